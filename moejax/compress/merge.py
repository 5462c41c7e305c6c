"""Expert merging (MC-SMoE, "Merge, Then Compress"): N groups of experts, one merged expert each.

Per MoE layer (and per expert group under group-limited routing):

1. Centres: the N most used experts (usage frequency; ties: the lower index), or with
   centres="output_norm" the N with the largest gate-weighted output norm (EASY-EP's pruning
   score, `moejax.compress.prune`): a variant, not the paper's choice.
2. Grouping: every other expert joins the centre whose router-logit column is most similar to
   its own (cosine over the calibration tokens, `LayerStats.similarity`).
3. Alignment: an expert MLP is unchanged by any permutation of its F hidden units, so before
   averaging each member's hidden units are permuted onto the centre's by weight matching
   (`match_hidden_units`: the assignment maximising the summed inner products of the units'
   weights, scipy's linear_sum_assignment). A member that is a hidden-unit permutation of its
   centre is mapped back onto it exactly.
4. Averaging: wi_gate, wi_up, wo averaged with the members' usage frequencies as weights
   (uniform when no member was used).
5. Router: the merged column is the same usage-weighted mean of the members' columns (and
   expert-bias entries). The group's routing mass is proportional to
   sum_m exp(x . w_m) = exp(LSE_m(x . w_m)), which is not linear in x. Its linearisation is
   log(n) + x . (sum_m p_m w_m), p_m the members' shares of the group's routing (estimated by
   their usage frequencies; exact when the members' columns are equal). The slope is the
   usage-weighted mean column; the constant log(n) would need a router bias the model does not
   have, so a merged expert's logit is its members' weighted mean logit. Only the ranking then
   changes the output when the top-k weights are renormalised (norm_topk_prob). The mean keeps
   the group's direction, which keeping only the centre's column would not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from moejax.compress.layers import (
    check_num_experts,
    check_stats,
    edit_moe_layers,
    map_expert_leaves,
)
from moejax.compress.stats import LayerStats
from moejax.layers.config import ModelConfig

# Expert weight names and the axis of the hidden units F in one expert's array.
_HIDDEN_AXIS = {"wi_gate": 1, "wi_up": 1, "wo": 0}


def match_hidden_units(ref: Mapping[str, Any], other: Mapping[str, Any]) -> np.ndarray:
    """The permutation of `other`'s hidden units that best matches `ref`'s (weight matching).

    Args:
      ref, other: one expert's weights each, {"wi_up": [D, F], "wo": [F, D], optional
        "wi_gate": [D, F]}.

    Returns:
      perm [F] int: hidden unit perm[a] of `other` is matched to unit a of `ref`, i.e.
      `permute_hidden_units(other, perm)` is aligned with `ref`. It maximises
      sum_a <ref unit a, other unit perm[a]> over the concatenated (wi_gate, wi_up, wo) weights
      of each unit, so an exact permutation of ref is recovered.
    """
    score_FxF = 0.0
    for name, axis in _HIDDEN_AXIS.items():
        if name in ref:
            a = np.moveaxis(np.asarray(ref[name], np.float64), axis, 0)
            b = np.moveaxis(np.asarray(other[name], np.float64), axis, 0)
            score_FxF = score_FxF + a @ b.T
    rows, cols = linear_sum_assignment(score_FxF, maximize=True)
    return cols[np.argsort(rows)]


def permute_hidden_units(weights: Mapping[str, Any], perm: np.ndarray) -> dict[str, Any]:
    """One expert's weights with hidden unit a taken from unit perm[a] (same function)."""
    return {
        name: np.take(np.asarray(w), perm, axis=_HIDDEN_AXIS[name]) for name, w in weights.items()
    }


MERGE_CENTRES = ("frequency", "output_norm")


def expert_groups(
    stats: LayerStats, num_experts: int, n_groups: int, centres: str = "frequency"
) -> list[np.ndarray]:
    """MC-SMoE grouping of one layer: N groups, each [centre, members...] of expert indices.

    Args:
      stats: the layer's statistics (frequency, similarity, gate-weighted output norms).
      num_experts: N, a multiple of n_groups.
      n_groups: routing groups; each keeps N / n_groups centres and its members stay inside.
      centres: the score the centres are the top of, one of MERGE_CENTRES (module docstring).

    Returns:
      N int arrays, ordered by their centre's index; every expert is in exactly one.
    """
    if centres not in MERGE_CENTRES:
        raise ValueError(
            f"centres={centres!r} is invalid: allowed values are "
            f"{', '.join(map(repr, MERGE_CENTRES))}"
        )
    score = stats.frequency if centres == "frequency" else stats.weighted_norm_sum_E
    sim = stats.similarity
    per_group = num_experts // n_groups
    groups = []
    for block in np.arange(stats.num_experts).reshape(n_groups, -1):
        centre_ids = np.sort(block[np.argsort(-score[block], kind="stable")[:per_group]])
        members = {int(c): [int(c)] for c in centre_ids}
        for m in block:
            if m not in members:
                # argmax: ties go to the lower-index centre.
                members[int(centre_ids[np.argmax(sim[m, centre_ids])])].append(int(m))
        groups.extend(np.asarray(members[int(c)]) for c in centre_ids)
    return groups


