"""Argument checks, the output-dtype rule and the kernels' output type, shared by `gmm`/`tgmm` and
every backend.

The public ops call these before dispatching (where concrete group sizes can still be checked on
the host) and each backend's entry point calls them again, so a backend called directly gets the
same messages. Every failure is a `ValueError` naming the argument and the shapes.

Legend: M rows, K contraction width, N output width, G groups.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from moejax.pallas.quantized import QuantizedWeight


class Problem(NamedTuple):
    """Sizes of one grouped product and its result dtype.

    Attributes:
      m, k, n: M, K, N (gmm: [M, K] x [G, K, N] -> [M, N]; tgmm: [M, K]^T x [M, N] -> [G, K, N]).
      num_groups: G.
      out_dtype: `preferred_element_type`, else the inputs' dtype.
    """

    m: int
    k: int
    n: int
    num_groups: int
    out_dtype: jnp.dtype

    @property
    def is_empty(self) -> bool:
        """No rows, no contraction, no columns or no groups: the result is all zeros."""
        return 0 in (self.m, self.k, self.n, self.num_groups)


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_group_sizes(group_sizes: jax.Array, num_groups: int, num_rows: int) -> None:
    if group_sizes.ndim != 1 or group_sizes.shape[0] != num_groups:
        raise ValueError(
            f"group_sizes must have shape [G]=[{num_groups}], got {tuple(group_sizes.shape)}"
        )
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be an integer array (int32), got {group_sizes.dtype}")
    if _is_concrete(group_sizes):
        sizes = np.asarray(group_sizes)
        if (sizes < 0).any():
            raise ValueError(f"group_sizes must be non-negative, got {sizes.tolist()}")
        if int(sizes.sum()) > num_rows:
            raise ValueError(
                f"sum(group_sizes)={int(sizes.sum())} exceeds the {num_rows} rows of lhs "
                f"(lhs rows M={num_rows})"
            )


def _check_operands(lhs: jax.Array, name: str, other: jax.Array, layout: str) -> None:
    """lhs [M, K] and `other` (rhs or grad, of rank len(layout)): floating, one dtype."""
    rank = layout.count(",") + 1
    if lhs.ndim != 2:
        raise ValueError(f"lhs must have rank 2 [M, K], got shape {tuple(lhs.shape)}")
    if other.ndim != rank:
        raise ValueError(f"{name} must have rank {rank} {layout}, got shape {tuple(other.shape)}")
    for arg, x in (("lhs", lhs), (name, other)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{arg} must be a floating-point array, got {arg}.dtype={x.dtype}")
    if lhs.dtype != other.dtype:
        raise ValueError(f"lhs.dtype={lhs.dtype} and {name}.dtype={other.dtype} must match")


def out_dtype(in_dtype: Any, preferred_element_type: Any) -> jnp.dtype:
    """The result dtype of every product: `preferred_element_type`, else the inputs' dtype."""
    if preferred_element_type is None:
        return jnp.dtype(in_dtype)
    if not jnp.issubdtype(jnp.dtype(preferred_element_type), jnp.floating):
        raise ValueError(
            f"preferred_element_type must be None or a floating dtype, got {preferred_element_type}"
        )
    return jnp.dtype(preferred_element_type)


