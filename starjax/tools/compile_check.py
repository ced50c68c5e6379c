r"""Compile-only memory check: will a config fit a TPU slice? Answered on a laptop CPU.

Lowers and compiles, for a given preset, mesh and batch, (a) the language-model train step
(`starjax.train.step.jit_train_step` on the sharded `TrainState`) and (b) a Quiet-STaR train step
(`jax.value_and_grad` of `starjax.quiet_star.objective.quiet_star_loss` plus the same AdamW update),
from abstract inputs only (`jax.ShapeDtypeStruct`s carrying their shardings): no parameter is
ever allocated, so a 7B model on 64 devices compiles on a 2-core CPU. It prints XLA's
`compiled.memory_analysis()` per device and flags a step whose estimated peak exceeds `--hbm_gb`.

  python -m starjax.tools.compile_check --preset=llama2_7b --devices=64 --mesh=fsdp=64 \
      --batch=64 --seq_len=2048 --dtype=bfloat16 --remat=full

`--devices=N` fakes N CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N, set before
jax starts, which is why the arguments are parsed before anything imports jax); `--devices=0`
uses the real devices instead (e.g. on a TPU VM, for the TPU compiler's own figures).

Reading the numbers: arguments and outputs are the exact per-device shard sizes of the state and
batch. Temp is the CPU compiler's buffer plan, a proxy for the TPU's (different fusion and
layouts; bf16 may be widened on CPU), so leave headroom, or rerun with `--devices=0` on the
target. Peak estimate = arguments + outputs - aliased (donated state) + temp.

Exit status: 0 if every step fits, 1 if one exceeds the budget, 2 on bad arguments (e.g. a mesh
whose size is not the device count).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from starjax import xla_flags

GB = 1e9
STEPS = ("train", "quiet_star")


def parse_mesh(spec: str) -> dict[str, int]:
  """"data=8,fsdp=8" -> {"data": 8, "fsdp": 8}; unnamed axes keep MeshConfig's defaults."""
  out: dict[str, int] = {}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, sep, value = part.partition("=")
    if not sep or name not in ("data", "fsdp", "tensor"):
      raise ValueError(f"--mesh={spec!r}: expected comma-separated data=N, fsdp=N, tensor=N "
                       f"(one of them may be -1), got {part!r}.")
    try:
      out[name] = int(value)
    except ValueError as e:
      raise ValueError(f"--mesh={spec!r}: {name} must be an integer, got {value!r}.") from e
  return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """Command-line arguments; plain argparse so that nothing imports jax yet."""
  p = argparse.ArgumentParser(
      prog="python -m starjax.tools.compile_check",
      description="Compile the train and Quiet-STaR steps from abstract inputs on a (fake) mesh "
                  "and print per-device memory.")
  p.add_argument("--preset", default="small", help="Model preset (starjax.models.config.PRESETS).")
  p.add_argument("--devices", type=int, default=8,
                 help="Fake CPU devices to create; 0 = use the real devices.")
  p.add_argument("--mesh", default="data=2,fsdp=4",
                 help="Mesh axis sizes, e.g. data=8,fsdp=8 (unnamed axes: data=-1, fsdp=1, "
                      "tensor=1; -1 takes the remaining devices).")
  p.add_argument("--batch", type=int, default=8, help="Global rows per LM train step.")
  p.add_argument("--seq_len", type=int, default=256, help="Tokens per row of the LM train step.")
  p.add_argument("--dtype", default=None, help="Compute dtype override (float32, bfloat16).")
  p.add_argument("--remat", default=None, help="Remat override (none, full, dots).")
  p.add_argument("--vocab_size", type=int, default=None, help="Vocabulary size override.")
  p.add_argument("--steps", default=",".join(STEPS),
                 help=f"Comma-separated steps to compile, from {STEPS}.")
  p.add_argument("--qs_batch", type=int, default=None, help="Quiet-STaR rows (default --batch).")
  p.add_argument("--qs_seq_len", type=int, default=None,
                 help="Quiet-STaR tokens per row (default --seq_len).")
  p.add_argument("--qs_n_ahead", type=int, default=8, help="QuietStarConfig.n_ahead.")
  p.add_argument("--qs_n_ahead_talk", type=int, default=4, help="QuietStarConfig.n_ahead_talk.")
  p.add_argument("--qs_n_passes", type=int, default=2, help="QuietStarConfig.n_passes.")
  p.add_argument("--hbm_gb", type=float, default=16.0,
                 help="Per-device memory budget in GB (1e9 bytes); 16 for v4/v5e-like chips.")
  p.add_argument("--json_out", default=None, help="Also write the results to this JSON file.")
  args = p.parse_args(argv)
  try:
    args.mesh_axes = parse_mesh(args.mesh)
  except ValueError as e:
    p.error(str(e))
  args.step_list = [s.strip() for s in args.steps.split(",") if s.strip()]
  unknown = sorted(set(args.step_list) - set(STEPS))
  if unknown or not args.step_list:
    p.error(f"--steps={args.steps!r}: choose from {STEPS}.")
  if args.devices < 0:
    p.error(f"--devices must be >= 0, got {args.devices}.")
  return args


