"""The fused expert MLP on rows in the tile-padded layout: a public differentiable op.

`expert_mlp_padded` runs each row tile's whole expert MLP in one loop over the experts and
their tiles (the XLA/CPU path of the dropless MoE layer), with a custom VJP whose backward is
again one such loop (`xla_gmm.mlp_padded_bwd`). The rows come from `padded_layout` (every
group starts on a tile boundary), so the caller gathers tokens straight into that layout and
back.

Legend: P padded rows (= T_p * tile_m), D model width, F hidden width, G groups (experts),
T_p row tiles.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax

from moejax.pallas import xla_gmm


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _expert_mlp_padded(x_PxD, wi_gate, wi_up, wo, tile_group_Tp, num_used_tiles, act, tile_m):
    args = (x_PxD, wi_gate, wi_up, wo, tile_group_Tp, num_used_tiles, act, tile_m)
    return _expert_mlp_padded_fwd(*args)[0]


def _expert_mlp_padded_fwd(x_PxD, wi_gate, wi_up, wo, tile_group_Tp, num_used_tiles, act, tile_m):
    y_PxD, pre = xla_gmm.mlp_padded(
        x_PxD, wi_gate, wi_up, wo, tile_group_Tp, num_used_tiles, act=act, tile_m=tile_m
    )
    return y_PxD, (x_PxD, wi_gate, wi_up, wo, tile_group_Tp, num_used_tiles, pre)


def _expert_mlp_padded_bwd(act, tile_m, res, dy_PxD):
    x_PxD, wi_gate, wi_up, wo, tile_group_Tp, num_used_tiles, pre = res
    # The cotangent may arrive in a wider dtype than the rows (f32 for bf16); the loop runs in
    # the rows' dtype, as the forward did.
    grads = xla_gmm.mlp_padded_bwd(
        x_PxD,
        wi_gate,
        wi_up,
        wo,
        tile_group_Tp,
        num_used_tiles,
        pre,
        dy_PxD.astype(x_PxD.dtype),
        act=act,
        tile_m=tile_m,
    )
    # The tile map and the tile count are integers: no cotangent.
    return (*grads, None, None)


_expert_mlp_padded.defvjp(_expert_mlp_padded_fwd, _expert_mlp_padded_bwd)


def expert_mlp_padded(
    x_PxD: jax.Array,
    wi_gate_GxDxF: jax.Array | None,
    wi_up_GxDxF: jax.Array,
    wo_GxFxD: jax.Array,
    tile_group_Tp: jax.Array,
    num_used_tiles: jax.Array,
    *,
    act: Callable[[jax.Array], jax.Array],
    gated: bool,
    tile_m: int,
) -> jax.Array:
    """Per-tile expert MLP on the tile-padded layout, differentiable in x and the weights.

    gated: h = act(x @ wi_gate[g]) * (x @ wi_up[g]); else h = act(x @ wi_up[g]); y = h @ wo[g],
    with g = tile_group_Tp[tile]. Matmuls accumulate in float32 (or wider); the pre-activations
    and the result are in x's dtype.

    Args:
      x_PxD: [P, D] rows in the padded layout (`padded_layout`), padding rows zero.
      wi_gate_GxDxF: [G, D, F] gate weights when `gated`, else None.
      wi_up_GxDxF: [G, D, F].
      wo_GxFxD: [G, F, D].
      tile_group_Tp: [T_p] int32 group of each row tile (`PaddedLayout.tile_group_Tp`).
      num_used_tiles: scalar int32; tiles at and past it give zeros (and zero gradients).
      act: elementwise activation with act(0) = 0 (padding rows then add nothing to the weight
        gradients); hashable, as it is a static argument.
      gated: whether the MLP is gated (must agree with `wi_gate_GxDxF` being given).
      tile_m: rows per tile, the one the layout was built with (P = T_p * tile_m).

    Returns:
      y_PxD: [P, D] in x's dtype, zero on skipped tiles.
    """
    if gated != (wi_gate_GxDxF is not None):
        raise ValueError(
            f"gated={gated} needs wi_gate_GxDxF to be {'an array' if gated else 'None'}, "
            f"got {None if wi_gate_GxDxF is None else tuple(wi_gate_GxDxF.shape)}"
        )
    num_tiles = tile_group_Tp.shape[0]
    if x_PxD.ndim != 2 or x_PxD.shape[0] != num_tiles * tile_m:
        raise ValueError(
            f"x_PxD must be [P, D] with P = T_p * tile_m = {num_tiles} * {tile_m}, "
            f"got shape {tuple(x_PxD.shape)}"
        )
    return _expert_mlp_padded(
        x_PxD, wi_gate_GxDxF, wi_up_GxDxF, wo_GxFxD, tile_group_Tp, num_used_tiles, act, tile_m
    )
