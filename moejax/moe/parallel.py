"""Expert parallelism: the local MoE pipeline inside `jax.shard_map` with explicit collectives.

The experts' weights are split over the mesh axis "expert" (E_loc = E / ep experts per shard,
and their hidden axis F over "tensor" when it divides); tokens are split over the batch axes
(data, fsdp, expert). Routing (router, balancing losses) and the capacity / expert-choice
selection run before, in ordinary GSPMD code on the global arrays, so every decision is the one
a single device makes (a dropped assignment becomes the sentinel "no expert" of its Routing);
this module only moves tokens to the shard owning their expert, runs the same local dropless
pipeline there (`moejax.moe.pipeline.dropless_ffn`, with the sentinel for "not here") and
brings the results back.

Strategies (MoEConfig.execution.expert_parallel):
- "all_to_all": each shard packs its kept assignments into fixed-size send buffers, one per
  destination shard, of S = ceil(A_exp / ep * ep_capacity_factor) rows (A_exp = the shard's
  expected kept assignments, so A_exp / ep is the balanced load per destination). One
  all_to_all sends the rows, the owner runs its local experts as one grouped matmul, a second
  all_to_all returns them. Exact whenever no source sends more than S rows to one destination;
  rows that do not fit are dropped, counted, and added to the returned dropped fraction, never
  silently. ep_capacity_factor=None sizes S for the worst case, T_loc * min(K, E_loc) (every
  token sending all its picks to one shard): dropless and exact, at ep x the buffer memory of
  a balanced load. ep_chunks = n > 1 cuts each shard's tokens into n chunks, each packed,
  exchanged, computed and returned on its own (S sized for the chunk): the chunks do not depend
  on each other, so the compiler may run one chunk's all_to_all while another's grouped matmul
  runs (the overlap of Tutel and Comet). Equal to one chunk whenever no buffer overflows.
  The exchange itself (MoEExecution.ep_exchange) is "fixed" (the buffers above) or "ragged":
  each shard sorts its kept assignments by expert (so by destination, and by local expert
  within one), all-gathers its per-expert counts (ep x E ints, as MaxText does: every shard
  then derives every pair's offsets, no second round trip) and one `jax.lax.ragged_all_to_all`
  sends each destination exactly its rows, into a receive buffer of the same R = ep * S rows
  as the fixed path's; the owner reads its rows' local experts off the gathered counts, runs
  them as one grouped matmul, and a second ragged_all_to_all returns them. Traffic is the
  rows routed, not ep * S per source, and the send side needs A rows, not ep * S. The R rows
  are shared by the sources: a destination keeps rows in source order until R are filled, so
  with ep_capacity_factor=None (S = the worst case) nothing can be dropped, and with a factor
  a destination drops only what exceeds R in all (never more than the fixed path, which drops
  per source past S); the dropped rows are counted the same way. "auto" = ragged where XLA
  implements ragged-all-to-all (TPU, GPU: the mesh's devices decide), fixed on CPU.
- "all_gather": tokens and routing are all-gathered over "expert", each shard computes its own
  experts' contributions for every gathered token (dropless), and a psum_scatter returns each
  token's sum to its shard. Exact, no bound, ep x the token traffic. It is also what "none"
  becomes when the grouped matmuls are Pallas kernels on a mesh of several devices
  (`layer_strategy`): GSPMD cannot partition those custom calls.
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

Legend: T tokens (per shard inside shard_map), K places per token (Routing's K_max),
A = T*K assignments, D model width, F expert hidden width, E experts, E_loc experts per shard,
ep expert-axis size, S send-buffer rows per destination, R = ep*S rows, C capacity.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from moejax import pallas
from moejax.moe.experts import ExpertWeights
from moejax.moe.pipeline import (
    dispatch_kind,
    dropless_ffn,
    dropped_fraction,
    plan_routing,
    routed_ffn,
)
from moejax.moe.plans import combine_rows, gather_rows, make_plan
from moejax.moe.routing import Routing
from moejax.sharding.rules import BATCH_AXES

if TYPE_CHECKING:
    from moejax.layers.config import MoEConfig

EXPERT_AXIS = "expert"
TENSOR_AXIS = "tensor"
STRATEGIES = ("all_to_all", "all_gather")
EXCHANGES = ("auto", "fixed", "ragged")
# Platforms (jax Device.platform) whose XLA backend implements ragged-all-to-all; XLA:CPU does
# not ("HLO opcode `ragged-all-to-all` is not supported by XLA:CPU ThunkEmitter").
RAGGED_PLATFORMS = ("tpu", "gpu")


def mesh_platform(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh) -> str:
    """The platform of `mesh`'s devices ("cpu", "gpu", "tpu"); a deviceless compile's mesh of
    topology devices names its target's. An abstract mesh without devices: the default
    backend's."""
    if isinstance(mesh, jax.sharding.Mesh):
        return mesh.devices.flat[0].platform
    device = getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def resolve_exchange(name: str, platform: str) -> str:
    """The all_to_all exchange "fixed" or "ragged" for MoEExecution.ep_exchange=`name` on
    `platform`: "auto" is ragged on RAGGED_PLATFORMS, fixed elsewhere.

    Raises:
      ValueError: an unknown name, or "ragged" on a platform without ragged-all-to-all.
    """
    if name not in EXCHANGES:
        raise ValueError(
            f"MoEExecution.ep_exchange={name!r} is invalid: allowed values are "
            f"{', '.join(map(repr, EXCHANGES))}"
        )
    if name == "auto":
        return "ragged" if platform in RAGGED_PLATFORMS else "fixed"
    if name == "ragged" and platform not in RAGGED_PLATFORMS:
        raise ValueError(
            f"MoEExecution.ep_exchange='ragged' needs jax.lax.ragged_all_to_all, which XLA "
            f"implements on {' and '.join(RAGGED_PLATFORMS)} only, not on this mesh's platform "
            f"{platform!r}: use 'fixed' (or 'auto', which picks it there)"
        )
    return name


def ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes):
    """The ragged exchange's one collective, over the expert axis: `jax.lax.ragged_all_to_all`
    with one slice per destination (offsets and sizes [ep]). Kept to this function so that a
    test on CPU, where XLA does not implement it, can put an emulation in its place."""
    return jax.lax.ragged_all_to_all(
        operand,
        output,
        input_offsets,
        send_sizes,
        output_offsets,
        recv_sizes,
        axis_name=EXPERT_AXIS,
    )


def send_buffer_rows(
    expected_rows: float, num_assignments: int, ep: int, factor: float | None
) -> int:
    """Rows S of each per-destination send buffer: the balanced load times `factor`.

    Args:
      expected_rows: kept assignments a shard expects to send in all (balanced routing).
      num_assignments: the most a shard can send to one destination (the cap on S).
      ep: destinations (expert-axis size).
      factor: MoEConfig.execution.ep_capacity_factor; None = the cap (nothing can overflow).
    """
    if factor is None:
        return max(1, num_assignments)
    return max(1, min(num_assignments, math.ceil(expected_rows / ep * factor)))


def _vary(xs, axes: tuple[str, ...]):
    """pcast every array in `xs` to vary over all of `axes` (the ones it does not already)."""

    def one(x):
        if x is None:
            return None
        missing = tuple(a for a in axes if a not in jax.typeof(x).manual_axis_type.varying)
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return [one(x) for x in xs]


