"""Expert parallelism: the routed-expert FFN inside `jax.shard_map` with explicit collectives.

The experts' weights are split over the mesh axis "expert" (E_loc = E / ep experts per shard,
and their hidden axis F over "tensor" when it divides); tokens are split over the batch axes
(data, fsdp, expert). Routing (router, balancing losses) and the capacity / expert-choice
selection run before, in ordinary GSPMD code on the global arrays, so every decision is the one
a single device makes; this module only moves tokens to the shard owning their expert, runs the
grouped expert MLP there (moejax.layers.dispatch building blocks) and brings the results back.

Strategies (MoEConfig.expert_parallel):
- "all_to_all": each shard packs its kept assignments into fixed-size send buffers, one per
  destination shard, of S = ceil(A_exp / ep * ep_capacity_factor) rows (A_exp = the shard's
  expected kept assignments, so A_exp / ep is the balanced load per destination). One
  all_to_all sends the rows, the owner runs its local experts as one grouped matmul, a second
  all_to_all returns them. Exact whenever no source sends more than S rows to one destination;
  rows that do not fit are dropped, counted, and added to the returned dropped fraction, never
  silently.
- "all_gather": tokens and routing are all-gathered over "expert", each shard computes its own
  experts' contributions for every gathered token (dropless), and a psum_scatter returns each
  token's sum to its shard. Exact, no bound, ep x the token traffic.
With F split over "tensor", each shard holds a partial sum over its F slice; a psum over
"tensor" on the [T, D] output (the smallest tensor on the way) completes it.
Expert weights stored with D split over "fsdp" (rule embed_moe -> fsdp) enter the shard_map
gathered over fsdp (ZeRO-3: XLA inserts the all-gather, and the reduce-scatter of their
gradients on the way back).

When the tokens do not split over "expert" (e.g. a tiny decode batch), they stay replicated over
it and each shard computes its experts' part for all of them, then a psum over "expert".

Everything inside the shard_map is first made to vary over the same mesh axes (`pcast`): the
dispatch/grouped-matmul custom VJPs need primal and cotangent to agree, and the transpose of
that pcast is exactly the psum of the weight gradients over the token axes (and of the token
gradients over "tensor").

Legend: T tokens (per shard inside shard_map), K choices per token (E for expert choice),
A = T*K assignments, D model width, F expert hidden width, E experts, E_loc experts per shard,
ep expert-axis size, S send-buffer rows per destination, R = ep*S rows, C capacity.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax.layers import dispatch
from moejax.layers.config import MoEConfig
from moejax.layers.router import ExpertChoiceOutput, RouterOutput
from moejax.sharding.rules import BATCH_AXES

EXPERT_AXIS = "expert"
TENSOR_AXIS = "tensor"
STRATEGIES = ("all_to_all", "all_gather")


def send_buffer_rows(expected_rows: float, num_assignments: int, ep: int, factor: float) -> int:
    """Rows S of each per-destination send buffer: the balanced load times `factor`.

    Args:
      expected_rows: kept assignments a shard expects to send in all (balanced routing).
      num_assignments: A, the most a shard can send (the cap on S).
      ep: destinations (expert-axis size).
      factor: MoEConfig.ep_capacity_factor.
    """
    return max(1, min(num_assignments, math.ceil(expected_rows / ep * factor)))


def _vary(xs, axes: tuple[str, ...]):
    """pcast every array in `xs` to vary over all of `axes` (the ones it does not already)."""

    def one(x):
        if x is None:
            return None
        missing = tuple(a for a in axes if a not in jax.typeof(x).manual_axis_type.varying)
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return [one(x) for x in xs]


def _local_dropless(x_MxD, local_MxK, w_MxK, weights, cfg: MoEConfig, num_local: int):
    """The local experts on assignments tagged with a local expert id (M's dropless blocks).

    Args:
      x_MxD: token vectors (assignment (m, k) belongs to token m).
      local_MxK: local expert id of each assignment, num_local for "not here / dropped".
      w_MxK: float32 combine weights.
      weights: (wi_gate, wi_up, wo) local expert weights [E_loc, ...].

    Returns:
      [M, D] float32 sum_k w[m, k] * expert_{local[m, k]}(x[m]) over the local experts.
    """
    tile_m = cfg.gmm_tile if dispatch.use_padded_layout(cfg.gmm_backend) else None
    plan = dispatch.dropless_plan(local_MxK, num_local, tile_m=tile_m)
    rows_RxD = dispatch.gather_rows(x_MxD, plan)
    out_RxD = dispatch.grouped_expert_mlp(
        rows_RxD, *weights, plan, activation=cfg.activation, backend=cfg.gmm_backend
    )
    return dispatch.combine_rows(out_RxD, w_MxK, plan)


def _all_to_all_body(
    x_TxD, idx_TxK, w_TxK, keep_TxK, *weights, cfg, ep, s_rows, vary_axes, tensor_split
):
    """Per-shard all_to_all dispatch (module docstring). Returns (y_TxD f32, overflow)."""
    x_TxD, idx_TxK, w_TxK, keep_TxK, *weights = _vary(
        (x_TxD, idx_TxK, w_TxK, keep_TxK, *weights), vary_axes
    )
    t, k = idx_TxK.shape
    num_local = cfg.num_experts // ep
    num_rows = ep * s_rows
    # Destination shard of each kept assignment (shard d owns experts [d*E_loc, (d+1)*E_loc));
    # ep = not sent. Packing per destination is a capacity plan with "experts" = destinations
    # and capacity S, first come first served in assignment order.
    dest_TxK = jnp.where(keep_TxK, idx_TxK // num_local, ep)
    send = dispatch.capacity_plan(dest_TxK, w_TxK, ep, s_rows, "position")
    row_of_assign = jnp.where(keep_TxK, send.row_of_assign_TxK, num_rows)
    send = send._replace(row_of_assign_TxK=jnp.minimum(row_of_assign, num_rows))
    overflow = keep_TxK.sum(dtype=jnp.int32) - send.group_sizes_E.sum()

    idx_pad_A = jnp.concatenate([idx_TxK.reshape(-1), jnp.zeros((1,), jnp.int32)])
    slot_dest_R = jnp.arange(num_rows, dtype=jnp.int32) // s_rows
    used_R = send.assign_of_row_R < t * k
    local_R = jnp.where(
        used_R, idx_pad_A[send.assign_of_row_R] - slot_dest_R * num_local, num_local
    )
    send_RxD = dispatch.gather_rows(x_TxD, send)
    d = x_TxD.shape[1]
    # recv[j] = the buffer shard j filled for this shard.
    recv_ExSxD = jax.lax.all_to_all(send_RxD.reshape(ep, s_rows, d), EXPERT_AXIS, 0, 0)
    recv_local_R = jax.lax.all_to_all(local_R.reshape(ep, s_rows), EXPERT_AXIS, 0, 0).reshape(-1)
    ones_Rx1 = jnp.ones((num_rows, 1), jnp.float32)
    (ones_Rx1,) = _vary((ones_Rx1,), vary_axes)
    out_RxD = _local_dropless(
        recv_ExSxD.reshape(num_rows, d),
        recv_local_R[:, None],
        ones_Rx1,
        weights,
        cfg,
        num_local,
    )
    # The rows travel back in the compute dtype, as they came.
    back_ExSxD = jax.lax.all_to_all(
        out_RxD.astype(x_TxD.dtype).reshape(ep, s_rows, d), EXPERT_AXIS, 0, 0
    )
    y_TxD = dispatch.combine_rows(back_ExSxD.reshape(num_rows, d), w_TxK, send)
    if tensor_split:
        y_TxD = jax.lax.psum(y_TxD, TENSOR_AXIS)
    return y_TxD, overflow


def _all_gather_body(
    x_TxD, idx_TxK, w_TxK, keep_TxK, *weights, cfg, ep, gather, vary_axes, tensor_split
):
    """Per-shard all_gather dispatch (module docstring). Returns (y_TxD f32, 0)."""
    x_TxD, idx_TxK, w_TxK, keep_TxK, *weights = _vary(
        (x_TxD, idx_TxK, w_TxK, keep_TxK, *weights), vary_axes
    )
    if gather:
        x_TxD, idx_TxK, w_TxK, keep_TxK = (
            jax.lax.all_gather(v, EXPERT_AXIS, axis=0, tiled=True)
            for v in (x_TxD, idx_TxK, w_TxK, keep_TxK)
        )
    num_local = cfg.num_experts // ep
    first = jax.lax.axis_index(EXPERT_AXIS) * num_local if EXPERT_AXIS in vary_axes else 0
    local_TxK = idx_TxK - first
    owned_TxK = keep_TxK & (local_TxK >= 0) & (local_TxK < num_local)
    local_TxK = jnp.where(owned_TxK, local_TxK, num_local)
    y_TxD = _local_dropless(x_TxD, local_TxK, w_TxK, weights, cfg, num_local)
    if gather:
        y_TxD = jax.lax.psum_scatter(y_TxD, EXPERT_AXIS, scatter_dimension=0, tiled=True)
    elif EXPERT_AXIS in vary_axes:
        y_TxD = jax.lax.psum(y_TxD, EXPERT_AXIS)
    if tensor_split:
        y_TxD = jax.lax.psum(y_TxD, TENSOR_AXIS)
    return y_TxD, jnp.zeros((), jnp.int32)


def _context_mesh(mesh):
    if mesh is not None:
        return mesh
    abstract = jax.sharding.get_abstract_mesh()
    return None if abstract.empty else abstract


def token_axes(mesh, num_tokens: int) -> tuple[str, ...]:
    """Batch axes of `mesh` (data, fsdp, expert order) the T tokens are split over.

    An axis is used only if the tokens still divide evenly; the rest keep them replicated.
    """
    axes, size = [], 1
    for axis in BATCH_AXES:
        n = mesh.shape.get(axis, 1)
        if n > 1 and num_tokens % (size * n) == 0:
            axes.append(axis)
            size *= n
    return tuple(axes)


def _token_major(x_TxD, routing, cfg: MoEConfig, capacity: int):
    """Routing as token-major assignments plus the single-device drop decisions.

    Returns:
      indices_TxK int32, weights_TxK float32, keep_TxK bool, base dropped fraction (float32
      scalar, what the local path reports) and the expected kept assignments per token.
    """
    num_tokens = x_TxD.shape[0]
    if isinstance(routing, ExpertChoiceOutput):
        plan, weights_TxE = dispatch.expert_choice_plan(
            routing.token_indices, routing.weights, num_tokens
        )
        num_rows = routing.token_indices.size
        keep_TxE = plan.row_of_assign_TxK < num_rows
        indices_TxE = jnp.broadcast_to(jnp.arange(cfg.num_experts, dtype=jnp.int32), keep_TxE.shape)
        dropped = 1.0 - keep_TxE.any(axis=1).mean(dtype=jnp.float32)
        return indices_TxE, weights_TxE, keep_TxE, dropped, num_rows / num_tokens
    if not isinstance(routing, RouterOutput):
        raise ValueError(
            f"routing must be a RouterOutput or ExpertChoiceOutput, got {type(routing).__name__}"
        )
    indices_TxK = routing.indices.astype(jnp.int32)
    if cfg.dispatch == "capacity":
        plan = dispatch.capacity_plan(
            indices_TxK, routing.weights, cfg.num_experts, capacity, cfg.drop_policy
        )
        keep_TxK = plan.row_of_assign_TxK < cfg.num_experts * capacity
        dropped = 1.0 - plan.group_sizes_E.sum().astype(jnp.float32) / indices_TxK.size
        per_token = min(cfg.top_k, cfg.num_experts * capacity / num_tokens)
        return indices_TxK, routing.weights, keep_TxK, dropped, per_token
    keep_TxK = jnp.ones(indices_TxK.shape, bool)
    return indices_TxK, routing.weights, keep_TxK, jnp.zeros((), jnp.float32), cfg.top_k


def expert_parallel_ffn(
    x_TxD: jax.Array,
    routing: RouterOutput | ExpertChoiceOutput,
    wi_gate_ExDxF: jax.Array | None,
    wi_up_ExDxF: jax.Array,
    wo_ExFxD: jax.Array,
    cfg: MoEConfig,
    *,
    capacity: int,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The routed experts' output across the mesh; what `Experts` returns on one device.

    Called from `moejax.layers.experts.Experts` (under jit) when cfg.expert_parallel is not
    "none". Any mesh works: a size-1 expert axis is plain data parallelism with local experts,
    and with no mesh at all the local dispatch runs directly.

    Args:
      x_TxD: tokens in the compute dtype (global view; GSPMD-sharded).
      routing: RouterOutput (token choice) or ExpertChoiceOutput.
      wi_gate_ExDxF: gate weights, None for non-gated activations; wi_up_ExDxF, wo_ExFxD:
        expert weights in the compute dtype.
      cfg: num_experts, activation, dispatch, drop_policy, expert_parallel strategy,
        ep_capacity_factor, gmm backend.
      capacity: per-expert slots (cfg.capacity(T, train=...)) for capacity dispatch and expert
        choice.
      mesh: mesh to shard over; None = the context mesh (`jax.set_mesh` / sharding_context).

    Returns:
      y_TxD float32, and the dropped fraction (float32 scalar): the local path's (capacity
      drops; unpicked tokens for expert choice) plus the all_to_all send-buffer overflow as a
      fraction of all assignments (0 when the buffer bound holds, always 0 for all_gather).

    Raises:
      ValueError: unknown strategy, or num_experts not divisible by the expert-axis size.
    """
    strategy = cfg.expert_parallel
    if strategy not in STRATEGIES:
        raise ValueError(
            f"MoEConfig.expert_parallel={strategy!r} is invalid here: allowed values are "
            f"{', '.join(map(repr, STRATEGIES))}"
        )
    mesh = _context_mesh(mesh)
    if mesh is None:
        return _local(x_TxD, routing, (wi_gate_ExDxF, wi_up_ExDxF, wo_ExFxD), cfg, capacity)
    ep = mesh.shape.get(EXPERT_AXIS, 1)
    if cfg.num_experts % ep:
        raise ValueError(
            f"MoEConfig.num_experts={cfg.num_experts} must be divisible by the mesh's expert "
            f"axis size {ep}"
        )
    indices, weights_f32, keep, dropped, per_token = _token_major(x_TxD, routing, cfg, capacity)
    t, k = indices.shape
    expert_weights = (wi_gate_ExDxF, wi_up_ExDxF, wo_ExFxD)

    tok_axes = token_axes(mesh, t)
    n_tok = math.prod(mesh.shape[a] for a in tok_axes)
    split_on_expert = EXPERT_AXIS in tok_axes
    tensor_split = (
        mesh.shape.get(TENSOR_AXIS, 1) > 1 and wo_ExFxD.shape[1] % mesh.shape[TENSOR_AXIS] == 0
    )
    e_axis = EXPERT_AXIS if EXPERT_AXIS in mesh.shape else None
    f_axis = TENSOR_AXIS if tensor_split else None
    vary_axes = tuple(dict.fromkeys((*tok_axes, *filter(None, (e_axis, f_axis)))))
    tok_spec = P(tok_axes or None, None)
    w_in, w_out = P(e_axis, None, f_axis), P(e_axis, f_axis, None)
    weight_specs = (None if wi_gate_ExDxF is None else w_in, w_in, w_out)

    if strategy == "all_to_all" and split_on_expert:
        t_loc = t // n_tok
        s_rows = send_buffer_rows(t_loc * per_token, t_loc * k, ep, cfg.ep_capacity_factor)
        body = functools.partial(
            _all_to_all_body,
            cfg=cfg,
            ep=ep,
            s_rows=s_rows,
            vary_axes=vary_axes,
            tensor_split=tensor_split,
        )
    else:
        body = functools.partial(
            _all_gather_body,
            cfg=cfg,
            ep=ep,
            gather=split_on_expert,
            vary_axes=vary_axes,
            tensor_split=tensor_split,
        )

    def counted(*args):
        # Logical constraints name mesh axes that are manual inside shard_map: switch them off.
        with nn.logical_axis_rules(()):
            y, overflow = body(*args)
        if tok_axes:
            overflow = jax.lax.psum(overflow, tok_axes)
        # Tokens are replicated over the non-token axes, so is the count: make it invariant.
        rest = tuple(a for a in jax.typeof(overflow).manual_axis_type.varying)
        if rest:
            overflow = jax.lax.pmax(overflow, rest)
        return y, overflow.astype(jnp.float32)

    fn = jax.shard_map(
        counted,
        mesh=mesh,
        in_specs=(tok_spec, tok_spec, tok_spec, tok_spec, *weight_specs),
        out_specs=(tok_spec, P()),
        check_vma=True,
    )
    y_TxD, overflow = fn(x_TxD, indices, weights_f32, keep, *expert_weights)
    return y_TxD, dropped + overflow / keep.size


def _local(x_TxD, routing, weights, cfg: MoEConfig, capacity: int):
    """No mesh: the single-device dispatch paths, unchanged."""
    if isinstance(routing, ExpertChoiceOutput):
        return dispatch.expert_choice_ffn(
            x_TxD, routing.weights, routing.token_indices, *weights, cfg
        )
    if cfg.dispatch == "capacity":
        return dispatch.capacity_ffn(
            x_TxD, routing.weights, routing.indices, *weights, cfg, capacity=capacity
        )
    y_TxD = dispatch.dropless_ffn(x_TxD, routing.weights, routing.indices, *weights, cfg)
    return y_TxD, jnp.zeros((), jnp.float32)
