"""Public grouped matmul ops: `gmm` and `tgmm`, differentiable, with a choice of backend.

`gmm(lhs, rhs, group_sizes)` multiplies consecutive row groups of `lhs` by their own expert
weight, with `jax.lax.ragged_dot` semantics (rows past sum(group_sizes) give zeros). `tgmm` is
its weight gradient: per group `lhs[rows_g].T @ grad[rows_g]`. `gmm` carries a custom VJP so that
the backward pass uses the same fast kernels:

    d_lhs = gmm(grad, rhs, transpose_rhs=not transpose_rhs)
    d_rhs = tgmm(lhs, grad)            (tgmm(grad, lhs) when rhs is stored transposed)

`rhs` may be a `QuantizedWeight` (int8 values + float32 scales, moejax.pallas.quantized): every
backend then dequantizes where it loads the weight (per tile in the Triton and Mosaic kernels,
per group slice in XLA, the whole weight in the ragged_dot reference). The backward pass
computes d_lhs through the same quantized kernel (transposed); the integer values get no
gradient (a float0 zero), the float scales get theirs from the weight gradient that tgmm gives:
d scale = sum over each scale group of values * d_rhs.

Backends (rows of `moejax.pallas.backends.BACKEND_TABLE`, dispatched through it):
  "xla"        a loop over the groups' row tiles in plain XLA (moejax.pallas.xla_gmm), the CPU
               path;
  "triton"     Pallas kernels lowered through Triton (GPU), moejax.pallas.triton_gmm;
  "mosaic"     Pallas kernels lowered through Mosaic (TPU), moejax.pallas.mosaic_gmm;
  "ragged_dot" jax.lax.ragged_dot / ragged_dot_general (moejax.pallas.ragged_gmm), the
               reference the others must match;
  "auto"       triton on GPU, mosaic on TPU, xla elsewhere (`resolve_backend`).
The backend modules are imported when first used so that this file does not depend on all of
them being importable (the Mosaic TPU lowering, for instance, is only needed on TPU). Arguments
are validated here (concrete group sizes on the host) and again by each backend
(`moejax.pallas.validation`), the config against the backend's config type.

Legend: M rows, K contraction width, N output width, G groups.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from moejax.pallas.backends import BACKEND_TABLE, BACKENDS, GmmBackend, resolve_backend
from moejax.pallas.quantized import QuantizedWeight
from moejax.pallas.validation import check_config, check_gmm_args, check_tgmm_args

__all__ = ["BACKENDS", "gmm", "resolve_backend", "tgmm"]


def _resolve_interpret(interpret: bool | None) -> bool:
    if interpret is None:
        # Pallas kernels have no CPU lowering: on a CPU host the only way to run them is the
        # interpreter.
        return jax.default_backend() == "cpu"
    if not isinstance(interpret, bool):
        raise ValueError(f"interpret must be None, True or False, got {interpret!r}")
    return interpret


def _backend(name: str, config: Any) -> GmmBackend:
    """The table row for `name` ("auto" resolved), with `config` checked against its type."""
    backend = BACKEND_TABLE[resolve_backend(name)]
    check_config(backend.name, config, backend.kernels().config_type)
    return backend


# Jitted so that eager calls compile the backend's metadata + kernel once per shape instead of
# dispatching (and compiling) each small index op separately.
@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6, 7))
def _gmm_impl(lhs, rhs, group_sizes, transpose_rhs, out_dtype, backend, config, interpret):
    """Forward product on already validated arguments and a resolved backend row."""
    return backend.kernels().gmm(
        lhs,
        rhs,
        group_sizes,
        transpose_rhs=transpose_rhs,
        preferred_element_type=out_dtype,
        config=config,
        interpret=interpret,
    )


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6, 7))
def _tgmm_impl(lhs, grad, group_sizes, num_groups, out_dtype, backend, config, interpret):
    """Per-group lhs.T @ grad on already validated arguments and a resolved backend row."""
    return backend.kernels().tgmm(
        lhs,
        grad,
        group_sizes,
        num_groups=num_groups,
        preferred_element_type=out_dtype,
        config=config,
        interpret=interpret,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _gmm(lhs, rhs, group_sizes, transpose_rhs, out_dtype, backend, config, interpret):
    return _gmm_impl(lhs, rhs, group_sizes, transpose_rhs, out_dtype, backend, config, interpret)


def _gmm_fwd(lhs, rhs, group_sizes, transpose_rhs, out_dtype, backend, config, interpret):
    out = _gmm_impl(lhs, rhs, group_sizes, transpose_rhs, out_dtype, backend, config, interpret)
    return out, (lhs, rhs, group_sizes)


def _gmm_bwd(transpose_rhs, out_dtype, backend, config, interpret, res, grad_MxN):
    lhs, rhs, group_sizes = res
    # The kernels take one input dtype: the cotangent arrives in the output dtype (often f32 for
    # bf16 inputs) and is brought to the input dtype, as the forward matmul itself ran in it.
    grad_MxN = grad_MxN.astype(lhs.dtype)
    d_lhs = _gmm_impl(
        grad_MxN, rhs, group_sizes, not transpose_rhs, lhs.dtype, backend, config, interpret
    )
    quantized = isinstance(rhs, QuantizedWeight)
    num_groups = rhs.shape[0]
    # The weight's gradient in its stored layout; float32 for a quantized weight (it only feeds
    # the scales' gradient).
    d_rhs_dtype = jnp.float32 if quantized else rhs.dtype
    if transpose_rhs:
        # rhs is [G, N, K]: its gradient is grad[rows_g].T @ lhs[rows_g].
        d_rhs = _tgmm_impl(
            grad_MxN, lhs, group_sizes, num_groups, d_rhs_dtype, backend, config, interpret
        )
    else:
        d_rhs = _tgmm_impl(
            lhs, grad_MxN, group_sizes, num_groups, d_rhs_dtype, backend, config, interpret
        )
    if quantized:
        d_rhs = QuantizedWeight(None, _scale_grad(rhs, d_rhs))
    # Integer group sizes (and quantized values) have no tangent space; None is the custom_vjp
    # spelling of "no grad".
    return d_lhs, d_rhs, None


def _scale_grad(weight: QuantizedWeight, d_w: jax.Array) -> jax.Array:
    """d scale [G, S, A2] from the dequantized weight's gradient [G, A1, A2]: w = values * scale
    over each group of A1 / S rows, so d scale = sum over the group of values * d w."""
    g, a1, a2 = weight.shape
    s = weight.scale.shape[1]
    prod = (weight.values.astype(jnp.float32) * d_w).reshape(g, s, a1 // s, a2)
    return prod.sum(axis=2).astype(weight.scale.dtype)


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(
    lhs: jax.Array,
    rhs: jax.Array | QuantizedWeight,
    group_sizes: jax.Array,
    *,
    transpose_rhs: bool = False,
    preferred_element_type: Any = None,
    backend: str = "auto",
    config: Any = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Grouped matmul: row block g of lhs times rhs[g] (jax.lax.ragged_dot semantics).

    Args:
      lhs: [M, K] float, rows grouped consecutively by `group_sizes`.
      rhs: [G, K, N], or [G, N, K] when `transpose_rhs` (same dtype as lhs); or a
        `QuantizedWeight` of that shape (int8 values, float32 scales grouped along the stored
        axis 1), dequantized to lhs.dtype tile by tile (its values get no gradient, its
        scales do).
      group_sizes: [G] integer, non-negative, sum <= M.
      transpose_rhs: contract lhs with rhs's last axis (rhs[g].T is used).
      preferred_element_type: result dtype; None = lhs.dtype. Accumulation is float32.
      backend: one of "auto", "xla", "triton", "mosaic", "ragged_dot".
      config: the backend's tiling, an instance of its config type (`XlaConfig`,
        `TritonConfig`, `MosaicConfig`; ragged_dot takes none); None = the backend's tuned table
        / default. Another type raises a ValueError naming the backend and the type.
      interpret: run Pallas kernels in interpret mode; None = interpret when on CPU.

    Returns:
      [M, N]: rows of group g are lhs[rows_g] @ rhs[g]; rows past sum(group_sizes) are zero.
    """
    problem = check_gmm_args(lhs, rhs, group_sizes, transpose_rhs, preferred_element_type)
    return _gmm(
        lhs,
        rhs,
        group_sizes.astype(jnp.int32),
        bool(transpose_rhs),
        problem.out_dtype,
        _backend(backend, config),
        config,
        _resolve_interpret(interpret),
    )


def tgmm(
    lhs: jax.Array,
    grad: jax.Array,
    group_sizes: jax.Array,
    *,
    num_groups: int | None = None,
    preferred_element_type: Any = None,
    backend: str = "auto",
    config: Any = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Transposed grouped matmul (gmm's weight gradient): out[g] = lhs[rows_g].T @ grad[rows_g].

    Args:
      lhs: [M, K] float, rows grouped consecutively by `group_sizes`.
      grad: [M, N], same dtype and row grouping.
      group_sizes: [G] integer, non-negative, sum <= M; rows past the sum are ignored.
      num_groups: G; None = group_sizes.shape[0] (must equal it when given).
      preferred_element_type: result dtype; None = lhs.dtype. Accumulation is float32.
      backend, config, interpret: as for `gmm`.

    Returns:
      [G, K, N]; an empty group gives zeros.
    """
    problem = check_tgmm_args(lhs, grad, group_sizes, num_groups, preferred_element_type)
    return _tgmm_impl(
        lhs,
        grad,
        group_sizes.astype(jnp.int32),
        problem.num_groups,
        problem.out_dtype,
        _backend(backend, config),
        config,
        _resolve_interpret(interpret),
    )
