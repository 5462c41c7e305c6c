"""The "tokamax" backend: tokamax's `ragged_dot` kernels behind moejax's gmm/tgmm contract.

An optional dependency (`pip install "moejax[tokamax]"`) for users who want tokamax's kernels
(Triton and Mosaic GPU kernels on GPU, a Mosaic kernel on TPU, `jax.lax.ragged_dot` elsewhere)
under moejax's pipeline, and so that the deviceless kernel report can set them beside ours.
"auto" never picks it.

`TokamaxConfig.implementation` chooses tokamax's implementation: None lets tokamax pick for the
default device (its first that does not raise NotImplementedError; on CPU its "xla" path),
"triton" / "mosaic" force its Pallas kernels (what a deviceless compile for a GPU or TPU target
needs, since the host is a CPU), "xla" its reference. moejax's custom VJP (moejax.pallas.ops)
calls this backend's gmm with transpose_rhs for d_lhs and its tgmm for d_rhs, so tokamax's own
VJP is not used. A QuantizedWeight rhs is dequantized in full to lhs.dtype first.

Legend: M rows, K contraction width, N output width, G groups.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from moejax.pallas.backends import GmmKernels
from moejax.pallas.quantized import QuantizedWeight, dequantize
from moejax.pallas.ragged_gmm import TGMM_DIMS
from moejax.pallas.validation import check_config, check_gmm_args, check_tgmm_args

IMPLEMENTATIONS = (None, "xla", "triton", "mosaic")


@dataclasses.dataclass(frozen=True)
class TokamaxConfig:
    """Which tokamax implementation runs (module docstring); tokamax tiles its own kernels.

    Attributes:
      implementation: None (tokamax picks), "xla", "triton" or "mosaic".
    """

    implementation: str | None = None

    def __post_init__(self):
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"TokamaxConfig.implementation={self.implementation!r} is invalid: allowed "
                f"values are {', '.join(map(repr, IMPLEMENTATIONS))}"
            )


def _tokamax():
    try:
        import tokamax  # noqa: PLC0415 (an optional dependency, imported on first use)
        from absl import flags  # noqa: PLC0415 (tokamax's dependency)
    except ImportError as e:
        raise ImportError(
            'backend="tokamax" needs the tokamax package: pip install "moejax[tokamax]"'
        ) from e
    # tokamax reads its options from absl flags and, unparsed, parses sys.argv for them, which
    # fails on any other program's arguments (pytest's, the train CLI's): use their defaults.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return tokamax


def _ragged_dot_general(lhs, rhs, group_sizes, dims, out_dtype, config):
    config = config or TokamaxConfig()
    return _tokamax().ragged_dot_general(
        lhs,
        rhs,
        group_sizes,
        dims,
        preferred_element_type=out_dtype,
        implementation=config.implementation,
    )


def gmm_tokamax(
    lhs: jax.Array,
    rhs: jax.Array | QuantizedWeight,
    group_sizes: jax.Array,
    *,
    transpose_rhs: bool = False,
    preferred_element_type: Any = None,
    config: TokamaxConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """tokamax.ragged_dot_general(lhs, rhs): rhs [G, K, N], or [G, N, K] with transpose_rhs
    (contracted over its last axis, no transposed copy). `interpret` is ignored (tokamax has
    no interpret switch). Returns [M, N], zeros past sum(group_sizes)."""
    del interpret
    check_config("tokamax", config, TokamaxConfig)
    problem = check_gmm_args(lhs, rhs, group_sizes, transpose_rhs, preferred_element_type)
    if isinstance(rhs, QuantizedWeight):
        rhs = dequantize(rhs, lhs.dtype)
    dims = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(([1], [2 if transpose_rhs else 1]), ([], [])),
        lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[0],
    )
    return _ragged_dot_general(lhs, rhs, group_sizes, dims, problem.out_dtype, config)


def tgmm_tokamax(
    lhs: jax.Array,
    grad: jax.Array,
    group_sizes: jax.Array,
    *,
    num_groups: int | None = None,
    preferred_element_type: Any = None,
    config: TokamaxConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Per-group lhs.T @ grad as tokamax's ragged_dot_general with a ragged contracting
    dimension (the oracle's TGMM_DIMS). Returns [G, K, N]; an empty group gives zeros."""
    del interpret
    check_config("tokamax", config, TokamaxConfig)
    problem = check_tgmm_args(lhs, grad, group_sizes, num_groups, preferred_element_type)
    return _ragged_dot_general(lhs, grad, group_sizes, TGMM_DIMS, problem.out_dtype, config)


GMM_KERNELS = GmmKernels(
    gmm=gmm_tokamax, tgmm=tgmm_tokamax, config_type=TokamaxConfig, tuned_configs=None
)
