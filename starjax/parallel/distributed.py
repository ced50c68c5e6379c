"""Multi-host start-up: one call at the top of every entry point.

On a TPU pod (or several GPU hosts) every process runs the same command; JAX's distributed runtime
must be started before any other JAX call. `initialize()` does that when asked, through the
argument or `STARJAX_DISTRIBUTED=1`, and is a no-op otherwise, so the same entry point runs on a
laptop. On TPU VMs the coordinator, process count and id are discovered automatically; elsewhere
pass them or set JAX's usual variables (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID).
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)

ENV_FLAG = "STARJAX_DISTRIBUTED"


def initialize(enabled: bool | None = None, *, coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               timeout_s: int = 300) -> bool:
  """Starts jax.distributed if enabled (argument, else $STARJAX_DISTRIBUTED); returns whether on.

  Safe to call twice. Must run before anything touches a JAX device.
  """
  if enabled is None:
    enabled = os.environ.get(ENV_FLAG, "").lower() in ("1", "true", "yes")
  if not enabled:
    return False
  if jax.distributed.is_initialized():
    return True
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             initialization_timeout=timeout_s)
  log.info("jax.distributed: process %d of %d, %d local / %d global devices",
           jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
  return True