def force_host_devices(n: int) -> None:
  """Makes the CPU backend expose `n` devices; must run before jax initialises a backend."""
  os.environ["XLA_FLAGS"] = xla_flags.with_device_count(os.environ.get("XLA_FLAGS", ""), n)
  os.environ["JAX_PLATFORMS"] = "cpu"


def memory_report(compiled: Any) -> dict[str, float] | None:
  """Per-device sizes in GB from `compiled.memory_analysis()` (None if the backend has none)."""
  ma = compiled.memory_analysis()
  if ma is None:
    return None
  get = lambda name: float(getattr(ma, name, 0) or 0) / GB
  rep = {
      "arguments": get("argument_size_in_bytes"),
      "outputs": get("output_size_in_bytes"),
      "aliased": get("alias_size_in_bytes"),
      "temp": get("temp_size_in_bytes"),
      "generated_code": get("generated_code_size_in_bytes"),
  }
  rep["peak_estimate"] = rep["arguments"] + rep["outputs"] - rep["aliased"] + rep["temp"]
  return rep


def _abstract(tree: Any, shardings: Any) -> Any:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      tree, shardings)


def lower_train_step(cfg: Any, mesh: Any, batch: int, seq_len: int) -> Any:
  """The LM train step (`jit_train_step`) lowered on abstract state and batch."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from starjax.train import optim  # pylint: disable=g-import-not-at-top
  from starjax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from starjax.train import step as step_lib  # pylint: disable=g-import-not-at-top

  ocfg = optim.OptimizerConfig()
  tx = optim.make_optimizer(ocfg, total_steps=1000)
  shardings = state_lib.state_shardings(cfg, tx, mesh)
  state = state_lib.abstract_train_state(cfg, tx, mesh)
  fn = step_lib.jit_train_step(cfg, tx, mesh, shardings, batch,
                               optim.learning_rate_schedule(ocfg, 1000))
  bsh = step_lib.batch_sharding(mesh, 2, batch)
  rows = {k: jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=bsh)
          for k in ("inputs", "targets", "positions", "segment_ids")}
  rows["loss_mask"] = jax.ShapeDtypeStruct((batch, seq_len), jnp.float32, sharding=bsh)
  return fn.lower(state, rows)


def lower_quiet_star_step(cfg: Any, qcfg: Any, mesh: Any, batch: int, seq_len: int) -> Any:
  """value_and_grad of `quiet_star_loss` plus an AdamW update, lowered on abstract inputs.

  The decoder params use the rules-table shardings of the LM train state; the thought embeddings
  and mixing head are replicated; the batch is split over the mesh's batch axes, as
  `quiet_star_loss(..., mesh=mesh)` expects.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  from starjax.parallel import sharding  # pylint: disable=g-import-not-at-top
  from starjax.quiet_star import objective  # pylint: disable=g-import-not-at-top
  from starjax.train import optim  # pylint: disable=g-import-not-at-top
  from starjax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from starjax.train import step as step_lib  # pylint: disable=g-import-not-at-top

  tx = optim.make_optimizer(optim.OptimizerConfig(), total_steps=1000)
  rep = sharding.replicated(mesh)
  params = jax.eval_shape(lambda: objective.init_params(jax.random.key(0), qcfg, cfg))
  param_sh = {
      "lm": sharding.tree_shardings(params["lm"], state_lib.param_logical_names(cfg), mesh),
      "thought": jax.tree.map(lambda _: rep, params["thought"]),
      "mixer": jax.tree.map(lambda _: rep, params["mixer"]),
  }
  opt = jax.eval_shape(tx.init, params)
  opt_sh = optax.tree_map_params(
      tx, lambda _, s: s, opt, param_sh, transform_non_params=lambda _: rep,
      is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  shardings = state_lib.TrainState(step=rep, params=param_sh, opt_state=opt_sh)
  state = _abstract(state_lib.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                                         opt_state=opt), shardings)

  def step(state, batch, key):
    loss_fn = lambda p: objective.quiet_star_loss(p, batch, key, qcfg, cfg, mesh)
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new = state_lib.TrainState(step=state.step + 1,
                               params=optax.apply_updates(state.params, updates),
                               opt_state=opt_state)
    return new, metrics

  bsh = step_lib.batch_sharding(mesh, 2, batch)
  rows = {"tokens": jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=bsh),
          "mask": jax.ShapeDtypeStruct((batch, seq_len), jnp.bool_, sharding=bsh)}
  key = jax.eval_shape(lambda: jax.random.key(0))
  key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep)
  fn = jax.jit(step, in_shardings=(shardings, bsh, rep), out_shardings=(shardings, rep),
               donate_argnums=(0,))
  return fn.lower(state, rows, key)


