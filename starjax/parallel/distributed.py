"""Multi-host start-up: one call at the top of every entry point.

On a TPU pod (or several GPU hosts) every process runs the same command; JAX's distributed runtime
must be started before any other JAX call. `initialize()` does that when asked, through the
argument or `STARJAX_DISTRIBUTED=1`, and is a no-op otherwise, so the same entry point runs on a
laptop. On TPU VMs the coordinator, process count and id are discovered automatically; elsewhere
pass them or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (what
`python -m starjax.parallel.localhost` sets for CPU processes on one machine). CPU processes
exchange collectives through gloo (`jax_cpu_collectives_implementation`, the default in jax 0.10).

If a process dies, the others stop within about `heartbeat_timeout_s` (JAX's coordination service
aborts them with "Terminating process because the JAX distributed service detected fatal errors.
This most likely indicates that another task died"); rerunning every process resumes from the last
checkpoint.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)

ENV_FLAG = "STARJAX_DISTRIBUTED"


def _env_int(name: str) -> int | None:
  value = os.environ.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError as e:
    raise ValueError(f"${name} must be an integer, got {value!r}.") from e


def initialize(enabled: bool | None = None, *, coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               timeout_s: int = 300, heartbeat_timeout_s: int | None = None,
               shutdown_timeout_s: int | None = None) -> bool:
  """Starts jax.distributed if enabled (argument, else $STARJAX_DISTRIBUTED); returns whether on.

  Safe to call twice. Must run before anything touches a JAX device.

  Args:
    enabled: start the runtime; None reads $STARJAX_DISTRIBUTED.
    coordinator_address: host:port of process 0 (default $JAX_COORDINATOR_ADDRESS or auto).
    num_processes: process count (default $JAX_NUM_PROCESSES or auto).
    process_id: this process's index (default $JAX_PROCESS_ID or auto).
    timeout_s: how long to wait for every process to join.
    heartbeat_timeout_s: a process silent this long is declared dead and the others abort
      (JAX's default, 100 s, when None).
    shutdown_timeout_s: how long the exit barrier waits for the other processes (JAX's default
      when None).
  """
  if enabled is None:
    enabled = os.environ.get(ENV_FLAG, "").lower() in ("1", "true", "yes")
  if not enabled:
    return False
  if jax.distributed.is_initialized():
    return True
  if num_processes is None:
    num_processes = _env_int("JAX_NUM_PROCESSES")
  if process_id is None:
    process_id = _env_int("JAX_PROCESS_ID")
  timeouts = {}
  if heartbeat_timeout_s is not None:
    timeouts["heartbeat_timeout_seconds"] = heartbeat_timeout_s
  if shutdown_timeout_s is not None:
    timeouts["shutdown_timeout_seconds"] = shutdown_timeout_s
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             initialization_timeout=timeout_s, **timeouts)
  log.info("jax.distributed: process %d of %d, %d local / %d global devices",
           jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
  return True
