"""Token dispatch and combine for the MoE block: pure functions of arrays and the config.

Every path is described by a `DispatchPlan`: a set of R "rows" (expert inputs) laid out so that
each expert's rows are contiguous, and index maps between rows and the (token, choice)
assignments. Dispatch gathers token vectors into rows, the experts run on rows, and the combine
gathers each token's rows back and sums them with the router weights in float32:

- dropless: (token, choice) pairs sorted by expert (`sort_by_expert`), rows = T * K, experts run
  as a grouped matmul (`moejax.pallas.gmm`). On the XLA backend the rows are placed directly in
  the tile-padded layout (`moejax.pallas.padded_layout`: each expert starts on a tile boundary), so
  the one gather that dispatch needs anyway also does the padding, and one scan over row tiles
  runs each tile's whole expert MLP (`moejax.pallas.expert_mlp_padded`, one-scan backward), without
  gmm's own gathers in and out of that layout or a [P, F] hidden layer in memory.
- capacity: rows = E * C slots; an over-full expert keeps its first C assignments in priority
  order ("position": token order, then choice rank; "probs": highest router weight first) and
  drops the rest (a dropped assignment contributes zero). Experts run as one batched einsum.
- expert choice: rows = E * C, expert e's slots hold the tokens it picked; assignments are
  (token, expert) pairs, most of them empty.

Both directions are gathers, in the forward and in the backward pass (custom VJPs): a scatter
is far slower than a gather on CPU and serialises on GPU, and each row maps to exactly one
assignment, so the transpose of a gather here is another gather.

These functions are what `moejax.sharding.expert_parallel` reuses inside `shard_map`.

Legend: T tokens, D model width, F expert hidden width, E experts, K choices per token,
C capacity (slots per expert), R rows, M = T * K assignments, P padded rows.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from moejax import pallas
from moejax.layers.config import MoEConfig
from moejax.layers.mlp import GATED, activation_fn


class DispatchPlan(NamedTuple):
    """Where each assignment's token goes and comes back from.

    Attributes:
      token_of_row_R: [R] int32 token of each row; T for an empty row (padding, unused slot).
      assign_of_row_R: [R] int32 flat assignment index t * K + k of each row; T * K if empty.
      row_of_assign_TxK: [T, K] int32 row of each assignment; R if it has none (dropped).
      group_sizes_E: [E] int32 real rows per expert (their rows start at the expert's offset).
      tile_group: [R / tile] int32 expert of each row tile, only for the tile-padded layout.
      num_used_tiles: scalar int32 tiles holding rows, only for the tile-padded layout.
    """

    token_of_row_R: jax.Array
    assign_of_row_R: jax.Array
    row_of_assign_TxK: jax.Array
    group_sizes_E: jax.Array
    tile_group: jax.Array | None = None
    num_used_tiles: jax.Array | None = None

    @property
    def padded(self) -> bool:
        return self.tile_group is not None


def _append_zero_row(x: jax.Array) -> jax.Array:
    return jnp.concatenate([x, jnp.zeros((1, *x.shape[1:]), x.dtype)], axis=0)


def _append(x_N: jax.Array, value) -> jax.Array:
    return jnp.concatenate([x_N, jnp.full((1,), value, x_N.dtype)])


def sort_by_expert(indices_TxK: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """Orders the T * K assignments by expert (stable: token order within an expert).

    Args:
      indices_TxK: int expert of each (token, choice).
      num_experts: E.

    Returns:
      assign_of_sorted_M: [M] int32 flat assignment index t * K + k of each sorted position.
      group_sizes_E: [E] int32 assignments per expert.
    """
    expert_M = jnp.asarray(indices_TxK).reshape(-1).astype(jnp.int32)
    assign_of_sorted_M = jnp.argsort(expert_M, stable=True).astype(jnp.int32)
    group_sizes_E = jnp.zeros((num_experts,), jnp.int32).at[expert_M].add(1)
    return assign_of_sorted_M, group_sizes_E


def _inverse_permutation(perm_M: jax.Array) -> jax.Array:
    return jnp.zeros_like(perm_M).at[perm_M].set(jnp.arange(perm_M.shape[0], dtype=perm_M.dtype))


def dropless_plan(indices_TxK: jax.Array, num_experts: int, *, tile_m: int | None) -> DispatchPlan:
    """Every assignment gets a row; rows sorted by expert.

    Args:
      indices_TxK: int expert of each (token, choice).
      num_experts: E.
      tile_m: None for the compact layout (R = T * K, for `moejax.pallas.gmm`); an int for the
        tile-padded layout of `moejax.pallas.padded_layout` (R = padded rows).

    Returns:
      The DispatchPlan.
    """
    num_tokens, top_k = indices_TxK.shape
    num_assign = num_tokens * top_k
    assign_of_sorted_M, group_sizes_E = sort_by_expert(indices_TxK, num_experts)
    sorted_of_assign_M = _inverse_permutation(assign_of_sorted_M)
    if tile_m is None:
        return DispatchPlan(
            assign_of_sorted_M // top_k,
            assign_of_sorted_M,
            sorted_of_assign_M.reshape(num_tokens, top_k),
            group_sizes_E,
        )
    tile_m = pallas.effective_tile(num_assign, num_experts, tile_m)
    layout = pallas.padded_layout(group_sizes_E, num_assign, tile_m)
    # Padding rows point at sorted position M, which the appended sentinel maps to "no
    # assignment" (T * K), hence token T.
    assign_of_row_P = _append(assign_of_sorted_M, num_assign)[layout.src_row_P]
    row_of_assign_TxK = layout.dst_row_M[sorted_of_assign_M].reshape(num_tokens, top_k)
    return DispatchPlan(
        assign_of_row_P // top_k,
        assign_of_row_P,
        row_of_assign_TxK,
        group_sizes_E,
        layout.tile_group_Tp,
        layout.num_used_tiles,
    )


def capacity_plan(
    indices_TxK: jax.Array,
    weights_TxK: jax.Array,
    num_experts: int,
    capacity: int,
    drop_policy: str,
) -> DispatchPlan:
    """Per-expert buffers of `capacity` slots; over-full experts drop their lowest-priority rows.

    Args:
      indices_TxK: int expert of each (token, choice).
      weights_TxK: router weights (used for drop_policy="probs").
      num_experts: E.
      capacity: C slots per expert.
      drop_policy: "position" (assignments ranked by token, then choice rank) or "probs"
        (highest weight first, ties by position).

    Returns:
      The DispatchPlan with R = E * C rows; slot c of expert e is row e * C + c.
    """
    num_tokens, top_k = indices_TxK.shape
    num_assign = num_tokens * top_k
    expert_M = jnp.asarray(indices_TxK).reshape(-1).astype(jnp.int32)
    if drop_policy == "position":
        priority_M = jnp.arange(num_assign, dtype=jnp.int32)
    elif drop_policy == "probs":
        # Stable sort on -weight keeps position order among equal weights.
        weight_M = jax.lax.stop_gradient(weights_TxK).reshape(-1)
        priority_M = jnp.argsort(-weight_M, stable=True).astype(jnp.int32)
    else:
        raise ValueError(
            f"drop_policy={drop_policy!r} is invalid: allowed values are 'position', 'probs'"
        )
    # Stable sort by expert of the assignments in priority order: within an expert, sorted
    # position minus the expert's start is the assignment's rank (its slot if < C).
    by_expert = jnp.argsort(expert_M[priority_M], stable=True)
    assign_of_sorted_M = priority_M[by_expert]
    counts_E = jnp.zeros((num_experts,), jnp.int32).at[expert_M].add(1)
    starts_E = jnp.cumsum(counts_E) - counts_E
    sorted_of_assign_M = _inverse_permutation(assign_of_sorted_M)
    rank_M = sorted_of_assign_M - starts_E[expert_M]
    num_rows = num_experts * capacity
    row_of_assign_M = jnp.where(rank_M < capacity, expert_M * capacity + rank_M, num_rows)

    slot_ExC = jnp.arange(capacity, dtype=jnp.int32)[None, :]
    used_ExC = slot_ExC < counts_E[:, None]
    sorted_pos_ExC = jnp.where(used_ExC, starts_E[:, None] + slot_ExC, num_assign)
    assign_of_row_R = _append(assign_of_sorted_M, num_assign)[sorted_pos_ExC].reshape(-1)
    return DispatchPlan(
        assign_of_row_R // top_k,
        assign_of_row_R,
        row_of_assign_M.reshape(num_tokens, top_k),
        jnp.minimum(counts_E, capacity),
    )


def expert_choice_plan(
    token_indices_ExC: jax.Array, weights_ExC: jax.Array, num_tokens: int
) -> tuple[DispatchPlan, jax.Array]:
    """Rows are the experts' chosen tokens; assignments are (token, expert) pairs.

    Each expert picks C distinct tokens, so pair (t, e) has at most one row.

    Args:
      token_indices_ExC: int token chosen for each slot.
      weights_ExC: float32 weight of each slot.
      num_tokens: T.

    Returns:
      The DispatchPlan (assignments [T, E], R = E * C) and the weights as [T, E] (zero where an
      expert did not pick the token).
    """
    num_experts, capacity = token_indices_ExC.shape
    num_rows = num_experts * capacity
    token_R = jnp.asarray(token_indices_ExC).reshape(-1).astype(jnp.int32)
    expert_R = jnp.repeat(jnp.arange(num_experts, dtype=jnp.int32), capacity)
    assign_R = token_R * num_experts + expert_R
    row_of_assign = jnp.full((num_tokens * num_experts,), num_rows, jnp.int32)
    row_of_assign = row_of_assign.at[assign_R].set(jnp.arange(num_rows, dtype=jnp.int32))
    weights_TxE = jnp.zeros((num_tokens, num_experts), jnp.float32)
    weights_TxE = weights_TxE.at[token_R, expert_R].set(weights_ExC.reshape(-1))
    plan = DispatchPlan(
        token_R,
        assign_R,
        row_of_assign.reshape(num_tokens, num_experts),
        jnp.full((num_experts,), capacity, jnp.int32),
    )
    return plan, weights_TxE


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
      [T, D] float32; assignments without a row (dropped) contribute zero.
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


def _expert_hidden(x_Rx_, wi_gate, wi_up, activation: str, matmul) -> jax.Array:
    up = matmul(x_Rx_, wi_up)
    if activation in GATED:
        return activation_fn(activation)(matmul(x_Rx_, wi_gate)) * up
    return activation_fn(activation)(up)


def grouped_expert_mlp(
    x_RxD: jax.Array,
    wi_gate_ExDxF: jax.Array | None,
    wi_up_ExDxF: jax.Array,
    wo_ExFxD: jax.Array,
    plan: DispatchPlan,
    *,
    activation: str,
    backend: str,
) -> jax.Array:
    """Each row through its expert's MLP, rows grouped by expert (dropless layout).

    Args:
      x_RxD: rows from `gather_rows` with a dropless plan.
      wi_gate_ExDxF: gate weights (gated activations), else None.
      wi_up_ExDxF, wo_ExFxD: expert weights, in x's dtype.
      plan: the DispatchPlan (padded layout -> one scan over row tiles running the whole MLP,
        `moejax.pallas.expert_mlp_padded`; compact -> moejax.pallas.gmm per matmul).
      activation: MLP type (see moejax.layers.mlp).
      backend: moejax.pallas.gmm backend for the compact layout.

    Returns:
      [R, D] expert outputs; empty rows are zero.
    """
    if plan.padded:
        tile_m = plan.token_of_row_R.shape[0] // plan.tile_group.shape[0]
        return pallas.expert_mlp_padded(
            x_RxD,
            wi_gate_ExDxF,
            wi_up_ExDxF,
            wo_ExFxD,
            plan.tile_group,
            plan.num_used_tiles,
            act=activation_fn(activation),
            gated=activation in GATED,
            tile_m=tile_m,
        )

    def matmul(lhs, rhs):
        return pallas.gmm(lhs, rhs, plan.group_sizes_E, backend=backend, config=None)

    h_RxF = _expert_hidden(x_RxD, wi_gate_ExDxF, wi_up_ExDxF, activation, matmul)
    return matmul(h_RxF, wo_ExFxD)


def batched_expert_mlp(
    x_ExCxD: jax.Array,
    wi_gate_ExDxF: jax.Array | None,
    wi_up_ExDxF: jax.Array,
    wo_ExFxD: jax.Array,
    *,
    activation: str,
) -> jax.Array:
    """Each expert's MLP on its own [C, D] buffer (capacity layout): [E, C, D] -> [E, C, D]."""

    def matmul(lhs, rhs):
        return jnp.einsum("ecd,edf->ecf", lhs, rhs)

    h_ExCxF = _expert_hidden(x_ExCxD, wi_gate_ExDxF, wi_up_ExDxF, activation, matmul)
    return matmul(h_ExCxF, wo_ExFxD)


def use_padded_layout(backend: str) -> bool:
    """True when gmm `backend` resolves to the XLA scan (the padded layout's only consumer).

    Resolved by `moejax.pallas.resolve_backend`, the one place "auto" is decided, so the layout
    and the grouped matmul never disagree about the platform.
    """
    return pallas.resolve_backend(backend) == "xla"


def dropless_ffn(
    x_TxD: jax.Array,
    weights_TxK: jax.Array,
    indices_TxK: jax.Array,
    wi_gate_ExDxF: jax.Array | None,
    wi_up_ExDxF: jax.Array,
    wo_ExFxD: jax.Array,
    cfg: MoEConfig,
) -> jax.Array:
    """Dropless token-choice experts: sort by expert, grouped MLP, weighted combine.

    Args:
      x_TxD: tokens in the compute dtype.
      weights_TxK, indices_TxK: the router's weights (float32) and experts.
      wi_gate_ExDxF (None unless gated), wi_up_ExDxF, wo_ExFxD: expert weights, compute dtype.
      cfg: activation, gmm_backend, gmm_tile.

    Returns:
      [T, D] float32 routed output.
    """
    tile_m = cfg.gmm_tile if use_padded_layout(cfg.gmm_backend) else None
    plan = dropless_plan(indices_TxK, wi_up_ExDxF.shape[0], tile_m=tile_m)
    rows_RxD = gather_rows(x_TxD, plan)
    out_RxD = grouped_expert_mlp(
        rows_RxD,
        wi_gate_ExDxF,
        wi_up_ExDxF,
        wo_ExFxD,
        plan,
        activation=cfg.activation,
        backend=cfg.gmm_backend,
    )
    return combine_rows(out_RxD, weights_TxK, plan)


def _buffered_experts(
    x_TxD, plan, weights, buffer_shape, wi_gate_ExDxF, wi_up_ExDxF, wo_ExFxD, activation,
    buffer_constraint,
):  # fmt: skip
    """Gather into [E, C, D] expert buffers, run every expert on its buffer, combine to [T, D].

    Shared by capacity and expert-choice dispatch, which differ only in how `plan` fills the
    buffers; `buffer_constraint` (optional) shards the buffers.
    """
    x_ExCxD = gather_rows(x_TxD, plan).reshape(*buffer_shape, -1)
    if buffer_constraint is not None:
        x_ExCxD = buffer_constraint(x_ExCxD)
    out_ExCxD = batched_expert_mlp(
        x_ExCxD, wi_gate_ExDxF, wi_up_ExDxF, wo_ExFxD, activation=activation
    )
    if buffer_constraint is not None:
        out_ExCxD = buffer_constraint(out_ExCxD)
    return combine_rows(out_ExCxD.reshape(buffer_shape[0] * buffer_shape[1], -1), weights, plan)


def capacity_ffn(
    x_TxD: jax.Array,
    weights_TxK: jax.Array,
    indices_TxK: jax.Array,
    wi_gate_ExDxF: jax.Array | None,
    wi_up_ExDxF: jax.Array,
    wo_ExFxD: jax.Array,
    cfg: MoEConfig,
    *,
    capacity: int,
    buffer_constraint=None,
) -> tuple[jax.Array, jax.Array]:
    """Token-choice experts with per-expert buffers of `capacity` slots.

    Args:
      x_TxD, weights_TxK, indices_TxK, wi_*, wo_ExFxD: as for `dropless_ffn`.
      cfg: activation, drop_policy.
      capacity: C slots per expert (cfg.capacity(T, train=...)).
      buffer_constraint: optional function applied to the [E, C, D] buffers (sharding).

    Returns:
      [T, D] float32 routed output (dropped assignments contribute zero) and the dropped
      fraction of the T * K assignments (float32 scalar).
    """
    num_experts = wi_up_ExDxF.shape[0]
    plan = capacity_plan(indices_TxK, weights_TxK, num_experts, capacity, cfg.drop_policy)
    y_TxD = _buffered_experts(
        x_TxD, plan, weights_TxK, (num_experts, capacity), wi_gate_ExDxF, wi_up_ExDxF,
        wo_ExFxD, cfg.activation, buffer_constraint,
    )  # fmt: skip
    dropped = indices_TxK.size - plan.group_sizes_E.sum()
    return y_TxD, dropped.astype(jnp.float32) / indices_TxK.size


def expert_choice_ffn(
    x_TxD: jax.Array,
    weights_ExC: jax.Array,
    token_indices_ExC: jax.Array,
    wi_gate_ExDxF: jax.Array | None,
    wi_up_ExDxF: jax.Array,
    wo_ExFxD: jax.Array,
    cfg: MoEConfig,
    *,
    buffer_constraint=None,
) -> tuple[jax.Array, jax.Array]:
    """Expert-choice experts: expert e runs on the C tokens it picked.

    Args:
      x_TxD: tokens in the compute dtype.
      weights_ExC, token_indices_ExC: the ExpertChoiceRouter's output.
      wi_*, wo_ExFxD: expert weights, compute dtype.
      cfg: activation.
      buffer_constraint: optional function applied to the [E, C, D] buffers (sharding).

    Returns:
      [T, D] float32 output and the fraction of tokens that no expert picked (float32 scalar).
    """
    num_tokens = x_TxD.shape[0]
    num_experts, capacity = token_indices_ExC.shape
    plan, weights_TxE = expert_choice_plan(token_indices_ExC, weights_ExC, num_tokens)
    y_TxD = _buffered_experts(
        x_TxD, plan, weights_TxE, (num_experts, capacity), wi_gate_ExDxF, wi_up_ExDxF,
        wo_ExFxD, cfg.activation, buffer_constraint,
    )  # fmt: skip
    picked_T = (plan.row_of_assign_TxK < num_experts * capacity).any(axis=1)
    unpicked = num_tokens - picked_T.sum(dtype=jnp.int32)
    return y_TxD, unpicked.astype(jnp.float32) / num_tokens
