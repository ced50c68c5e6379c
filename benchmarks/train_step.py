"""Training throughput and MFU of starjax's own train step, with PyTorch (HF transformers) as peer.

For each (model, sequence length, compute dtype) this runs `starjax.train.step.jit_train_step`
(forward, backward, clip + AdamW; 1-device mesh) on random tokens and reports tokens/s, model FLOPs
utilisation (MFU) against the matmul ceiling measured in the same run, and peak memory. Where
torch runs on the same device (the CPU build), the same step - HF `LlamaForCausalLM` built with
`config_to_hf` and loaded with the same weights (`params_to_hf`), cross-entropy, backward, clip,
AdamW - runs in the same process, its steps interleaved with JAX's so both see the same machine
load, and its tokens/s is the peer figure.

Each configuration runs in a fresh child process, so peak memory (ru_maxrss on CPU, the device's
peak_bytes_in_use on accelerators) belongs to that configuration alone; JAX's peak is read before
torch is imported.

  python -m benchmarks.train_step --out /tmp/train_step.json [--quick] [--models smollm2_135m]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # Allow `python benchmarks/train_step.py`.
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  __package__ = "benchmarks"  # pylint: disable=redefined-builtin

from benchmarks import common  # noqa: E402

# Model shapes: a starjax preset name, or explicit ModelConfig fields.
MODELS: dict[str, dict[str, Any]] = {
    "tiny": {"preset": "tiny"},
    "small": {"preset": "small"},
    "smollm2_135m": {"preset": "smollm2_135m"},
    # TinyLlama-1.1B's shape: the ~1B accelerator configuration.
    "1b": {"fields": dict(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                          ffn_dim=5632, max_seq_len=4096)},
}
# Tokens per step (batch = tokens // seq_len) on CPU and on accelerators.
TOKENS_PER_STEP = {
    "cpu": {"tiny": 128, "small": 4096, "smollm2_135m": 1024, "1b": 1024},
    # Moderate batches: remat is off by default, and every layer's attention matrix is kept.
    "accelerator": {"tiny": 4096, "small": 32768, "smollm2_135m": 8192, "1b": 8192},
}
DEFAULT_MODELS = {"cpu": ("smollm2_135m", "small"),
                  "accelerator": ("smollm2_135m", "small", "1b")}

FLOPS_FORMULA = (
    "flops_per_step = 6 * N * tokens + 12 * n_layers * S * n_heads * head_dim * tokens, where "
    "tokens = batch * seq_len, S = min(seq_len, sliding_window) and N = parameters that take part "
    "in a matmul: num_params() minus the input embedding of untied models (a tied embedding is "
    "counted once, as the LM head; the lookup itself is free). The attention term counts the full "
    "S x S score and value matmuls (no causal halving), forward + backward (x3). MFU = "
    "flops_per_step / step_time / ceiling, with the ceiling of the row's compute dtype from "
    "matmul_ceiling in the same run.")


# ----------------------------------------------------------------------------------------------
# Shapes and FLOPs.


def model_config(model: str, dtype: str, remat: str = "none", attention: str = "auto") -> Any:
  from starjax.models import config as config_lib  # pylint: disable=g-import-not-at-top

  spec = MODELS[model]
  if "preset" in spec:
    return config_lib.preset(spec["preset"], dtype=dtype, remat=remat, attention=attention)
  return config_lib.ModelConfig(**spec["fields"], dtype=dtype, remat=remat, attention=attention)


def matmul_params(cfg: Any) -> int:
  """Parameters that take part in a matmul (see FLOPS_FORMULA)."""
  return cfg.num_params() - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim)


def train_flops(cfg: Any, batch: int, seq_len: int) -> float:
  """Model FLOPs of one training step (forward + backward) by FLOPS_FORMULA."""
  tokens = batch * seq_len
  span = min(seq_len, cfg.sliding_window or seq_len)
  attn = 12 * cfg.n_layers * span * cfg.n_heads * cfg.head_dim * tokens
  return 6.0 * matmul_params(cfg) * tokens + attn


# ----------------------------------------------------------------------------------------------
# One configuration (runs in a child process).


def _synthetic_rows(cfg: Any, batch: int, seq_len: int) -> dict[str, Any]:
  import numpy as np  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (batch, seq_len + 1), dtype=np.int32)
  return {
      "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
      "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy(),
      "segment_ids": np.ones((batch, seq_len), np.int32),
      "loss_mask": np.ones((batch, seq_len), np.float32),
  }


class _TorchPeer:
  """The same model and step in PyTorch: HF causal LM, cross-entropy, backward, clip, AdamW."""

  def __init__(self, cfg: Any, params: Any, rows: dict[str, Any], dtype: str, device: str):
    import numpy as np  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top

    from starjax.models import hf  # pylint: disable=g-import-not-at-top

    self.torch = torch
    self.device = device
    self.dtype = dtype
    self.threads = None
    if device == "cpu":
      self.threads = common.cpu_count()
      torch.set_num_threads(self.threads)
    hf_config = hf.config_to_hf(cfg)
    config = transformers.AutoConfig.for_model(
        hf_config["model_type"], **{k: v for k, v in hf_config.items() if k != "model_type"})
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model = model.to(device=device, dtype=torch.float32)
    state = {k: torch.from_numpy(np.array(v, np.float32, copy=True)) for k, v in
             hf.params_to_hf(cfg, params).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed = {"lm_head.weight"} if cfg.tie_embeddings else set()
    if unexpected or set(missing) - allowed:
      raise RuntimeError(f"HF weights do not match: missing={missing}, unexpected={unexpected}")
    if cfg.tie_embeddings and (model.get_output_embeddings().weight.data_ptr()
                               != model.get_input_embeddings().weight.data_ptr()):
      raise RuntimeError("HF model did not tie the LM head to the embedding.")
    model.train()
    self.model = model
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                  {"params": no_decay, "weight_decay": 0.0}],
                                 lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    self.inputs = torch.from_numpy(rows["inputs"]).long().to(device)
    self.targets = torch.from_numpy(rows["targets"]).long().to(device)

  def pick_threads(self) -> dict[str, float]:
    """Times one step at 1 and at all cores and keeps the faster thread count (CPU only).

    OpenMP's spinning barriers collapse when other processes share the cores: on the 2-core dev
    machine under load, 2 threads measured 4x slower than 1. The peer gets its best setting.
    """
    torch = self.torch
    probe = {}
    for n in sorted({1, common.cpu_count()}, reverse=True):
      torch.set_num_threads(n)
      t0 = time.perf_counter()
      self.step()
      probe[str(n)] = time.perf_counter() - t0
    self.threads = int(min(probe, key=probe.get))
    torch.set_num_threads(self.threads)
    return probe

  def step(self) -> float:
    torch = self.torch
    ctx = (torch.autocast(self.device, dtype=torch.bfloat16) if self.dtype == "bfloat16"
           else torch.autocast(self.device, enabled=False))
    with ctx:
      logits = self.model(input_ids=self.inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), self.targets.flatten())
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
    self.opt.step()
    value = loss.item()  # Synchronises on accelerators.
    return value


def _kernel_share(before: resource.struct_rusage) -> tuple[float, int]:
  """(system CPU seconds, minor page faults) of this process since `before`.

  On the 2-core dev VM, XLA's step re-faults its ~3 GB of freed temporaries every step, and the
  faults cost 3-4x more right after torch's step (4 vs 13 s of system time per JAX step): the
  same-run peer comparison is only fair with these numbers next to it.
  """
  now = resource.getrusage(resource.RUSAGE_SELF)
  return now.ru_stime - before.ru_stime, now.ru_minflt - before.ru_minflt


def _torch_device(backend: str) -> str | None:
  """Where the torch peer runs: the same device as JAX, or None (no peer)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  if backend == "cpu":
    return "cpu"
  if backend == "gpu" and torch.cuda.is_available():
    return "cuda"
  return None


