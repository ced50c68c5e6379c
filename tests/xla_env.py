"""XLA flags for the test suite: fast compiles, and a fake CPU device count per process.

Compiling dominates the suite's time (its models are tiny), and on XLA CPU most of a compile is
the MLIR fusion emitters and LLVM's optimisation passes. Turning both off roughly halves it
(tests/test_models.py + tests/test_quiet_star.py: 237 s -> 121 s on the 2-core dev VM, 2026-12-03)
at the cost of slower generated code, which tiny models do not notice. Only the tests use these
flags; the library, `make demo` and the benchmarks run with XLA's defaults.
"""

from __future__ import annotations

import importlib.metadata
import os

from starjax import xla_flags


def _fast_compile() -> tuple[str, ...]:
  """The fast-compile flags this jaxlib knows. XLA aborts the process on an unknown flag, and
  jaxlib 0.11 no longer has the fusion-emitter switch (seen on 0.11.2, 2026-12-04)."""
  flags = ["--xla_backend_optimization_level=0"]
  try:
    major, minor = (int(x) for x in importlib.metadata.version("jaxlib").split(".")[:2])
  except (importlib.metadata.PackageNotFoundError, ValueError):
    major, minor = 0, 10
  if (major, minor) < (0, 11):
    flags.insert(0, "--xla_cpu_use_fusion_emitters=false")
  return tuple(flags)


FAST_COMPILE = _fast_compile()
DEVICE_FLAG = xla_flags.DEVICE_FLAG


def flags(devices: int | None = None, base: str | None = None) -> str:
  """An XLA_FLAGS value: `base` (default: this process's) plus FAST_COMPILE.

  With `devices`, any device count in `base` is replaced by that many fake CPU devices.
  """
  base = os.environ.get("XLA_FLAGS", "") if base is None else base
  out = (xla_flags.with_device_count(base, devices) if devices else base).split()
  return " ".join(out + [f for f in FAST_COMPILE if f not in out])


def env(devices: int | None = None, **extra: str) -> dict[str, str]:
  """This process's environment with `flags(devices)` as XLA_FLAGS, plus `extra`."""
  return {**os.environ, "XLA_FLAGS": flags(devices), **extra}
