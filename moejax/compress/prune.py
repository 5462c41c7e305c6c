"""Expert pruning from router statistics: keep N of each MoE layer's E experts.

Scores (`PRUNE_SCORES`), each per layer and, with group-limited routing, per expert group:

- "frequency": keep the most used experts (fraction of routed assignments).
- "output_norm" (EASY-EP): keep the experts with the largest gate-weighted output norm summed
  over the calibration tokens, sum_t w_te * ||expert_e(x_t)||: how much each expert actually
  adds to the block's output.
- "similarity" (STUN's behavioural similarity): repeatedly take the two remaining experts whose
  router-logit columns are most similar (cosine over the calibration tokens) and drop the less
  used one, so every dropped expert has a near-duplicate among the kept ones.

Dropping an expert removes its expert weights, its router column and its expert-bias entry; the
router's score function then runs over the kept experts only. An expert no token was routed to
can therefore be dropped without changing the output when the scores are sigmoid or the top-k
weights are renormalised (norm_topk_prob); with unrenormalised softmax weights the kept experts'
weights grow by the pruned experts' share of the softmax.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from moejax.compress.layers import (
    check_num_experts,
    check_stats,
    edit_moe_layers,
    map_expert_leaves,
)
from moejax.compress.stats import LayerStats
from moejax.layers.config import ModelConfig

PRUNE_SCORES = ("frequency", "output_norm", "similarity", "random")


def _top(scores: np.ndarray, n: int) -> np.ndarray:
    """Positions of the n highest scores (ties: the lower position)."""
    return np.argsort(-scores, kind="stable")[:n]


def _drop_similar(similarity: np.ndarray, frequency: np.ndarray, n: int) -> np.ndarray:
    """STUN-style: positions kept after dropping, pair by pair, the less used of the two most
    similar remaining experts (ties: the later expert is dropped)."""
    alive = list(range(len(frequency)))
    while len(alive) > n:
        sub = similarity[np.ix_(alive, alive)].copy()
        np.fill_diagonal(sub, -np.inf)
        a, b = np.unravel_index(np.argmax(sub), sub.shape)
        i, j = sorted((alive[a], alive[b]))
        alive.remove(j if frequency[j] <= frequency[i] else i)
    return np.asarray(alive)


def kept_experts(stats: LayerStats, num_experts: int, score: str, n_groups: int) -> np.ndarray:
    """The sorted indices of the experts one layer keeps.

    Args:
      stats: the layer's statistics.
      num_experts: N, a multiple of n_groups.
      score: one of PRUNE_SCORES.
      n_groups: the layer's expert groups; N / n_groups experts are kept in each.

    Returns:
      [N] int indices in [0, E), ascending.
    """
    if score not in PRUNE_SCORES:
        raise ValueError(
            f"score={score!r} is invalid: allowed values are {', '.join(map(repr, PRUNE_SCORES))}"
        )
    e = stats.num_experts
    per_group = num_experts // n_groups
    kept = []
    for group in np.arange(e).reshape(n_groups, -1):
        if score == "frequency":
            pos = _top(stats.frequency[group], per_group)
        elif score == "output_norm":
            pos = _top(stats.weighted_norm_sum_E[group], per_group)
        elif score == "similarity":
            pos = _drop_similar(
                stats.similarity[np.ix_(group, group)], stats.frequency[group], per_group
            )
        else:  # "random": the baseline every score must beat; seeded by the layer
            rng = np.random.default_rng(stats.layer)
            pos = np.sort(rng.choice(len(group), per_group, replace=False))
        kept.extend(group[pos])
    return np.sort(np.asarray(kept, dtype=np.int64))


def prune_experts(
    model_cfg: ModelConfig,
    variables: Mapping[str, Any],
    stats: Sequence[LayerStats],
    num_experts: int,
    score: str = "frequency",
) -> tuple[ModelConfig, dict[str, Any]]:
    """Keeps num_experts experts in every MoE layer (each layer its own, by `score`).

    Args:
      model_cfg: the model's config.
      variables: its variables ("params", optional "moe_state"/"moe_stats"); either layout.
      stats: `routing_stats(model_cfg, variables, batches)`.
      num_experts: N experts to keep per layer, in [1, E] (a multiple of moe.n_groups).
      score: "frequency", "output_norm" (EASY-EP) or "similarity" (STUN), module docstring;
        "random" keeps a random subset (seeded by the layer index), the baseline.

    Returns:
      (model_cfg with moe.num_experts = N, variables with router/kernel [.., D, N],
      experts/* [.., N, ...], router/expert_bias [.., N]); the kept experts keep their order.

    Raises:
      ValueError naming the field: num_experts out of range, a config the smaller model cannot
      have (MoEConfig.top_k / max_k > N, n_groups not dividing N, ...), stats not matching the
      model's MoE layers, an unknown score.
    """
    if score not in PRUNE_SCORES:
        raise ValueError(
            f"score={score!r} is invalid: allowed values are {', '.join(map(repr, PRUNE_SCORES))}"
        )
    new_cfg = check_num_experts(model_cfg, num_experts)
    check_stats(model_cfg, stats)
    n_groups = model_cfg.moe.n_groups
    keep = {s.layer: kept_experts(s, num_experts, score, n_groups) for s in stats}

    def edit(layer: int, collection: str, moe: dict) -> dict:
        del collection
        idx = jnp.asarray(keep[layer])
        return map_expert_leaves(
            moe,
            lambda a: jnp.take(a, idx, axis=-1),
            lambda experts: {k: jnp.take(v, idx, axis=0) for k, v in experts.items()},
        )

    return new_cfg, edit_moe_layers(model_cfg, variables, edit)
