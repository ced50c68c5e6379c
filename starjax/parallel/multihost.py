"""Host data <-> global arrays across processes, and process-0-only outputs.

In a multi-process run (TPU pod, several GPU hosts, or `starjax.parallel.localhost` on one machine)
each process addresses only its own devices: a numpy array cannot be passed to a jitted function
whose sharding spans other processes, and a global array cannot be fetched with `device_get`.
These helpers do the two conversions and say which process writes files. On one process every
helper is the plain single-process call (`device_put` / `device_get`), so library code uses them
unconditionally and single-process behaviour does not change.

All helpers that touch arrays spanning processes are collectives: every process must call them in
the same order with arrays of the same shapes.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Sharding


def is_multiprocess() -> bool:
  """Whether this run has more than one JAX process."""
  return jax.process_count() > 1


def is_primary() -> bool:
  """Whether this process writes host-side outputs (results, metrics, sampled text)."""
  return jax.process_index() == 0


def process_rows(sharding: Sharding, n: int) -> np.ndarray:
  """Ascending indices along dim 0 of an (n, ...) array held by this process's devices.

  These are the rows a process must supply to `jax.make_array_from_process_local_data` (which
  maps local rows onto its shards in ascending global order). All of 0..n-1 when dim 0 is
  replicated; n / process_count contiguous rows for the usual batch sharding.
  """
  shape = (n,) + (1,) * (len(getattr(sharding, "spec", ())) - 1)
  rows: set[int] = set()
  for index in sharding.addressable_devices_indices_map(shape).values():
    rows.update(range(*index[0].indices(n)))
  return np.asarray(sorted(rows), np.int64)


def _is_key(x: Any) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def global_from_host(tree: Any, sharding: Sharding | Any) -> Any:
  """Places values every process holds in full onto `sharding` (one sharding or a matching tree).

  Each process builds only the shards of its own devices. Leaves that already are global arrays
  are resharded with `device_put`. On one process this is `jax.device_put`.
  """
  if not is_multiprocess():
    return jax.device_put(tree, sharding)

  def one(x: Any, sh: Sharding) -> jax.Array:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.device_put(x, sh)
    host = x if _is_key(x) else np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(host.shape, sh, lambda index: host[index])

  if isinstance(sharding, Sharding):
    return jax.tree.map(lambda x: one(x, sharding), tree)
  return jax.tree.map(one, tree, sharding)


def to_host(tree: Any) -> Any:
  """numpy copies of the full values of `tree` on every process (a collective if multi-process).

  Arrays spanning other processes are all-gathered (`process_allgather`, exact); replicated and
  process-local arrays are read locally.
  """
  def one(x: Any) -> Any:
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.device_get(x)

  return jax.tree.map(one, tree)


def agree(flag: bool) -> bool:
  """Process 0's `flag` on every process (a collective if multi-process).

  For decisions that gate collectives, e.g. "this stage's file already exists, skip it": if
  processes decided differently, some would enter a collective the others never reach.
  """
  if not is_multiprocess():
    return bool(flag)
  return bool(multihost_utils.broadcast_one_to_all(np.int32(bool(flag))))


def sync(name: str) -> None:
  """Barrier across processes (no-op on one): e.g. after process 0 wrote a file others read."""
  if is_multiprocess():
    multihost_utils.sync_global_devices(name)


def assert_same(tree: Any, what: str) -> None:
  """Raises if `tree` (host values) differs between processes; no-op on one process."""
  if is_multiprocess():
    multihost_utils.assert_equal(tree, f"{what} differ between processes")
