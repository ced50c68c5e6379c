"""Jitted, donated, sharded train and eval steps for next-token prediction."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from starjax.models import abacus
from starjax.models.config import ModelConfig
from starjax.models.llama import Transformer
from starjax.parallel import multihost, sharding
from starjax.train import losses
from starjax.train.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def lm_loss(cfg: ModelConfig, params: Any, batch: Batch) -> tuple[jax.Array, dict[str, Any]]:
  """Masked next-token cross-entropy of one batch of rows (see `batching`).

  A "digit_offset" entry (B, T) shifts the digit indices of a model with digit-index embeddings
  (random per example in training, see `RowSource`); without it they start at 1.
  """
  digit_index = None
  if cfg.digit_positions and "digit_offset" in batch:
    digit_index, _ = abacus.digit_index(cfg, batch["inputs"], batch["digit_offset"],
                                        segment_ids=batch.get("segment_ids"))
  out = Transformer(cfg).apply({"params": params}, batch["inputs"], batch["positions"],
                               segment_ids=batch.get("segment_ids"), digit_index=digit_index)
  return losses.masked_cross_entropy(out.logits, batch["targets"], batch["loss_mask"])


def train_step(state: TrainState, batch: Batch, *, cfg: ModelConfig,
               tx: optax.GradientTransformation,
               schedule: Callable[[jax.Array], jax.Array] | None = None
               ) -> tuple[TrainState, Metrics]:
  """One AdamW update; returns the new state and scalar metrics."""
  (loss, stats), grads = jax.value_and_grad(
      lambda p: lm_loss(cfg, p, batch), has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
      "loss": loss,
      "grad_norm": optax.tree.norm(grads),
      "tokens": stats["tokens"],
      "accuracy": stats["correct"] / jnp.maximum(stats["tokens"], 1.0),
  }
  if schedule is not None:
    metrics["lr"] = schedule(state.step)
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, batch: Batch, *, cfg: ModelConfig) -> Metrics:
  """Summed statistics of one eval batch (sum over batches, then divide)."""
  _, stats = lm_loss(cfg, params, batch)
  return stats


def batch_sharding(mesh: Mesh, ndim: int = 2, batch_size: int | None = None) -> NamedSharding:
  """Rows sharded over ('data', 'fsdp') by the rules table (replicated if they do not divide)."""
  shape = (batch_size or mesh.size,) + (1,) * (ndim - 1)
  return sharding.named_sharding(("batch",) + (None,) * (ndim - 1), shape, mesh)


def jit_train_step(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                   state_shardings: Any, batch_size: int,
                   schedule: Callable[[jax.Array], jax.Array] | None = None) -> Callable:
  """`train_step` jitted with explicit shardings and the old state donated."""
  bsh = batch_sharding(mesh, 2, batch_size)

  def step(state, batch):
    with sharding.use_mesh(mesh):
      return train_step(state, batch, cfg=cfg, tx=tx, schedule=schedule)

  return jax.jit(step, in_shardings=(state_shardings, bsh),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))


def jit_eval_step(cfg: ModelConfig, mesh: Mesh, param_shardings: Any,
                  batch_size: int) -> Callable:
  bsh = batch_sharding(mesh, 2, batch_size)

  def step(params, batch):
    with sharding.use_mesh(mesh):
      return eval_step(params, batch, cfg=cfg)

  return jax.jit(step, in_shardings=(param_shardings, bsh), out_shardings=sharding.replicated(mesh))


@functools.lru_cache(maxsize=64)
def process_rows(mesh: Mesh, batch_size: int) -> np.ndarray:
  """Rows of a global batch that this process loads for `device_batch` (ascending indices).

  All rows on one process; on several, the rows its devices hold under `batch_sharding` (every
  row when the batch is too small to split, which then must be identical on all processes).
  """
  rows = (np.arange(batch_size) if jax.process_count() == 1
          else multihost.process_rows(batch_sharding(mesh, 1, batch_size), batch_size))
  rows.flags.writeable = False  # Shared by every caller through the cache.
  return rows


def device_batch(rows: dict[str, Any], mesh: Mesh, batch_size: int | None = None) -> Batch:
  """Host rows (this process's `process_rows`) -> global arrays sharded over the batch axes.

  Args:
    rows: arrays whose leading dimension holds this process's rows of the batch.
    mesh: the mesh the train step runs on.
    batch_size: the global batch size; default: local rows x process count (exact whenever the
      batch splits evenly over processes, always on one process).
  """
  out = {}
  for k, v in rows.items():
    n = batch_size or v.shape[0] * jax.process_count()
    if jax.process_count() > 1 and v.shape[0] != len(process_rows(mesh, n)):
      raise ValueError(f"device_batch: {k!r} has {v.shape[0]} rows, but this process holds "
                       f"{len(process_rows(mesh, n))} of the global batch of {n} "
                       "(load process_rows(mesh, batch_size)).")
    sh = batch_sharding(mesh, v.ndim, n)
    out[k] = jax.make_array_from_process_local_data(sh, v, (n,) + v.shape[1:])
  return out
