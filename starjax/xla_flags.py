"""XLA_FLAGS editing that does not import jax: the flags must be set before jax starts."""

from __future__ import annotations

DEVICE_FLAG = "--xla_force_host_platform_device_count"


def with_device_count(flags: str, devices: int | None) -> str:
  """An XLA_FLAGS value: `flags` without its fake CPU device count, plus `devices` if given.

  Used for child processes and before jax starts: multi-process launches (`devices` per process),
  benchmarks (None: the real device), the compile check and the test suite.
  """
  out = [f for f in flags.split() if not f.startswith(DEVICE_FLAG)]
  if devices is not None:
    out.append(f"{DEVICE_FLAG}={devices}")
  return " ".join(out)
