"""Checkpointing for training runs: a thin wrapper over Orbax's CheckpointManager.

Each checkpoint step holds two items:

* ``state``: the train-state pytree (jax arrays, possibly sharded), written with
  ``StandardSave`` and restored onto caller-chosen shardings with ``StandardRestore``.
* ``meta``: a small JSON dict (config, data-pipeline position, ...), written with ``JsonSave``.

The wrapper never deletes anything itself: old steps are pruned only by Orbax's ``LatestN``
preservation policy when a new step is saved, and a corrupt step makes ``restore`` raise a
``CheckpointError`` that explains how to recover instead of silently falling back or cleaning up.

Preemption: ``PreemptionFlag`` turns SIGTERM (and optionally SIGINT) into a flag that the training
loop polls once per step; on ``should_stop(step)`` the loop saves with ``force=True``, calls
``wait()`` and exits cleanly.
"""

from __future__ import annotations

import logging
import os
import signal
import types
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

PyTree = Any

_STATE = "state"
_META = "meta"
_MAX_CAUSE_CHARS = 600

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
  """A checkpoint step exists but cannot be read (corrupt, incomplete or incompatible)."""

  def __init__(self, message: str, *, directory: str, step: int | None):
    super().__init__(message)
    self.directory = directory
    self.step = step


def reached_preemption_sync_point(step: int) -> bool:
  """Whether JAX's multi-host preemption service says to checkpoint at ``step``.

  Returns False when the service is unavailable (single process, service disabled, or any error),
  so it is safe and cheap to call every step.
  """
  try:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    return bool(multihost_utils.reached_preemption_sync_point(step))
  except Exception:  # pylint: disable=broad-except
    return False


def _is_remote(path: str) -> bool:
  return "://" in path


