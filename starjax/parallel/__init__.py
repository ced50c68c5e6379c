"""Meshes, the logical-axis rules table, sharded state creation, multi-host start-up."""

from starjax.parallel import multihost
from starjax.parallel.distributed import initialize
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
    "AXES", "RULES", "MeshConfig", "constrain", "initialize", "logical_names", "logical_to_spec", "make_mesh",
    "multihost", "named_sharding", "replicated", "tree_shardings", "use_mesh",
]