def _all_to_all_body(x_TxD, idx_TxK, w_TxK, *weights, cfg, ep, s_rows, vary_axes, tensor_split):
    """Per-shard all_to_all dispatch (module docstring). Returns (y_TxD f32, overflow)."""
    x_TxD, idx_TxK, w_TxK, *weights = _vary((x_TxD, idx_TxK, w_TxK, *weights), vary_axes)
    local = ExpertWeights(*weights)
    t, k = idx_TxK.shape
    num_local = local.wi_up.shape[0]
    num_rows = ep * s_rows
    # Destination shard of each kept assignment (shard d owns experts [d*E_loc, (d+1)*E_loc));
    # ep (the sentinel) = not sent. Packing per destination is a capacity plan with "experts" =
    # destinations and capacity S, first come first served in assignment order.
    real_TxK = idx_TxK < cfg.num_experts
    dest_TxK = jnp.where(real_TxK, idx_TxK // num_local, ep)
    send = make_plan("capacity", dest_TxK, ep, capacity=s_rows, drop_policy="position")
    overflow = real_TxK.sum(dtype=jnp.int32) - send.num_kept

    idx_pad_A = jnp.concatenate([idx_TxK.reshape(-1), jnp.zeros((1,), jnp.int32)])
    slot_dest_R = jnp.arange(num_rows, dtype=jnp.int32) // s_rows
    used_R = send.assign_of_row_R < t * k
    local_R = jnp.where(
        used_R, idx_pad_A[send.assign_of_row_R] - slot_dest_R * num_local, num_local
    )
    send_RxD = gather_rows(x_TxD, send)
    d = x_TxD.shape[1]
    # recv[j] = the buffer shard j filled for this shard.
    recv_ExSxD = jax.lax.all_to_all(send_RxD.reshape(ep, s_rows, d), EXPERT_AXIS, 0, 0)
    recv_local_R = jax.lax.all_to_all(local_R.reshape(ep, s_rows), EXPERT_AXIS, 0, 0).reshape(-1)
    ones_Rx1 = jnp.ones((num_rows, 1), jnp.float32)
    (ones_Rx1,) = _vary((ones_Rx1,), vary_axes)
    out_RxD = dropless_ffn(
        recv_ExSxD.reshape(num_rows, d), ones_Rx1, recv_local_R[:, None], local, cfg
    )
    # The rows travel back in the compute dtype, as they came.
    back_ExSxD = jax.lax.all_to_all(
        out_RxD.astype(x_TxD.dtype).reshape(ep, s_rows, d), EXPERT_AXIS, 0, 0
    )
    y_TxD = combine_rows(back_ExSxD.reshape(num_rows, d), w_TxK, send)
    # The block's combined output, named like the local pipeline's (moejax.moe.pipeline).
    y_TxD = checkpoint_name(y_TxD, "moe_combine")
    if tensor_split:
        y_TxD = jax.lax.psum(y_TxD, TENSOR_AXIS)
    return y_TxD, overflow


def _exclusive_cumsum(x, axis):
    return jnp.cumsum(x, axis=axis) - x


def _ragged_body(x_TxD, idx_TxK, w_TxK, *weights, cfg, ep, s_rows, vary_axes, tensor_split):
    """Per-shard ragged all_to_all dispatch (module docstring). Returns (y_TxD f32, overflow)."""
    x_TxD, idx_TxK, w_TxK, *weights = _vary((x_TxD, idx_TxK, w_TxK, *weights), vary_axes)
    local = ExpertWeights(*weights)
    t, d = x_TxD.shape
    num_local = local.wi_up.shape[0]
    num_rows = ep * s_rows
    # Rows sorted by expert: destination d's rows are the contiguous block of experts
    # [d*E_loc, (d+1)*E_loc), sorted by local expert inside it. Sentinels sort last, unsent.
    send = make_plan("dropless", idx_TxK, cfg.num_experts, tile_m=None)
    me = jax.lax.axis_index(EXPERT_AXIS)
    # counts[s, d, e]: rows shard s has for local expert e of destination d (all shards agree).
    counts_SxDxL = jax.lax.all_gather(send.group_sizes_E.reshape(ep, num_local), EXPERT_AXIS)
    pair_SxD = counts_SxDxL.sum(axis=2)
    # Destination d fills its R rows in source order: source s writes at the rows sent to d
    # by the sources before it, as many as still fit.
    before_SxD = _exclusive_cumsum(pair_SxD, axis=0)
    kept_SxD = jnp.clip(num_rows - before_SxD, 0, pair_SxD)
    out_off_SxD = jnp.minimum(before_SxD, num_rows)
    # Source s's block for destination d starts after its blocks for destinations before d.
    in_off_SxD = _exclusive_cumsum(pair_SxD, axis=1)
    overflow = pair_SxD[me].sum() - kept_SxD[me].sum()

    send_AxD = gather_rows(x_TxD, send)
    recv_RxD, zeros_AxD = _vary(
        (jnp.zeros((num_rows, d), x_TxD.dtype), jnp.zeros_like(send_AxD)), vary_axes
    )
    offsets = _vary((in_off_SxD[me], kept_SxD[me], out_off_SxD[me], kept_SxD[:, me]), vary_axes)
    recv_RxD = ragged_all_to_all(send_AxD, recv_RxD, *offsets)
    # Received rows come as blocks (source s, local expert e) in that order, each of its
    # count cut to what source s was allowed to send: the local expert of row r is the block
    # r falls in; rows past all blocks are empty (the sentinel).
    counts_SxL = counts_SxDxL[:, me, :]
    block_SxL = jnp.clip(kept_SxD[:, me, None] - _exclusive_cumsum(counts_SxL, 1), 0, counts_SxL)
    ends_B = jnp.cumsum(block_SxL.reshape(-1))
    block_R = jnp.searchsorted(ends_B, jnp.arange(num_rows, dtype=jnp.int32), side="right")
    local_R = jnp.where(block_R < ep * num_local, block_R % num_local, num_local)
    ones_Rx1, local_Rx1 = _vary(
        (jnp.ones((num_rows, 1), jnp.float32), local_R[:, None].astype(jnp.int32)), vary_axes
    )
    out_RxD = dropless_ffn(recv_RxD, ones_Rx1, local_Rx1, local, cfg)
    # The way back: this shard returns source s's rows to where they left, in the compute dtype.
    offsets = _vary(
        (out_off_SxD[:, me], kept_SxD[:, me], in_off_SxD[:, me], kept_SxD[me]), vary_axes
    )
    back_AxD = ragged_all_to_all(out_RxD.astype(x_TxD.dtype), zeros_AxD, *offsets)
    # Rows not sent (over R) come back as zeros: those assignments contribute nothing.
    y_TxD = checkpoint_name(combine_rows(back_AxD, w_TxK, send), "moe_combine")
    if tensor_split:
        y_TxD = jax.lax.psum(y_TxD, TENSOR_AXIS)
    return y_TxD, overflow


def _all_gather_body(x_TxD, idx_TxK, w_TxK, *weights, cfg, ep, gather, vary_axes, tensor_split):
    """Per-shard all_gather dispatch (module docstring). Returns (y_TxD f32, 0)."""
    x_TxD, idx_TxK, w_TxK, *weights = _vary((x_TxD, idx_TxK, w_TxK, *weights), vary_axes)
    local = ExpertWeights(*weights)
    if gather:
        x_TxD, idx_TxK, w_TxK = (
            jax.lax.all_gather(v, EXPERT_AXIS, axis=0, tiled=True) for v in (x_TxD, idx_TxK, w_TxK)
        )
    num_local = local.wi_up.shape[0]
    first = jax.lax.axis_index(EXPERT_AXIS) * num_local if EXPERT_AXIS in vary_axes else 0
    # Global sentinel E lies outside every shard's range, so it stays "not here".
    local_TxK = idx_TxK - first
    owned_TxK = (local_TxK >= 0) & (local_TxK < num_local)
    local_TxK = jnp.where(owned_TxK, local_TxK, num_local)
    y_TxD = dropless_ffn(x_TxD, w_TxK, local_TxK, local, cfg)
    if gather:
        y_TxD = jax.lax.psum_scatter(y_TxD, EXPERT_AXIS, scatter_dimension=0, tiled=True)
    elif EXPERT_AXIS in vary_axes:
        y_TxD = jax.lax.psum(y_TxD, EXPERT_AXIS)
    if tensor_split:
        y_TxD = jax.lax.psum(y_TxD, TENSOR_AXIS)
    return y_TxD, jnp.zeros((), jnp.int32)


def _chunked(body, x_TxD, idx_TxK, w_TxK, *weights, chunks: int, vary_axes: tuple[str, ...]):
    """`body` on `chunks` equal, consecutive slices of a shard's tokens: (y_TxD, overflow), the
    outputs concatenated and the overflow counts summed. Unrolled: the slices are independent
    programs the scheduler may interleave."""
    if chunks == 1:
        return body(x_TxD, idx_TxK, w_TxK, *weights)
    # Vary the weights once for all chunks: the transpose of each pcast is a psum of the weight
    # gradients over the token axes, which must happen once, not once per chunk.
    weights = _vary(weights, vary_axes)
    size = x_TxD.shape[0] // chunks
    ys, overflow = [], 0
    for c in range(chunks):
        rows = slice(c * size, (c + 1) * size)
        y, o = body(x_TxD[rows], idx_TxK[rows], w_TxK[rows], *weights)
        ys.append(y)
        overflow = overflow + o
    return jnp.concatenate(ys, axis=0), overflow


# gmm backends whose grouped matmuls are Pallas kernels: custom calls that XLA's SPMD partitioner
# cannot split ("Mosaic kernels cannot be automatically partitioned"), so on a mesh of several
# devices they must run per shard, inside shard_map.
KERNEL_BACKENDS = ("mosaic", "triton", "tokamax")


def layer_strategy(cfg: MoEConfig, mesh=None) -> str:
    """How an MoE layer's routed experts run: cfg.execution.expert_parallel, except that "none"
    with a Pallas kernel backend (KERNEL_BACKENDS, "auto" resolved as `moejax.pallas.gmm`
    resolves it) on a mesh of more than one device becomes "all_gather": the local pipeline per
    shard inside shard_map (plain data parallelism when the mesh's expert axis is 1), the same
    numbers as one device, where GSPMD could not lower the kernels at all.

    Args:
      cfg: the MoE config (execution.expert_parallel, execution.gmm_backend).
      mesh: the mesh; None = the context mesh (`jax.set_mesh` / sharding_context).

    Returns:
      "none" (GSPMD partitions the local pipeline), "all_to_all" or "all_gather".
    """
    strategy = cfg.execution.expert_parallel
    if strategy != "none":
        return strategy
    mesh = _context_mesh(mesh)
    if mesh is None or math.prod(mesh.shape.values()) == 1:
        return strategy
    if pallas.resolve_backend(cfg.execution.gmm_backend) in KERNEL_BACKENDS:
        return "all_gather"
    return strategy


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


def _kept_assignments(routing: Routing, cfg: MoEConfig, capacity: int, key):
    """The single-device drop decisions, as a Routing whose dropped places are the sentinel.

    Returns:
      indices_TxK int32 (E where dropped or no expert), the dropped fraction the local path
      reports (float32 scalar) and the expected kept assignments per token (for S).
    """
    num_tokens, k_max = routing.indices.shape
    indices_TxK = routing.indices.astype(jnp.int32)
    if dispatch_kind(cfg) != "capacity":
        return indices_TxK, jnp.zeros((), jnp.float32), k_max
    plan = plan_routing(routing, cfg, capacity=capacity, key=key)
    kept_TxK = plan.row_of_assign_TxK < cfg.num_experts * capacity
    indices_TxK = jnp.where(kept_TxK, indices_TxK, cfg.num_experts)
    per_token = min(k_max, cfg.num_experts * capacity / num_tokens)
    return indices_TxK, dropped_fraction(routing, plan, cfg), per_token


def expert_parallel_ffn(
    x_TxD: jax.Array,
    routing: Routing,
    experts: ExpertWeights,
    cfg: MoEConfig,
    *,
    capacity: int,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    key: jax.Array | None = None,
    strategy: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The routed experts' output across the mesh; what `routed_ffn` returns on one device.

    Called from `moejax.layers.experts.Experts` (under jit) when `layer_strategy` is not
    "none". Any mesh works: a size-1 expert axis is plain data parallelism with local
    experts, and with no mesh at all the local pipeline runs directly.

    Args:
      x_TxD: tokens in the compute dtype (global view; GSPMD-sharded).
      routing: the router's decision (any router of moejax.moe.routing.ROUTERS).
      experts: the experts' weights in the compute dtype (global, logically sharded).
      cfg: num_experts, activation, dispatch, drop_policy, execution (strategy,
        ep_capacity_factor, ep_chunks, ep_exchange, gmm backend).
      capacity: per-expert slots for capacity dispatch and expert choice.
      mesh: mesh to shard over; None = the context mesh (`jax.set_mesh` / sharding_context).
      key: PRNG key of drop_policy="random" (training only).
      strategy: "all_to_all" or "all_gather"; None = cfg.execution.expert_parallel.

    Returns:
      y_TxD float32, and the dropped fraction (float32 scalar): the local path's (capacity
      drops; unpicked tokens for expert choice) plus the all_to_all send-buffer overflow as a
      fraction of all places (0 when the buffer bound holds, always 0 for all_gather).

    Raises:
      ValueError: unknown strategy, num_experts not divisible by the expert-axis size, or
        ep_exchange="ragged" on a platform without ragged-all-to-all (CPU).
    """
    strategy = strategy or cfg.execution.expert_parallel
    if strategy not in STRATEGIES:
        raise ValueError(
            f"MoEExecution.expert_parallel={strategy!r} is invalid here: allowed values are "
            f"{', '.join(map(repr, STRATEGIES))}"
        )
    mesh = _context_mesh(mesh)
    if mesh is None:
        return routed_ffn(x_TxD, routing, experts, cfg, capacity=capacity, key=key)
    ep = mesh.shape.get(EXPERT_AXIS, 1)
    if cfg.num_experts % ep:
        raise ValueError(
            f"MoEConfig.num_experts={cfg.num_experts} must be divisible by the mesh's expert "
            f"axis size {ep}"
        )
    indices, dropped, per_token = _kept_assignments(routing, cfg, capacity, key)
    t, k = indices.shape

    tok_axes = token_axes(mesh, t)
    n_tok = math.prod(mesh.shape[a] for a in tok_axes)
    split_on_expert = EXPERT_AXIS in tok_axes
    tensor_split = (
        mesh.shape.get(TENSOR_AXIS, 1) > 1 and experts.wo.shape[1] % mesh.shape[TENSOR_AXIS] == 0
    )
    e_axis = EXPERT_AXIS if EXPERT_AXIS in mesh.shape else None
    f_axis = TENSOR_AXIS if tensor_split else None
    vary_axes = tuple(dict.fromkeys((*tok_axes, *filter(None, (e_axis, f_axis)))))
    tok_spec = P(tok_axes or None, None)
    w_in, w_out = P(e_axis, None, f_axis), P(e_axis, f_axis, None)
    weight_specs = (None if experts.wi_gate is None else w_in, w_in, w_out)

    if strategy == "all_to_all" and split_on_expert:
        t_loc = t // n_tok
        chunks = cfg.execution.ep_chunks if t_loc % cfg.execution.ep_chunks == 0 else 1
        t_chunk = t_loc // chunks
        # A token sends at most min(K, E_loc) of its picks to one destination (distinct experts).
        worst = t_chunk * min(k, cfg.num_experts // ep)
        s_rows = send_buffer_rows(t_chunk * per_token, worst, ep, cfg.execution.ep_capacity_factor)
        exchange = resolve_exchange(cfg.execution.ep_exchange, mesh_platform(mesh))
        body = functools.partial(
            _chunked,
            functools.partial(
                _ragged_body if exchange == "ragged" else _all_to_all_body,
                cfg=cfg,
                ep=ep,
                s_rows=s_rows,
                vary_axes=vary_axes,
                tensor_split=tensor_split,
            ),
            chunks=chunks,
            vary_axes=vary_axes,
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
        in_specs=(tok_spec, tok_spec, tok_spec, *weight_specs),
        out_specs=(tok_spec, P()),
        check_vma=True,
    )
    y_TxD, overflow = fn(x_TxD, indices, routing.weights.astype(jnp.float32), *experts)
    return y_TxD, dropped + overflow / indices.size