def _merge_matrix(groups: list[np.ndarray], frequency: np.ndarray, e: int) -> np.ndarray:
    """[N, E] float64: row g holds group g's averaging weights (usage frequency, normalised)."""
    mix_NxE = np.zeros((len(groups), e))
    for g, members in enumerate(groups):
        w = frequency[members]
        mix_NxE[g, members] = w / w.sum() if w.sum() > 0 else 1.0 / len(members)
    return mix_NxE


def _merge_experts_of_layer(
    experts: dict, groups: list[np.ndarray], mix_NxE: np.ndarray, align: bool = True
) -> dict:
    """The merged [N, ...] expert weights of one layer (aligned unless align=False, then
    frequency-averaged)."""
    names = [name for name in _HIDDEN_AXIS if name in experts]
    arrays = {name: np.asarray(experts[name], np.float64) for name in names}
    merged = {name: [] for name in arrays}
    for g, members in enumerate(groups):
        centre = {name: a[members[0]] for name, a in arrays.items()}
        total = {name: mix_NxE[g, members[0]] * w for name, w in centre.items()}
        for m in members[1:]:
            member = {name: a[m] for name, a in arrays.items()}
            aligned = member
            if align:
                aligned = permute_hidden_units(member, match_hidden_units(centre, member))
            for name in total:
                total[name] = total[name] + mix_NxE[g, m] * aligned[name]
        for name in merged:
            merged[name].append(total[name])
    return {
        name: jnp.asarray(np.stack(ws), dtype=jnp.asarray(experts[name]).dtype)
        for name, ws in merged.items()
    }


def merge_experts(
    model_cfg: ModelConfig,
    variables: Mapping[str, Any],
    stats: Sequence[LayerStats],
    num_experts: int,
    *,
    align: bool = True,
    centres: str = "frequency",
) -> tuple[ModelConfig, dict[str, Any]]:
    """MC-SMoE merging of every MoE layer's E experts into num_experts (module docstring).

    Args:
      model_cfg: the model's config.
      variables: its variables ("params", optional "moe_state"/"moe_stats"); either layout.
      stats: `routing_stats(model_cfg, variables, batches)`.
      num_experts: N merged experts per layer, in [1, E] (a multiple of moe.n_groups).
      align: permute each member's hidden units onto its centre's before averaging (MC-SMoE);
        False averages them as they are (plain averaging, the ablation).
      centres: "frequency" (MC-SMoE: the most used experts) or "output_norm" (the largest
        gate-weighted output norms); the members' averaging weights are usage frequencies
        either way.

    Returns:
      (model_cfg with moe.num_experts = N, variables with N experts per layer: merged expert
      weights, router columns and expert-bias entries the usage-weighted means of their
      group's; a "moe_stats" expert_load is summed over the group).

    Raises:
      ValueError naming the field, as `prune_experts`.
    """
    new_cfg = check_num_experts(model_cfg, num_experts)
    check_stats(model_cfg, stats)
    e, n_groups = model_cfg.moe.num_experts, model_cfg.moe.n_groups
    plans = {}
    for s in stats:
        groups = expert_groups(s, num_experts, n_groups, centres)
        plans[s.layer] = (groups, _merge_matrix(groups, s.frequency, e))

    def edit(layer: int, collection: str, moe: dict) -> dict:
        groups, mix_NxE = plans[layer]
        # Loads add up; parameters and biases are averaged.
        router_mix = (mix_NxE > 0).astype(np.float64) if collection == "moe_stats" else mix_NxE

        def merge_router(a):
            a = jnp.asarray(a)
            mixed = np.asarray(a, np.float64) @ router_mix.T
            return jnp.asarray(mixed, a.dtype)

        return map_expert_leaves(
            moe,
            merge_router,
            lambda experts: _merge_experts_of_layer(experts, groups, mix_NxE, align),
        )

    return new_cfg, edit_moe_layers(model_cfg, variables, edit)
