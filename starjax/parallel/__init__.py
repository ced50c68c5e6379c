"""Meshes, the logical-axis rules table, and sharded state creation."""

from starjax.parallel.mesh import AXES, MeshConfig, make_mesh
from starjax.parallel.sharding import (
    RULES,
    constrain,
    logical_names,
    logical_to_spec,
    named_sharding,
    replicated,
    tree_shardings,
    use_mesh,
)

__all__ = [
    "AXES", "RULES", "MeshConfig", "constrain", "logical_names", "logical_to_spec", "make_mesh",
    "named_sharding", "replicated", "tree_shardings", "use_mesh",
]
