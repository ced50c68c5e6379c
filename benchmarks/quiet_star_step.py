"""Quiet-STaR training-step time and peak memory: diagonal thought attention vs the dense mask.

Issue #6. One training step (forward, backward, clip + AdamW) of the Quiet-STaR trainer's own step
function (`starjax.quiet_star.train.train_step`: sampled thoughts, talk losses, mixing head,
REINFORCE) for every sequence length L in {64, 128, 256} and thought length N = `n_ahead` in
{4, 8, 16}, with n_ahead_talk 4, 2 passes, batch 2 and f32 on a 4-layer width-128 decoder with
vocabulary 512 (the "small" preset at half width: 4 heads, 2 key/value heads, ffn 352).

Each (L, N) runs twice, each time in a fresh child process so its peak memory belongs to that run
alone (on CPU: the child's resident high-water mark during the training steps, reset after
compiling so the XLA compiler's transient memory is not counted as the step's, with the
whole-process peak kept as process_peak_mem_mb; on accelerators: the device's
peak_bytes_in_use):
  * "diag": the library as is, where a thought step attends to one causal L x L block plus a
    diagonal term per earlier thought step (`quiet_star.attention.thought_attention`);
  * "dense": the same step with the thought attention done the reference way: an explicit
    (L, L * S) mask over the base keys and every thought step's keys, through
    `quiet_star.attention.dense_thought_attention`. The benchmark swaps it in for
    `thought_attention` while the dense child traces its step (no library switch exists; the
    library itself is unchanged).

After the target configuration (or the longest L's rows where the target is not in the run), one
more child times the diag step for every N at that L in one process, interleaved in rounds
(`run_interleaved`, --interleave-rounds): the linearity target is judged on those times, since
per-N children also carry the machine's drift between processes. Under --budget-s it is skipped
when the time left is below an estimate from the runs before it.

A configuration whose compiled program would need more than --mem-cap-mb, or whose child runs past
--config-timeout-s, is recorded as skipped with the reason instead of running or hanging.

FLOPs (`step_flops`; model FLOPs, as for MFU). With M = N - 3 sampled thought tokens, T talk steps,
S = M + T + 2 forward steps, P passes, batch B, n_lin the parameters that take part in a matmul
(decoder projections and LM head; the embedding lookup is free), H query heads of width D:

  lin        = 2 * n_lin                                (matmuls of one row through the decoder)
  att(A)     = 4 * n_layers * H * D * A                 (QK^T and PV of one row over A keys)
  base       = B * L * (lin + att(L))
  thought    = B * P * (S - 1) * L * (lin + att(A)),    A = L + S - 1 (diag) or L * S (dense)
  talk       = B * P * T * L * (2 * dim * vocab + 2 * (3 * dim^2 + dim))  (talk logits, mixer)
  flops_per_step = 3 * (base + thought + talk)          (backward = 2 x forward)

Attention counts every key a row's score matrix holds (no causal halving), as train_step does.
The thought/talk steps are rematerialised in the backward pass, so the machine executes about one
more forward of them than counted (`executed_flops_per_step`). The achieved rate
flops_per_step / step_s is reported against the f32 matmul ceiling measured in the same run
(`mfu`), and against the datasheet peak on accelerators.

Reference figures (issue #6): the reference PyTorch implementation at this configuration, measured
on the CPU development machine: 5.8 s and 5.4 GB peak at L=256, N=16; 1.3 s and 2.0 GB at L=256,
N=4. Targets at L=256, N=16: >= 5x faster and >= 5x less peak memory than those figures, >= 3x
faster than the dense way in the same run, step time linear in N. Ratios against the reference
are only meaningful on that machine (`reference.comparable` says whether this run is on a CPU).

  python -m benchmarks.quiet_star_step --out /tmp/quiet_star_step.json [--quick]

Rows: seq_len, n_ahead, step_s, peak_mem_mb, dense_step_s, dense_peak_mem_mb (plus FLOPs, MFU,
ratios and per-run details).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # Allow `python benchmarks/quiet_star_step.py`.
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  __package__ = "benchmarks"  # pylint: disable=redefined-builtin

from benchmarks import common  # noqa: E402

# The decoder of issue #6: 4 layers, width 128, vocabulary 512 ("small" at half width).
MODEL = dict(vocab_size=512, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=352,
             max_seq_len=1024)
# --quick: a 1-layer width-32 decoder, so the smoke run takes seconds.
QUICK_MODEL = dict(vocab_size=512, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64,
                   max_seq_len=64)
SEQ_LENS = (64, 128, 256)
N_AHEADS = (4, 8, 16)
QUICK_SEQ_LENS = (16,)
QUICK_N_AHEADS = (4,)
N_AHEAD_TALK = 4
N_PASSES = 2
BATCH = 2
DTYPE = "float32"
VARIANTS = ("diag", "dense")
# The configuration the targets are set at.
TARGET_CONFIG = (256, 16)

GB = 1e9 / 2**20  # MiB per (decimal) GB; the conservative reading of the quoted figures.
REFERENCE = {
    "source": "issue #6: the reference PyTorch Quiet-STaR implementation (ezelikman/quiet-star) "
              "at this configuration, measured on the CPU development machine",
    "peak_mem_units": "quoted in GB, taken as 1e9 bytes (the stricter reading) and given in MiB",
    "rows": [
        {"seq_len": 256, "n_ahead": 16, "step_s": 5.8, "peak_mem_mb": 5.4 * GB},
        {"seq_len": 256, "n_ahead": 4, "step_s": 1.3, "peak_mem_mb": 2.0 * GB},
    ],
}
TARGETS = {"speedup_vs_reference": 5.0, "mem_reduction_vs_reference": 5.0,
           "speedup_vs_dense": 3.0}

FLOPS_FORMULA = (
    "flops_per_step = 3 * (base + thought + talk), with lin = 2 * n_lin, att(A) = 4 * n_layers * "
    "H * D * A, base = B * L * (lin + att(L)), thought = B * P * (S - 1) * L * (lin + att(A)) where "
    "A = L + S - 1 (diag) or L * S (dense), talk = B * P * T * L * (2 * dim * vocab + 2 * (3 * "
    "dim^2 + dim)); S = M + T + 2 steps, M = n_ahead - 3 sampled thought tokens, n_lin = "
    "parameters in matmuls (decoder projections + LM head). Remat recompute of the thought/talk "
    "steps is not counted (executed_flops_per_step adds it). mfu = flops_per_step / step_s / f32 "
    "matmul ceiling of the same run.")


# ----------------------------------------------------------------------------------------------
# Shapes and FLOPs.


def model_config(quick: bool = False) -> Any:
  """The decoder of the benchmark (`QUICK_MODEL` with quick)."""
  from starjax.models.config import ModelConfig  # pylint: disable=g-import-not-at-top

  return ModelConfig(**(QUICK_MODEL if quick else MODEL), dtype=DTYPE, remat="none")


def quiet_star_config(n_ahead: int) -> Any:
  """The objective settings: reference defaults with n_ahead N, 4 talk steps, 2 passes."""
  from starjax.quiet_star.config import QuietStarConfig  # pylint: disable=g-import-not-at-top

  return QuietStarConfig(n_ahead=n_ahead, n_ahead_talk=N_AHEAD_TALK, n_passes=N_PASSES)


def step_flops(model_cfg: Any, qcfg: Any, batch: int, seq_len: int, dense: bool = False
               ) -> dict[str, float]:
  """FLOPs of one training step by the formula of the module docstring.

  Returns:
    {"forward": ..., "flops_per_step": 3 x forward, "executed_flops_per_step": with the remat
    recompute of the thought and talk steps}.
  """
  c = model_cfg
  n_lin = c.num_params() - (0 if c.tie_embeddings else c.vocab_size * c.dim)
  lin = 2.0 * n_lin
  att = lambda keys: 4.0 * c.n_layers * c.n_heads * c.head_dim * keys
  n, s, p, t = seq_len, qcfg.n_steps, qcfg.n_passes, qcfg.n_ahead_talk
  keys = n * s if dense else n + s - 1
  base = batch * n * (lin + att(n))
  thought = batch * p * (s - 1) * n * (lin + att(keys))
  talk = batch * p * t * n * (2.0 * c.dim * c.vocab_size + 2.0 * (3 * c.dim**2 + c.dim))
  forward = base + thought + talk
  return {"forward": forward, "flops_per_step": 3.0 * forward,
          "executed_flops_per_step": 3.0 * forward + thought + talk}


# ----------------------------------------------------------------------------------------------
# One run of one configuration (in a child process).


@contextlib.contextmanager
def attention_variant(variant: str) -> Iterator[None]:
  """While active (during tracing), thought steps use the given attention ("diag" or "dense")."""
  from starjax.quiet_star import attention as qs_attn  # pylint: disable=g-import-not-at-top

  if variant == "diag":
    yield
    return
  if variant != "dense":
    raise ValueError(f"variant={variant!r}; expected one of {VARIANTS}")
  original = qs_attn.thought_attention
  qs_attn.thought_attention = qs_attn.dense_thought_attention
  try:
    yield
  finally:
    qs_attn.thought_attention = original


def _mem_cap_mb(device: Any, requested: float | None) -> float | None:
  """Largest compiled footprint a run may have: the flag, else half of RAM (CPU) or 90% of the
  device's limit."""
  if requested:
    return requested
  if device.platform == "cpu":
    total = common._mem_total_gb()  # pylint: disable=protected-access
    return total * 1024 * 0.5 if total else None
  try:
    limit = (device.memory_stats() or {}).get("bytes_limit")
  except Exception:  # pylint: disable=broad-except
    limit = None
  return 0.9 * limit / 2**20 if limit else None


