"""Grouped matmul kernels in Pallas with the Triton lowering (GPU); interpret mode on CPU.

Three products, each one `pl.pallas_call`:
  gmm             out[rows_g] = lhs[rows_g] @ rhs[g]        (forward)
  gmm, transposed out[rows_g] = lhs[rows_g] @ rhs[g].T      (d_lhs in the backward pass)
  tgmm            out[g] = lhs[rows_g].T @ grad[rows_g]     (d_rhs in the backward pass)

gmm schedule. Triton needs a static grid, but which row tiles each group touches depends on
`group_sizes`, a device array. So XLA computes, without a host sync, a list of "work items"
(row tile, group) - one per pair where the group has rows in the tile - and the grid runs over a
static upper bound of that list (the shared `moejax.pallas.metadata.make_group_metadata`, here
with zero_tail; `work_list` packs it for the kernel). Rows past sum(group_sizes) form one more
pseudo-group, the tail, whose work items write zeros (ragged_dot semantics). A tile shared
by two groups is visited once per group; each visit stores only its own group's rows (row mask),
so every output row is written exactly once and programs never race. Unused work items have an
empty row range and zero K steps: they load and store nothing.

tgmm schedule. The output [G, K, N] has a static shape, so the grid is (K tiles, N tiles, G);
each program loops over the row tiles of its group (a dynamic trip count: the group's tile
range from the same shared metadata) and accumulates lhs_tile.T @ grad_tile under the group's
row mask. An empty group runs zero iterations and stores zeros.

Quantized weights (`moejax.pallas.QuantizedWeight`: int8 values, float32 scales grouped along
the stored axis 1): gmm loads the int8 tile and its scale row and dequantizes it in registers
before the dot, so no float copy of the weight exists in memory. The block along the stored
axis 1 (block_k forward, block_n transposed) divides the scale group (`quantized_config`), so
each tile has exactly one scale row: a [1, bn] (or [1, bk]) load broadcast over the tile.

Both accumulate in float32 and cast to `preferred_element_type` when storing. Partial tiles at
the edges of M, K and N are handled with load/store masks (loads fill zeros), so no operand is
padded in memory. Block sizes, warps and stages come from `TritonConfig`, looked up in
`TUNED_CONFIGS` by kernel, dtype width and shape class unless the caller passes one.

Legend: M rows, K contraction width, N output width, G groups, W work items (static bound),
bm/bk/bn block sizes along M/K/N.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from moejax.pallas.backends import GmmKernels
from moejax.pallas.metadata import make_group_metadata
from moejax.pallas.quantized import QuantizedWeight, dequantize_tile
from moejax.pallas.validation import (
    check_config,
    check_gmm_args,
    check_tgmm_args,
    kernel_out_struct,
)

# Shared memory per SM usable by one block on the GPUs this table targets (H100/H200: 227 KiB).
# `TritonConfig.shared_memory_bytes` must stay under it, or Triton fails at compile time.
MAX_SHARED_MEMORY_BYTES = 227 * 1024


def _is_power_of_two(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """Tiling of one Triton grouped-matmul kernel.

    For gmm, block_m x block_n is the output tile and block_k the contraction step. For tgmm,
    block_k x block_n is the output tile of out[g] and block_m the contraction (row) step.
    Triton requires power-of-two block shapes, and its dot needs every dimension >= 16.

    Attributes:
      block_m: rows per tile.
      block_k: tile along K.
      block_n: tile along N.
      num_warps: warps (of 32 threads) per program.
      num_stages: software-pipelining depth of the contraction loop.
    """

    block_m: int = 64
    block_k: int = 32
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_m", "block_k", "block_n"):
            value = getattr(self, name)
            if not _is_power_of_two(value) or value < 16:
                raise ValueError(
                    f"TritonConfig.{name}={value} must be a power of two >= 16 (Triton block "
                    "shapes are powers of two and tl.dot needs dimensions >= 16)"
                )
        if self.num_warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"TritonConfig.num_warps={self.num_warps} must be in 1, 2, 4, ..., 32")
        if self.num_stages < 1:
            raise ValueError(f"TritonConfig.num_stages={self.num_stages} must be >= 1")

    def shared_memory_bytes(self, kernel: str, itemsize: int) -> int:
        """Shared memory of the pipelined operand tiles (what Triton allocates per stage)."""
        if kernel == "tgmm":
            per_stage = self.block_m * (self.block_k + self.block_n)
        else:
            per_stage = self.block_k * (self.block_m + self.block_n)
        return self.num_stages * per_stage * itemsize


KERNELS = ("gmm", "gmm_transposed", "tgmm")
SHAPE_CLASSES = ("few_rows", "narrow", "wide")

# Tuned table: (kernel, operand bytes per element, shape class) -> config. The entries follow
# the usual Triton matmul heuristics for Hopper (128x128 output tiles with 8 warps for large
# problems, wider K steps for 16-bit types, smaller row tiles when groups are short so that
# partial tiles waste fewer rows). They have NOT been timed on a GPU in this repository yet:
# benchmarks/gmm.py is the tool to re-tune them on one.
TUNED_CONFIGS: dict[tuple[str, int, str], TritonConfig] = {
    ("gmm", 2, "few_rows"): TritonConfig(32, 64, 128, num_warps=4, num_stages=4),
    ("gmm", 2, "narrow"): TritonConfig(64, 64, 64, num_warps=4, num_stages=4),
    ("gmm", 2, "wide"): TritonConfig(128, 64, 128, num_warps=8, num_stages=3),
    ("gmm", 4, "few_rows"): TritonConfig(32, 32, 128, num_warps=4, num_stages=3),
    ("gmm", 4, "narrow"): TritonConfig(64, 32, 64, num_warps=4, num_stages=3),
    ("gmm", 4, "wide"): TritonConfig(128, 32, 128, num_warps=8, num_stages=3),
    ("gmm_transposed", 2, "few_rows"): TritonConfig(32, 64, 128, num_warps=4, num_stages=4),
    ("gmm_transposed", 2, "narrow"): TritonConfig(64, 64, 64, num_warps=4, num_stages=4),
    ("gmm_transposed", 2, "wide"): TritonConfig(128, 64, 128, num_warps=8, num_stages=3),
    ("gmm_transposed", 4, "few_rows"): TritonConfig(32, 32, 128, num_warps=4, num_stages=3),
    ("gmm_transposed", 4, "narrow"): TritonConfig(64, 32, 64, num_warps=4, num_stages=3),
    ("gmm_transposed", 4, "wide"): TritonConfig(128, 32, 128, num_warps=8, num_stages=3),
    ("tgmm", 2, "few_rows"): TritonConfig(32, 64, 64, num_warps=4, num_stages=4),
    ("tgmm", 2, "narrow"): TritonConfig(64, 64, 64, num_warps=4, num_stages=4),
    ("tgmm", 2, "wide"): TritonConfig(64, 128, 128, num_warps=8, num_stages=3),
    ("tgmm", 4, "few_rows"): TritonConfig(32, 64, 64, num_warps=4, num_stages=3),
    ("tgmm", 4, "narrow"): TritonConfig(32, 64, 64, num_warps=4, num_stages=3),
    ("tgmm", 4, "wide"): TritonConfig(32, 128, 128, num_warps=8, num_stages=3),
}


def shape_class(num_rows: int, k: int, n: int, num_groups: int) -> str:
    """Coarse shape class used as the tuned-table key.

    "few_rows": fewer than 256 rows per group on average (fine-grained experts, small batches);
    "wide": both feature widths >= 1024; "narrow": the rest.
    """
    if num_rows < 256 * num_groups:
        return "few_rows"
    if min(k, n) >= 1024:
        return "wide"
    return "narrow"


def _fit(block: int, dim: int) -> int:
    """Shrink a block to the smallest power of two >= dim (and >= 16) for small problems."""
    return min(block, max(16, pl.next_power_of_2(dim)))


def default_config(
    kernel: str, num_rows: int, k: int, n: int, num_groups: int, dtype
) -> TritonConfig:
    """Tuned-table config for a problem, with blocks shrunk to the problem when it is smaller.

    Args:
      kernel: "gmm", "gmm_transposed" or "tgmm".
      num_rows, k, n, num_groups: M, K, N, G of the problem.
      dtype: operand dtype (its width picks the table row).

    Returns:
      The TritonConfig to use.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not one of {KERNELS}")
    itemsize = 2 if jnp.dtype(dtype).itemsize <= 2 else 4
    cfg = TUNED_CONFIGS[(kernel, itemsize, shape_class(num_rows, k, n, num_groups))]
    return dataclasses.replace(
        cfg,
        block_m=_fit(cfg.block_m, num_rows),
        block_k=_fit(cfg.block_k, k),
        block_n=_fit(cfg.block_n, n),
    )


