"""Logical axis names -> mesh axes: the ONE rules table and the helpers that apply it.

Parameters and activations are annotated with logical names ("embed", "mlp", "activation_batch",
...). `RULES` maps each name to mesh axes. A mesh axis is used for a dimension only if it divides
the dimension and is not already used by another dimension of the same array; otherwise that
dimension falls back to replication. This keeps one table valid for a 1-device CPU run, an 8-device
test mesh and a TPU pod, whatever the head counts or batch sizes.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None

# The rules table. Order of mesh axes inside a tuple is the order of the sharded layout.
RULES: tuple[tuple[str, MeshAxes], ...] = (
    # Parameters.
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    # Activations.
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_vocab", "tensor"),
    # Data batches and caches.
    ("batch", ("data", "fsdp")),
    ("cache_length", None),
)


@dataclasses.dataclass(frozen=True)
class ShardingContext:
  mesh: Mesh
  rules: tuple[tuple[str, MeshAxes], ...] = RULES


_CONTEXT: contextvars.ContextVar[ShardingContext | None] = contextvars.ContextVar(
    "starjax_sharding", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Sequence[tuple[str, MeshAxes]] = RULES) -> Iterator[Mesh]:
  """Makes `mesh` and `rules` the target of activation constraints while tracing.

  Usable inside a jitted function (it sets no global jax state; constraints carry their mesh).
  """
  token = _CONTEXT.set(ShardingContext(mesh, tuple(rules)))
  try:
    yield mesh
  finally:
    _CONTEXT.reset(token)


def current() -> ShardingContext | None:
  return _CONTEXT.get()


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, MeshAxes]] = RULES) -> PartitionSpec:
  """Resolves logical names for an array of `shape` into a PartitionSpec on `mesh`."""
  if names is None:
    return PartitionSpec()
  if len(names) != len(shape):
    raise ValueError(f"{len(names)} logical names {tuple(names)} for an array of shape "
                     f"{tuple(shape)}.")
  table = dict(rules)
  used: set[str] = set()
  out: list[MeshAxes] = []
  for name, dim in zip(names, shape):
    axes = table.get(name) if name is not None else None
    if axes is None:
      out.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    chosen: list[str] = []
    size = 1
    for ax in axes:
      n = mesh.shape.get(ax, 1)
      if ax in used or n == 1 or dim % (size * n):
        continue
      chosen.append(ax)
      size *= n
    used.update(chosen)
    out.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  return PartitionSpec(*out)


def named_sharding(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                   rules: Sequence[tuple[str, MeshAxes]] = RULES) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical names; a no-op outside `use_mesh`."""
  ctx = _CONTEXT.get()
  if ctx is None:
    return x
  return jax.lax.with_sharding_constraint(x, named_sharding(names, x.shape, ctx.mesh, ctx.rules))


def logical_names(boxed_tree: Any) -> Any:
  """Tree of logical-name tuples (None for unannotated leaves) from flax's partitioning boxes."""
  def names_of(leaf: Any) -> Any:
    if isinstance(leaf, nn.Partitioned):
      return tuple(leaf.names)
    return None
  return jax.tree.map(names_of, boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def tree_shardings(abstract_tree: Any, names_tree: Any, mesh: Mesh,
                   rules: Sequence[tuple[str, MeshAxes]] = RULES) -> Any:
  """NamedShardings for every leaf of `abstract_tree` given a matching tree of logical names.

  `names_tree` has tuples (or None) at the positions of the leaves of `abstract_tree`.
  """
  leaves, treedef = jax.tree.flatten(abstract_tree)
  names = treedef.flatten_up_to(names_tree)
  return treedef.unflatten(
      [named_sharding(n, x.shape, mesh, rules) for n, x in zip(names, leaves)])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