def check_quantized(weight: QuantizedWeight, name: str = "rhs") -> None:
    """`weight` is a QuantizedWeight: values [G, A1, A2] int8, scale [G, A1 / group, A2] float32
    with at least one scale row and the group dividing A1."""
    values, scale = weight
    for field, x in (("values", values), ("scale", scale)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise ValueError(f"{name}.{field} must be an array, got {type(x).__name__}")
    if values.ndim != 3:
        raise ValueError(
            f"{name}.values must have rank 3 [G, A1, A2], got shape {tuple(values.shape)}"
        )
    if values.dtype != jnp.int8:
        raise ValueError(
            f"{name}.values must be int8 (int4 values stored as int8), got {values.dtype}"
        )
    if scale.dtype != jnp.float32:
        raise ValueError(f"{name}.scale must be float32, got {scale.dtype}")
    g, a1, a2 = values.shape
    if (
        scale.ndim != 3
        or (scale.shape[0], scale.shape[2]) != (g, a2)
        or scale.shape[1] < 1
        or a1 % scale.shape[1]
    ):
        raise ValueError(
            f"{name}.scale must have shape [G, A1 / group, A2] with the group dividing "
            f"A1={a1} (values {tuple(values.shape)}), got {tuple(scale.shape)}"
        )


def check_gmm_args(
    lhs: jax.Array,
    rhs: jax.Array | QuantizedWeight,
    group_sizes: jax.Array,
    transpose_rhs: bool,
    preferred_element_type: Any,
) -> Problem:
    """Validates gmm's operands: lhs [M, K], rhs [G, K, N] ([G, N, K] transposed), sizes [G].

    A `QuantizedWeight` rhs is checked by `check_quantized` and then stands for a weight of its
    values' shape in lhs's dtype.

    Returns:
      The problem's sizes and result dtype.
    """
    layout = "[G, N, K]" if transpose_rhs else "[G, K, N]"
    if isinstance(rhs, QuantizedWeight):
        check_quantized(rhs, "rhs")
        if lhs.ndim == 2 and not jnp.issubdtype(lhs.dtype, jnp.floating):
            raise ValueError(f"lhs must be a floating-point array, got lhs.dtype={lhs.dtype}")
        rhs = jax.ShapeDtypeStruct(rhs.values.shape, lhs.dtype)
    _check_operands(lhs, "rhs", rhs, layout)
    k_axis, n_axis = (2, 1) if transpose_rhs else (1, 2)
    if rhs.shape[k_axis] != lhs.shape[1]:
        raise ValueError(
            f"lhs [M, K]={tuple(lhs.shape)} and rhs {layout}={tuple(rhs.shape)} disagree on K "
            f"(transpose_rhs={transpose_rhs})"
        )
    _check_group_sizes(group_sizes, rhs.shape[0], lhs.shape[0])
    dtype = out_dtype(lhs.dtype, preferred_element_type)
    return Problem(lhs.shape[0], lhs.shape[1], rhs.shape[n_axis], rhs.shape[0], dtype)


def check_tgmm_args(
    lhs: jax.Array,
    grad: jax.Array,
    group_sizes: jax.Array,
    num_groups: int | None,
    preferred_element_type: Any,
) -> Problem:
    """Validates tgmm's operands: lhs [M, K], grad [M, N], sizes [G], num_groups None or G.

    Returns:
      The problem's sizes (num_groups resolved to G) and result dtype.
    """
    if group_sizes.ndim != 1:
        raise ValueError(f"group_sizes must have shape [G], got {tuple(group_sizes.shape)}")
    if num_groups is None:
        num_groups = group_sizes.shape[0]
    if num_groups != group_sizes.shape[0]:
        raise ValueError(
            f"num_groups={num_groups} must equal group_sizes.shape[0]={group_sizes.shape[0]}"
        )
    _check_operands(lhs, "grad", grad, "[M, N]")
    if lhs.shape[0] != grad.shape[0]:
        raise ValueError(
            f"lhs [M, K]={tuple(lhs.shape)} and grad [M, N]={tuple(grad.shape)} disagree on M"
        )
    _check_group_sizes(group_sizes, num_groups, lhs.shape[0])
    dtype = out_dtype(lhs.dtype, preferred_element_type)
    return Problem(lhs.shape[0], lhs.shape[1], grad.shape[1], int(num_groups), dtype)


def check_config(backend: str, config: Any, config_type: type | None) -> None:
    """`config` must be None or a `config_type` (a backend without a config type takes none)."""
    if config is None or (config_type is not None and isinstance(config, config_type)):
        return
    if config_type is None:
        raise ValueError(
            f"the {backend} backend takes no config, got {config!r} ({type(config).__name__})"
        )
    raise ValueError(
        f"config for the {backend} backend must be a {config_type.__name__} or None, "
        f"got {config!r} ({type(config).__name__})"
    )


def kernel_out_struct(shape: tuple[int, ...], dtype: Any, *operands: Any) -> jax.ShapeDtypeStruct:
    """The `out_shape` of a backend's pallas_call. Inside `shard_map(check_vma=True)` (the
    expert-parallel exchanges) it must say over which mesh axes the output varies: those any
    operand (array leaves of `operands`) varies over; outside, that set is empty."""
    leaves = jax.tree.leaves(operands)
    varying = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in leaves))
    return jax.ShapeDtypeStruct(
        shape, dtype, manual_axis_type=jax.sharding.ManualAxisType(varying=varying)
    )
