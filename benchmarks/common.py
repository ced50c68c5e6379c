"""Shared benchmark helpers: machine description, timing, peak memory, JSON, the matmul ceiling.

Contract for every benchmark script in this folder (`run_all` relies on it):
  * it runs as `python -m benchmarks.<name>` from the repository root;
  * it accepts the flags of `base_parser`: --out PATH (JSON, written atomically), --quick (a tiny
    setting that finishes in seconds), --ceiling PATH (the matmul_ceiling JSON of the same run) and
    --budget-s SECONDS (skip remaining work, keeping what is measured, once exceeded);
  * its JSON is {"benchmark", "machine", "rows": [...], ...}; rows use the keys model, seq_len,
    dtype, tokens_per_s, mfu, peak_mem_mb and torch_tokens_per_s where they apply, which is what
    the summary table shows (everything else stays in the JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import re
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from starjax import xla_flags

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
# Outside the repository, so cached measurements are never committed.
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "starjax-bench"
# A cached ceiling older than this is re-measured when no --ceiling is given.
CEILING_MAX_AGE_S = 24 * 3600

# Datasheet dense peaks in TFLOP/s by device kind substring (first match wins), for MFU against the
# vendor figure on accelerators. f32 on NVIDIA is the non-tensor-core figure.
SPEC_PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bfloat16": 989.0, "float32": 67.0}),
    ("H100 PCIe", {"bfloat16": 756.0, "float32": 51.0}),
    ("H100", {"bfloat16": 989.0, "float32": 67.0}),
    ("A100", {"bfloat16": 312.0, "float32": 19.5}),
    ("L4", {"bfloat16": 121.0, "float32": 30.3}),
    ("TPU v6", {"bfloat16": 918.0}),
    ("TPU v5p", {"bfloat16": 459.0}),
    ("TPU v5", {"bfloat16": 197.0}),
    ("TPU v4", {"bfloat16": 275.0}),
)


def base_parser(description: str) -> argparse.ArgumentParser:
  """The flags every benchmark accepts (see the module docstring)."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--out", type=Path, default=None, help="JSON output path.")
  p.add_argument("--quick", action="store_true", help="Tiny setting for smoke tests.")
  p.add_argument("--ceiling", type=Path, default=None,
                 help="matmul_ceiling JSON to report against (default: cache or measure now).")
  p.add_argument("--budget-s", type=float, default=None,
                 help="Stop starting new work after this many seconds.")
  return p


# ----------------------------------------------------------------------------------------------
# Machine.


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def cpu_count() -> int:
  """Cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def _mem_total_gb() -> float | None:
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  except (ValueError, OSError, AttributeError):
    return None


def package_versions() -> dict[str, str | None]:
  out: dict[str, str | None] = {"python": platform.python_version()}
  for name in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers"):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def machine_info() -> dict[str, Any]:
  """What ran the benchmark: host, CPU, accelerator (as JAX sees it) and package versions."""
  import jax  # pylint: disable=g-import-not-at-top

  dev = jax.devices()[0]
  info = {
      "hostname": socket.gethostname(),
      "platform": platform.platform(),
      "cpu_model": cpu_model(),
      "cpu_cores": cpu_count(),
      "mem_total_gb": round(_mem_total_gb() or 0.0, 1),
      "jax_backend": jax.default_backend(),
      "device_kind": dev.device_kind,
      "device_count": jax.device_count(),
      "versions": package_versions(),
      # Other processes compete for the cores: timings are only comparable at similar load.
      "load_avg_1m": os.getloadavg()[0],
  }
  info["name"] = machine_slug(info)
  return info


def _slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_slug(info: dict[str, Any]) -> str:
  """Short file-name-safe machine name, e.g. 'cpu-amd-epyc-2c' or 'gpu-nvidia-h100-80gb-hbm3'."""
  if info["jax_backend"] == "cpu":
    return f"cpu-{_slug(info['cpu_model'])}-{info['cpu_cores']}c"
  n = info["device_count"]
  return f"{info['jax_backend']}-{_slug(info['device_kind'])}" + (f"-x{n}" if n > 1 else "")


def spec_peak_tflops(device_kind: str, dtype: str) -> float | None:
  """Datasheet peak for `dtype` on an accelerator, or None (CPUs, unknown devices)."""
  for key, peaks in SPEC_PEAK_TFLOPS:
    if key.lower() in device_kind.lower():
      return peaks.get(dtype)
  return None


def now_iso() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------
# JSON.


def write_text(path: str | os.PathLike[str], text: str) -> None:
  """Writes `text` atomically (temp file in the same folder, then os.replace)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files.
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
  """Writes `obj` as JSON atomically."""
  write_text(path, json.dumps(obj, indent=1, default=_json_default) + "\n")


def _json_default(x: Any) -> Any:
  if hasattr(x, "item"):  # numpy / jax scalars.
    return x.item()
  if isinstance(x, Path):
    return str(x)
  raise TypeError(f"Not JSON serialisable: {type(x)}")


def read_json(path: str | os.PathLike[str]) -> Any:
  with open(path) as f:
    return json.load(f)


# ----------------------------------------------------------------------------------------------
# Timing and memory.


