"""Quantized grouped-matmul weights: int8 values and float32 scales, dequantized per tile.

    w = QuantizedWeight(values_GxA1xA2, scale_GxSxA2)       # moejax.compress.quantize_experts
    out = moejax.pallas.gmm(lhs, w, group_sizes)             # == gmm(lhs, w.dequantize(lhs.dtype))

`values` are the stored integers (int8; int4 values are stored as int8 in [-8, 7]) and `scale`
one float32 per output channel and run of `group_size = A1 / S` consecutive rows of the stored
axis 1. For the forward product (`transpose_rhs=False`, rhs [G, K, N]) that axis is the
contraction K; for the d_lhs product (`transpose_rhs=True`, rhs [G, N, K]) the same array is
contracted over axis 2, and the scale groups run along the output axis. The backends never build
the [G, A1, A2] float weight: each dequantizes only the tile (Triton, Mosaic) or the group's
slice (XLA) it multiplies, as `dequantize_tile` does; "ragged_dot", the reference, calls
`dequantize` on the whole array.

Numerics: a tile is `(values.astype(float32) * scale).astype(lhs.dtype)`, elementwise the same
as `dequantize(w, lhs.dtype)`, so a quantized gmm equals gmm on the dequantized weight up to
the float32 accumulation order.

Legend: G groups (experts), A1/A2 the stored axes 1/2, S scale rows (A1 / group_size).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class QuantizedWeight(NamedTuple):
    """A quantized [G, A1, A2] weight (a pytree: it passes through jit, vmap and custom_vjp).

    Attributes:
      values: [G, A1, A2] int8, the stored integers (int4 weights in [-8, 7]).
      scale: [G, A1 / group_size, A2] float32; row s covers stored rows
        [s * group_size, (s + 1) * group_size) of axis 1 (S = 1: per output channel).
    """

    values: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, int, int]:
        """The shape of the (dequantized) weight, [G, A1, A2]."""
        return tuple(self.values.shape)

    @property
    def group_size(self) -> int:
        """Stored rows of axis 1 per scale row."""
        return self.values.shape[1] // self.scale.shape[1]

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        """The whole [G, A1, A2] weight in `dtype` (the reference; backends dequantize tiles)."""
        return dequantize(self, dtype)


def dequantize_tile(values_RxC: jax.Array, scale_SxC: jax.Array, dtype: Any) -> jax.Array:
    """One tile of stored rows: [R, C] int values times their scale rows [S, C], S dividing R
    (each scale row covers R / S consecutive rows; S = 1 broadcasts one row). In `dtype`."""
    r, c = values_RxC.shape[-2:]
    s = scale_SxC.shape[-2]
    q = values_RxC.astype(jnp.float32)
    if s == 1:
        w = q * scale_SxC.astype(jnp.float32)
    else:
        lead = values_RxC.shape[:-2]
        q_SxRsxC = q.reshape(*lead, s, r // s, c)
        w = (q_SxRsxC * scale_SxC.astype(jnp.float32)[..., :, None, :]).reshape(*lead, r, c)
    return w.astype(dtype)


def dequantize(weight: QuantizedWeight, dtype: Any = jnp.float32) -> jax.Array:
    """[G, A1, A2] float weight in `dtype`: values * scale, scale row s over its group of rows."""
    from moejax.pallas.validation import check_quantized  # noqa: PLC0415 (import cycle)

    check_quantized(weight, "weight")
    return dequantize_tile(weight.values, weight.scale, dtype)
