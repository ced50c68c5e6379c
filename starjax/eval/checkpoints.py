"""Loading model parameters (only) from a `python -m starjax.train` run directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from starjax import tokenizers
from starjax.models import llama
from starjax.models.config import ModelConfig
from starjax.train import loop

_STATE = "state"
_META = "meta"


def _manager(directory: Path) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  return ocp.CheckpointManager(directory, options=options, item_names=(_STATE, _META))


def load_params_from_workdir(workdir: str | os.PathLike, *, step: int | None = None,
                             mesh: Mesh | None = None) -> tuple[ModelConfig, Any, str]:
  """Restores the params of a training run without its optimizer state.

  See `restore_params` (which also returns the step and the run config) for details.
  """
  cfg, params, tokenizer_spec, _, _ = restore_params(workdir, step=step, mesh=mesh)
  return cfg, params, tokenizer_spec


def restore_params(workdir: str | os.PathLike, *, step: int | None = None,
                   mesh: Mesh | None = None) -> tuple[ModelConfig, Any, str, int, dict[str, Any]]:
  """Restores the params of a training run without its optimizer state.

  Reads the run's config from the checkpoint's `meta` item, rebuilds the model config (with the
  vocabulary size of the run's tokenizer, as training does) and restores only the `params`
  subtree of the saved TrainState (an Orbax partial restore).

  Args:
    workdir: the `--workdir` of a training run (holding `checkpoints/`).
    step: checkpoint step (default: the latest).
    mesh: place the params replicated on this mesh; default: the first local device.

  Returns:
    (model config, params pytree of jax arrays, tokenizer spec string for `load_tokenizer`,
    restored step, the run's config dict).

  Raises:
    FileNotFoundError: no checkpoint directory, no checkpoints, or `step` is not saved.
    ValueError: the checkpoint has no run config in its meta.
  """
  directory = Path(workdir).absolute() / "checkpoints"
  if not directory.is_dir():
    raise FileNotFoundError(f"No checkpoint directory {str(directory)!r}: is {str(workdir)!r} the "
                            f"workdir of a `python -m starjax.train` run?")
  with _manager(directory) as manager:
    steps = sorted(manager.all_steps())
    if not steps:
      raise FileNotFoundError(f"No complete checkpoints in {str(directory)!r}.")
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise FileNotFoundError(f"Checkpoint step {step} not in {str(directory)!r}; saved: {steps}.")
    meta = manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META]
    config = (meta or {}).get("config")
    if not config:
      raise ValueError(f"Checkpoint {directory / str(step)} has no run config in its meta.")
    tokenizer_spec = str(config.get("tokenizer", "byte"))
    tok = tokenizers.load_tokenizer(tokenizer_spec)
    cfg = loop.parse_config(config, vocab_size=tok.vocab_size).model

    sharding = (NamedSharding(mesh, PartitionSpec()) if mesh is not None
                else jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    shapes = jax.eval_shape(lambda: llama.init_params(cfg, jax.random.key(0)))
    target = {"params": jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)}
    restore = ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)
    restored = manager.restore(step, args=ocp.args.Composite(**{_STATE: restore}))[_STATE]
  return cfg, restored["params"], tokenizer_spec, int(step), dict(config)