def work_list(group_sizes: jax.Array, num_rows: int, block_m: int, num_k_steps: int) -> jax.Array:
    """The gmm kernel's work items, from the shared (group, row tile) metadata, on device.

    Args:
      group_sizes: [G] int32, sum <= num_rows.
      num_rows: M.
      block_m: row tile.
      num_k_steps: ceil(K / bk), the K steps of a real group's work item.

    Returns:
      work_W5: [5, W] int32 with W = `metadata.num_work_items(M, G + 1, bm)` (the tail counts as
      group G); per work item: rhs group (clamped to [0, G)), row tile, first row, end row
      (exclusive) of the group inside the whole array, and the number of K steps to run (0 for
      the tail, which then stores zeros, and for idle items, whose empty row range stores
      nothing).
    """
    num_groups = group_sizes.shape[0]
    meta = make_group_metadata(group_sizes, num_rows=num_rows, tile=block_m, zero_tail=True)
    group_W = meta.item_group_W
    used_W = jnp.arange(group_W.shape[0], dtype=jnp.int32) < meta.num_items
    tile_W = jnp.where(used_W, meta.item_tile_W, 0)
    row_start_W = jnp.where(used_W, meta.group_offsets[group_W], 0)
    row_end_W = jnp.where(used_W, meta.group_offsets[group_W + 1], 0)
    k_steps_W = jnp.where(used_W & (group_W < num_groups), num_k_steps, 0)
    rhs_group_W = jnp.minimum(group_W, num_groups - 1)
    return jnp.stack([rhs_group_W, tile_W, row_start_W, row_end_W, k_steps_W]).astype(jnp.int32)


