"""moejax.moe: the MoE block as a pipeline of pure functions of arrays (no Flax).

    router (ROUTERS) -> Routing -> plan (PLANS) -> run_experts -> combine -> y [T, D]
    expert parallelism = the same local pipeline inside shard_map (moejax.moe.parallel)

The Flax modules that own the parameters (moejax.layers.Router, Experts, MoE) call these; the
imports flow one way: layers -> moe -> pallas / sharding.rules.
"""

from moejax.moe.experts import ExpertWeights, run_experts
from moejax.moe.parallel import expert_parallel_ffn, layer_strategy, send_buffer_rows
from moejax.moe.pipeline import (
    apply_plan,
    block_capacity,
    dispatch_kind,
    dropless_ffn,
    dropped_fraction,
    plan_routing,
    routed_ffn,
)
from moejax.moe.plans import (
    PLANS,
    DispatchPlan,
    capacity_plan,
    combine_rows,
    dropless_plan,
    gather_rows,
    make_plan,
    sort_by_expert,
)
from moejax.moe.routing import (
    ROUTERS,
    RouterSpec,
    Routing,
    expert_choice_route,
    group_limited_mask,
    random_route,
    router_scores,
    router_spec,
    topk_route,
)

__all__ = [
    "PLANS",
    "ROUTERS",
    "DispatchPlan",
    "ExpertWeights",
    "RouterSpec",
    "Routing",
    "apply_plan",
    "block_capacity",
    "capacity_plan",
    "combine_rows",
    "dispatch_kind",
    "dropless_ffn",
    "dropless_plan",
    "dropped_fraction",
    "expert_choice_route",
    "expert_parallel_ffn",
    "layer_strategy",
    "gather_rows",
    "group_limited_mask",
    "make_plan",
    "plan_routing",
    "random_route",
    "routed_ffn",
    "router_scores",
    "router_spec",
    "run_experts",
    "send_buffer_rows",
    "sort_by_expert",
    "topk_route",
]
