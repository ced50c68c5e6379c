"""`make bench`: every benchmark in benchmarks/, one JSON file and one summary table.

matmul_ceiling runs first; every other benchmark script here (a module with a `__main__` block,
other than common and run_all) then runs in name order as a child process with --ceiling pointing
at that measurement, --budget-s its share of the remaining time, and --quick when given (see the
contract in `benchmarks.common`). The combined result, each benchmark's full JSON included, goes to
benchmarks/results/<machine>-<date>.json (and the table to the same name with .md).

  python -m benchmarks.run_all [--quick] [--only train_step] [--budget-s 840]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # Allow `python benchmarks/run_all.py`.
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  __package__ = "benchmarks"  # pylint: disable=redefined-builtin

from benchmarks import common  # noqa: E402

CEILING = "matmul_ceiling"
NOT_BENCHMARKS = {"__init__", "common", "run_all", CEILING}
# Share of the remaining time budget, relative to 1 for benchmarks not listed.
WEIGHTS = {"train_step": 3.0, "quiet_star_step": 2.0, "decode": 2.0}
# Kept back from the budget for start-up, the ceiling and writing results.
RESERVE_S = 20.0


def discover() -> list[str]:
  """Benchmark module names in benchmarks/, ceiling excluded, in name order."""
  here = Path(__file__).resolve().parent
  names = []
  for path in sorted(here.glob("*.py")):
    if path.stem in NOT_BENCHMARKS or path.stem.startswith("_"):
      continue
    if "__main__" in path.read_text():
      names.append(path.stem)
  return names


def _run(name: str, out: Path, extra: list[str], timeout: float) -> dict[str, Any]:
  """Runs one benchmark; returns its JSON, or a stub with the error."""
  t0 = time.perf_counter()
  print(f"[run_all] {name} (limit {timeout:.0f} s) ...", flush=True)
  code, log = common.run_module(f"benchmarks.{name}", ["--out", str(out), *extra],
                                timeout=timeout)
  wall = time.perf_counter() - t0
  result: dict[str, Any] = {}
  if out.exists():  # Benchmarks write partial results as they go.
    result = common.read_json(out)
  if code is None:
    result.update(status="timeout", log_tail=common.tail(log))
  elif code != 0:
    result.update(status=f"exit code {code}", log_tail=common.tail(log))
  else:
    result.setdefault("status", "ok")
  result.setdefault("benchmark", name)
  result.setdefault("rows", [])
  result["run_all_wall_s"] = wall
  print(f"[run_all] {name}: {result['status']} in {wall:.0f} s", flush=True)
  if result["status"] != "ok":
    print(result.get("log_tail", ""), flush=True)
  return result


def summary_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
  """One flat row per measured configuration, over all benchmarks (common keys only)."""
  keys = ("model", "seq_len", "batch", "dtype", "tokens_per_s", "mfu", "peak_mem_mb",
          "torch_tokens_per_s", "speedup_vs_torch")
  rows = []
  for name, res in results.items():
    if name == CEILING:
      continue
    for r in res.get("rows", []):
      row = {"benchmark": name, **{k: r.get(k) for k in keys}}
      for key, alias in (("tokens_per_s", "starjax_tokens_per_s"), ("model", "mode"),
                         ("torch_tokens_per_s", "hf_tokens_per_s"), ("speedup_vs_torch", "ratio")):
        if row[key] is None:  # decode's rows name these differently (the peer is HF generate).
          row[key] = r.get(alias)
      if r.get("n_ahead") is not None:  # Quiet-STaR rows differ by thought length N.
        row["model"] = f"{row['model']} N={r['n_ahead']}"
      note = r.get("error") or r.get("skipped")
      if note:
        row["note"] = note
      rows.append(row)
  return rows


def summary_table(machine: dict[str, Any], ceiling: dict[str, Any] | None,
                  rows: list[dict[str, Any]], statuses: dict[str, str]) -> str:
  lines = [f"Machine: {machine['name']} ({machine['cpu_model']}, {machine['cpu_cores']} cores, "
           f"jax {machine['versions']['jax']} on {machine['jax_backend']}: "
           f"{machine['device_kind']} x{machine['device_count']})"]
  if ceiling:
    lines.append("Matmul ceiling (GFLOP/s, this run): "
                 + ", ".join(f"{d} {common.fmt(g)}" for d, g in ceiling.items()))
  bad = {n: s for n, s in statuses.items() if s != "ok"}
  if bad:
    lines.append("Not ok: " + ", ".join(f"{n} ({s})" for n, s in bad.items()))
  lines.append("")
  headers = ["benchmark", "model", "seq", "batch", "dtype", "tokens/s", "MFU", "peak MB",
             "torch tokens/s", "vs torch"]
  body = [[r["benchmark"], r["model"], r["seq_len"], r["batch"], r["dtype"],
           r.get("note") or r["tokens_per_s"], r["mfu"], r["peak_mem_mb"],
           r["torch_tokens_per_s"], r["speedup_vs_torch"]] for r in rows]
  lines.append(common.markdown_table(headers, body))
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = common.base_parser(__doc__.splitlines()[0])
  p.add_argument("--only", default=None,
                 help="Comma list of benchmarks to run (the ceiling always runs).")
  p.set_defaults(budget_s=None)
  args = p.parse_args(argv)
  budget = args.budget_s or (300.0 if args.quick else 840.0)
  t_start = time.perf_counter()
  started = common.now_iso()
  machine = common.machine_info()
  names = discover()
  if args.only:
    wanted = [n for n in args.only.split(",") if n]
    unknown = sorted(set(wanted) - set(names))
    if unknown:
      p.error(f"unknown benchmarks {unknown}; found {names}")
    names = [n for n in names if n in wanted]
  suffix = "-quick" if args.quick else ""
  out = args.out or common.RESULTS_DIR / f"{machine['name']}-{started[:10]}{suffix}.json"
  quick = ["--quick"] if args.quick else []

  results: dict[str, dict[str, Any]] = {}
  with tempfile.TemporaryDirectory(prefix="starjax_bench_") as tmp:
    tmp = Path(tmp)
    ceiling_path = Path(args.ceiling) if args.ceiling else tmp / f"{CEILING}.json"
    if args.ceiling:
      results[CEILING] = {**common.read_json(ceiling_path), "status": "given"}
    else:
      results[CEILING] = _run(CEILING, ceiling_path, quick, timeout=max(60.0, budget / 5))
    ceiling_ok = ceiling_path.exists()
    for i, name in enumerate(names):
      remaining = budget - (time.perf_counter() - t_start) - RESERVE_S
      weights = [WEIGHTS.get(n, 1.0) for n in names[i:]]
      share = remaining * weights[0] / sum(weights)
      if share < 10 or not ceiling_ok:
        results[name] = {"benchmark": name, "rows": [],
                         "status": "skipped: " + ("no ceiling" if not ceiling_ok else "budget")}
        continue
      extra = [*quick, "--ceiling", str(ceiling_path), "--budget-s", f"{0.9 * share:.0f}"]
      results[name] = _run(name, tmp / f"{name}.json", extra, timeout=share)

  ceiling = results[CEILING].get("ceiling_gflops")
  rows = summary_rows(results)
  statuses = {n: r.get("status", "ok") for n, r in results.items()}
  table = summary_table(machine, ceiling, rows, statuses)
  combined = {"machine": machine, "started_at": started, "finished_at": common.now_iso(),
              "wall_s": time.perf_counter() - t_start, "budget_s": budget, "quick": args.quick,
              "ceiling_gflops": ceiling, "statuses": statuses, "summary": rows,
              "summary_markdown": table, "benchmarks": results}
  common.write_json(out, combined)
  md = out.with_suffix(".md")
  common.write_text(md, table + "\n")
  print(table)
  print(f"\nwrote {out} and {md.name} in {combined['wall_s']:.0f} s")
  return combined


def failed(combined: dict[str, Any]) -> list[str]:
  """Benchmarks that crashed or timed out (budget skips do not count)."""
  return [n for n, s in combined["statuses"].items()
          if s not in ("ok", "given") and not s.startswith("skipped")]


if __name__ == "__main__":
  sys.exit(1 if failed(main()) else 0)
