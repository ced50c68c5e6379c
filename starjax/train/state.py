"""Train state, created already sharded: eval_shape -> shardings -> jit(init, out_shardings)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from starjax.models import llama
from starjax.models.config import ModelConfig
from starjax.parallel import sharding


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint holds: step, f32 master params and optimizer state."""

  step: jax.Array
  params: Any
  opt_state: Any


def param_logical_names(cfg: ModelConfig) -> Any:
  """Tree of logical-axis-name tuples matching the params tree (no FLOPs, no memory)."""
  boxed = jax.eval_shape(lambda: llama.init_params(cfg, jax.random.key(0), boxed=True))
  return sharding.logical_names(boxed)


def state_shardings(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh) -> Any:
  """NamedShardings for a TrainState: params by the rules table, optimizer moments alike."""
  names = param_logical_names(cfg)
  abstract_params = jax.eval_shape(lambda: llama.init_params(cfg, jax.random.key(0)))
  param_sh = sharding.tree_shardings(abstract_params, names, mesh)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_sh = optax.tree_map_params(
      tx, lambda _, s: s, abstract_opt, param_sh,
      transform_non_params=lambda _: sharding.replicated(mesh),
      is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  return TrainState(step=sharding.replicated(mesh), params=param_sh, opt_state=opt_sh)


def create_train_state(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                       rng: jax.Array, params: Any = None) -> TrainState:
  """Initialises (or adopts `params`) directly into the target shardings; no full replica."""
  shardings = state_shardings(cfg, tx, mesh)

  def init(rng, params):
    if params is None:
      params = llama.init_params(cfg, rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  if params is None:
    return jax.jit(lambda r: init(r, None), out_shardings=shardings)(rng)
  return jax.jit(init, out_shardings=shardings)(rng, params)


def abstract_train_state(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh) -> Any:
  """ShapeDtypeStructs with shardings: the restore target for checkpoints."""
  shardings = state_shardings(cfg, tx, mesh)
  shapes = jax.eval_shape(
      lambda: TrainState(step=jnp.zeros((), jnp.int32),
                         params=(p := llama.init_params(cfg, jax.random.key(0))),
                         opt_state=tx.init(p)))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def unbox(tree: Any) -> Any:
  return nn.meta.unbox(tree)
