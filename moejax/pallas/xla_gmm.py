"""Grouped matmul in plain XLA: the CPU backend of `moejax.pallas.gmm`/`tgmm`.

`jax.lax.ragged_dot` on CPU multiplies every row by every group's weight and masks (G times the
FLOPs). Here the rows are laid out so that every group starts on a row-tile boundary ("padded
layout": group g occupies ceil(s_g / tile_m) whole tiles, the tail of its last tile is zeros),
and a loop over the groups, each running a loop over its own tiles (`_group_tile_loop`),
multiplies each tile by its group's weight only. The cost is the real FLOPs plus at most one
partial tile per group, plus two row gathers (in and out of the padded layout). The group's
weight slice is taken once per group, not once per tile, and the tile loops run only over used
tiles, so no per-tile branch carries the [G, K, N] weight-gradient accumulators. (In a profile
of the earlier tile scan, each tile's `lax.cond` took 0.45 ms of its own; the train step's time
did not change measurably with the loops, `benchmarks/train_step.py`.) A quantized rhs
(`moejax.pallas.QuantizedWeight`) is dequantized one group slice at a time, so no [G, K, N]
float weight is built.

The padded layout is the shared group-tile work list (`moejax.pallas.metadata`) of the group
sizes rounded up to whole tiles. The functions are plain (no custom_vjp): `moejax.pallas.ops`
wraps the grouped matmuls, and `moejax.pallas.expert_mlp` wraps `mlp_padded`/`mlp_padded_bwd` (a
whole expert MLP per tile in one loop, for the dropless MoE layer). `padded_layout` is public so
that dispatch code can gather tokens straight into the padded layout.

Legend: M rows, K contraction width, N output width, G groups, P padded rows (= T_p * tile_m),
T_p number of row tiles (static upper bound).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from moejax.pallas.backends import GmmKernels
from moejax.pallas.metadata import make_group_metadata
from moejax.pallas.quantized import QuantizedWeight, dequantize_tile
from moejax.pallas.validation import Problem, check_config, check_gmm_args, check_tgmm_args


@dataclasses.dataclass(frozen=True)
class XlaConfig:
    """Tiling of the XLA grouped matmul.

    Attributes:
      tile_m: row tile, the padding granularity of the padded layout (each group is padded to a
        multiple of it); shrunk by `effective_tile` when there are few rows per group. 256 keeps
        the per-tile matmuls large on CPU while padding at most one partial tile per group.
    """

    tile_m: int = 256

    def __post_init__(self):
        if not isinstance(self.tile_m, int) or isinstance(self.tile_m, bool) or self.tile_m < 1:
            raise ValueError(f"XlaConfig.tile_m must be a positive int, got {self.tile_m!r}")


class PaddedLayout(NamedTuple):
    """Where each row goes when every group is padded to a multiple of `tile_m` rows.

    Attributes:
      src_row_P: [P] int32, for each padded row the source row in [0, M), or M for a padding row
        (gathering from an operand with one extra zero row makes padding rows zero).
      dst_row_M: [M] int32, for each source row its padded row in [0, P), or P for rows past
        sum(group_sizes) (gathering from a padded result with one extra zero row gives zeros).
      tile_group_Tp: [T_p] int32, the group of each row tile (unused tiles repeat the last used
        tile's group; always in [0, G)).
      num_used_tiles: scalar int32, tiles that hold at least one real row's group.
    """

    src_row_P: jax.Array
    dst_row_M: jax.Array
    tile_group_Tp: jax.Array
    num_used_tiles: jax.Array


def num_padded_tiles(num_rows: int, num_groups: int, tile_m: int) -> int:
    """Static upper bound on sum_g ceil(s_g / tile_m) over all group_sizes with sum <= num_rows.

    With n groups holding a partial tile, the full tiles use at least n rows fewer, so the count
    is at most floor((M - n) / tile_m) + n, largest for n = min(G, M).
    """
    n = min(num_groups, num_rows)
    return max((num_rows - n) // tile_m + n, 1)


def effective_tile(num_rows: int, num_groups: int, tile_m: int) -> int:
    """The row tile actually used: `tile_m`, shrunk for few rows.

    Padding costs up to one tile per group, so with few rows (decoding, tiny batches) a large
    tile would multiply the work by up to G; the tile is capped at the power of two at or above
    the mean group size, which bounds the padding rows by about twice the real ones.
    """
    mean_group = max(1, -(-num_rows // max(num_groups, 1)))
    return max(1, min(tile_m, 1 << (mean_group - 1).bit_length()))


def padded_layout(group_sizes: jax.Array, num_rows: int, tile_m: int) -> PaddedLayout:
    """Index maps between the consecutive-row layout and the tile-padded layout.

    Args:
      group_sizes: [G] int32, rows of each group, consecutive, sum <= num_rows.
      num_rows: M, rows of the unpadded operand.
      tile_m: row tile; every group starts at a multiple of it in the padded layout.

    Returns:
      A `PaddedLayout` with P = num_padded_tiles(M, G, tile_m) * tile_m padded rows.
    """
    num_groups = group_sizes.shape[0]
    num_tiles = num_padded_tiles(num_rows, num_groups, tile_m)
    padded_rows = num_tiles * tile_m
    sizes_G = group_sizes.astype(jnp.int32)
    ends_G = jnp.cumsum(sizes_G)
    starts_G = ends_G - sizes_G
    # The padded layout is the shared work list of the sizes rounded up to whole tiles: those
    # groups share no tile, so work item t is row tile t, and num_tiles bounds the items.
    # Unused tiles (t >= num_used_tiles) repeat the last used tile's group.
    tiles_G = (sizes_G + tile_m - 1) // tile_m
    meta = make_group_metadata(
        tiles_G * tile_m, num_rows=padded_rows, tile=tile_m, max_items=num_tiles
    )
    tile_group_Tp, num_used_tiles = meta.item_group_W, meta.num_items
    pad_starts_G = meta.group_offsets[:-1]

    row_P = jnp.arange(padded_rows, dtype=jnp.int32)
    group_P = jnp.repeat(tile_group_Tp, tile_m, total_repeat_length=padded_rows)
    offset_P = row_P - pad_starts_G[group_P]
    used_P = (offset_P < sizes_G[group_P]) & (row_P < num_used_tiles * tile_m)
    src_row_P = jnp.where(used_P, starts_G[group_P] + offset_P, num_rows)

    # Source row i belongs to the group whose row range [start, end) contains it.
    row_M = jnp.arange(num_rows, dtype=jnp.int32)
    group_M = jnp.minimum(jnp.searchsorted(ends_G, row_M, side="right"), num_groups - 1)
    dst_row_M = jnp.where(
        row_M < ends_G[-1], pad_starts_G[group_M] + row_M - starts_G[group_M], padded_rows
    )
    return PaddedLayout(src_row_P, dst_row_M.astype(jnp.int32), tile_group_Tp, num_used_tiles)


def _gather_rows(x_MxK: jax.Array, rows: jax.Array) -> jax.Array:
    """x[rows] where rows == M selects a zero row (no clamping, no scatter)."""
    zero = jnp.zeros((1, x_MxK.shape[1]), x_MxK.dtype)
    return jnp.concatenate([x_MxK, zero], axis=0)[rows]


def _zeros_varying_like(shape, dtype, *like: jax.Array) -> jax.Array:
    """Zeros varying over the same shard_map axes as `like`: inside shard_map (check_vma) a
    loop's carry and body must agree on them. Plain zeros outside."""
    axes = set().union(*(jax.typeof(x).manual_axis_type.varying for x in like))
    zeros = jnp.zeros(shape, dtype)
    return jax.lax.pcast(zeros, tuple(sorted(axes)), to="varying") if axes else zeros


def _group_tile_loop(tile_group_Tp, num_used_tiles, num_groups, group_fn, carry):
    """Runs group_fn(g, first_tile, end_tile, carry) -> carry for g = 0..G-1, in order.

    Groups occupy consecutive tiles of the padded layout, so group g's used tiles are
    [first_tile, end_tile); a group without rows gets an empty range. Unused tiles
    (>= num_used_tiles) belong to no range. group_fn typically takes its weight slice once and
    runs `jax.lax.fori_loop(first_tile, end_tile, ...)` over the tiles.
    """
    used_Tp = (jnp.arange(tile_group_Tp.shape[0]) < num_used_tiles).astype(jnp.int32)
    tiles_G = jnp.zeros((num_groups,), jnp.int32).at[tile_group_Tp].add(used_Tp)
    ends_G = jnp.cumsum(tiles_G)

    def body(g, carry):
        return group_fn(g, ends_G[g] - tiles_G[g], ends_G[g], carry)

    return jax.lax.fori_loop(0, num_groups, body, carry)


def _tile(rows_PxN: jax.Array, t: jax.Array, tile_m: int) -> jax.Array:
    """Rows of tile t."""
    return jax.lax.dynamic_slice_in_dim(rows_PxN, t * tile_m, tile_m)


def _set_tile(rows_PxN: jax.Array, t: jax.Array, value_txN: jax.Array, tile_m: int) -> jax.Array:
    """rows with tile t replaced by value (in place inside a loop)."""
    return jax.lax.dynamic_update_slice_in_dim(
        rows_PxN, value_txN.astype(rows_PxN.dtype), t * tile_m, 0
    )


def gmm_padded(
    lhs_PxK: jax.Array,
    rhs: jax.Array | QuantizedWeight,
    tile_group_Tp: jax.Array,
    num_used_tiles: jax.Array,
    *,
    transpose_rhs: bool,
    preferred_element_type: jnp.dtype,
    tile_m: int,
) -> jax.Array:
    """Grouped matmul on rows already in the padded layout: tile t uses rhs[tile_group_Tp[t]].

    Args:
      lhs_PxK: [P, K] rows in the padded layout (P = T_p * tile_m).
      rhs: [G, K, N], or [G, N, K] when transpose_rhs; or a QuantizedWeight of that shape,
        whose group slice is dequantized (to lhs's dtype) by each tile that uses it.
      tile_group_Tp: [T_p] int32 group of each tile.
      num_used_tiles: scalar; tiles at and past it are skipped and give zeros.
      transpose_rhs: contract with rhs's last axis instead of its middle one.
      preferred_element_type: dtype of the result (and of the per-tile accumulation).
      tile_m: rows per tile.

    Returns:
      [P, N] in the padded layout.
    """
    quantized = isinstance(rhs, QuantizedWeight)
    rhs = rhs if quantized else jnp.asarray(rhs)
    num_tiles = tile_group_Tp.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    contract = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
    # Accumulate each tile in float32 (or wider) even for bf16 results; the tile is the whole
    # contraction, so the cast happens once per output element.
    acc_dtype = jnp.promote_types(preferred_element_type, jnp.float32)

    def group_weight(g):
        if not quantized:
            return jax.lax.dynamic_index_in_dim(rhs, g, keepdims=False)
        # Only this group's slice is dequantized (K x N, against its tiles' M x K x N work).
        values_g, scale_g = (jax.lax.dynamic_index_in_dim(a, g, keepdims=False) for a in rhs)
        return dequantize_tile(values_g, scale_g, lhs_PxK.dtype)

    def group(g, first, end, out_PxN):
        rhs_g = group_weight(g)

        def tile(t, out_PxN):
            prod = jax.lax.dot_general(
                _tile(lhs_PxK, t, tile_m), rhs_g, contract, preferred_element_type=acc_dtype
            )
            return _set_tile(out_PxN, t, prod, tile_m)

        return jax.lax.fori_loop(first, end, tile, out_PxN)

    out = _zeros_varying_like(
        (num_tiles * tile_m, n), preferred_element_type, lhs_PxK, *jax.tree.leaves(rhs)
    )
    return _group_tile_loop(tile_group_Tp, num_used_tiles, rhs.shape[0], group, out)


def _layout(
    group_sizes: jax.Array, problem: Problem, config: XlaConfig | None
) -> tuple[int, PaddedLayout]:
    """The row tile used for a problem (`effective_tile` of the config's) and its padded layout."""
    tile_m = effective_tile(problem.m, problem.num_groups, (config or XlaConfig()).tile_m)
    return tile_m, padded_layout(group_sizes, problem.m, tile_m)


def gmm_xla(
    lhs: jax.Array,
    rhs: jax.Array | QuantizedWeight,
    group_sizes: jax.Array,
    *,
    transpose_rhs: bool = False,
    preferred_element_type: Any = None,
    config: XlaConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Grouped matmul, `jax.lax.ragged_dot` semantics, computing each row against its group only.

    Args:
      lhs: [M, K], rows grouped consecutively by `group_sizes`.
      rhs: [G, K, N], or [G, N, K] with transpose_rhs; or a QuantizedWeight (`gmm_padded`).
      group_sizes: [G] int32, sum <= M.
      transpose_rhs: use rhs[g].T.
      preferred_element_type: result dtype; None = lhs.dtype.
      config: the row tile; None = `XlaConfig()`.
      interpret: ignored (plain XLA, nothing to interpret).

    Returns:
      [M, N]: row i of group g is lhs[i] @ rhs[g]; rows past sum(group_sizes) are zero.
    """
    del interpret
    check_config("xla", config, XlaConfig)
    problem = check_gmm_args(lhs, rhs, group_sizes, transpose_rhs, preferred_element_type)
    tile_m, layout = _layout(group_sizes, problem, config)
    lhs_PxK = _gather_rows(lhs, layout.src_row_P)
    out_PxN = gmm_padded(
        lhs_PxK,
        rhs,
        layout.tile_group_Tp,
        layout.num_used_tiles,
        transpose_rhs=transpose_rhs,
        preferred_element_type=problem.out_dtype,
        tile_m=tile_m,
    )
    return _gather_rows(out_PxN, layout.dst_row_M)


def tgmm_padded(
    lhs_PxK: jax.Array,
    grad_PxN: jax.Array,
    tile_group_Tp: jax.Array,
    num_used_tiles: jax.Array,
    *,
    num_groups: int,
    preferred_element_type: jnp.dtype,
    tile_m: int,
) -> jax.Array:
    """Per-group lhs.T @ grad on the padded layout (padding rows must be zero in lhs or grad).

    Returns:
      [G, K, N]; groups with no tile are zero. Accumulates in float32 (or wider), then casts.
    """
    k, n = lhs_PxK.shape[1], grad_PxN.shape[1]
    acc_dtype = jnp.promote_types(preferred_element_type, jnp.float32)

    def group(g, first, end, acc_GxKxN):
        def tile(t, acc_KxN):
            return acc_KxN + jax.lax.dot_general(
                _tile(lhs_PxK, t, tile_m),
                _tile(grad_PxN, t, tile_m),
                (((0,), (0,)), ((), ())),
                preferred_element_type=acc_dtype,
            )

        acc_KxN = jax.lax.fori_loop(
            first, end, tile, _zeros_varying_like((k, n), acc_dtype, lhs_PxK, grad_PxN)
        )
        # Each group is written once, with its own sum: no read-modify-write of [G, K, N].
        return jax.lax.dynamic_update_index_in_dim(acc_GxKxN, acc_KxN, g, 0)

    acc = _zeros_varying_like((num_groups, k, n), acc_dtype, lhs_PxK, grad_PxN)
    acc = _group_tile_loop(tile_group_Tp, num_used_tiles, num_groups, group, acc)
    return acc.astype(preferred_element_type)


def tgmm_xla(
    lhs: jax.Array,
    grad: jax.Array,
    group_sizes: jax.Array,
    *,
    num_groups: int | None = None,
    preferred_element_type: Any = None,
    config: XlaConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Transposed grouped matmul: out[g] = lhs[rows_g].T @ grad[rows_g].

    Args:
      lhs: [M, K], rows grouped consecutively by `group_sizes`.
      grad: [M, N], same row grouping.
      group_sizes: [G] int32, sum <= M; rows past the sum are ignored.
      num_groups: G (defaults to group_sizes.shape[0]; must equal it).
      preferred_element_type: result dtype; None = lhs.dtype.
      config: the row tile; None = `XlaConfig()`.
      interpret: ignored (plain XLA, nothing to interpret).

    Returns:
      [G, K, N]; an empty group gives zeros.
    """
    del interpret
    check_config("xla", config, XlaConfig)
    problem = check_tgmm_args(lhs, grad, group_sizes, num_groups, preferred_element_type)
    tile_m, layout = _layout(group_sizes, problem, config)
    # Padding rows gather the extra zero row, so they add nothing to any group.
    lhs_PxK = _gather_rows(lhs, layout.src_row_P)
    grad_PxN = _gather_rows(grad, layout.src_row_P)
    return tgmm_padded(
        lhs_PxK,
        grad_PxN,
        layout.tile_group_Tp,
        layout.num_used_tiles,
        num_groups=problem.num_groups,
        preferred_element_type=problem.out_dtype,
        tile_m=tile_m,
    )


def mlp_padded(
    x_PxD: jax.Array,
    wi_gate_GxDxF: jax.Array | None,
    wi_up_GxDxF: jax.Array,
    wo_GxFxD: jax.Array,
    tile_group_Tp: jax.Array,
    num_used_tiles: jax.Array,
    *,
    act,
    tile_m: int,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """A whole expert MLP per row tile in one loop: act(x @ wi_gate) * (x @ wi_up) @ wo.

    One loop instead of one per matmul keeps the [tile_m, F] hidden activations of a tile in
    cache between the matmuls and the elementwise work, and never writes the [P, F] hidden
    layer; only the pre-activations are kept, as residuals for `mlp_padded_bwd`.

    Args:
      x_PxD: [P, D] rows in the padded layout (padding rows zero).
      wi_gate_GxDxF: gate weights (gated MLPs), else None; wi_up_GxDxF: [G, D, F];
        wo_GxFxD: [G, F, D].
      tile_group_Tp, num_used_tiles: as for `gmm_padded`.
      act: elementwise nonlinearity (of the gate for gated MLPs) with act(0) = 0.
      tile_m: rows per tile.

    Returns:
      y_PxD in x's dtype (zero on skipped tiles) and the residuals (pre-activations, [P, F]
      each: up, then gate for gated MLPs).
    """
    num_tiles = tile_group_Tp.shape[0]
    d, f = x_PxD.shape[1], wi_up_GxDxF.shape[2]
    dtype = x_PxD.dtype
    gated = wi_gate_GxDxF is not None
    acc_dtype = jnp.promote_types(dtype, jnp.float32)
    weights = (wi_up_GxDxF, wo_GxFxD) + ((wi_gate_GxDxF,) if gated else ())

    def dot(a, b):
        return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=acc_dtype)

    def group(g, first, end, outs):
        w_up, w_o, *w_gate = (jax.lax.dynamic_index_in_dim(w, g, keepdims=False) for w in weights)

        def tile(t, outs):
            y_PxD, pre_PxF = outs
            x_txD = _tile(x_PxD, t, tile_m)
            pre = (dot(x_txD, w_up).astype(dtype),)
            if gated:
                pre += (dot(x_txD, w_gate[0]).astype(dtype),)
                h_txF = act(pre[1]) * pre[0]
            else:
                h_txF = act(pre[0])
            y_PxD = _set_tile(y_PxD, t, dot(h_txF, w_o), tile_m)
            return y_PxD, tuple(
                _set_tile(b, t, v, tile_m) for b, v in zip(pre_PxF, pre, strict=True)
            )

        return jax.lax.fori_loop(first, end, tile, outs)

    rows = num_tiles * tile_m
    outs = (
        _zeros_varying_like((rows, d), dtype, x_PxD, *weights),
        (_zeros_varying_like((rows, f), dtype, x_PxD, *weights),) * (1 + gated),
    )
    num_groups = wi_up_GxDxF.shape[0]
    return _group_tile_loop(tile_group_Tp, num_used_tiles, num_groups, group, outs)


def mlp_padded_bwd(
    x_PxD: jax.Array,
    wi_gate_GxDxF: jax.Array | None,
    wi_up_GxDxF: jax.Array,
    wo_GxFxD: jax.Array,
    tile_group_Tp: jax.Array,
    num_used_tiles: jax.Array,
    residuals: tuple[jax.Array, ...],
    dy_PxD: jax.Array,
    *,
    act,
    tile_m: int,
) -> tuple[jax.Array, jax.Array | None, jax.Array, jax.Array]:
    """Gradients of `mlp_padded` in one loop over the groups and their tiles.

    Each tile's weight gradients are summed in float32 (or wider) [D, F] accumulators carried
    through its group's tile loop, which then writes them to the group's slice once; padding
    rows are zero in x and in the hidden activations (act(0) = 0), so they add nothing.

    Returns:
      d_x_PxD (zero on skipped tiles), d_wi_gate (None if not gated), d_wi_up, d_wo, in the
      dtypes of their primals.
    """
    dtype = x_PxD.dtype
    gated = wi_gate_GxDxF is not None
    acc_dtype = jnp.promote_types(dtype, jnp.float32)
    weights = (wi_up_GxDxF, wo_GxFxD) + ((wi_gate_GxDxF,) if gated else ())

    def dot(a, b, dims):
        return jax.lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=acc_dtype)

    def group(g, first, end, carry):
        d_x_PxD, acc = carry
        w_up, w_o, *w_gate = (jax.lax.dynamic_index_in_dim(w, g, keepdims=False) for w in weights)

        def tile(t, carry):
            d_x_PxD, acc_g = carry
            x_txD, dy_txD = _tile(x_PxD, t, tile_m), _tile(dy_PxD, t, tile_m)
            pre = tuple(_tile(r, t, tile_m) for r in residuals)
            if gated:
                h_txF, h_vjp = jax.vjp(lambda gate, up: act(gate) * up, pre[1], pre[0])
            else:
                h_txF, h_vjp = jax.vjp(act, pre[0])
            d_h = dot(dy_txD, w_o, ((1,), (1,))).astype(dtype)
            d_pre = h_vjp(d_h)
            d_pre = (d_pre[1], d_pre[0]) if gated else d_pre
            d_x = dot(d_pre[0], w_up, ((1,), (1,)))
            if gated:
                d_x = d_x + dot(d_pre[1], w_gate[0], ((1,), (1,)))
            d_w = (dot(x_txD, d_pre[0], ((0,), (0,))), dot(h_txF, dy_txD, ((0,), (0,))))
            if gated:
                d_w += (dot(x_txD, d_pre[1], ((0,), (0,))),)
            acc_g = tuple(a + dw for a, dw in zip(acc_g, d_w, strict=True))
            return _set_tile(d_x_PxD, t, d_x, tile_m), acc_g

        zeros = tuple(
            _zeros_varying_like(w.shape[1:], acc_dtype, x_PxD, dy_PxD, *weights) for w in weights
        )
        d_x_PxD, acc_g = jax.lax.fori_loop(first, end, tile, (d_x_PxD, zeros))
        # Each group's slice is written once, with its own sum (zeros for a group without rows).
        acc = tuple(
            jax.lax.dynamic_update_index_in_dim(a, a_g, g, 0)
            for a, a_g in zip(acc, acc_g, strict=True)
        )
        return d_x_PxD, acc

    acc = tuple(_zeros_varying_like(w.shape, acc_dtype, x_PxD, dy_PxD, *weights) for w in weights)
    d_x = _zeros_varying_like(x_PxD.shape, dtype, x_PxD, dy_PxD, *weights)
    num_groups = wi_up_GxDxF.shape[0]
    d_x, acc = _group_tile_loop(tile_group_Tp, num_used_tiles, num_groups, group, (d_x, acc))
    d_w = tuple(a.astype(w.dtype) for a, w in zip(acc, weights, strict=True))
    d_gate = d_w[2] if gated else None
    return d_x, d_gate, d_w[0], d_w[1]


GMM_KERNELS = GmmKernels(gmm=gmm_xla, tgmm=tgmm_xla, config_type=XlaConfig, tuned_configs=None)
