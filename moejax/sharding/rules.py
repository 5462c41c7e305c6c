"""Logical axis names -> mesh axes: the one table that decides how everything is sharded.

Layers name their parameter and activation axes (`nn.with_logical_partitioning`,
`nn.with_logical_constraint`); this table maps each name to mesh axes. Flax applies the rules in
order and skips a rule whose mesh axes another dimension of the same array already uses, so one
table serves parameters and activations: `embed` is sharded over fsdp in a weight, but in an
activation ("batch", "length", "embed") batch takes fsdp first and embed stays replicated.

Choices:
- batch is split over data, fsdp and expert: outside the MoE block the expert axis is just more
  data parallelism; inside it the expert-parallel shard_map moves tokens to their experts.
- embed -> fsdp (ZeRO-3 style: weights gathered per layer), mlp/heads/kv_heads/vocab -> tensor
  (Megatron-style column/row splits).
- exp -> expert; the experts' own dimensions use separate names (MaxText) so they can be
  sharded independently of the dense layers: embed_moe -> fsdp, mlp_moe -> tensor.
- layers (the nn.scan axis), norm, length, head_dim, unmodeled (router output), capacity are
  replicated.
"""

from __future__ import annotations

from moejax.sharding.mesh import MESH_AXES

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

BATCH_AXES = ("data", "fsdp", "expert")

DEFAULT_RULES: Rules = (
    ("batch", BATCH_AXES),
    ("tokens", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("exp", "expert"),
    ("embed_moe", "fsdp"),
    ("mlp_moe", "tensor"),
    ("layers", None),
    ("length", None),
    ("head_dim", None),
    ("norm", None),
    ("unmodeled", None),
    ("capacity", None),
)


def validate_rules(rules) -> Rules:
    """Checks a rules table's form: pairs (logical name, mesh axis | tuple of axes | None).

    Args:
      rules: sequence of pairs, e.g. DEFAULT_RULES or a config's `mesh.rules`.

    Returns:
      The rules as a tuple of tuples.

    Raises:
      ValueError: an entry that is not such a pair or names an unknown mesh axis.
    """
    out = []
    for i, entry in enumerate(rules):
        if not isinstance(entry, tuple | list) or len(entry) != 2 or not isinstance(entry[0], str):
            raise ValueError(f"rules[{i}]={entry!r} must be a pair (logical_name, mesh_axes)")
        name, axes = entry
        axes = tuple(axes) if isinstance(axes, list) else axes
        for axis in (axes,) if isinstance(axes, str) else axes or ():
            if axis not in MESH_AXES:
                raise ValueError(
                    f"rules[{i}] maps {name!r} to unknown mesh axis {axis!r}; "
                    f"allowed axes are {', '.join(MESH_AXES)}"
                )
        out.append((name, axes))
    return tuple(out)
