"""Tile-aware token rounding (SonicMoE): per-expert token counts rounded to the row tile.

A grouped matmul processes each expert's rows in tiles of `tile` rows; an expert with n rows
costs ceil(n / tile) tiles, the last one partly padding. Rounding every expert's count of
token-choice assignments to a multiple of the tile removes that padding:

  "down"     drops the expert's lowest-weight assignments down to the multiple below;
  "up"       adds the highest-scoring tokens that had not chosen it, up to the multiple above
             (when that exceeds the number of tokens, it rounds down instead);
  "nearest"  takes the closer of the two (a tie goes up).

Applied between the router and the experts in training only: the router's balancing losses and
statistics read its own choices, evaluation and decoding route plain token choice. Expert e
ranks the tokens that chose it by combine weight, then the others by router score, and keeps
the first `rounded(n_e)`: "down" keeps a subset of the picks, "up" a superset. An added token's
combine weight is its router score times routed_scaling_factor (what expert choice gives a token
it takes); kept picks keep their weights.

Shapes stay static: "down" keeps Routing's K_max (dropped places become "no expert"), "up" and
"nearest" widen it to E (place e of token t holds e or "no expert", as expert choice), since a
token may be added to any number of experts.

Legend: T tokens, E experts, K places per token, m null experts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from moejax.moe.routing import Routing

if TYPE_CHECKING:
    from moejax.layers.config import MoEConfig

TOKEN_ROUNDINGS = ("none", "up", "down", "nearest")


def rounded_counts(count_E: jax.Array, tile: int, mode: str, num_tokens: int) -> jax.Array:
    """int32 [E]: each count rounded to a multiple of `tile` per `mode` (module docstring)."""
    if mode not in TOKEN_ROUNDINGS[1:]:
        raise ValueError(
            f"MoEConfig.token_rounding={mode!r} is invalid here: allowed values are "
            f"{', '.join(map(repr, TOKEN_ROUNDINGS[1:]))}"
        )
    count_E = count_E.astype(jnp.int32)
    down_E = count_E // tile * tile
    up_E = (count_E + tile - 1) // tile * tile
    up_E = jnp.where(up_E <= num_tokens, up_E, down_E)  # no more rows than tokens
    if mode == "down":
        return down_E
    if mode == "up":
        return up_E
    return jnp.where(count_E - down_E < up_E - count_E, down_E, up_E)


def rounding_tile(cfg: MoEConfig) -> int:
    """The tile counts are rounded to: cfg.rounding_tile, else the grouped matmul's row tile."""
    return cfg.rounding_tile or cfg.execution.gmm_tile


def round_token_counts(routing: Routing, cfg: MoEConfig, *, tile: int | None = None) -> Routing:
    """The token-choice `routing` with every expert's assignment count rounded to the tile.

    Args:
      routing: a token-choice Routing (indices >= E: no expert).
      cfg: token_rounding ("up", "down", "nearest"), routed_scaling_factor, num_experts.
      tile: rows per tile; None = `rounding_tile(cfg)`.

    Returns:
      A Routing with the same probs and logits; K_max unchanged for "down", E otherwise.
    """
    tile = rounding_tile(cfg) if tile is None else tile
    num_tokens, _ = routing.indices.shape
    e = cfg.num_experts
    none = routing.probs.shape[-1]  # E + m: the "unused place" sentinel
    real_TxK = routing.indices < e
    expert_TxK = jnp.where(real_TxK, routing.indices, e)
    onehot_TxKxE = jax.nn.one_hot(expert_TxK, e + 1, dtype=jnp.float32)[..., :e]
    chosen_TxE = onehot_TxKxE.sum(axis=1) > 0
    weight_TxE = jnp.einsum("tk,tke->te", routing.weights, onehot_TxKxE)
    target_E = rounded_counts(chosen_TxE.sum(axis=0), tile, cfg.token_rounding, num_tokens)

    # Per expert: the tokens that chose it by weight, then the others by router score.
    value_TxE = jax.lax.stop_gradient(jnp.where(chosen_TxE, weight_TxE, routing.probs[:, :e]))
    order_TxE = jnp.lexsort((-value_TxE, ~chosen_TxE), axis=0)
    rank_TxE = jnp.argsort(order_TxE, axis=0)
    keep_TxE = rank_TxE < target_E[None, :]

    if cfg.token_rounding == "down":  # a subset of the picks: stays token-major [T, K]
        keep_Tx1E = jnp.pad(keep_TxE, ((0, 0), (0, 1)))
        keep_TxK = jnp.take_along_axis(keep_Tx1E, expert_TxK, axis=1) & real_TxK
        indices_TxK = jnp.where(keep_TxK | ~real_TxK, routing.indices, none)
        weights_TxK = jnp.where(keep_TxK, routing.weights, 0.0)
    else:
        added_TxE = routing.probs[:, :e] * cfg.routed_scaling_factor
        weights_TxK = jnp.where(keep_TxE, jnp.where(chosen_TxE, weight_TxE, added_TxE), 0.0)
        indices_TxK = jnp.where(keep_TxE, jnp.arange(e, dtype=jnp.int32)[None, :], none)
    indices_TxK = indices_TxK.astype(jnp.int32)
    count_T = (indices_TxK < e).sum(axis=-1, dtype=jnp.int32)
    return Routing(weights_TxK, indices_TxK, routing.probs, routing.logits, count_T)