def _fmt(rep: dict[str, float] | None, budget: float) -> list[str]:
  if rep is None:
    return ["    memory_analysis() is not available on this backend"]
  rows = [("arguments", "arguments"), ("outputs", "outputs"),
          ("aliased", "aliased (donated inputs reused as outputs)"), ("temp", "temp"),
          ("generated_code", "generated code")]
  lines = [f"    {label:<48s} {rep[k]:9.3f} GB" for k, label in rows]
  verdict = "OK" if rep["peak_estimate"] <= budget else "EXCEEDS BUDGET"
  lines.append(f"    {'peak estimate (args + outputs - aliased + temp)':<48s} "
               f"{rep['peak_estimate']:9.3f} GB  (budget {budget:g} GB: {verdict})")
  return lines


def run(args: argparse.Namespace) -> int:
  """Builds the mesh, compiles the requested steps, prints the memory; returns the exit status."""
  if args.devices:
    force_host_devices(args.devices)
  import jax  # pylint: disable=g-import-not-at-top

  from starjax.models import matmul  # pylint: disable=g-import-not-at-top
  from starjax.models.config import PRESETS, preset  # pylint: disable=g-import-not-at-top
  from starjax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from starjax.quiet_star.config import QuietStarConfig  # pylint: disable=g-import-not-at-top

  # Compile the program accelerators run, not the CPU-only kernels (fake devices are CPUs).
  matmul.set_cpu_kernels(args.devices == 0 and jax.default_backend() == "cpu")

  def fail(msg: str) -> int:
    print(f"compile_check: error: {msg}", file=sys.stderr)
    return 2

  if args.preset not in PRESETS:
    return fail(f"unknown --preset={args.preset!r}; known: {sorted(PRESETS)}.")
  mesh_cfg = mesh_lib.MeshConfig(**args.mesh_axes)
  n_dev = args.devices or jax.device_count()
  try:
    mesh_cfg.shape(n_dev)
  except ValueError as e:
    return fail(f"--mesh={args.mesh} does not fit --devices={n_dev}: {e}")
  if args.devices and jax.device_count() != args.devices:
    return fail(f"jax already sees {jax.device_count()} devices, not --devices={args.devices}: "
                "it was initialised before XLA_FLAGS could be set. Run this as its own process "
                "(python -m starjax.tools.compile_check).")
  overrides = {k: v for k, v in (("dtype", args.dtype), ("remat", args.remat),
                                 ("vocab_size", args.vocab_size)) if v is not None}
  try:
    cfg = preset(args.preset, **overrides)
    qcfg = QuietStarConfig(n_ahead=args.qs_n_ahead, n_ahead_talk=args.qs_n_ahead_talk,
                           n_passes=args.qs_n_passes)
  except ValueError as e:
    return fail(str(e))
  mesh = mesh_lib.make_mesh(mesh_cfg)
  axes = " ".join(f"{k}={v}" for k, v in mesh.shape.items())
  platform = jax.devices()[0].platform
  print(f"compile_check: {args.preset} ({cfg.num_params() / 1e9:.3f}B params, {cfg.dtype} compute, "
        f"remat {cfg.remat}) on {n_dev} {platform} devices, mesh {axes}")

  qs_batch = args.qs_batch or args.batch
  qs_len = args.qs_seq_len or args.seq_len
  jobs = {
      "train": (f"train step: batch {args.batch} x {args.seq_len}",
                lambda: lower_train_step(cfg, mesh, args.batch, args.seq_len)),
      "quiet_star": (f"quiet_star step: batch {qs_batch} x {qs_len}, n_ahead {qcfg.n_ahead} "
                     f"({qcfg.n_sampled} thought tokens), n_ahead_talk {qcfg.n_ahead_talk}, "
                     f"n_passes {qcfg.n_passes}",
                     lambda: lower_quiet_star_step(cfg, qcfg, mesh, qs_batch, qs_len)),
  }
  results: dict[str, Any] = {
      "preset": args.preset, "params": cfg.num_params(), "dtype": cfg.dtype, "remat": cfg.remat,
      "devices": n_dev, "platform": platform, "mesh": dict(mesh.shape), "hbm_gb": args.hbm_gb,
      "steps": {}}
  status = 0
  for name in args.step_list:
    title, lower = jobs[name]
    t0 = time.perf_counter()
    try:
      compiled = lower().compile()
    except ValueError as e:  # E.g. a batch the mesh's batch axes do not divide.
      return fail(f"{name} step: {e}")
    seconds = time.perf_counter() - t0
    rep = memory_report(compiled)
    print(f"  {title}; compiled in {seconds:.1f} s; per device:")
    print("\n".join(_fmt(rep, args.hbm_gb)))
    over = rep is not None and rep["peak_estimate"] > args.hbm_gb
    status = 1 if over else status
    results["steps"][name] = {"title": title, "compile_s": seconds, "memory_gb": rep,
                              "exceeds_budget": over}
  if args.json_out:
    os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
    with open(args.json_out, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=1)
  if status:
    print(f"compile_check: a step exceeds the {args.hbm_gb:g} GB per-device budget.")
  return status


def main(argv: Sequence[str] | None = None) -> int:
  return run(parse_args(argv))


if __name__ == "__main__":
  sys.exit(main())