def _gmm_kernel(
    work_ref,
    lhs_ref,
    rhs_ref,
    *refs,
    cfg: TritonConfig,
    k: int,
    n: int,
    transpose_rhs: bool,
    scale_group: int | None,
):
    # refs: (scale_ref, out_ref) for a quantized rhs (scale_group = its rows per scale row),
    # else (out_ref,).
    *scale_ref, out_ref = refs
    bm, bk, bn = cfg.block_m, cfg.block_k, cfg.block_n
    w = pl.program_id(0)
    j = pl.program_id(1)
    group = work_ref[0, w]
    row0 = work_ref[1, w] * bm
    row_start = work_ref[2, w]
    row_end = work_ref[3, w]
    k_steps = work_ref[4, w]

    rows_bm = row0 + jnp.arange(bm, dtype=jnp.int32)
    # Only this group's rows of the tile: a tile shared with the next group is also visited by
    # that group's work item, which writes the other rows.
    row_mask_bm = (rows_bm >= row_start) & (rows_bm < row_end)
    cols_bn = j * bn + jnp.arange(bn, dtype=jnp.int32)
    col_mask_bn = cols_bn < n

    def k_step(step, acc_bmxbn):
        ks_bk = step * bk + jnp.arange(bk, dtype=jnp.int32)
        k_mask_bk = ks_bk < k
        x_bmxbk = plgpu.load(
            lhs_ref.at[pl.ds(row0, bm), pl.ds(step * bk, bk)],
            mask=row_mask_bm[:, None] & k_mask_bk[None, :],
            other=0.0,
        )
        if transpose_rhs:
            w_bnxbk = plgpu.load(
                rhs_ref.at[group, pl.ds(j * bn, bn), pl.ds(step * bk, bk)],
                mask=col_mask_bn[:, None] & k_mask_bk[None, :],
                other=0,
            )
            if scale_group is not None:
                # The stored rows of this tile (output columns j*bn ...) share one scale row.
                s_1xbk = plgpu.load(
                    scale_ref[0].at[group, pl.ds((j * bn) // scale_group, 1), pl.ds(step * bk, bk)],
                    mask=k_mask_bk[None, :],
                    other=0.0,
                )
                w_bnxbk = dequantize_tile(w_bnxbk, s_1xbk, x_bmxbk.dtype)
            prod = jax.lax.dot_general(
                x_bmxbk, w_bnxbk, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
            )
        else:
            w_bkxbn = plgpu.load(
                rhs_ref.at[group, pl.ds(step * bk, bk), pl.ds(j * bn, bn)],
                mask=k_mask_bk[:, None] & col_mask_bn[None, :],
                other=0,
            )
            if scale_group is not None:
                # The K rows of this step lie in one scale group (block_k divides the group).
                s_1xbn = plgpu.load(
                    scale_ref[0].at[group, pl.ds((step * bk) // scale_group, 1), pl.ds(j * bn, bn)],
                    mask=col_mask_bn[None, :],
                    other=0.0,
                )
                w_bkxbn = dequantize_tile(w_bkxbn, s_1xbn, x_bmxbk.dtype)
            prod = jnp.dot(x_bmxbk, w_bkxbn, preferred_element_type=jnp.float32)
        return acc_bmxbn + prod

    # The tail pseudo-group and unused work items run zero steps and so store zeros (tail) or
    # nothing (unused items have an empty row range).
    acc_bmxbn = jax.lax.fori_loop(0, k_steps, k_step, jnp.zeros((bm, bn), jnp.float32))
    plgpu.store(
        out_ref.at[pl.ds(row0, bm), pl.ds(j * bn, bn)],
        acc_bmxbn.astype(out_ref.dtype),
        mask=row_mask_bm[:, None] & col_mask_bn[None, :],
    )


def quantized_config(
    cfg: TritonConfig, weight: QuantizedWeight, transpose_rhs: bool
) -> TritonConfig:
    """`cfg` with the block along the weight's stored axis 1 (block_k for gmm, block_n for the
    transposed product) dividing the scale group, so that each tile multiplies by one scale row.

    The block is halved until it divides the group (a power of two, so the group must be a
    multiple of 16); with one scale row for the whole axis (per channel) any block works.

    Raises:
      ValueError: the group has no power-of-two divisor >= 16.
    """
    if weight.scale.shape[1] == 1:
        return cfg
    name = "block_n" if transpose_rhs else "block_k"
    group, block = weight.group_size, getattr(cfg, name)
    while block > 16 and group % block:
        block //= 2
    if group % block:
        raise ValueError(
            f"rhs.scale groups of {group} rows do not fit the triton backend: TritonConfig."
            f"{name} (a power of two >= 16) must divide the group size; use a group size that "
            "is a multiple of 16, or per-channel scales"
        )
    return dataclasses.replace(cfg, **{name: block})


@functools.partial(
    jax.jit, static_argnames=("transpose_rhs", "preferred_element_type", "config", "interpret")
)
def gmm_triton(
    lhs: jax.Array,
    rhs: jax.Array | QuantizedWeight,
    group_sizes: jax.Array,
    *,
    transpose_rhs: bool = False,
    preferred_element_type=None,
    config: TritonConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Grouped matmul (forward, or d_lhs with transpose_rhs) as a Pallas Triton kernel.

    Args:
      lhs: [M, K].
      rhs: [G, K, N], or [G, N, K] with transpose_rhs; or a QuantizedWeight of that shape,
        whose int8 tile and scale row the kernel loads and dequantizes before the dot.
      group_sizes: [G] int32, sum <= M (checked on the host by `moejax.pallas.gmm`).
      transpose_rhs: contract with rhs's last axis.
      preferred_element_type: result dtype; None = lhs.dtype.
      config: tiling; None = `default_config` for this problem. For a quantized rhs the block
        along its stored axis 1 is shrunk to divide the scale group (`quantized_config`).
      interpret: run in the Pallas interpreter (CPU) instead of lowering to Triton.

    Returns:
      [M, N], zeros in rows past sum(group_sizes).
    """
    check_config("triton", config, TritonConfig)
    p = check_gmm_args(lhs, rhs, group_sizes, transpose_rhs, preferred_element_type)
    if p.is_empty:
        # Nothing to tile (Triton grids and blocks cannot be empty); an empty K gives zeros.
        return jnp.zeros((p.m, p.n), p.out_dtype)
    kernel_name = "gmm_transposed" if transpose_rhs else "gmm"
    cfg = config or default_config(kernel_name, p.m, p.k, p.n, p.num_groups, lhs.dtype)
    operands, scale_group = (rhs,), None
    if isinstance(rhs, QuantizedWeight):
        operands, scale_group = tuple(rhs), rhs.group_size
        cfg = quantized_config(cfg, rhs, transpose_rhs)
    work_W5 = work_list(group_sizes, p.m, cfg.block_m, pl.cdiv(p.k, cfg.block_k))
    grid = (work_W5.shape[1], pl.cdiv(p.n, cfg.block_n))
    kernel = functools.partial(
        _gmm_kernel,
        cfg=cfg,
        k=p.k,
        n=p.n,
        transpose_rhs=transpose_rhs,
        scale_group=scale_group,
    )
    return pl.pallas_call(
        kernel,
        out_shape=kernel_out_struct((p.m, p.n), p.out_dtype, lhs, rhs, group_sizes),
        grid=grid,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"{kernel_name}_quantized" if scale_group else kernel_name,
    )(work_W5, lhs, *operands)


def _tgmm_kernel(meta_ref, lhs_ref, grad_ref, out_ref, *, cfg: TritonConfig, k: int, n: int):
    bm, bk, bn = cfg.block_m, cfg.block_k, cfg.block_n
    i = pl.program_id(0)
    j = pl.program_id(1)
    g = pl.program_id(2)
    row_start = meta_ref[0, g]
    row_end = meta_ref[1, g]
    first_tile = meta_ref[2, g]
    num_tiles = meta_ref[3, g]

    ks_bk = i * bk + jnp.arange(bk, dtype=jnp.int32)
    k_mask_bk = ks_bk < k
    cols_bn = j * bn + jnp.arange(bn, dtype=jnp.int32)
    col_mask_bn = cols_bn < n

    def row_step(t, acc_bkxbn):
        row0 = (first_tile + t) * bm
        rows_bm = row0 + jnp.arange(bm, dtype=jnp.int32)
        row_mask_bm = (rows_bm >= row_start) & (rows_bm < row_end)
        # Both operands are masked: the other group's rows of a shared tile must add nothing,
        # even if they hold inf/nan.
        x_bmxbk = plgpu.load(
            lhs_ref.at[pl.ds(row0, bm), pl.ds(i * bk, bk)],
            mask=row_mask_bm[:, None] & k_mask_bk[None, :],
            other=0.0,
        )
        dy_bmxbn = plgpu.load(
            grad_ref.at[pl.ds(row0, bm), pl.ds(j * bn, bn)],
            mask=row_mask_bm[:, None] & col_mask_bn[None, :],
            other=0.0,
        )
        return acc_bkxbn + jax.lax.dot_general(
            x_bmxbk, dy_bmxbn, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )

    # An empty group has num_tiles == 0: the loop does not run and the block is stored as zeros.
    acc_bkxbn = jax.lax.fori_loop(0, num_tiles, row_step, jnp.zeros((bk, bn), jnp.float32))
    plgpu.store(
        out_ref.at[g, pl.ds(i * bk, bk), pl.ds(j * bn, bn)],
        acc_bkxbn.astype(out_ref.dtype),
        mask=k_mask_bk[:, None] & col_mask_bn[None, :],
    )


@functools.partial(
    jax.jit, static_argnames=("num_groups", "preferred_element_type", "config", "interpret")
)
def tgmm_triton(
    lhs: jax.Array,
    grad: jax.Array,
    group_sizes: jax.Array,
    *,
    num_groups: int | None = None,
    preferred_element_type=None,
    config: TritonConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Per-group lhs.T @ grad (d_rhs of gmm) as a Pallas Triton kernel.

    Args:
      lhs: [M, K].
      grad: [M, N].
      group_sizes: [G] int32, sum <= M; rows past the sum are ignored.
      num_groups: G; None = group_sizes.shape[0] (must equal it).
      preferred_element_type: result dtype; None = lhs.dtype.
      config: tiling; None = `default_config("tgmm", ...)`.
      interpret: run in the Pallas interpreter (CPU) instead of lowering to Triton.

    Returns:
      [G, K, N]; an empty group gives zeros.
    """
    check_config("triton", config, TritonConfig)
    p = check_tgmm_args(lhs, grad, group_sizes, num_groups, preferred_element_type)
    num_groups, k, n = p.num_groups, p.k, p.n
    if p.is_empty:
        # No rows means every group is empty: zeros, like an empty group.
        return jnp.zeros((num_groups, k, n), p.out_dtype)
    cfg = config or default_config("tgmm", p.m, k, n, num_groups, lhs.dtype)
    # Each program loops over its group's row tiles: the group's rows and tile range from the
    # shared metadata (its work list is unused here and compiled away).
    meta = make_group_metadata(group_sizes, num_rows=p.m, tile=cfg.block_m)
    offsets = meta.group_offsets
    meta_4xG = jnp.stack([offsets[:-1], offsets[1:], meta.first_tile_R, meta.num_tiles_R])
    grid = (pl.cdiv(k, cfg.block_k), pl.cdiv(n, cfg.block_n), num_groups)
    kernel = functools.partial(_tgmm_kernel, cfg=cfg, k=k, n=n)
    return pl.pallas_call(
        kernel,
        out_shape=kernel_out_struct((num_groups, k, n), p.out_dtype, lhs, grad, group_sizes),
        grid=grid,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="tgmm",
    )(meta_4xG, lhs, grad)


GMM_KERNELS = GmmKernels(
    gmm=gmm_triton, tgmm=tgmm_triton, config_type=TritonConfig, tuned_configs=TUNED_CONFIGS
)
