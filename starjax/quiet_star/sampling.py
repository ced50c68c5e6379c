"""Thought sampling: per-token PRNG keys, token choice, P passes vmapped inside `shard_map`.

Keys: thought token c_i (i = 1..M) of pass p at position t of example e is drawn with
`fold_in(fold_in(fold_in(fold_in(key, e), p), t), i)`, where e is the example's global id
(`batch["example_ids"]`, default its row in the global batch). Results therefore do not depend on
the number of devices, on how the batch is split, or on which other rows share the call.

Layout: the base pass runs once per example; the P passes are a `jax.vmap` over the thought and talk
steps that shares the base keys/values; with a mesh, the whole per-example computation runs inside
`jax.shard_map` over the batch axes ("data", "fsdp") with replicated parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from starjax.models.config import ModelConfig
from starjax.quiet_star import forward as fwd
from starjax.quiet_star.config import QuietStarConfig
from starjax.sampling import core as sampling_core

Array = jax.Array


def example_keys(key: Array, example_ids: Array) -> Array:
  """Keys (B,): fold_in(key, example id)."""
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, example_ids)


def row_keys(ex_keys: Array, pass_index: Array | int, length: int) -> Array:
  """Keys (B, L): fold_in(fold_in(example key, pass), position)."""
  def per_example(k):
    k = jax.random.fold_in(k, pass_index)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(k, jnp.arange(length))
  return jax.vmap(per_example)(ex_keys)


def token_key(key: Array, example_id: int, pass_index: int, position: int, index: int) -> Array:
  """The key of thought token c_index of (example, pass, position); for sequential samplers."""
  for i in (example_id, pass_index, position, index):
    key = jax.random.fold_in(key, i)
  return key


def choose_tokens(logits: Array, keys: Array | None, cfg: QuietStarConfig) -> Array:
  """Thought tokens (...) from float32 logits (..., V) whose suppressed ids are already -1e10.

  Draws from softmax(logits / thought_temperature) with one key per row, or argmax when
  `greedy_thoughts`.
  """
  if cfg.greedy_thoughts:
    return sampling_core.first_argmax(logits)
  lead = logits.shape[:-1]
  flat = logits.reshape(-1, logits.shape[-1]) / cfg.thought_temperature
  return sampling_core.sample_categorical(keys.reshape(-1), flat).reshape(lead)


def make_chooser(rkeys: Array | None, cfg: QuietStarConfig, forced: Array | None = None
                 ) -> fwd.Chooser:
  """A `forward.Chooser` sampling with per-row keys `rkeys` (B, L), or reading forced (M, B, L)."""
  if forced is not None:
    return lambda i, logits: jax.lax.dynamic_index_in_dim(forced, i - 1, 0, keepdims=False)

  def choose(i, logits):
    if cfg.greedy_thoughts:
      return choose_tokens(logits, None, cfg)
    keys = jax.vmap(jax.vmap(jax.random.fold_in, in_axes=(0, None)), in_axes=(0, None))(rkeys, i)
    return choose_tokens(logits, keys, cfg)

  return choose


def rollouts(params: fwd.Params, tokens: Array, valid: Array, ex_keys: Array,
             cfg: QuietStarConfig, model_cfg: ModelConfig, forced: Array | None = None
             ) -> tuple[fwd.BaseOutputs, fwd.ThoughtOutputs]:
  """Base pass once, then the P passes vmapped (ThoughtOutputs get a leading P axis).

  Args:
    params: Quiet-STaR parameters {"lm", "thought", "mixer"}.
    tokens: int (B, L).
    valid: bool (B, L), real tokens.
    ex_keys: (B,) per-example keys (`example_keys`).
    cfg: objective settings.
    model_cfg: decoder shape.
    forced: optional int (B, P, M, L) thought tokens to use instead of sampling.
  """
  base = fwd.base_pass(params["lm"], tokens, valid, model_cfg)

  def one_pass(p, forced_p):
    choose = make_chooser(row_keys(ex_keys, p, tokens.shape[1]), cfg, forced_p)
    return fwd.thought_pass(params, base, tokens, valid, cfg, model_cfg, choose)

  passes = jnp.arange(cfg.n_passes)
  if forced is None:
    return base, jax.vmap(lambda p: one_pass(p, None))(passes)
  return base, jax.vmap(one_pass)(passes, jnp.transpose(forced, (1, 2, 0, 3)))


def batch_axes(mesh: Mesh) -> tuple[str, ...] | None:
  """The mesh axes the batch is split over (those of "data"/"fsdp" larger than 1)."""
  return tuple(a for a in ("data", "fsdp") if mesh.shape.get(a, 1) > 1) or None


def over_examples(fn: Callable[..., Any], mesh: Mesh | None, n_replicated: int
                  ) -> Callable[..., Any]:
  """Runs fn(*replicated, *per_example) per device under `shard_map` (or directly without mesh).

  The first `n_replicated` arguments (parameters, keys) are replicated; the rest and every output
  are split along their leading (example) axis over `batch_axes(mesh)`.
  """
  if mesh is None:
    return fn
  rows = P(batch_axes(mesh))

  def wrapped(*args):
    in_specs = (P(),) * n_replicated + (rows,) * (len(args) - n_replicated)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=rows, check_vma=False)(*args)

  return wrapped


def batch_example_ids(batch: dict[str, Array]) -> Array:
  """The global example ids that seed the thought keys: batch["example_ids"] or 0..B-1."""
  n = batch["tokens"].shape[0]
  return jnp.asarray(batch.get("example_ids", jnp.arange(n)), jnp.int32)


def sample_thoughts(params: fwd.Params, batch: dict[str, Array], key: Array,
                    cfg: QuietStarConfig, model_cfg: ModelConfig, mesh: Mesh | None = None
                    ) -> dict[str, Array]:
  """Samples P thoughts at every position.

  Args:
    params: Quiet-STaR parameters.
    batch: {"tokens": int (B, L), "mask": (B, L) real tokens, optional "example_ids": (B,)}.
    key: base PRNG key.
    cfg: objective settings.
    model_cfg: decoder shape.
    mesh: optional mesh; B must be divisible by the product of its batch axes.

  Returns:
    {"tokens": int (B, P, M, L), "logp": (B, P, M, L)}: thought token c_i of pass p at position t
    is tokens[b, p, i - 1, t].
  """
  def local(params, key, tokens, valid, ids):
    _, th = rollouts(params, tokens, valid, example_keys(key, ids), cfg, model_cfg)
    return {"tokens": jnp.transpose(th.tokens, (2, 0, 1, 3)),
            "logp": jnp.transpose(th.logp, (2, 0, 1, 3))}

  return over_examples(local, mesh, 2)(params, key, batch["tokens"],
                                       batch["mask"].astype(bool), batch_example_ids(batch))