def _attention_kernel(cfg: Any, backend: str) -> str:
  """The kernel the model's training pass uses (see attention.dot_product_attention)."""
  from starjax.models import attention  # pylint: disable=g-import-not-at-top

  if cfg.attention == "auto":
    if backend == "cpu":
      return "recompute (CPU)"
    return "cudnn" if attention.cudnn_flash_supported(cfg.compute_dtype, cfg.head_dim) else "xla"
  return cfg.attention


def run_config(spec: dict[str, Any]) -> dict[str, Any]:
  """Measures one configuration; `spec` holds model, seq_len, batch, dtype, remat, steps, ..."""
  if spec["torch"]:
    # A GPU peer shares the card: JAX's default preallocation (75%) would leave torch too little
    # for a ~1B model's AdamW state and activations. No effect on CPU.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from starjax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from starjax.train import optim  # pylint: disable=g-import-not-at-top
  from starjax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from starjax.train import step as step_lib  # pylint: disable=g-import-not-at-top

  t_start = time.perf_counter()
  cfg = model_config(spec["model"], spec["dtype"], spec["remat"], spec.get("attention", "auto"))
  batch, seq_len = spec["batch"], spec["seq_len"]
  backend = jax.default_backend()
  device = jax.devices()[0]
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(), devices=[device])
  tx = optim.make_optimizer(
      optim.OptimizerConfig(lr=1e-4, schedule="constant", weight_decay=0.1), total_steps=1000)
  shardings = state_lib.state_shardings(cfg, tx, mesh)
  state = state_lib.create_train_state(cfg, tx, mesh, jax.random.key(0))
  rows = _synthetic_rows(cfg, batch, seq_len)
  dbatch = step_lib.device_batch(rows, mesh)
  step = step_lib.jit_train_step(cfg, tx, mesh, shardings, batch)

  t0 = time.perf_counter()
  compiled = step.lower(state, dbatch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()

  def jax_step():
    nonlocal state
    state, metrics = compiled(state, dbatch)
    jax.block_until_ready((state, metrics))
    return metrics

  for _ in range(spec["warmup"]):
    jax_step()
  if backend == "cpu":
    peak_mem_mb = common.peak_rss_mb()
    peak_mem_source = "ru_maxrss of the child process (whole process, after compile + warmup)"
  else:
    peak_mem_mb = common.device_peak_mem_mb(device)
    peak_mem_source = "device memory_stats peak_bytes_in_use"

  peer, torch_loss, torch_error, thread_probe = None, None, None, None
  torch_device = _torch_device(backend) if spec["torch"] else None
  if torch_device is not None:
    try:
      # The peer starts from the parameters of JAX's next (first timed) step, so the two losses of
      # that step must agree: a check that the peer is the same model.
      params = jax.tree.map(lambda x: np.array(x, dtype=np.float32, copy=True), state.params)
      peer = _TorchPeer(cfg, params, rows, spec["dtype"], torch_device)
      del params
      torch_loss = peer.step()
      for _ in range(spec["warmup"] - 1):
        peer.step()
      if torch_device == "cpu":
        thread_probe = peer.pick_threads()
    except Exception as e:  # pylint: disable=broad-except
      peer, torch_error = None, f"{type(e).__name__}: {e}"

  # Timed steps; with a peer, JAX and torch alternate (in alternating order) so both see the same
  # machine load.
  jax_times, torch_times, jax_losses = [], [], []
  kernel = {"jax": [], "torch": []}  # Per step: (system CPU s, minor page faults).
  deadline = t_start + spec["max_s"]
  load_before = os.getloadavg()[0]
  for i in range(spec["steps"]):
    t_iter = time.perf_counter()
    order = ("jax", "torch") if i % 2 == 0 else ("torch", "jax")
    for who in order:
      if who == "jax":
        ru0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        metrics = jax_step()
        jax_times.append(time.perf_counter() - t0)
        kernel["jax"].append(_kernel_share(ru0))
        jax_losses.append(float(metrics["loss"]))
      elif peer is not None:
        ru0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        peer.step()
        torch_times.append(time.perf_counter() - t0)
        kernel["torch"].append(_kernel_share(ru0))
    if time.perf_counter() + (time.perf_counter() - t_iter) > deadline:
      break
  loss_diff = None if torch_loss is None else abs(jax_losses[0] - torch_loss)

  jt = common.timing_from(jax_times)
  tokens = batch * seq_len
  row = {
      "model": spec["model"], "seq_len": seq_len, "dtype": spec["dtype"], "batch": batch,
      "tokens_per_step": tokens, "remat": spec["remat"], "attention": cfg.attention,
      "attention_kernel": _attention_kernel(cfg, backend), "n_params": cfg.num_params(),
      "step_time_s": jt.median, "tokens_per_s": tokens / jt.median,
      "flops_per_step": train_flops(cfg, batch, seq_len),
      "peak_mem_mb": peak_mem_mb, "peak_mem_source": peak_mem_source,
      "xla_temp_mb": mem.temp_size_in_bytes / 2**20 if mem else None,
      "xla_argument_mb": mem.argument_size_in_bytes / 2**20 if mem else None,
      "compile_s": compile_s, "jax_times_s": list(jt.times),
      "jax_sys_s_and_page_faults": kernel["jax"],
      # 1-minute load average before and after the timed steps: other processes' share of the CPU.
      "load_avg": [load_before, os.getloadavg()[0]],
      "torch_tokens_per_s": None,
  }
  if torch_times:
    tt = common.timing_from(torch_times)
    row.update(torch_tokens_per_s=tokens / tt.median, torch_step_time_s=tt.median,
               torch_times_s=list(tt.times), torch_device=torch_device,
               speedup_vs_torch=tt.median / jt.median, loss_diff_vs_torch=loss_diff,
               torch_sys_s_and_page_faults=kernel["torch"],
               torch_threads=peer.threads, torch_thread_probe_s=thread_probe)
  if torch_error:
    row["torch_error"] = torch_error
  row["wall_s"] = time.perf_counter() - t_start
  return row


# ----------------------------------------------------------------------------------------------
# Driver.


def _csv(text: str) -> list[str]:
  return [t for t in text.split(",") if t]


def _add_mfu(row: dict[str, Any], ceiling: dict[str, Any], device_kind: str) -> None:
  gflops = row["flops_per_step"] / row["step_time_s"] / 1e9
  row["model_gflops_per_s"] = gflops
  ceil = ceiling["gflops"].get(row["dtype"])
  row["ceiling_gflops"] = ceil
  row["mfu"] = gflops / ceil if ceil else None
  row["mfu_vs_f32_ceiling"] = gflops / ceiling["gflops"]["float32"]
  peak = common.spec_peak_tflops(device_kind, row["dtype"])
  row["mfu_vs_spec_peak"] = gflops / (peak * 1e3) if peak else None
  if row.get("torch_step_time_s"):
    row["torch_mfu_vs_f32_ceiling"] = (row["flops_per_step"] / row["torch_step_time_s"] / 1e9
                                       / ceiling["gflops"]["float32"])


def summary_table(rows: list[dict[str, Any]]) -> str:
  headers = ["model", "seq", "batch", "dtype", "tokens/s", "MFU", "peak MB", "torch tokens/s",
             "vs torch"]
  body = []
  for r in rows:
    if "error" in r or "skipped" in r:
      body.append([r["model"], r["seq_len"], r.get("batch"), r["dtype"],
                   r.get("error") or r.get("skipped"), None, None, None, None])
      continue
    body.append([r["model"], r["seq_len"], r["batch"], r["dtype"], r["tokens_per_s"],
                 r["mfu"], r["peak_mem_mb"], r["torch_tokens_per_s"],
                 r.get("speedup_vs_torch")])
  return common.markdown_table(headers, body)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = common.base_parser(__doc__.splitlines()[0])
  p.add_argument("--models", type=_csv, default=None, help=f"Comma list of {sorted(MODELS)}.")
  p.add_argument("--seq-lens", type=_csv, default=None, help="Default 256,1024.")
  p.add_argument("--dtypes", type=_csv, default=None, help="Default float32,bfloat16.")
  p.add_argument("--tokens-per-step", type=int, default=None,
                 help="Tokens per step for every model (default: per model and backend).")
  p.add_argument("--remat", default="none", choices=("none", "full", "dots"))
  p.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn"),
                 help="ModelConfig.attention: the attention kernel.")
  p.add_argument("--steps", type=int, default=None, help="Timed steps (median reported).")
  p.add_argument("--warmup", type=int, default=1, help="Untimed steps after compiling.")
  p.add_argument("--torch-dtypes", type=_csv, default=None,
                 help="Compute dtypes that get the torch peer (default float32; quick: both).")
  p.add_argument("--no-torch", action="store_true", help="Skip the torch peer.")
  p.add_argument("--config-timeout-s", type=float, default=900.0,
                 help="Wall-clock limit of one configuration's child process.")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)

  if args.child is not None:  # Child process: one configuration.
    row = run_config(json.loads(args.child))
    common.write_json(args.child_out, row)
    return row

  t_start = time.perf_counter()
  started = common.now_iso()
  machine = common.machine_info()
  kind = "cpu" if machine["jax_backend"] == "cpu" else "accelerator"
  ceiling = common.get_ceiling(args.ceiling, machine["name"], quick=args.quick)
  models = args.models or (["tiny"] if args.quick else list(DEFAULT_MODELS[kind]))
  seq_lens = [int(s) for s in (args.seq_lens or (["64"] if args.quick else ["256", "1024"]))]
  dtypes = args.dtypes or ["float32", "bfloat16"]
  torch_dtypes = set(args.torch_dtypes or (dtypes if args.quick else ["float32"]))
  steps = args.steps or (2 if args.quick else 3)
  for m in models:
    if m not in MODELS:
      p.error(f"unknown model {m!r}; known: {sorted(MODELS)}")

  out = args.out or common.RESULTS_DIR / f"train_step-{machine['name']}-{started[:10]}.json"
  result = {"benchmark": "train_step", "machine": machine, "quick": args.quick,
            "started_at": started, "flops_formula": FLOPS_FORMULA, "ceiling": ceiling,
            "settings": {"steps": steps, "warmup": args.warmup, "remat": args.remat,
                         "attention": args.attention,
                         "optimizer": "clip_by_global_norm(1.0) + AdamW(lr 1e-4, b=(0.9, 0.95), "
                                      "wd 0.1 on matrices)",
                         "torch_peer": "HF AutoModelForCausalLM (sdpa attention) from "
                                       "config_to_hf with params_to_hf weights, same batch, "
                                       "cross-entropy + backward + clip + AdamW; on CPU the "
                                       "faster of 1 and all-core threads (torch_threads)"},
            "rows": []}
  # Most important first (f32, longest sequence), so a tight budget skips the least important.
  plan = [(m, q, d) for d in dtypes for m in models for q in sorted(seq_lens, reverse=True)]
  for model, seq_len, dtype in plan:
    tokens = args.tokens_per_step or TOKENS_PER_STEP[kind][model]
    batch = max(1, tokens // seq_len)
    spec = {"model": model, "seq_len": seq_len, "dtype": dtype, "batch": batch,
            "remat": args.remat, "attention": args.attention, "steps": steps,
            "warmup": args.warmup,
            "torch": not args.no_torch and dtype in torch_dtypes,
            "max_s": args.config_timeout_s * 0.8}
    head = {"model": model, "seq_len": seq_len, "dtype": dtype, "batch": batch}
    elapsed = time.perf_counter() - t_start
    if args.budget_s is not None and elapsed >= args.budget_s - 30:
      result["rows"].append({**head, "skipped": "budget"})
      continue
    timeout = args.config_timeout_s
    if args.budget_s is not None:
      timeout = min(timeout, args.budget_s - elapsed)
      spec["max_s"] = min(spec["max_s"], 0.8 * timeout)
    print(f"[train_step] {model} seq {seq_len} batch {batch} {dtype} ...", flush=True)
    row = common.run_child("benchmarks.train_step", spec, timeout)
    row = {**head, **row}
    if "error" not in row:
      _add_mfu(row, ceiling, machine["device_kind"])
    result["rows"].append(row)
    common.write_json(out, result)  # Partial results survive an interrupted run.
  order = {(m, q, d): i for i, (m, q, d) in enumerate(
      (m, q, d) for m in models for q in sorted(seq_lens) for d in dtypes)}
  result["rows"].sort(key=lambda r: order[(r["model"], r["seq_len"], r["dtype"])])
  result["finished_at"] = common.now_iso()
  result["wall_s"] = time.perf_counter() - t_start
  common.write_json(out, result)
  print(f"ceiling GFLOP/s ({ceiling['source']}): "
        + ", ".join(f"{d} {common.fmt(g)}" for d, g in ceiling["gflops"].items()))
  print(summary_table(result["rows"]))
  print(f"wrote {out}")
  return result


if __name__ == "__main__":
  main()
