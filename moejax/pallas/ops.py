"""Public grouped matmul ops: `gmm` and `tgmm`, differentiable, with a choice of backend.

`gmm(lhs, rhs, group_sizes)` multiplies consecutive row groups of `lhs` by their own expert
weight, with `jax.lax.ragged_dot` semantics (rows past sum(group_sizes) give zeros). `tgmm` is
its weight gradient: per group `lhs[rows_g].T @ grad[rows_g]`. `gmm` carries a custom VJP so that
the backward pass uses the same fast kernels:

    d_lhs = gmm(grad, rhs, transpose_rhs=not transpose_rhs)
    d_rhs = tgmm(lhs, grad)            (tgmm(grad, lhs) when rhs is stored transposed)

Backends:
  "xla"        grouped scan over row tiles in plain XLA (moejax.pallas.xla_gmm), the CPU path;
  "triton"     Pallas kernels lowered through Triton (GPU), moejax.pallas.triton_gmm;
  "mosaic"     Pallas kernels lowered through Mosaic (TPU), moejax.pallas.mosaic_gmm;
  "ragged_dot" jax.lax.ragged_dot / ragged_dot_general, the reference the others must match;
  "auto"       triton on GPU, mosaic on TPU, xla elsewhere.
The backend modules are imported when first used so that this file does not depend on all of
them being importable (the Mosaic TPU lowering, for instance, is only needed on TPU).

Legend: M rows, K contraction width, N output width, G groups.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

BACKENDS = ("auto", "xla", "triton", "mosaic", "ragged_dot")


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def resolve_backend(name: str) -> str:
    """The concrete backend for `name`: "auto" -> triton on GPU, mosaic on TPU, xla elsewhere.

    Args:
      name: one of `BACKENDS`.

    Returns:
      `name` itself unless it is "auto".
    """
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is not one of {BACKENDS}")
    if name != "auto":
        return name
    platform = jax.default_backend()
    if platform in ("gpu", "cuda", "rocm"):
        return "triton"
    if platform == "tpu":
        return "mosaic"
    return "xla"


def _resolve_interpret(interpret: bool | None) -> bool:
    if interpret is None:
        # Pallas kernels have no CPU lowering: on a CPU host the only way to run them is the
        # interpreter.
        return jax.default_backend() == "cpu"
    if not isinstance(interpret, bool):
        raise ValueError(f"interpret must be None, True or False, got {interpret!r}")
    return interpret


def _validate_group_sizes(group_sizes: jax.Array, num_groups: int, num_rows: int) -> None:
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


def _validate_float(name: str, x: jax.Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got {name}.dtype={x.dtype}")


def _validate_preferred(preferred_element_type: Any) -> None:
    if preferred_element_type is not None and not jnp.issubdtype(
        jnp.dtype(preferred_element_type), jnp.floating
    ):
        raise ValueError(
            f"preferred_element_type must be None or a floating dtype, got {preferred_element_type}"
        )


def _validate_gmm_args(
    lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, transpose_rhs: bool, pet: Any
) -> None:
    if lhs.ndim != 2:
        raise ValueError(f"lhs must have rank 2 [M, K], got shape {tuple(lhs.shape)}")
    if rhs.ndim != 3:
        layout = "[G, N, K]" if transpose_rhs else "[G, K, N]"
        raise ValueError(f"rhs must have rank 3 {layout}, got shape {tuple(rhs.shape)}")
    _validate_float("lhs", lhs)
    _validate_float("rhs", rhs)
    if lhs.dtype != rhs.dtype:
        raise ValueError(f"lhs.dtype={lhs.dtype} and rhs.dtype={rhs.dtype} must match")
    k_axis = 2 if transpose_rhs else 1
    if rhs.shape[k_axis] != lhs.shape[1]:
        layout = "[G, N, K]" if transpose_rhs else "[G, K, N]"
        raise ValueError(
            f"lhs [M, K]={tuple(lhs.shape)} and rhs {layout}={tuple(rhs.shape)} disagree on K "
            f"(transpose_rhs={transpose_rhs})"
        )
    _validate_group_sizes(group_sizes, rhs.shape[0], lhs.shape[0])
    _validate_preferred(pet)


def _validate_tgmm_args(
    lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array, num_groups: int, pet: Any
) -> None:
    if lhs.ndim != 2:
        raise ValueError(f"lhs must have rank 2 [M, K], got shape {tuple(lhs.shape)}")
    if grad.ndim != 2:
        raise ValueError(f"grad must have rank 2 [M, N], got shape {tuple(grad.shape)}")
    _validate_float("lhs", lhs)
    _validate_float("grad", grad)
    if lhs.dtype != grad.dtype:
        raise ValueError(f"lhs.dtype={lhs.dtype} and grad.dtype={grad.dtype} must match")
    if lhs.shape[0] != grad.shape[0]:
        raise ValueError(
            f"lhs [M, K]={tuple(lhs.shape)} and grad [M, N]={tuple(grad.shape)} disagree on M"
        )
    if num_groups != group_sizes.shape[0]:
        raise ValueError(
            f"num_groups={num_groups} must equal group_sizes.shape[0]={group_sizes.shape[0]}"
        )
    _validate_group_sizes(group_sizes, num_groups, lhs.shape[0])
    _validate_preferred(pet)


# Jitted so that eager calls compile the backend's metadata + kernel once per shape instead of
# dispatching (and compiling) each small index op separately.
@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6, 7))
def _gmm_impl(lhs, rhs, group_sizes, transpose_rhs, out_dtype, backend, config, interpret):
    """Forward product on an already validated, resolved backend."""
    if backend == "ragged_dot":
        rhs_GxKxN = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
        return jax.lax.ragged_dot(lhs, rhs_GxKxN, group_sizes, preferred_element_type=out_dtype)
    if backend == "xla":
        from moejax.pallas import xla_gmm

        kwargs = {} if config is None else {"tile_m": config}
        return xla_gmm.gmm_xla(
            lhs,
            rhs,
            group_sizes,
            transpose_rhs=transpose_rhs,
            preferred_element_type=out_dtype,
            **kwargs,
        )
    if backend == "triton":
        from moejax.pallas import triton_gmm

        return triton_gmm.gmm_triton(
            lhs,
            rhs,
            group_sizes,
            transpose_rhs=transpose_rhs,
            preferred_element_type=out_dtype,
            config=config,
            interpret=interpret,
        )
    from moejax.pallas import mosaic_gmm

    return mosaic_gmm.gmm_mosaic(
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
    """Per-group lhs.T @ grad on an already validated, resolved backend."""
    if backend == "ragged_dot":
        # Ragged contracting dimension: the M rows are split by group, each group contracts its
        # own rows, and the groups become a new leading output axis.
        dims = jax.lax.RaggedDotDimensionNumbers(
            dot_dimension_numbers=(([0], [0]), ([], [])),
            lhs_ragged_dimensions=[0],
            rhs_group_dimensions=[],
        )
        return jax.lax.ragged_dot_general(
            lhs, grad, group_sizes, dims, preferred_element_type=out_dtype
        )
    if backend == "xla":
        from moejax.pallas import xla_gmm

        kwargs = {} if config is None else {"tile_m": config}
        return xla_gmm.tgmm_xla(
            lhs,
            grad,
            group_sizes,
            num_groups=num_groups,
            preferred_element_type=out_dtype,
            **kwargs,
        )
    if backend == "triton":
        from moejax.pallas import triton_gmm

        return triton_gmm.tgmm_triton(
            lhs,
            grad,
            group_sizes,
            num_groups=num_groups,
            preferred_element_type=out_dtype,
            config=config,
            interpret=interpret,
        )
    from moejax.pallas import mosaic_gmm

    return mosaic_gmm.tgmm_mosaic(
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
    num_groups = rhs.shape[0]
    if transpose_rhs:
        # rhs is [G, N, K]: its gradient is grad[rows_g].T @ lhs[rows_g].
        d_rhs = _tgmm_impl(
            grad_MxN, lhs, group_sizes, num_groups, rhs.dtype, backend, config, interpret
        )
    else:
        d_rhs = _tgmm_impl(
            lhs, grad_MxN, group_sizes, num_groups, rhs.dtype, backend, config, interpret
        )
    # Integer group sizes have no tangent space; None is the custom_vjp spelling of "no grad".
    return d_lhs, d_rhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
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
      rhs: [G, K, N], or [G, N, K] when `transpose_rhs` (same dtype as lhs).
      group_sizes: [G] integer, non-negative, sum <= M.
      transpose_rhs: contract lhs with rhs's last axis (rhs[g].T is used).
      preferred_element_type: result dtype; None = lhs.dtype. Accumulation is float32.
      backend: one of "auto", "xla", "triton", "mosaic", "ragged_dot".
      config: backend tiling: TritonConfig (triton), MosaicConfig (mosaic), an int row tile
        (xla), ignored by ragged_dot; None = the backend's tuned table / default.
      interpret: run Pallas kernels in interpret mode; None = interpret when on CPU.

    Returns:
      [M, N]: rows of group g are lhs[rows_g] @ rhs[g]; rows past sum(group_sizes) are zero.
    """
    _validate_gmm_args(lhs, rhs, group_sizes, transpose_rhs, preferred_element_type)
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    return _gmm(
        lhs,
        rhs,
        group_sizes.astype(jnp.int32),
        bool(transpose_rhs),
        out_dtype,
        resolve_backend(backend),
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
    if group_sizes.ndim != 1:
        raise ValueError(f"group_sizes must have shape [G], got {tuple(group_sizes.shape)}")
    num_groups = group_sizes.shape[0] if num_groups is None else int(num_groups)
    _validate_tgmm_args(lhs, grad, group_sizes, num_groups, preferred_element_type)
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    return _tgmm_impl(
        lhs,
        grad,
        group_sizes.astype(jnp.int32),
        num_groups,
        out_dtype,
        resolve_backend(backend),
        config,
        _resolve_interpret(interpret),
    )
