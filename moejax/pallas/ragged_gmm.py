"""The "ragged_dot" backend: `jax.lax.ragged_dot` / `ragged_dot_general`, the oracle.

On CPU it computes every group densely (G times the FLOPs); it is the reference the other
backends are tested against, never picked by "auto". It has no tiling: `config` must be None.

Legend: M rows, K contraction width, N output width, G groups.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from moejax.pallas.backends import GmmKernels
from moejax.pallas.quantized import QuantizedWeight, dequantize
from moejax.pallas.validation import check_config, check_gmm_args, check_tgmm_args

# tgmm as a ragged_dot_general with a ragged contracting dimension: the M rows are split by
# group, each group contracts its own rows, and the groups become a new leading output axis.
TGMM_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([0], [0]), ([], [])),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[],
)


def gmm_ragged_dot(
    lhs: jax.Array,
    rhs: jax.Array | QuantizedWeight,
    group_sizes: jax.Array,
    *,
    transpose_rhs: bool = False,
    preferred_element_type: Any = None,
    config: None = None,
    interpret: bool = False,
) -> jax.Array:
    """jax.lax.ragged_dot(lhs, rhs) with rhs [G, K, N] (or [G, N, K] with transpose_rhs).

    `interpret` is ignored (no Pallas kernel). A QuantizedWeight rhs is dequantized in full to
    lhs.dtype first. Returns [M, N], zeros past sum(group_sizes).
    """
    del interpret
    check_config("ragged_dot", config, None)
    problem = check_gmm_args(lhs, rhs, group_sizes, transpose_rhs, preferred_element_type)
    if isinstance(rhs, QuantizedWeight):
        # The reference: the whole float weight, as the layer built it before gmm took
        # quantized weights.
        rhs = dequantize(rhs, lhs.dtype)
    rhs_GxKxN = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
    return jax.lax.ragged_dot(lhs, rhs_GxKxN, group_sizes, preferred_element_type=problem.out_dtype)


def tgmm_ragged_dot(
    lhs: jax.Array,
    grad: jax.Array,
    group_sizes: jax.Array,
    *,
    num_groups: int | None = None,
    preferred_element_type: Any = None,
    config: None = None,
    interpret: bool = False,
) -> jax.Array:
    """Per-group lhs.T @ grad through ragged_dot_general. Returns [G, K, N]."""
    del interpret
    check_config("ragged_dot", config, None)
    problem = check_tgmm_args(lhs, grad, group_sizes, num_groups, preferred_element_type)
    return jax.lax.ragged_dot_general(
        lhs, grad, group_sizes, TGMM_DIMS, preferred_element_type=problem.out_dtype
    )


GMM_KERNELS = GmmKernels(
    gmm=gmm_ragged_dot, tgmm=tgmm_ragged_dot, config_type=None, tuned_configs=None
)