@dataclasses.dataclass(frozen=True)
class Timing:
  """Seconds per call: the median is the figure to report."""

  median: float
  min: float
  times: tuple[float, ...]

  def as_dict(self) -> dict[str, Any]:
    return {"median_s": self.median, "min_s": self.min, "times_s": list(self.times)}


def time_fn(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5,
            max_s: float | None = None) -> Timing:
  """Median wall time of `fn()` after `warmup` calls; `fn` must block until its work is done.

  With `max_s`, fewer repeats (at least one) are taken when the warmup shows they would not fit.
  """
  t0 = time.perf_counter()
  for _ in range(warmup):
    fn()
  if max_s is not None and warmup:
    per_call = (time.perf_counter() - t0) / warmup
    repeats = min(repeats, max(1, int(max_s / max(per_call, 1e-9))))
  times = []
  for _ in range(max(repeats, 1)):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return timing_from(times)


def timing_from(times: Sequence[float]) -> Timing:
  return Timing(statistics.median(times), min(times), tuple(times))


def peak_rss_mb() -> float:
  """This process's peak resident set (Linux reports KiB, macOS bytes)."""
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return rss / (2**20 if sys.platform == "darwin" else 2**10)


def device_peak_mem_mb(device: Any) -> float | None:
  """Peak bytes in use on an accelerator since start, or None where JAX does not track it."""
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return stats["peak_bytes_in_use"] / 2**20


# ----------------------------------------------------------------------------------------------
# Child processes.


def child_env() -> dict[str, str]:
  """Environment for benchmark subprocesses: repo importable, no fake-device XLA flag."""
  env = dict(os.environ)
  flags = xla_flags.with_device_count(env.get("XLA_FLAGS", ""), None)
  if flags:
    env["XLA_FLAGS"] = flags
  else:
    env.pop("XLA_FLAGS", None)
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
  return env


def run_module(module: str, args: Sequence[str], *, timeout: float | None
               ) -> tuple[int | None, str]:
  """Runs `python -m module args` in the repo root; returns (exit code or None on timeout, log)."""
  cmd = [sys.executable, "-m", module, *args]
  try:
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=timeout, check=False)
  except subprocess.TimeoutExpired as e:
    out = (e.stdout or b"") + (e.stderr or b"")
    return None, out.decode(errors="replace") if isinstance(out, bytes) else str(out)
  return proc.returncode, proc.stdout + proc.stderr


def run_child(module: str, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
  """Runs `python -m module --child SPEC --child-out F` and returns F's JSON.

  On a timeout or a failed exit, returns {"error": why} (with the log's tail for a failure), so a
  benchmark records the configuration instead of stopping.
  """
  fd, path = tempfile.mkstemp(prefix=module.rsplit(".", 1)[-1] + "_", suffix=".json")
  os.close(fd)
  try:
    code, log = run_module(module, ["--child", json.dumps(spec), "--child-out", path],
                           timeout=timeout)
    if code is None:
      return {"error": f"time cap: still running after {timeout:.0f} s"}
    if code != 0:
      why = "killed (out of memory?)" if code in (-9, 137) else f"exit code {code}"
      return {"error": why, "log_tail": tail(log)}
    return read_json(path)
  finally:
    os.unlink(path)


def tail(text: str, n: int = 20) -> str:
  return "\n".join(text.strip().splitlines()[-n:])


# ----------------------------------------------------------------------------------------------
# The matmul ceiling.


def ceiling_cache_path(machine_name: str) -> Path:
  return CACHE_DIR / f"ceiling-{machine_name}.json"


def get_ceiling(path: Path | None, machine_name: str, *, quick: bool = False) -> dict[str, Any]:
  """The matmul ceiling to report against.

  `path` (run_all passes the figure measured earlier in the same run) wins; otherwise a cached
  measurement of this machine younger than a day; otherwise it is measured now (and cached).

  Returns:
    {"gflops": {"float32": x, "bfloat16": y}, "source": ..., "measured_at": ...}.
  """
  if path is None:
    cached = ceiling_cache_path(machine_name)
    if cached.exists() and time.time() - cached.stat().st_mtime < CEILING_MAX_AGE_S:
      path = cached
  if path is None:
    path = ceiling_cache_path(machine_name)
    args = ["--out", str(path)] + (["--quick"] if quick else [])
    code, log = run_module("benchmarks.matmul_ceiling", args, timeout=600)
    if code != 0:
      raise RuntimeError(f"matmul_ceiling failed:\n{tail(log)}")
  data = read_json(path)
  return {"gflops": data["ceiling_gflops"], "source": str(path),
          "measured_at": data.get("finished_at"), "quick": data.get("quick", False)}


# ----------------------------------------------------------------------------------------------
# Output.


def fmt(x: Any, digits: int = 3) -> str:
  """Compact number formatting for tables ('-' for missing)."""
  if x is None:
    return "-"
  if isinstance(x, bool):
    return str(x)
  if isinstance(x, int):
    return str(x)
  if isinstance(x, float):
    if x == 0:
      return "0"
    if abs(x) >= 10 ** digits:
      return f"{x:,.0f}"
    return f"{x:.{digits}g}"
  return str(x)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
  lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
  return "\n".join(lines)
