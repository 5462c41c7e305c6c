"""moejax.sharding: device mesh, logical axis rules, sharded init (expert parallelism, the MoE
pipeline inside shard_map, lives in moejax.moe.parallel)."""

from moejax.sharding.mesh import MESH_AXES, initialize_distributed, make_mesh, mesh_shape
from moejax.sharding.partitioning import (
    batch_axes,
    batch_sharding,
    global_batch,
    init_sharded,
    logical_shardings,
    logical_to_spec,
    replicated,
    sharding_context,
    unbox,
)
from moejax.sharding.rules import DEFAULT_RULES, Rules, validate_rules

__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "Rules",
    "batch_axes",
    "batch_sharding",
    "global_batch",
    "init_sharded",
    "initialize_distributed",
    "logical_shardings",
    "logical_to_spec",
    "make_mesh",
    "mesh_shape",
    "replicated",
    "sharding_context",
    "unbox",
    "validate_rules",
]
