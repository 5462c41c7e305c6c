"""The local MoE pipeline: Routing -> plan -> run experts -> combine, on one device's arrays.

    routing = ROUTERS[cfg.router].route(logits, cfg, ...)            (moejax.moe.routing)
    plan = make_plan(kind, routing.indices, E, ...)                   (moejax.moe.plans)
    rows = gather_rows(x, plan); out = run_experts(rows, w, plan)     (moejax.moe.experts)
    y = combine_rows(out, routing.weights, plan)                      (float32)

`routed_ffn` runs it for a whole block; `dropless_ffn` is the dropless path alone, which the two
expert-parallel exchanges (moejax.moe.parallel) run on each shard's local experts.

Checkpoint names (`jax.ad_checkpoint.checkpoint_name`; the remat policies of
`moejax.layers.transformer` save, offload or recompute by them), placed in `apply_plan` so every
layout and both expert-parallel exchanges pass them:

  moe_dispatch   [R, D] rows entering the experts (after the gather; under all_to_all, the
                 rows a shard received)
  moe_mlpwi      [R, F] wi outputs (both branches of a gated MLP)  } compact and buffers
  moe_act        [R, F] activation outputs                          } layouts only (experts.py)
  moe_mlpwo      [R, D] expert output rows
  moe_combine    [T, D] float32 weighted sum of a token's rows (under all_to_all also the
                 returned rows' combine, moejax.moe.parallel)

Legend: T tokens, D model width, E experts, K places per token, C capacity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from moejax import pallas
from moejax.moe.experts import ExpertWeights, run_experts
from moejax.moe.plans import DispatchPlan, combine_rows, gather_rows, make_plan
from moejax.moe.routing import Routing, router_spec, token_mean

if TYPE_CHECKING:
    from moejax.layers.config import MoEConfig


def dispatch_kind(cfg: MoEConfig) -> str:
    """The plan kind of a config: cfg.dispatch for token choice, "capacity" when experts choose."""
    return cfg.dispatch if router_spec(cfg.router).token_choice else "capacity"


def block_capacity(cfg: MoEConfig, num_tokens: int, *, train: bool) -> int:
    """Per-expert slots C of a block over `num_tokens` tokens (cfg.capacity); when experts
    choose, at most T (an expert cannot take a token twice)."""
    slots = cfg.capacity(num_tokens, train=train)
    return slots if router_spec(cfg.router).token_choice else min(slots, num_tokens)


def dropless_tile(cfg: MoEConfig) -> int | None:
    """The padded layout's row tile when gmm runs on the XLA backend (its only consumer), else
    None (compact layout). `pallas.resolve_backend` is the one place "auto" is decided, so the
    layout and the grouped matmul never disagree about the platform."""
    ex = cfg.execution
    return ex.gmm_tile if pallas.resolve_backend(ex.gmm_backend) == "xla" else None


def plan_routing(
    routing: Routing, cfg: MoEConfig, *, capacity: int, key: jax.Array | None = None
) -> DispatchPlan:
    """The DispatchPlan of `routing` under cfg (dispatch kind, drop policy, gmm layout).

    `key` draws drop_policy="random" (training); without it that policy keeps position order
    (evaluation).
    """
    policy = cfg.drop_policy
    if policy == "random" and key is None:
        policy = "position"
    return make_plan(
        dispatch_kind(cfg),
        routing.indices,
        cfg.num_experts,
        weights_TxK=routing.weights,
        capacity=capacity,
        drop_policy=policy,
        tile_m=dropless_tile(cfg),
        key=key,
    )


def apply_plan(
    x_TxD: jax.Array,
    weights_TxK: jax.Array,
    plan: DispatchPlan,
    experts: ExpertWeights,
    cfg: MoEConfig,
    *,
    buffer_constraint: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """Gather -> run experts -> combine: [T, D] float32 routed output of a plan, with the
    checkpoint names of the module docstring."""
    ex = cfg.execution
    rows_RxD = checkpoint_name(gather_rows(x_TxD, plan), "moe_dispatch")
    out_RxD = run_experts(
        rows_RxD,
        experts,
        plan,
        activation=cfg.activation,
        backend=ex.gmm_backend,
        interpret=ex.gmm_interpret,
        buffer_constraint=buffer_constraint,
    )
    out_RxD = checkpoint_name(out_RxD, "moe_mlpwo")
    return checkpoint_name(combine_rows(out_RxD, weights_TxK, plan), "moe_combine")


def dropless_ffn(
    x_TxD: jax.Array,
    weights_TxK: jax.Array,
    indices_TxK: jax.Array,
    experts: ExpertWeights,
    cfg: MoEConfig,
    *,
    tile_m: int | None | str = "auto",
) -> jax.Array:
    """Dropless experts on assignments [T, K] (index E' = number of experts in `experts` = none).

    Args:
      x_TxD: token vectors in the compute dtype.
      weights_TxK: float32 combine weights.
      indices_TxK: int32 expert of each assignment, the sentinel for "not here".
      experts: weights of the experts indexed (all E, or a shard's local ones).
      cfg: activation and execution knobs.
      tile_m: the plan's layout: "auto" = `dropless_tile(cfg)`, None = compact, an int = padded.

    Returns:
      [T, D] float32: sum_k weights[t, k] * expert_{indices[t, k]}(x[t]) over real indices.
    """
    tile_m = dropless_tile(cfg) if tile_m == "auto" else tile_m
    plan = make_plan("dropless", indices_TxK, experts.wi_up.shape[0], tile_m=tile_m)
    return apply_plan(x_TxD, weights_TxK, plan, experts, cfg)


def dropped_fraction(routing: Routing, plan: DispatchPlan, cfg: MoEConfig) -> jax.Array:
    """float32 scalar: for token choice the routed assignments no expert processed (of the real
    ones); when experts choose, the tokens no expert took (of the valid ones)."""
    if not router_spec(cfg.router).token_choice:
        return token_mean(routing.experts_per_token == 0, routing.valid)
    real = routing.experts_per_token.sum()
    return (real - plan.num_kept).astype(jnp.float32) / jnp.maximum(real, 1)


def routed_ffn(
    x_TxD: jax.Array,
    routing: Routing,
    experts: ExpertWeights,
    cfg: MoEConfig,
    *,
    capacity: int,
    buffer_constraint: Callable[[jax.Array], jax.Array] | None = None,
    key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The routed experts of one block on one device (or under GSPMD).

    Args:
      x_TxD: tokens in the compute dtype.
      routing: the router's decision.
      experts: the experts' weights in the compute dtype.
      cfg: dispatch, drop_policy, activation, execution.
      capacity: per-expert slots for capacity dispatch and expert choice
        (cfg.capacity(T, train=...)).
      buffer_constraint: optional function applied to [E, C, D] expert buffers (sharding).
      key: PRNG key of drop_policy="random" (training only).

    Returns:
      y_TxD float32 (zeros for a token with no processed expert) and the dropped fraction.
    """
    plan = plan_routing(routing, cfg, capacity=capacity, key=key)
    y_TxD = apply_plan(
        x_TxD, routing.weights, plan, experts, cfg, buffer_constraint=buffer_constraint
    )
    return y_TxD, dropped_fraction(routing, plan, cfg)
