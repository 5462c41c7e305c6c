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

Shapes stay static: "down" keeps Routing's K_max (dropped places become "no expert"); "up" and
"nearest" widen it by cfg.rounding_extra places. A token can be added only to its
`rounding_extra` best-scoring experts among those it did not pick (its candidates), so expert e
adds tokens from the tokens that have it as a candidate; when they are too few to reach the
multiple above, e rounds down instead. Candidates bound the width (the [T, K, D] combine would
otherwise be [T, E, D]) and are where an expert's best other tokens are anyway: a token that
scores e highly without picking it has e just behind its picks.

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


def rounded_counts(
    count_E: jax.Array, tile: int, mode: str, num_tokens: int, room_E: jax.Array | None = None
) -> jax.Array:
    """int32 [E]: each count rounded to a multiple of `tile` per `mode` (module docstring).

    Args:
      count_E: assignments per expert.
      tile: the row tile.
      mode: "down", "up" or "nearest".
      num_tokens: T, the most rows an expert can have.
      room_E: the most rows expert e can reach by adding tokens (its count plus its candidates);
        rounding up past it (or past T) rounds down instead. None: T.
    """
    if mode not in TOKEN_ROUNDINGS[1:]:
        raise ValueError(
            f"MoEConfig.token_rounding={mode!r} is invalid here: allowed values are "
            f"{', '.join(map(repr, TOKEN_ROUNDINGS[1:]))}"
        )
    count_E = count_E.astype(jnp.int32)
    down_E = count_E // tile * tile
    up_E = (count_E + tile - 1) // tile * tile
    room_E = (
        jnp.full_like(count_E, num_tokens) if room_E is None else jnp.minimum(room_E, num_tokens)
    )
    up_E = jnp.where(up_E <= room_E, up_E, down_E)
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
      routing: a token-choice Routing [T, K] (indices >= E: no expert).
      cfg: token_rounding ("up", "down", "nearest"), rounding_extra, routed_scaling_factor.
      tile: rows per tile; None = `rounding_tile(cfg)`.

    Returns:
      A Routing with the same probs and logits, of width K ("down") or K + cfg.rounding_extra
      ("up", "nearest": the added experts in the last places).
    """
    tile = rounding_tile(cfg) if tile is None else tile
    num_tokens, k = routing.indices.shape
    e = cfg.num_experts
    none = routing.probs.shape[-1]  # E + m: the "unused place" sentinel
    real_TxK = routing.indices < e
    expert_TxW = jnp.where(real_TxK, routing.indices, e)  # W places: the K picks (+ X candidates)
    value_TxW = jax.lax.stop_gradient(routing.weights).astype(jnp.float32)
    tier_TxW = jnp.zeros((num_tokens, k), jnp.int32)
    grow = cfg.token_rounding != "down"
    if grow:
        # Each token may be added to its X = rounding_extra best experts it did not pick.
        picked_TxE = jnp.zeros((num_tokens, e + 1), bool)
        picked_TxE = picked_TxE.at[jnp.arange(num_tokens)[:, None], expert_TxW].set(True)
        if routing.valid is not None:  # padding is never added to an expert
            picked_TxE = picked_TxE | ~routing.valid[:, None]
        score_TxE = jax.lax.stop_gradient(routing.probs[:, :e]).astype(jnp.float32)
        extra = min(cfg.rounding_extra, e)
        cand_score_TxX, cand_TxX = jax.lax.top_k(
            jnp.where(picked_TxE[:, :e], -jnp.inf, score_TxE), extra
        )
        cand_TxX = jnp.where(jnp.isfinite(cand_score_TxX), cand_TxX, e)  # fewer than X unpicked
        expert_TxW = jnp.concatenate([expert_TxW, cand_TxX], axis=1)
        value_TxW = jnp.concatenate([value_TxW, cand_score_TxX], axis=1)
        tier_TxW = jnp.concatenate([tier_TxW, jnp.ones_like(cand_TxX)], axis=1)

    # One sort of the T * W entries: by expert, picks before candidates, then by weight / score
    # (ties: by token). An entry's rank within its expert decides whether it is kept.
    expert_A, value_A, tier_A = (a.reshape(-1) for a in (expert_TxW, value_TxW, tier_TxW))
    order_A = jnp.lexsort((-value_A, tier_A, expert_A))
    sorted_expert_A = expert_A[order_A]
    present_A = expert_A < e
    picks_E = jnp.zeros((e + 1,), jnp.int32).at[expert_A].add(tier_A == 0)[:e]
    entries_E = jnp.zeros((e + 1,), jnp.int32).at[expert_A].add(present_A)[:e]
    target_E = rounded_counts(
        picks_E, tile, cfg.token_rounding, num_tokens, entries_E if grow else None
    )
    start_E1 = jnp.pad(jnp.cumsum(entries_E) - entries_E, (0, 1))
    target_E1 = jnp.pad(target_E, (0, 1))
    rank_A = jnp.arange(expert_A.shape[0]) - start_E1[sorted_expert_A]
    keep_sorted_A = (sorted_expert_A < e) & (rank_A < target_E1[sorted_expert_A])
    keep_TxW = jnp.zeros_like(keep_sorted_A).at[order_A].set(keep_sorted_A).reshape(num_tokens, -1)

    keep_TxK = keep_TxW[:, :k]
    indices_TxK = jnp.where(real_TxK & ~keep_TxK, none, routing.indices)
    weights_TxK = jnp.where(keep_TxK, routing.weights, 0.0)
    if grow:
        added_TxX = keep_TxW[:, k:]
        cand_safe_TxX = jnp.minimum(cand_TxX, e - 1)
        score_TxX = jnp.take_along_axis(routing.probs[:, :e], cand_safe_TxX, axis=1)
        indices_TxK = jnp.concatenate([indices_TxK, jnp.where(added_TxX, cand_TxX, none)], 1)
        added_w_TxX = jnp.where(added_TxX, score_TxX * cfg.routed_scaling_factor, 0.0)
        weights_TxK = jnp.concatenate([weights_TxK, added_w_TxX], axis=1)
    indices_TxK = indices_TxK.astype(jnp.int32)
    count_T = (indices_TxK < e).sum(axis=-1, dtype=jnp.int32)
    return Routing(weights_TxK, indices_TxK, routing.probs, routing.logits, count_T, routing.valid)
