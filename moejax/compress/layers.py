"""Editing the experts of every MoE layer of a model's variables, in either layer layout.

Both pruning and merging map each MoE layer's E experts to N new ones: a layer's router leaves
(`router/kernel` [D, E], `router/expert_bias` [E] in "moe_state", `router/expert_load` [E] in
"moe_stats") have the expert axis last, its `experts/*` leaves first. The trees are converted to
the unrolled layout (`layers_<i>`, one layer's arrays each), edited layer by layer, and stacked
back when the model scans its layers, so one edit serves both layouts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn

from moejax.compress.stats import LayerStats, moe_layer_indices
from moejax.layers.config import ModelConfig
from moejax.layers.transformer import scan_to_unrolled, unrolled_to_scan

# Router leaves whose last axis is the expert axis (null_kernel [D, m] is not per expert).
ROUTER_EXPERT_LEAVES = ("kernel", "expert_bias", "expert_load")

# edit(layer index, collection name, the layer's "moe" subtree) -> new subtree
MoEEdit = Callable[[int, str, dict], dict]


def check_num_experts(model_cfg: ModelConfig, num_experts: Any) -> ModelConfig:
    """model_cfg with moe.num_experts = num_experts, validated (ValueError naming the field)."""
    if model_cfg.moe is None or not moe_layer_indices(model_cfg):
        raise ValueError("model_cfg.moe: the model has no MoE layer to compress")
    e = model_cfg.moe.num_experts
    if not isinstance(num_experts, int) or isinstance(num_experts, bool):
        raise ValueError(f"num_experts={num_experts!r} is invalid: must be an integer in [1, {e}]")
    if not 1 <= num_experts <= e:
        raise ValueError(
            f"num_experts={num_experts} is invalid: must be in [1, MoEConfig.num_experts={e}]"
        )
    # MoEConfig validates itself: top_k, max_k, n_groups, topk_groups name their field.
    moe = dataclasses.replace(model_cfg.moe, num_experts=num_experts)
    return dataclasses.replace(model_cfg, moe=moe)


def check_stats(model_cfg: ModelConfig, stats: Sequence[LayerStats]) -> None:
    """ValueError naming `stats` unless it holds one LayerStats per MoE layer of model_cfg."""
    layers = moe_layer_indices(model_cfg)
    got = [getattr(s, "layer", None) for s in stats]
    if got != layers:
        raise ValueError(
            f"stats: expected one LayerStats per MoE layer {layers} (from routing_stats), got "
            f"layers {got}"
        )
    e = model_cfg.moe.num_experts
    for s in stats:
        if s.num_experts != e:
            raise ValueError(
                f"stats: layer {s.layer} has {s.num_experts} experts, MoEConfig.num_experts={e}"
            )


def edit_moe_layers(
    model_cfg: ModelConfig, variables: Mapping[str, Any], edit: MoEEdit
) -> dict[str, Any]:
    """Applies `edit` to the "moe" subtree of every MoE layer in every collection.

    Args:
      model_cfg: the model's (original) config.
      variables: the model's variables; boxed leaves are unboxed, frozen dicts unfrozen.
      edit: called once per (MoE layer, collection holding it) with plain-dict subtrees.

    Returns:
      New variables in model_cfg's layout (other collections and layers unchanged).
    """
    variables = flax.core.unfreeze(nn.meta.unbox(variables))
    out = {}
    for col, tree in variables.items():
        if not isinstance(tree, Mapping):
            out[col] = tree
            continue
        tree = scan_to_unrolled(model_cfg, tree) if model_cfg.scan_layers else dict(tree)
        for i in moe_layer_indices(model_cfg):
            layer = tree.get(f"layers_{i}")
            if isinstance(layer, Mapping) and "moe" in layer:
                tree[f"layers_{i}"] = {**layer, "moe": edit(i, col, dict(layer["moe"]))}
        out[col] = unrolled_to_scan(model_cfg, tree) if model_cfg.scan_layers else tree
    return out


def map_expert_leaves(
    moe: dict, router_fn: Callable[[Any], Any], experts_fn: Callable[[dict], dict]
) -> dict:
    """New "moe" subtree: router_fn on each per-expert router leaf (expert axis last),
    experts_fn on the whole `experts` dict (leaves with the expert axis first)."""
    moe = dict(moe)
    if "router" in moe:
        router = dict(moe["router"])
        for name in ROUTER_EXPERT_LEAVES:
            if name in router:
                router[name] = router_fn(router[name])
        moe["router"] = router
    if "experts" in moe:
        moe["experts"] = experts_fn(dict(moe["experts"]))
    return moe