class Checkpointer:
  """Saves and restores ``(state, meta)`` checkpoints under ``workdir/checkpoints``.

  Usage::

    with Checkpointer(workdir / "checkpoints", save_every=1000) as ckpt:
      if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(abstract_state)
      ...
      ckpt.save(step, state, {"config": cfg, "data_pos": pos})

  All processes must call ``save``/``restore``/``wait`` collectively (Orbax coordinates hosts):
  every process writes the shards it holds and process 0 the metadata and ``meta``, so the
  directory must be one storage all processes see (a GCS bucket on a pod; any local path for
  processes on one machine). Arrays may be sharded across processes and are restored onto the
  target shardings, whatever the process count (tested in ``tests/test_multihost.py``).
  """

  def __init__(
      self,
      directory: str | os.PathLike,
      *,
      save_every: int,
      keep: int = 3,
      async_save: bool = True,
  ):
    """Opens (creating if needed) the checkpoint directory without touching existing contents.

    Args:
      directory: Checkpoint directory, normally ``workdir/checkpoints``. It and the workdir are
        created if missing, but the workdir's parent must exist (guards against typos).
      save_every: ``save`` writes only at steps that are multiples of this (unless forced).
      keep: Number of most recent steps to keep; older ones are pruned after each save.
      async_save: Write to storage in a background thread after the device-to-host copy.

    Raises:
      FileNotFoundError: The parent of the workdir does not exist (local paths only).
      ValueError: ``save_every`` or ``keep`` is not positive.
    """
    if save_every < 1:
      raise ValueError(f"save_every must be >= 1, got {save_every}")
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}")
    path_str = os.fspath(directory)
    if not _is_remote(path_str):
      path_str = os.path.abspath(path_str)
      workdir = os.path.dirname(path_str)
      parent = os.path.dirname(workdir)
      if not os.path.isdir(parent):
        raise FileNotFoundError(
            f"Cannot create checkpoint directory {path_str!r}: the parent {parent!r} of the "
            f"workdir {workdir!r} does not exist. Create it first or fix the path."
        )
    self._directory = epath.Path(path_str)
    self._save_every = save_every
    self._keep = keep
    options = ocp.CheckpointManagerOptions(
        # Save decisions are made in `save`; Orbax's own policy is bypassed with force=True.
        save_interval_steps=1,
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=async_save,
        create=True,
        cleanup_tmp_directories=False,
    )
    self._manager = ocp.CheckpointManager(
        self._directory, options=options, item_names=(_STATE, _META)
    )
    self._closed = False

  @property
  def directory(self) -> epath.Path:
    """The checkpoint directory."""
    return self._directory

  @property
  def save_every(self) -> int:
    """Save interval in steps."""
    return self._save_every

  def all_steps(self) -> list[int]:
    """All complete checkpoint steps in the directory, ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest checkpoint step, or None when there is none."""
    return self._manager.latest_step()

  def save(
      self, step: int, state: PyTree, meta: dict | None = None, *, force: bool = False
  ) -> bool:
    """Saves ``state`` and ``meta`` at ``step`` if due (``step % save_every == 0``) or forced.

    A step reached at a JAX preemption sync point is saved as if forced. A step that already
    exists is never overwritten (returns False), so a forced save right after a periodic one at
    the same step is harmless. With ``async_save`` the write finishes in the background; call
    ``wait()`` before exiting.

    Args:
      step: Training step used as the checkpoint name.
      state: Pytree of arrays to save.
      meta: JSON-serializable dict (e.g. config and data position); ``None`` saves ``{}``.
      force: Save regardless of ``save_every``.

    Returns:
      Whether a save was started.
    """
    if not (force or step % self._save_every == 0 or reached_preemption_sync_point(step)):
      return False
    if step in self._manager.all_steps():
      log.info("Checkpoint step %d already exists in %s; not saving again.", step, self._directory)
      return False
    latest = self._manager.latest_step()
    if latest is not None and step < latest:
      log.warning(
          "Saving step %d although a newer step %d exists in %s (resumed from an earlier step?).",
          step,
          latest,
          self._directory,
      )
    args = ocp.args.Composite(
        **{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(dict(meta or {}))}
    )
    return bool(self._manager.save(step, args=args, force=True))

  def restore(self, abstract_state: PyTree, step: int | None = None) -> tuple[PyTree, dict]:
    """Restores ``(state, meta)`` from ``step`` (default: latest).

    Arrays are placed on the shardings of ``abstract_state``, a pytree of
    ``jax.ShapeDtypeStruct`` with ``.sharding`` set (e.g. built with ``jax.eval_shape`` and the
    target shardings); the sharding may differ from the one used at save time.

    Raises:
      FileNotFoundError: No checkpoint exists, or ``step`` is not among the saved steps.
      CheckpointError: The step exists but could not be read; nothing is deleted.
    """
    self.wait()
    self._manager.reload()  # Pick up steps moved aside or added since construction.
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"No checkpoints found in {self._directory}.")
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise FileNotFoundError(
          f"Checkpoint step {step} not found in {self._directory}; available steps: {steps}."
      )
    args = ocp.args.Composite(
        **{_STATE: ocp.args.StandardRestore(abstract_state), _META: ocp.args.JsonRestore()}
    )
    try:
      restored = self._manager.restore(step, args=args)
    except Exception as e:  # pylint: disable=broad-except
      raise self._restore_error(step, steps, e) from e
    return restored[_STATE], dict(restored[_META] or {})

  def _restore_error(self, step: int, steps: list[int], cause: Exception) -> CheckpointError:
    step_dir = self._directory / str(step)
    earlier = [s for s in steps if s < step]
    cause_text = f"{type(cause).__name__}: {cause}"
    if len(cause_text) > _MAX_CAUSE_CHARS:
      cause_text = cause_text[:_MAX_CAUSE_CHARS] + " ..."
    hint = (
        f"pass an earlier step to restore(..., step=N) (earlier steps: {earlier}), or "
        if earlier
        else ""
    )
    message = (
        f"Could not restore checkpoint step {step} from directory {self._directory} "
        f"(step folder {step_dir}). The step looks corrupt or incomplete, or does not match "
        f"abstract_state. Nothing was deleted. To recover, {hint}move the step folder out of "
        f"the way (e.g. `mv {step_dir} {step_dir}.corrupt`) so the previous step becomes the "
        f"latest, or point the run at a fresh workdir. Cause: {cause_text}"
    )
    return CheckpointError(message, directory=str(self._directory), step=step)

  def wait(self) -> None:
    """Blocks until any in-flight asynchronous save has been committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases resources. Idempotent."""
    if not self._closed:
      self._closed = True
      self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()


_Handler = Callable[[int, types.FrameType | None], Any] | int | None