def _vm_hwm_mb() -> float | None:
  """This process's resident high-water mark (VmHWM), or None off Linux."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return None


def _reset_peak_rss() -> bool:
  """Returns freed heap to the OS (glibc malloc_trim) and resets VmHWM to the current resident
  set (Linux >= 4.0), so the compiler's transient memory is not counted as the step's; False
  where that is not possible."""
  import ctypes  # pylint: disable=g-import-not-at-top

  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    return False
  return _vm_hwm_mb() is not None


def _compile_step(spec: dict[str, Any], n_ahead: int, variant: str) -> dict[str, Any]:
  """Builds the train state and rows of one (seq_len, n_ahead) and compiles its step.

  Returns a dict with compiled, state, rows, compile_s and memory (XLA's memory analysis or None).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from starjax.quiet_star import objective  # pylint: disable=g-import-not-at-top
  from starjax.quiet_star import train as qs_train  # pylint: disable=g-import-not-at-top
  from starjax.train import optim  # pylint: disable=g-import-not-at-top
  from starjax.train.state import TrainState  # pylint: disable=g-import-not-at-top

  model_cfg = model_config(spec["quick"])
  qcfg = quiet_star_config(n_ahead)
  batch, seq_len = spec["batch"], spec["seq_len"]
  ocfg = optim.OptimizerConfig(lr=1e-4, schedule="constant", weight_decay=0.1)
  tx = optim.make_optimizer(ocfg, total_steps=1000)
  schedule = optim.learning_rate_schedule(ocfg, total_steps=1000)
  params = objective.init_params(jax.random.key(0), qcfg, model_cfg)
  # Distinct buffers (start and end embeddings start as one array), so the state can be donated.
  params = jax.tree.map(lambda x: jnp.array(x, copy=True), params)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  rng = np.random.default_rng(0)
  rows = {"tokens": jnp.asarray(rng.integers(0, model_cfg.vocab_size, (batch, seq_len)),
                                jnp.int32),
          "mask": jnp.ones((batch, seq_len), jnp.bool_),
          "example_ids": jnp.arange(batch, dtype=jnp.int32)}

  def step(state, rows):
    return qs_train.train_step(state, rows, cfg=qcfg, model_cfg=model_cfg, tx=tx,
                               schedule=schedule, seed=0, mesh=None)

  t0 = time.perf_counter()
  with attention_variant(variant):
    compiled = jax.jit(step, donate_argnums=(0,)).lower(state, rows).compile()
  return {"compiled": compiled, "state": state, "rows": rows,
          "compile_s": time.perf_counter() - t0, "memory": compiled.memory_analysis()}


def run_config(spec: dict[str, Any]) -> dict[str, Any]:
  """Measures one (seq_len, n_ahead, variant); `spec` also holds quick, steps, warmup, max_s."""
  t_start = time.perf_counter()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  device = jax.devices()[0]
  jnp.zeros(()).block_until_ready()  # Starts the runtime before the baseline is read.
  baseline_rss_mb = common.peak_rss_mb()
  built = _compile_step(spec, spec["n_ahead"], spec["variant"])
  compiled, state, rows, mem = built["compiled"], built["state"], built["rows"], built["memory"]
  compile_s = built["compile_s"]
  footprint_mb = None
  if mem is not None:
    footprint_mb = (mem.temp_size_in_bytes + mem.argument_size_in_bytes
                    + mem.output_size_in_bytes) / 2**20
  row: dict[str, Any] = {
      "compile_s": compile_s, "baseline_rss_mb": baseline_rss_mb,
      "xla_temp_mb": mem.temp_size_in_bytes / 2**20 if mem else None,
      "xla_footprint_mb": footprint_mb,
  }
  cap = _mem_cap_mb(device, spec.get("mem_cap_mb"))
  row["mem_cap_mb"] = cap
  if cap and footprint_mb and footprint_mb > cap:
    row["skipped"] = (f"memory cap: compiled footprint {footprint_mb:.0f} MB > cap {cap:.0f} MB")
    return row

  losses = []

  def run_step():
    nonlocal state
    state, metrics, _ = compiled(state, rows)
    jax.block_until_ready((state, metrics))
    losses.append(float(metrics["loss"]))

  load_before = os.getloadavg()[0]
  after_compile_rss_mb = common.peak_rss_mb()
  reset = device.platform == "cpu" and _reset_peak_rss()
  timing = common.time_fn(run_step, warmup=spec["warmup"], repeats=spec["steps"],
                          max_s=spec["max_s"])
  # ru_maxrss shares VmHWM's counter, so the whole-process peak is the larger of the two phases.
  process_peak_mb = max(after_compile_rss_mb, common.peak_rss_mb(), _vm_hwm_mb() or 0.0)
  if device.platform != "cpu":
    peak_mem_mb = common.device_peak_mem_mb(device)
    source = "device memory_stats peak_bytes_in_use"
  elif reset:
    peak_mem_mb = _vm_hwm_mb()
    source = ("resident high-water mark of the child during the training steps (VmHWM reset "
              "after compiling; includes the runtime, parameters and optimizer state)")
  else:
    peak_mem_mb = process_peak_mb
    source = "ru_maxrss of the child process (whole process: runtime, compile, steps)"
  row.update(step_s=timing.median, step_min_s=timing.min, times_s=list(timing.times),
             peak_mem_mb=peak_mem_mb, peak_mem_source=source,
             process_peak_mem_mb=process_peak_mb, compile_peak_rss_mb=after_compile_rss_mb,
             first_loss=losses[0], loss=losses[-1], loss_finite=bool(np.isfinite(losses).all()),
             load_avg=[load_before, os.getloadavg()[0]],
             wall_s=time.perf_counter() - t_start)
  return row


def run_interleaved(spec: dict[str, Any]) -> dict[str, Any]:
  """Times the diag step at one seq_len for every N of spec["n_aheads"] in one process, in rounds.

  The linearity check compares step times across N, and on a shared VM the machine's speed drifts
  between child processes by more than the effect it looks for (10-30% on the 2-core VMs). Here
  each round times one step of every N, in an order rotated by one each round, so a slow moment
  touches all N alike. Peak memory is not measured (the runs share one process).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top

  n_aheads, rounds = list(spec["n_aheads"]), int(spec["rounds"])
  if len(n_aheads) < 2 or rounds < 1:
    raise ValueError(f"interleaved timing needs >= 2 N and >= 1 round; got {n_aheads}, {rounds}")
  t_start = time.perf_counter()
  built = {n: _compile_step(spec, n, "diag") for n in n_aheads}
  times: dict[int, list[float]] = {n: [] for n in n_aheads}
  losses: dict[int, list[float]] = {n: [] for n in n_aheads}

  def run_step(n: int) -> float:
    b = built[n]
    t0 = time.perf_counter()
    b["state"], metrics, _ = b["compiled"](b["state"], b["rows"])
    loss = float(metrics["loss"])  # Blocks until the step is done.
    elapsed = time.perf_counter() - t0
    losses[n].append(loss)
    return elapsed

  for _ in range(spec.get("warmup", 1)):
    for n in n_aheads:
      run_step(n)
  for r in range(rounds):
    for i in range(len(n_aheads)):
      n = n_aheads[(i + r) % len(n_aheads)]
      times[n].append(run_step(n))
  return {"seq_len": spec["seq_len"], "n_ahead": n_aheads, "rounds": rounds,
          "step_s": [statistics.median(times[n]) for n in n_aheads],
          "times_s": [times[n] for n in n_aheads],
          "compile_s": [built[n]["compile_s"] for n in n_aheads],
          "loss_finite": bool(all(np.isfinite(losses[n]).all() for n in n_aheads)),
          "order": "round r times N in the order n_ahead[r:] + n_ahead[:r]",
          "wall_s": time.perf_counter() - t_start}


# ----------------------------------------------------------------------------------------------
# Driver.


def _ratio(a: float | None, b: float | None) -> float | None:
  return a / b if a and b else None


def _fill_row(row: dict[str, Any], runs: dict[str, dict[str, Any]], model_cfg: Any,
              ceiling: dict[str, Any], device_kind: str) -> None:
  """Puts the diag and dense runs of one (L, N) into `row` (diag figures unprefixed)."""
  qcfg = quiet_star_config(row["n_ahead"])
  ceil = ceiling["gflops"].get(DTYPE)
  peak = common.spec_peak_tflops(device_kind, DTYPE)
  for variant, run in runs.items():
    pre = "" if variant == "diag" else "dense_"
    flops = step_flops(model_cfg, qcfg, row["batch"], row["seq_len"], dense=variant == "dense")
    step_s = run.get("step_s")
    gflops = flops["flops_per_step"] / step_s / 1e9 if step_s else None
    row.update({f"{pre}step_s": step_s, f"{pre}peak_mem_mb": run.get("peak_mem_mb"),
                f"{pre}process_peak_mem_mb": run.get("process_peak_mem_mb"),
                f"{pre}flops_per_step": flops["flops_per_step"],
                f"{pre}executed_flops_per_step": flops["executed_flops_per_step"],
                f"{pre}gflops_per_s": gflops,
                f"{pre}mfu": gflops / ceil if gflops and ceil else None,
                f"{pre}mfu_vs_spec_peak": gflops / (peak * 1e3) if gflops and peak else None,
                f"{pre}run": run})
    note = run.get("error") or run.get("skipped")
    if note:
      row["skipped" if variant == "diag" else "dense_skipped"] = note
  row["tokens_per_s"] = _ratio(row["batch"] * row["seq_len"], row.get("step_s"))
  # MFU as the dense way would count it (its own, larger, attention work) is dense_mfu; against
  # the diag algorithm's FLOPs, the dense step reaches:
  row["dense_useful_mfu"] = (row["flops_per_step"] / row["dense_step_s"] / 1e9 / ceil
                             if row.get("dense_step_s") and ceil else None)
  # Both start from the same parameters and thought keys: their first losses must agree.
  first = [runs.get(v, {}).get("first_loss") for v in VARIANTS]
  row["loss_diff_vs_dense"] = abs(first[0] - first[1]) if None not in first else None
  row["speedup_vs_dense"] = _ratio(row.get("dense_step_s"), row.get("step_s"))
  row["mem_reduction_vs_dense"] = _ratio(row.get("dense_peak_mem_mb"), row.get("peak_mem_mb"))


def linearity(rows: list[dict[str, Any]], prefix: str = "") -> list[dict[str, Any]]:
  """Per sequence length: does step time grow linearly in N?

  step_ratio is step_s at the largest N over the smallest; n_ratio is N's own ratio (proportional
  growth) and flop_ratio the FLOP model's (linear in S = N + 3 plus the fixed base pass, so below
  n_ratio; step_vs_flop_ratio is 1 when time tracks it). With three or more N, chord_deviation
  is how far the middle N's step time lies from the straight line through the two ends, relative
  to that line (0 for linear growth, negative when the curve bends upwards, as quadratic growth
  does). `linear`: step_ratio <= 1.1 n_ratio and chord_deviation >= -0.1.
  """
  out = []
  for seq_len in sorted({r["seq_len"] for r in rows}):
    pts = sorted((r["n_ahead"], r[f"{prefix}step_s"], r[f"{prefix}flops_per_step"])
                 for r in rows if r["seq_len"] == seq_len and r.get(f"{prefix}step_s"))
    if len(pts) < 2:
      continue
    (n0, s0, f0), (n1, s1, f1) = pts[0], pts[-1]
    entry = {"seq_len": seq_len, "n_ahead": [p[0] for p in pts],
             "step_s": [p[1] for p in pts], "step_ratio": s1 / s0, "n_ratio": n1 / n0,
             "flop_ratio": f1 / f0, "step_vs_flop_ratio": s1 / s0 / (f1 / f0),
             "chord_deviation": None}
    if len(pts) >= 3:
      nm, sm, _ = pts[len(pts) // 2]
      chord = s0 + (s1 - s0) * (nm - n0) / (n1 - n0)
      entry["chord_deviation"] = (sm - chord) / chord
    # Linear (affine) growth cannot exceed proportional growth; allow 10% for noise.
    entry["linear"] = entry["step_ratio"] <= 1.1 * entry["n_ratio"] and (
        entry["chord_deviation"] is None or entry["chord_deviation"] >= -0.1)
    out.append(entry)
  return out


def interleaved_rows(inter: dict[str, Any], model_cfg: Any) -> list[dict[str, Any]]:
  """The interleaved timings as rows `linearity` reads (seq_len, n_ahead, step_s, FLOPs)."""
  out = []
  for n, step_s in zip(inter["n_ahead"], inter["step_s"]):
    flops = step_flops(model_cfg, quiet_star_config(n), BATCH, inter["seq_len"])
    out.append({"seq_len": inter["seq_len"], "n_ahead": n, "step_s": step_s,
                "flops_per_step": flops["flops_per_step"]})
  return out


def compare(rows: list[dict[str, Any]], backend: str,
            interleaved: list[dict[str, Any]] | None = None) -> dict[str, Any]:
  """Ratios against the quoted reference figures, the dense way and the targets.

  `interleaved`: rows from `interleaved_rows`; where they cover the target sequence length, the
  linearity target is judged on them (one process, N interleaved) rather than on the per-N child
  processes, whose step times also carry the machine's drift between processes.
  """
  by_cfg = {(r["seq_len"], r["n_ahead"]): r for r in rows}
  refs = []
  for ref in REFERENCE["rows"]:
    r = by_cfg.get((ref["seq_len"], ref["n_ahead"]), {})
    refs.append({**ref, "speedup": _ratio(ref["step_s"], r.get("step_s")),
                 "mem_reduction": _ratio(ref["peak_mem_mb"], r.get("peak_mem_mb")),
                 # Against the whole child process's peak, the XLA compiler's included.
                 "mem_reduction_incl_compile": _ratio(ref["peak_mem_mb"],
                                                      r.get("process_peak_mem_mb"))})
  target = by_cfg.get(TARGET_CONFIG, {})
  ref = next(x for x in refs if (x["seq_len"], x["n_ahead"]) == TARGET_CONFIG)
  lin = linearity(rows)
  lin_inter = linearity(interleaved) if interleaved else []
  lin_target = next((x for x in lin_inter if x["seq_len"] == TARGET_CONFIG[0]), None)
  lin_source = "interleaved" if lin_target else "per_config_children"
  lin_target = lin_target or next((x for x in lin if x["seq_len"] == TARGET_CONFIG[0]), None)
  met = lambda x, bound: None if x is None else x >= bound
  return {
      "reference": {**REFERENCE, "rows": refs, "comparable": backend == "cpu"},
      "targets": {
          "config": {"seq_len": TARGET_CONFIG[0], "n_ahead": TARGET_CONFIG[1]},
          "bounds": TARGETS,
          "speedup_vs_reference": ref["speedup"],
          "mem_reduction_vs_reference": ref["mem_reduction"],
          "mem_reduction_vs_reference_incl_compile": ref["mem_reduction_incl_compile"],
          "speedup_vs_dense": target.get("speedup_vs_dense"),
          "met": {
              "speedup_vs_reference": met(ref["speedup"], TARGETS["speedup_vs_reference"]),
              "mem_reduction_vs_reference": met(ref["mem_reduction"],
                                                TARGETS["mem_reduction_vs_reference"]),
              "speedup_vs_dense": met(target.get("speedup_vs_dense"),
                                      TARGETS["speedup_vs_dense"]),
              "linear_in_n": lin_target["linear"] if lin_target else None,
          },
          "linear_in_n_source": lin_source if lin_target else None,
      },
      "linear_in_n": lin,
      "linear_in_n_interleaved": lin_inter,
      "dense_linear_in_n": linearity(rows, "dense_"),
  }


def summary_table(rows: list[dict[str, Any]]) -> str:
  headers = ["L", "N", "step s", "peak MB", "GFLOP/s", "MFU", "dense step s", "dense peak MB",
             "vs dense"]
  body = []
  for r in rows:
    body.append([r["seq_len"], r["n_ahead"], r.get("skipped") or r.get("step_s"),
                 r.get("peak_mem_mb"), r.get("gflops_per_s"), r.get("mfu"),
                 r.get("dense_skipped") or r.get("dense_step_s"), r.get("dense_peak_mem_mb"),
                 r.get("speedup_vs_dense")])
  return common.markdown_table(headers, body)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = common.base_parser(__doc__.splitlines()[0])
  p.add_argument("--seq-lens", default=None, help="Comma list (default 64,128,256).")
  p.add_argument("--n-aheads", default=None, help="Comma list of N (default 4,8,16).")
  p.add_argument("--no-dense", action="store_true", help="Skip the dense-mask runs.")
  p.add_argument("--steps", type=int, default=None, help="Timed steps (median reported).")
  p.add_argument("--warmup", type=int, default=1, help="Untimed steps after compiling.")
  p.add_argument("--interleave-rounds", type=int, default=None,
                 help="Rounds of the interleaved timing of every N at the longest L, for the "
                      "linearity check (default 3; 0 turns it off; needs >= 2 N).")
  p.add_argument("--config-timeout-s", type=float, default=None,
                 help="Wall-clock cap of one run's child process (default 300; quick 120).")
  p.add_argument("--mem-cap-mb", type=float, default=None,
                 help="Skip runs whose compiled footprint exceeds this (default: half of RAM on "
                      "CPU, 90%% of the device's memory on accelerators).")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)

  if args.child is not None:  # Child process: one run.
    spec = json.loads(args.child)
    row = run_interleaved(spec) if "n_aheads" in spec else run_config(spec)
    common.write_json(args.child_out, row)
    return row

  t_start = time.perf_counter()
  started = common.now_iso()
  machine = common.machine_info()
  ceiling = common.get_ceiling(args.ceiling, machine["name"], quick=args.quick)
  ints = lambda text: [int(x) for x in text.split(",") if x]
  seq_lens = ints(args.seq_lens) if args.seq_lens else list(
      QUICK_SEQ_LENS if args.quick else SEQ_LENS)
  n_aheads = ints(args.n_aheads) if args.n_aheads else list(
      QUICK_N_AHEADS if args.quick else N_AHEADS)
  steps = args.steps or (2 if args.quick else 3)
  config_timeout = args.config_timeout_s or (120.0 if args.quick else 300.0)
  variants = ("diag",) if args.no_dense else VARIANTS
  rounds = 3 if args.interleave_rounds is None else args.interleave_rounds
  model_cfg = model_config(args.quick)

  out = args.out or common.RESULTS_DIR / f"quiet_star_step-{machine['name']}-{started[:10]}.json"
  result: dict[str, Any] = {
      "benchmark": "quiet_star_step", "machine": machine, "quick": args.quick,
      "started_at": started, "flops_formula": FLOPS_FORMULA, "ceiling": ceiling,
      "settings": {
          "model": {**(QUICK_MODEL if args.quick else MODEL), "dtype": DTYPE,
                    "n_params": model_cfg.num_params()},
          "n_ahead_talk": N_AHEAD_TALK, "n_passes": N_PASSES, "batch": BATCH,
          "thought_tokens": "n_ahead - 3 sampled (reference training), S = n_ahead + 3 steps",
          "step": "starjax.quiet_star.train.train_step: value_and_grad of the Quiet-STaR loss, "
                  "clip_by_global_norm(1.0) + AdamW(lr 1e-4 constant, wd 0.1 on matrices); "
                  "remat_steps on (the library default)",
          "dense": "same step, thought attention through dense_thought_attention: an explicit "
                   "(L, L * S) mask over the base keys and all S - 1 thought-step slots at every "
                   "step (the in-scan buffer has fixed size; the reference grows its key cache "
                   "with the step, so this baseline does up to ~2x the reference's attention "
                   "work)",
          "steps": steps, "warmup": args.warmup, "config_timeout_s": config_timeout,
          "interleave_rounds": rounds,
          "mem_cap_mb": args.mem_cap_mb},
      "rows": [], "interleaved": None}
  # Most important first (the target configuration, then the other N at the longest L), so a
  # tight budget skips the least important; each (L, N) runs diag then dense.
  plan = sorted(((q, n) for q in seq_lens for n in n_aheads),
                key=lambda c: (c != TARGET_CONFIG, -c[0], -c[1]))
  # The interleaved timing of every N at the longest L (linearity) comes right after the target
  # configuration when the plan has it (under a budget it matters more than the other N's own
  # rows), else after the longest L's rows.
  has_target = TARGET_CONFIG in plan
  inter_len = None
  if rounds > 0 and len(n_aheads) >= 2:
    inter_len = TARGET_CONFIG[0] if has_target else max(seq_lens)

  def child_timeout(estimate_s: float = 0.0) -> float | None:
    """The time cap of the next child, or None when the budget has no room for it."""
    elapsed = time.perf_counter() - t_start
    if args.budget_s is None:
      return config_timeout
    if elapsed + estimate_s >= args.budget_s - 15:
      return None
    return min(config_timeout, args.budget_s - elapsed)

  def inter_rows() -> list[dict[str, Any]]:
    inter = result["interleaved"] or {}
    return interleaved_rows(inter, model_cfg) if inter.get("step_s") else []

  def run_interleaved_phase() -> None:
    # Each N compiles once and runs 1 + rounds steps: about a child run of the longest N each
    # (shorter N are cheaper), so len(N) x 0.75 x that run's wall time where one ran before.
    walls = [r.get("run", {}).get("wall_s") for r in result["rows"] if r["seq_len"] == inter_len]
    walls = [w for w in walls if w]
    estimate = 0.75 * len(n_aheads) * max(walls) if walls else 0.0
    timeout = child_timeout(estimate)
    if timeout is None:
      result["interleaved"] = {"seq_len": inter_len,
                               "skipped": f"budget (needs ~{estimate:.0f} s)"}
      return
    spec = {"seq_len": inter_len, "n_aheads": sorted(n_aheads), "rounds": rounds,
            "batch": BATCH, "quick": args.quick, "warmup": args.warmup}
    print(f"[quiet_star_step] L {inter_len} N {sorted(n_aheads)} interleaved x{rounds} ...",
          flush=True)
    result["interleaved"] = common.run_child("benchmarks.quiet_star_step", spec, timeout)
    result.update(compare(result["rows"], machine["jax_backend"], inter_rows()))
    common.write_json(out, result)

  for seq_len, n_ahead in plan:
    if inter_len is not None and result["interleaved"] is None and (
        seq_len < inter_len or (has_target and (seq_len, n_ahead) != TARGET_CONFIG)):
      run_interleaved_phase()
    row: dict[str, Any] = {"model": "quiet_star_4x128" if not args.quick else "quiet_star_quick",
                           "seq_len": seq_len, "n_ahead": n_ahead, "batch": BATCH,
                           "dtype": DTYPE}
    runs = {}
    for variant in variants:
      timeout = child_timeout()
      if timeout is None:
        runs[variant] = {"skipped": "budget"}
        continue
      spec = {"seq_len": seq_len, "n_ahead": n_ahead, "variant": variant, "batch": BATCH,
              "quick": args.quick, "steps": steps, "warmup": args.warmup,
              "max_s": 0.3 * timeout, "mem_cap_mb": args.mem_cap_mb}
      print(f"[quiet_star_step] L {seq_len} N {n_ahead} {variant} ...", flush=True)
      runs[variant] = common.run_child("benchmarks.quiet_star_step", spec, timeout)
    _fill_row(row, runs, model_cfg, ceiling, machine["device_kind"])
    result["rows"].append(row)
    result["rows"].sort(key=lambda r: (r["seq_len"], r["n_ahead"]))
    result.update(compare(result["rows"], machine["jax_backend"], inter_rows()))
    common.write_json(out, result)  # Partial results survive an interrupted run.
  if inter_len is not None and result["interleaved"] is None:
    run_interleaved_phase()
  result["finished_at"] = common.now_iso()
  result["wall_s"] = time.perf_counter() - t_start
  common.write_json(out, result)
  print(f"ceiling GFLOP/s ({ceiling['source']}): "
        + ", ".join(f"{d} {common.fmt(g)}" for d, g in ceiling["gflops"].items()))
  print(summary_table(result["rows"]))
  inter = result.get("interleaved") or {}
  if inter.get("step_s"):
    print(f"interleaved (L {inter['seq_len']}, {inter['rounds']} rounds): "
          + ", ".join(f"N={n} {common.fmt(t)} s" for n, t in zip(inter["n_ahead"],
                                                                 inter["step_s"])))
  print("targets: " + json.dumps(result["targets"]["met"])
        + f" (linearity from {result['targets']['linear_in_n_source']})")
  print(f"wrote {out}")
  return result


if __name__ == "__main__":
  main()
