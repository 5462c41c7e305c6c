"""Dispatch plans, gather and combine (stages 2 and 4 of the pipeline): pure functions of arrays.

Every dispatch kind produces one `DispatchPlan`: a set of R "rows" (expert inputs) laid out so
that each expert's rows are contiguous, and index maps between rows and the (token, place)
assignments of a `Routing` [T, K]. Assignments whose index is >= E ("no expert": a null
expert, an unused place) never get a row. Dispatch gathers token vectors into rows, the experts
run on rows (`moejax.moe.experts.run_experts`, by the plan's layout), and the combine gathers
each token's rows back and sums them with the router weights in float32:

- dropless: assignments sorted by expert (`sort_by_expert`), one row each, experts run as a
  grouped matmul. Layout "compact" (R = T * K, for `moejax.pallas.gmm`) or, on the XLA
  backend, "padded": rows placed directly in the tile-padded layout of
  `moejax.pallas.padded_layout` (each expert starts on a tile boundary), so the one gather that
  dispatch needs anyway also does the padding, and one loop over the experts' row tiles runs
  each tile's whole expert MLP (`moejax.pallas.expert_mlp_padded`).
- capacity: layout "buffers", R = E * C slots; an over-full expert keeps its first C
  assignments in priority order ("position": token order, then choice rank; "probs": highest
  router weight first) and drops the rest (a dropped assignment contributes zero). Experts run
  as one batched einsum. Expert choice is this plan too: its Routing gives every expert exactly
  C assignments, so nothing is dropped.

Kinds are chosen from `PLANS` by name (`MoEConfig.dispatch`, or "capacity" for routers whose
experts choose); adding one is a plan function and a row.

Both directions are gathers, in the forward and in the backward pass (custom VJPs): a scatter
is far slower than a gather on CPU and serialises on GPU, and each row maps to exactly one
assignment, so the transpose of a gather here is another gather.

Legend: T tokens, D model width, E experts, K places per token (Routing's K_max), C capacity
(slots per expert), R rows, M = T * K assignments, P padded rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from moejax import pallas

LAYOUTS = ("compact", "padded", "buffers")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DispatchPlan:
    """Where each assignment's token goes and comes back from.

    Attributes:
      token_of_row_R: [R] int32 token of each row; T for an empty row (padding, unused slot).
      assign_of_row_R: [R] int32 flat assignment index t * K + k of each row; T * K if empty.
      row_of_assign_TxK: [T, K] int32 row of each assignment; R if it has none (dropped, or the
        sentinel "no expert").
      group_sizes_E: [E] int32 real rows per expert (their rows start at the expert's offset).
      tile_group: [R / tile_m] int32 expert of each row tile ("padded" layout only).
      num_used_tiles: scalar int32 tiles holding rows ("padded" layout only).
      layout: "compact" (rows sorted by expert, R = T * K), "padded" (each expert's rows start
        on a multiple of tile_m) or "buffers" (slot c of expert e is row e * C + c).
      capacity: C for "buffers", else None.
      tile_m: the row tile of "padded", else None.
    """

    token_of_row_R: jax.Array
    assign_of_row_R: jax.Array
    row_of_assign_TxK: jax.Array
    group_sizes_E: jax.Array
    tile_group: jax.Array | None = None
    num_used_tiles: jax.Array | None = None
    layout: str = dataclasses.field(default="compact", metadata=dict(static=True))
    capacity: int | None = dataclasses.field(default=None, metadata=dict(static=True))
    tile_m: int | None = dataclasses.field(default=None, metadata=dict(static=True))

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"DispatchPlan.layout={self.layout!r} is not one of {LAYOUTS}")

    @property
    def num_experts(self) -> int:
        return self.group_sizes_E.shape[0]

    @property
    def num_kept(self) -> jax.Array:
        """int32 scalar: assignments that got a row."""
        return self.group_sizes_E.sum()


def _append_zero_row(x: jax.Array) -> jax.Array:
    return jnp.concatenate([x, jnp.zeros((1, *x.shape[1:]), x.dtype)], axis=0)


def _append(x_N: jax.Array, value) -> jax.Array:
    return jnp.concatenate([x_N, jnp.full((1,), value, x_N.dtype)])


def _inverse_permutation(perm_M: jax.Array) -> jax.Array:
    return jnp.zeros_like(perm_M).at[perm_M].set(jnp.arange(perm_M.shape[0], dtype=perm_M.dtype))


def _expert_or_none(indices_TxK: jax.Array, num_experts: int) -> jax.Array:
    """[M] int32 expert of each assignment, every "no expert" index (>= E) mapped to E."""
    return jnp.minimum(jnp.asarray(indices_TxK).reshape(-1).astype(jnp.int32), num_experts)


def sort_by_expert(indices_TxK: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """Orders the T * K assignments by expert (stable: token order within an expert).

    Args:
      indices_TxK: int expert of each (token, place); indices >= E ("no expert") sort last.
      num_experts: E.

    Returns:
      assign_of_sorted_M: [M] int32 flat assignment index t * K + k of each sorted position.
      group_sizes_E: [E] int32 assignments per expert ("no expert" not counted).
    """
    expert_M = _expert_or_none(indices_TxK, num_experts)
    assign_of_sorted_M = jnp.argsort(expert_M, stable=True).astype(jnp.int32)
    # Index E ("no expert") is out of bounds: the scatter drops it.
    group_sizes_E = jnp.zeros((num_experts,), jnp.int32).at[expert_M].add(1, mode="drop")
    return assign_of_sorted_M, group_sizes_E


def dropless_plan(
    indices_TxK: jax.Array,
    num_experts: int,
    *,
    tile_m: int | None,
    weights_TxK: jax.Array | None = None,
    capacity: int | None = None,
    drop_policy: str | None = None,
    key: jax.Array | None = None,
) -> DispatchPlan:
    """Every real assignment gets a row; rows sorted by expert.

    Args:
      indices_TxK: int expert of each (token, place), >= E for "no expert".
      num_experts: E.
      tile_m: None for the "compact" layout (R = T * K, for `moejax.pallas.gmm`); an int for
        the "padded" layout of `moejax.pallas.padded_layout`.
      weights_TxK, capacity, drop_policy, key: unused (the plan-table signature).

    Returns:
      The DispatchPlan.
    """
    del weights_TxK, capacity, drop_policy, key
    num_tokens, top_k = indices_TxK.shape
    num_assign = num_tokens * top_k
    assign_of_sorted_M, group_sizes_E = sort_by_expert(indices_TxK, num_experts)
    sorted_of_assign_M = _inverse_permutation(assign_of_sorted_M)
    num_real = group_sizes_E.sum()
    if tile_m is None:
        # Sentinel assignments sort behind every real one: their positions get no row.
        pos_M = jnp.arange(num_assign, dtype=jnp.int32)
        assign_of_row_M = jnp.where(pos_M < num_real, assign_of_sorted_M, num_assign)
        row_of_assign_M = jnp.where(sorted_of_assign_M < num_real, sorted_of_assign_M, num_assign)
        return DispatchPlan(
            assign_of_row_M // top_k,
            assign_of_row_M,
            row_of_assign_M.reshape(num_tokens, top_k),
            group_sizes_E,
            layout="compact",
        )
    tile_m = pallas.effective_tile(num_assign, num_experts, tile_m)
    layout = pallas.padded_layout(group_sizes_E, num_assign, tile_m)
    # Padding rows point at sorted position M, which the appended sentinel maps to "no
    # assignment" (T * K), hence token T. Sorted positions past the real rows (sentinels) have
    # no padded row (dst_row = P).
    assign_of_row_P = _append(assign_of_sorted_M, num_assign)[layout.src_row_P]
    row_of_assign_TxK = layout.dst_row_M[sorted_of_assign_M].reshape(num_tokens, top_k)
    return DispatchPlan(
        assign_of_row_P // top_k,
        assign_of_row_P,
        row_of_assign_TxK,
        group_sizes_E,
        layout.tile_group_Tp,
        layout.num_used_tiles,
        layout="padded",
        tile_m=tile_m,
    )


def capacity_plan(
    indices_TxK: jax.Array,
    num_experts: int,
    *,
    weights_TxK: jax.Array | None,
    capacity: int,
    drop_policy: str,
    tile_m: int | None = None,
    key: jax.Array | None = None,
) -> DispatchPlan:
    """Per-expert buffers of `capacity` slots; over-full experts drop their lowest-priority rows.

    Args:
      indices_TxK: int expert of each (token, place), >= E for "no expert".
      num_experts: E.
      weights_TxK: router weights (read for drop_policy="probs").
      capacity: C slots per expert.
      drop_policy: "position" (assignments ranked by token, then place), "probs" (highest
        weight first, ties by position) or "random" (a uniformly random order drawn with `key`:
        an over-full expert keeps a uniformly random subset).
      tile_m: unused (the plan-table signature).
      key: PRNG key of drop_policy="random".

    Returns:
      The DispatchPlan with R = E * C rows ("buffers"); slot c of expert e is row e * C + c.
    """
    del tile_m
    num_tokens, top_k = indices_TxK.shape
    num_assign = num_tokens * top_k
    expert_M = _expert_or_none(indices_TxK, num_experts)
    if drop_policy == "position":
        priority_M = jnp.arange(num_assign, dtype=jnp.int32)
    elif drop_policy == "probs":
        # Stable sort on -weight keeps position order among equal weights.
        weight_M = jax.lax.stop_gradient(weights_TxK).reshape(-1)
        priority_M = jnp.argsort(-weight_M, stable=True).astype(jnp.int32)
    elif drop_policy == "random":
        if key is None:
            raise ValueError("drop_policy='random' needs a PRNG key (training only)")
        priority_M = jax.random.permutation(key, num_assign).astype(jnp.int32)
    else:
        raise ValueError(
            f"drop_policy={drop_policy!r} is invalid: allowed values are 'position', 'probs', "
            "'random'"
        )
    # Stable sort by expert of the assignments in priority order: within an expert, sorted
    # position minus the expert's start is the assignment's rank (its slot if < C). The
    # sentinel E is a last "expert" whose assignments never get a slot.
    by_expert = jnp.argsort(expert_M[priority_M], stable=True)
    assign_of_sorted_M = priority_M[by_expert]
    counts_E1 = jnp.zeros((num_experts + 1,), jnp.int32).at[expert_M].add(1)
    starts_E1 = jnp.cumsum(counts_E1) - counts_E1
    sorted_of_assign_M = _inverse_permutation(assign_of_sorted_M)
    rank_M = sorted_of_assign_M - starts_E1[expert_M]
    num_rows = num_experts * capacity
    kept_M = (rank_M < capacity) & (expert_M < num_experts)
    row_of_assign_M = jnp.where(kept_M, expert_M * capacity + rank_M, num_rows)

    counts_E, starts_E = counts_E1[:num_experts], starts_E1[:num_experts]
    slot_ExC = jnp.arange(capacity, dtype=jnp.int32)[None, :]
    used_ExC = slot_ExC < counts_E[:, None]
    sorted_pos_ExC = jnp.where(used_ExC, starts_E[:, None] + slot_ExC, num_assign)
    assign_of_row_R = _append(assign_of_sorted_M, num_assign)[sorted_pos_ExC].reshape(-1)
    return DispatchPlan(
        assign_of_row_R // top_k,
        assign_of_row_R,
        row_of_assign_M.reshape(num_tokens, top_k),
        jnp.minimum(counts_E, capacity),
        layout="buffers",
        capacity=capacity,
    )


# name -> plan(indices_TxK, num_experts, *, weights_TxK, capacity, drop_policy, tile_m, key)
PLANS: dict[str, Callable[..., DispatchPlan]] = {
    "dropless": dropless_plan,
    "capacity": capacity_plan,
}


def make_plan(
    kind: str,
    indices_TxK: jax.Array,
    num_experts: int,
    *,
    weights_TxK: jax.Array | None = None,
    capacity: int | None = None,
    drop_policy: str = "position",
    tile_m: int | None = None,
    key: jax.Array | None = None,
) -> DispatchPlan:
    """The plan of dispatch kind `kind` (a key of PLANS) for these assignments."""
    if kind not in PLANS:
        raise ValueError(
            f"MoEConfig.dispatch={kind!r} is invalid: allowed values are "
            f"{', '.join(map(repr, PLANS))}"
        )
    return PLANS[kind](
        indices_TxK,
        num_experts,
        weights_TxK=weights_TxK,
        capacity=capacity,
        drop_policy=drop_policy,
        tile_m=tile_m,
        key=key,
    )


@jax.custom_vjp
def gather_rows(x_TxD: jax.Array, plan: DispatchPlan) -> jax.Array:
    """Dispatch: row r holds x[token_of_row[r]] (zeros for empty rows).

    Args:
      x_TxD: token vectors.
      plan: the DispatchPlan.

    Returns:
      [R, D] in x's dtype.
    """
    return _append_zero_row(x_TxD)[plan.token_of_row_R]


def _gather_rows_fwd(x_TxD, plan):
    return gather_rows(x_TxD, plan), plan


def _gather_rows_bwd(plan, d_rows_RxD):
    # Token t's gradient is the sum over its assignments' rows (dropped ones read the zero row).
    d_TxKxD = _append_zero_row(d_rows_RxD)[plan.row_of_assign_TxK]
    return d_TxKxD.sum(axis=1, dtype=jnp.float32).astype(d_rows_RxD.dtype), None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


@jax.custom_vjp
def combine_rows(rows_RxD: jax.Array, weights_TxK: jax.Array, plan: DispatchPlan) -> jax.Array:
    """Combine: y[t] = sum_k weights[t, k] * rows[row_of_assign[t, k]], in float32.

    Args:
      rows_RxD: expert outputs.
      weights_TxK: float32 router weights of the assignments.
      plan: the DispatchPlan.

    Returns:
      [T, D] float32; assignments without a row (dropped, no expert) contribute zero.
    """
    picked_TxKxD = _append_zero_row(rows_RxD)[plan.row_of_assign_TxK].astype(jnp.float32)
    return jnp.einsum("tk,tkd->td", weights_TxK.astype(jnp.float32), picked_TxKxD)


def _combine_rows_fwd(rows_RxD, weights_TxK, plan):
    return combine_rows(rows_RxD, weights_TxK, plan), (rows_RxD, weights_TxK, plan)


def _combine_rows_bwd(res, dy_TxD):
    rows_RxD, weights_TxK, plan = res
    dy_TxD = dy_TxD.astype(jnp.float32)
    # Row r's gradient is its assignment's weight times its token's output gradient; empty rows
    # read the appended zero weight.
    weight_R = _append(weights_TxK.reshape(-1).astype(jnp.float32), 0.0)[plan.assign_of_row_R]
    dy_RxD = _append_zero_row(dy_TxD)[plan.token_of_row_R]
    d_rows = (weight_R[:, None] * dy_RxD).astype(rows_RxD.dtype)
    picked_TxKxD = _append_zero_row(rows_RxD)[plan.row_of_assign_TxK].astype(jnp.float32)
    d_weights = jnp.einsum("tkd,td->tk", picked_TxKxD, dy_TxD).astype(weights_TxK.dtype)
    return d_rows, d_weights, None


combine_rows.defvjp(_combine_rows_fwd, _combine_rows_bwd)