class PreemptionFlag:
  """Records SIGTERM (and optionally SIGINT) in a flag for the training loop to poll.

  The handler only sets a flag, so it is safe at any point of a step; the loop checks
  ``should_stop(step)`` (or ``requested``), saves with ``force=True``, waits and exits. With
  ``sigint=True`` a second Ctrl-C falls through to the previous handler (normally
  ``KeyboardInterrupt``) so an unresponsive run can still be interrupted. Signal handlers can
  only be installed from the main thread. On multi-host jobs that enable JAX's preemption
  service, the Python SIGTERM handler replaces JAX's own notifier; there, rely on
  ``should_stop`` (which also polls the service's sync point) and skip ``install``.
  """

  def __init__(self, *, sigint: bool = False):
    self._signals: tuple[int, ...] = (signal.SIGTERM,) + ((signal.SIGINT,) if sigint else ())
    self._previous: dict[int, _Handler] = {}
    self._requested = False
    self._signum: int | None = None
    self._handler = self._handle  # One bound-method object, so identity checks work.

  @property
  def requested(self) -> bool:
    """Whether a stop signal was received (or ``request()`` was called)."""
    return self._requested

  @property
  def signal_received(self) -> int | None:
    """The last signal number received, if any."""
    return self._signum

  @property
  def installed(self) -> bool:
    """Whether the handlers are currently installed."""
    return bool(self._previous)

  def request(self) -> None:
    """Sets the flag manually (e.g. from a time budget check)."""
    self._requested = True

  def install(self) -> PreemptionFlag:
    """Installs the handlers, remembering the previous ones; returns self."""
    if self._previous:
      return self
    previous = {}
    try:
      for sig in self._signals:
        previous[sig] = signal.signal(sig, self._handler)
    except ValueError as e:  # Not the main thread.
      for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
      raise ValueError(f"PreemptionFlag must be installed from the main thread: {e}") from e
    self._previous = previous
    return self

  def uninstall(self) -> None:
    """Restores the handlers that were active before ``install``."""
    for sig, handler in self._previous.items():
      if signal.getsignal(sig) is not self._handler:
        log.warning("Signal %d handler was replaced by someone else; leaving it in place.", sig)
        continue
      signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    self._previous = {}

  def _handle(self, signum: int, frame: types.FrameType | None) -> None:
    if signum == signal.SIGINT and self._signum == signal.SIGINT:
      previous = self._previous.get(signum)
      if callable(previous):
        previous(signum, frame)
        return
    self._signum = signum
    self._requested = True

  def should_stop(self, step: int) -> bool:
    """Whether the loop should checkpoint and exit at ``step``.

    True if this flag is set or JAX's preemption service reached its sync point. With several
    processes the local flag is OR-ed across hosts (a collective: every process must call this
    at every step) so that all hosts save the same step together.
    """
    requested = self._requested
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      flags = multihost_utils.process_allgather(np.asarray(requested, dtype=np.int32))
      requested = bool(np.any(flags))
    return requested or reached_preemption_sync_point(step)

  def __enter__(self) -> PreemptionFlag:
    return self.install()

  def __exit__(self, *exc_info: object) -> None:
    self.uninstall()


def install_sigterm_handler(*, sigint: bool = False) -> PreemptionFlag:
  """Installs and returns a ``PreemptionFlag`` for SIGTERM (and SIGINT if ``sigint``)."""
  return PreemptionFlag(sigint=sigint).install()


def abstract_like(tree: PyTree, shardings: Any = None) -> PyTree:
  """Builds a ``ShapeDtypeStruct`` tree for ``restore`` from a concrete (or abstract) tree.

  Args:
    tree: Pytree of arrays or ``ShapeDtypeStruct``s.
    shardings: A single ``jax.sharding.Sharding`` applied to every leaf, a pytree of shardings
      matching ``tree``, or None to keep each leaf's own sharding.
  """
  def one(x: Any, sharding: Any) -> jax.ShapeDtypeStruct:
    if sharding is None:
      sharding = getattr(x, "sharding", None)
    dtype = x.dtype if hasattr(x, "dtype") else jax.numpy.asarray(x).dtype
    return jax.ShapeDtypeStruct(np.shape(x), dtype, sharding=sharding)

  if shardings is None or isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: one(x, shardings), tree)
  return jax.tree.map(one, tree, shardings)
