"""This machine's matmul ceiling: square f32 and bf16 (f32 accumulation) matmuls, in GFLOP/s.

Square matmuls of a few sizes through JAX (and PyTorch where it runs on the same device); the
ceiling per dtype is the best rate over sizes and frameworks. A ceiling is a capability and other
processes on the machine can only slow a sample down, so each rate comes from the fastest sample
(the median is recorded too); the benchmarks' own throughputs are medians. The other benchmarks
report model FLOPs utilisation (MFU) against the ceiling measured in the same `make bench` run.

  python -m benchmarks.matmul_ceiling --out /tmp/ceiling.json [--quick]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # Allow `python benchmarks/matmul_ceiling.py`.
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  __package__ = "benchmarks"  # pylint: disable=redefined-builtin

from benchmarks import common  # noqa: E402

DTYPES = ("float32", "bfloat16")


def _sizes(backend: str, quick: bool) -> tuple[int, ...]:
  if quick:
    return (256,) if backend == "cpu" else (1024,)
  return (1024, 2048) if backend == "cpu" else (4096, 8192)


def _calls_per_sample(backend: str, n: int) -> int:
  """Back-to-back calls per timing sample, so dispatch latency is negligible on accelerators."""
  return 1 if backend == "cpu" else max(1, 8192 // n) * 4


def jax_matmul_gflops(n: int, dtype: str, repeats: int, max_s: float) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  dt = jnp.dtype(dtype)
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.float32).astype(dt)
  b = jax.random.normal(kb, (n, n), jnp.float32).astype(dt)
  f = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  calls = _calls_per_sample(jax.default_backend(), n)

  def run():
    out = None
    for _ in range(calls):
      out = f(a, b)
    out.block_until_ready()

  run()  # Compiles.
  t = common.time_fn(run, warmup=1, repeats=repeats, max_s=max_s)
  return {"framework": "jax", "dtype": dtype, "n": n, "calls_per_sample": calls,
          "time_s": t.min / calls, "gflops": 2 * n**3 * calls / t.min / 1e9,
          "gflops_median": 2 * n**3 * calls / t.median / 1e9}


def torch_matmul_gflops(n: int, dtype: str, repeats: int, max_s: float) -> dict[str, Any]:
  import torch  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(common.cpu_count())
  dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  g = torch.Generator().manual_seed(0)
  a = torch.randn(n, n, generator=g).to(dt)
  b = torch.randn(n, n, generator=g).to(dt)
  t = common.time_fn(lambda: torch.matmul(a, b), warmup=1, repeats=repeats, max_s=max_s)
  return {"framework": "torch", "dtype": dtype, "n": n, "calls_per_sample": 1,
          "time_s": t.min, "gflops": 2 * n**3 / t.min / 1e9,
          "gflops_median": 2 * n**3 / t.median / 1e9}


def _torch_usable(backend: str) -> bool:
  """The torch peer only runs where it shares the device with JAX (the CPU build here)."""
  if backend != "cpu":
    return False
  try:
    import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def measure(quick: bool, with_torch: bool = True) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top

  backend = jax.default_backend()
  repeats = 3 if quick else 10
  max_s = 1.0 if quick else 5.0  # Per (framework, dtype, size): slow paths get fewer repeats.
  measures = [("jax", jax_matmul_gflops)]
  if with_torch and _torch_usable(backend):
    measures.append(("torch", torch_matmul_gflops))
  rows, too_slow = [], set()
  for n in _sizes(backend, quick):
    for dtype in DTYPES:
      for framework, measure_fn in measures:
        if (framework, dtype) in too_slow:  # e.g. bf16 emulated on a CPU without bf16 units.
          continue
        row = measure_fn(n, dtype, repeats, max_s)
        rows.append(row)
        if row["time_s"] * 8 > 2 * max_s:  # The next size (2x) would take 8x as long.
          too_slow.add((framework, dtype))
  ceiling, best = {}, {}
  for dtype in DTYPES:
    top = max((r for r in rows if r["dtype"] == dtype), key=lambda r: r["gflops"])
    ceiling[dtype] = top["gflops"]
    best[dtype] = {"framework": top["framework"], "n": top["n"]}
  kind = jax.devices()[0].device_kind
  peaks = {d: common.spec_peak_tflops(kind, d) for d in DTYPES}
  return {"rows": rows, "ceiling_gflops": ceiling, "ceiling_from": best,
          "spec_peak_tflops": peaks}


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = common.base_parser(__doc__.splitlines()[0])
  p.add_argument("--no-torch", action="store_true", help="JAX matmuls only.")
  args = p.parse_args(argv)
  t0 = time.perf_counter()
  started = common.now_iso()
  machine = common.machine_info()
  result = {"benchmark": "matmul_ceiling", "machine": machine, "quick": args.quick,
            "started_at": started,
            "flops_formula": "2 * n^3 per (n x n) @ (n x n); ceiling = best rate over sizes "
                             "and frameworks, each rate from the fastest of its samples"}
  result.update(measure(args.quick, with_torch=not args.no_torch))
  result["finished_at"] = common.now_iso()
  result["wall_s"] = time.perf_counter() - t0
  out = args.out or common.ceiling_cache_path(machine["name"])
  common.write_json(out, result)
  if args.out is not None and not args.quick:  # Full measurements also refresh the cache.
    common.write_json(common.ceiling_cache_path(machine["name"]), result)
  print(common.markdown_table(
      ["framework", "dtype", "n", "GFLOP/s"],
      [(r["framework"], r["dtype"], r["n"], r["gflops"]) for r in result["rows"]]))
  print("ceiling GFLOP/s: " + ", ".join(f"{d} {common.fmt(g)}"
                                        for d, g in result["ceiling_gflops"].items()))
  print(f"wrote {out}")
  return result


if __name__ == "__main__":
  main()
