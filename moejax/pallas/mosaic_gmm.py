"""Grouped matmul kernels for TPU in Pallas Mosaic: the "mosaic" backend of `moejax.pallas.gmm`.

Three products, all with `jax.lax.ragged_dot` semantics (rows are grouped consecutively by
`group_sizes`, rows past sum(group_sizes) give zeros):

  gmm_mosaic(lhs, rhs)                    out[rows_g] = lhs[rows_g] @ rhs[g]       (forward)
  gmm_mosaic(lhs, rhs, transpose_rhs=True) out[rows_g] = lhs[rows_g] @ rhs[g].T    (d_lhs)
  tgmm_mosaic(lhs, grad)                  out[g] = lhs[rows_g].T @ grad[rows_g]    (d_rhs)

How the kernels walk the rows. The rows are cut into row tiles of `tm` rows. A group covers a
run of consecutive row tiles; a tile that straddles a group boundary is visited once per group
that has rows in it, and those visits are consecutive (groups are sorted by row). The list of
visits ("steps") is the work list shared by every backend (`moejax.pallas.metadata`), computed
in XLA; `_make_schedule` adds which blocks each step fetches, and the kernel reads it by scalar
prefetch (SMEM): for step t, which group it works for and which row tile it reads or writes.
The number of steps depends on the group sizes, so the grid has a static upper bound of steps
and the steps past the real count do nothing and keep the previous step's block indices (no DMA).

Zeros past sum(group_sizes): the forward schedule appends a virtual "tail" group that owns rows
[sum(group_sizes), M_pad); its steps skip the matmul and store the zeroed accumulator, so every
output row is written exactly once and nothing is left uninitialised (megablox leaves those rows
as garbage and zeroes them in a separate XLA pass, or not at all). The weight-gradient schedule
gives each empty group one step that stores zeros.

Tiling. Block shapes obey Mosaic's rule: the last two dimensions of a block are multiples of
(8, 128) (16 in the second-minor for 16-bit types, whose native tile is (16, 128)). Inputs whose
dimensions are not tile multiples are zero-padded in the wrapper and the result is sliced back;
zero rows and columns add nothing to the products. Tile sizes come from `MosaicConfig`, by default
from `TUNED_CONFIGS`, and are fitted to the problem (`_fit_tiles`): capped at its size, and a
K/N tile divides the dimension when that is a multiple of 128 (so no weight is padded in HBM),
else pads it by at most 1/8.

Quantized weights (`moejax.pallas.QuantizedWeight`): the weight blocks are the stored int8
values, and a second input brings each block's scale rows; the kernel dequantizes the block in
VMEM (`dequantize_tile`) right before the dot, so HBM holds and moves only int8 weights. The
tile along the stored axis 1 (tk forward, tn transposed) and the scale group fit each other
(`_fit_scale_tile`): the tile divides the group (one scale row per block) or the group divides
the tile (tile / group rows, broadcast by a sublane-aligned reshape).

Accumulation is float32 in a VMEM scratch; inputs are float32 or bfloat16 (float32 products use
full-precision MXU passes); the result is cast to `preferred_element_type`.

Legend: M rows, K contraction width of gmm (lhs columns), N output width, G groups, T grid steps
along the rows (static upper bound), Mp/Kp/Np the dimensions padded to tile multiples.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from moejax.pallas.backends import GmmKernels
from moejax.pallas.metadata import make_group_metadata
from moejax.pallas.quantized import QuantizedWeight, dequantize_tile
from moejax.pallas.validation import (
    check_config,
    check_gmm_args,
    check_tgmm_args,
    kernel_out_struct,
)

_LANES = 128  # minor-dimension tile of every TPU vector register
_SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
# VMEM the compiler grants a kernel without asking (the smallest default across v4..v7x); above
# it the call requests more explicitly.
_DEFAULT_SCOPED_VMEM_BYTES = 16 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """Tile sizes of the Mosaic grouped matmul kernels.

    Attributes:
      tm: rows per row tile (second-minor of the lhs/out blocks): multiple of 8, and of 16 when
        any operand or the result is 16-bit (checked per call).
      tk: tile of gmm's contraction width K (lhs columns): multiple of 128.
      tn: tile of the output width N: multiple of 128.
    """

    tm: int = 128
    tk: int = 128
    tn: int = 128

    def __post_init__(self):
        if not isinstance(self.tm, int) or self.tm <= 0 or self.tm % 8:
            raise ValueError(f"MosaicConfig.tm must be a positive multiple of 8, got {self.tm!r}")
        for name in ("tk", "tn"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0 or value % _LANES:
                raise ValueError(
                    f"MosaicConfig.{name} must be a positive multiple of {_LANES}, got {value!r}"
                )


# Tuned tiles keyed by (product, input dtype, shape class). Products: "gmm" (rhs [G, K, N]),
# "gmm_t" (rhs [G, N, K], the d_lhs product), "tgmm" (out [G, K, N]). Shape class "large" when
# both K and N are >= 1024 (the MoE projections of real models), else "small".
# How the numbers were chosen: the MXU works on 128x128 (v4/v5) or 256x256 (v6e/v7x) tiles, so
# tk and tn are multiples of 256 where the problem allows; tm as large as VMEM permits because
# every row tile re-reads a whole [tk, tn] weight block from HBM, i.e. arithmetic intensity per
# weight byte grows with tm; double-buffered blocks + the f32 accumulator stay under the 16 MiB
# default scoped VMEM (`_vmem_bytes`; checked for every entry in the tests). These are reasoned
# defaults, not measured on TPU hardware (none was available): re-tune with benchmarks/ on TPU.
TUNED_CONFIGS: dict[tuple[str, str, str], MosaicConfig] = {
    ("gmm", "bfloat16", "small"): MosaicConfig(tm=512, tk=512, tn=512),
    ("gmm", "bfloat16", "large"): MosaicConfig(tm=512, tk=1024, tn=1024),
    ("gmm", "float32", "small"): MosaicConfig(tm=256, tk=512, tn=512),
    ("gmm", "float32", "large"): MosaicConfig(tm=256, tk=512, tn=1024),
    ("gmm_t", "bfloat16", "small"): MosaicConfig(tm=512, tk=512, tn=512),
    ("gmm_t", "bfloat16", "large"): MosaicConfig(tm=512, tk=1024, tn=1024),
    ("gmm_t", "float32", "small"): MosaicConfig(tm=256, tk=512, tn=512),
    ("gmm_t", "float32", "large"): MosaicConfig(tm=256, tk=512, tn=1024),
    ("tgmm", "bfloat16", "small"): MosaicConfig(tm=512, tk=512, tn=512),
    ("tgmm", "bfloat16", "large"): MosaicConfig(tm=512, tk=512, tn=1024),
    ("tgmm", "float32", "small"): MosaicConfig(tm=256, tk=512, tn=512),
    ("tgmm", "float32", "large"): MosaicConfig(tm=256, tk=512, tn=1024),
}


def shape_class(k: int, n: int) -> str:
    """Shape class of a product with contraction width K and output width N (table key)."""
    return "large" if min(k, n) >= 1024 else "small"


def lookup_config(product: str, dtype: Any, k: int, n: int) -> MosaicConfig:
    """Tuned tiles for `product` ("gmm", "gmm_t" or "tgmm") on `dtype` inputs of widths K, N."""
    key = (product, jnp.dtype(dtype).name, shape_class(k, n))
    if key not in TUNED_CONFIGS:
        raise ValueError(
            f"no tuned MosaicConfig for product={product!r}, dtype={jnp.dtype(dtype).name}; "
            f"known keys: {sorted(TUNED_CONFIGS)}"
        )
    return TUNED_CONFIGS[key]


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _sublane_multiple(*dtypes: Any) -> int:
    """Second-minor tile multiple: 8 for 32-bit types, 16 when any type is 16-bit."""
    return 16 if min(jnp.dtype(d).itemsize for d in dtypes) == 2 else 8


def _fit_lane_tile(dim: int, tile: int) -> int:
    """Tile for a lane dimension (K or N) of size `dim`, a multiple of 128, near `tile`.

    Padding a weight axis copies the whole weight on every call (the wrapper pads it in HBM:
    409 MiB of temporaries for one DeepSeek-shaped gmm, N = 1408, with a 768 tile), so when
    `dim` is a multiple of 128 the tile divides it: the divisor nearest `tile` (the larger on a
    tie), at most 2 x tile (N = 1408, tile 1024: 1408, one tile; 640 with 512: 640). Otherwise
    some padding is unavoidable and the largest tile up to `tile` whose padded extent stays
    within 1/8 of the smallest possible one (dim rounded up to 128) is used.
    """
    minimal = _round_up(max(dim, 1), _LANES)
    if tile >= minimal:
        return minimal
    if dim % _LANES == 0:
        divisors = [c for c in range(_LANES, min(dim, 2 * tile) + 1, _LANES) if dim % c == 0]
        return min(divisors, key=lambda c: (abs(c - tile), -c))
    for candidate in range(tile, _LANES - 1, -_LANES):
        if _round_up(minimal, candidate) - minimal <= minimal // 8:
            return candidate
    return _LANES


def _fit_tiles(config: MosaicConfig, m: int, k: int, n: int, sublanes: int) -> tuple[int, int, int]:
    """Tiles of `config` fitted to the problem: never larger than the (rounded-up) dimension,
    and K/N tiles moved to a divisor of the dimension, or shrunk to limit padding
    (`_fit_lane_tile`).

    Row padding costs no matmul work (padded rows belong to no group), so tm is only capped.
    """
    if config.tm % sublanes:
        raise ValueError(
            f"MosaicConfig.tm={config.tm} must be a multiple of {sublanes} for these dtypes "
            "(16-bit operands or result tile rows by 16)"
        )
    tm = min(config.tm, _round_up(max(m, 1), sublanes))
    return tm, _fit_lane_tile(k, config.tk), _fit_lane_tile(n, config.tn)


def _vmem_bytes(block_shapes: list[tuple[tuple[int, int], Any]], acc_shape: tuple[int, int]) -> int:
    """VMEM of a call: every block double-buffered by the pipeline + the f32 accumulator."""
    blocks = sum(2 * math.prod(shape) * jnp.dtype(dt).itemsize for shape, dt in block_shapes)
    return blocks + math.prod(acc_shape) * 4


def _compiler_params(semantics: tuple[str, ...], vmem: int) -> pltpu.CompilerParams:
    # Ask for more scoped VMEM only when needed, with headroom for Mosaic's internal scratch.
    limit = None if vmem <= _DEFAULT_SCOPED_VMEM_BYTES else vmem + 4 * 1024 * 1024
    return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=limit)


def _resolve_interpret(interpret: bool | pltpu.InterpretParams) -> Any:
    """`True` runs the TPU interpreter (simulated VMEM/SMEM, out-of-bounds checks) on the host."""
    if isinstance(interpret, pltpu.InterpretParams):
        return interpret
    if interpret is True:
        return pltpu.InterpretParams()
    if interpret is False:
        return False
    raise ValueError(f"interpret must be a bool or pltpu.InterpretParams, got {interpret!r}")


def _check_dtype(name: str, dtype: Any) -> None:
    if jnp.dtype(dtype) not in _SUPPORTED_DTYPES:
        raise ValueError(f"{name} must be float32 or bfloat16 for the mosaic backend, got {dtype}")


def _pad2(x: jax.Array, rows: int, cols: int) -> jax.Array:
    """Zero-pads the last two axes of x up to (rows, cols); a no-op when already that size."""
    pad_r, pad_c = rows - x.shape[-2], cols - x.shape[-1]
    if pad_r == 0 and pad_c == 0:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, pad_r), (0, pad_c)])


class _Schedule(NamedTuple):
    """The row steps of a kernel (all computed in XLA, read by the kernel from SMEM).

    Attributes:
      group_offsets: [Gs + 1] int32, group j owns rows [group_offsets[j], group_offsets[j+1]).
        Gs = G + 1 when a tail group is appended (gmm), else G.
      step_group_T: [T] int32, the group step t works for.
      step_tile_T: [T] int32, the row tile step t writes (gmm) or reads (tgmm).
      fetch_tile_T: [T] int32, the row tile whose input blocks step t fetches: its own tile when
        it computes, else the tile of the last computing step so that no new DMA is issued.
      fetch_group_T: [T] int32, the same for the weight block of gmm (always in [0, G)).
      compute_T: [T] int32, 1 when step t multiplies (a real, non-empty group), else 0.
      num_steps: [1] int32, steps that do something; steps >= num_steps[0] are idle.
    """

    group_offsets: jax.Array
    step_group_T: jax.Array
    step_tile_T: jax.Array
    fetch_tile_T: jax.Array
    fetch_group_T: jax.Array
    compute_T: jax.Array
    num_steps: jax.Array


def _make_schedule(
    group_sizes_G: jax.Array, *, m_pad: int, tm: int, zero_tail: bool, visit_empty: bool
) -> _Schedule:
    """Step list for the row axis of the grid: the shared work list plus what Mosaic adds.

    Args:
      group_sizes_G: [G] int32 rows per group (consecutive; sum <= M).
      m_pad: rows after padding M to a multiple of tm; the steps cover all of them.
      tm: row tile.
      zero_tail: append the virtual group of rows [sum(group_sizes), m_pad) whose steps store
        zeros (gmm: makes every output row, padding included, written exactly once).
      visit_empty: give each empty group one step (tgmm: the step stores its zero result).

    Returns:
      The schedule; its T = len(step_group_T) is the static number of grid steps along the rows,
      `metadata.num_work_items(m_pad, Gs, tm)`.
    """
    num_groups = group_sizes_G.shape[0]
    # (1)-(4) The (group, row tile) steps, in row order, idle steps repeating the last real one
    #     so that all their block indices, and hence the resident output block, stay the same.
    meta = make_group_metadata(
        group_sizes_G, num_rows=m_pad, tile=tm, zero_tail=zero_tail, visit_empty=visit_empty
    )
    step_group, step_tile = meta.item_group_W, meta.item_tile_W
    t_T = jnp.arange(step_group.shape[0])

    # (5) Steps that multiply: real (not tail) groups with rows, and not idle.
    is_real = step_group < num_groups
    compute = is_real & (meta.num_tiles_R[step_group] > 0) & (t_T < meta.num_items)

    # (6) Input blocks for steps that do not multiply: reuse the blocks of the last computing
    #     step before them (a running max over the indices of computing steps), so the pipeline
    #     sees unchanged block indices and skips the copy. Before any computing step, block 0.
    last_compute = lax.cummax(jnp.where(compute, t_T, -1), axis=0)
    has_prev = last_compute >= 0
    prev = jnp.maximum(last_compute, 0)
    fetch_tile = jnp.where(has_prev, step_tile[prev], 0)
    fetch_group = jnp.where(has_prev, step_group[prev], 0)

    return _Schedule(
        group_offsets=meta.group_offsets,
        step_group_T=step_group,
        step_tile_T=step_tile,
        fetch_tile_T=fetch_tile.astype(jnp.int32),
        fetch_group_T=jnp.minimum(fetch_group, num_groups - 1).astype(jnp.int32),
        compute_T=compute.astype(jnp.int32),
        num_steps=meta.num_items[None],
    )


def _row_mask(shape: tuple[int, int], tile: jax.Array, tm: int, start, end) -> jax.Array:
    """[tm, cols] bool: which rows of row tile `tile` fall in [start, end)."""
    rows = lax.broadcasted_iota(jnp.int32, shape, 0) + tile * tm
    return (rows >= start) & (rows < end)


def _precision(dtype: Any) -> lax.Precision:
    # float32 inputs get full-precision MXU passes (the f32 oracle is exact); bfloat16 inputs
    # are exact in one pass anyway, and an explicit DEFAULT keeps a global
    # jax_default_matmul_precision="highest" off them (Mosaic rejects bf16 "highest" dots: "Bad
    # lhs type").
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _fit_scale_tile(tile: int, weight: QuantizedWeight) -> int:
    """The tile along a quantized weight's stored axis 1 (`tile` or smaller, a multiple of 128)
    that meets its scale groups: either the tile divides the group (one scale row per tile) or
    the group, a multiple of 8, divides the tile (tile / group scale rows, each broadcast over
    its rows: a sublane-aligned reshape). Per-channel scales (one row) take any tile.

    Raises:
      ValueError: no multiple of 128 up to `tile` meets the group (e.g. a group of 100 rows).
    """
    group = weight.group_size
    if weight.scale.shape[1] == 1:
        return tile
    for candidate in range(tile, _LANES - 1, -_LANES):
        if group % candidate == 0 or (candidate % group == 0 and group % 8 == 0):
            return candidate
    raise ValueError(
        f"rhs.scale groups of {group} rows do not fit the mosaic backend: the tile along the "
        f"weight's axis 1 (a multiple of {_LANES}) must divide the group, or the group (a "
        f"multiple of 8) divide the tile; up to {tile} none does"
    )


def _scale_tiles(weight: QuantizedWeight, tile: int, a1_pad: int, a2_pad: int) -> jax.Array:
    """The scale rows of each stored-axis-1 tile: [G, a1_pad / tile, r, a2_pad] float32.

    r = tile / group when the group divides the tile (the tile's own scale rows, padded rows
    scaled by zero), else r = 1: the one row of the group the tile lies in (a small gather:
    a1_pad / tile rows, not the weight's size). The last two block dims (r, cols) are then a
    whole axis and a multiple of 128, as Mosaic requires.
    """
    scale = weight.scale
    group, tiles = weight.group_size, a1_pad // tile
    if scale.shape[1] > 1 and tile % group == 0:
        rows = _pad2(scale, a1_pad // group, a2_pad)
        return rows.reshape(scale.shape[0], tiles, tile // group, a2_pad)
    row_of_tile = (jnp.arange(tiles) * tile) // group
    return _pad2(scale[:, row_of_tile, :], tiles, a2_pad)[:, :, None, :]


@functools.partial(
    jax.jit,
    static_argnames=("transpose_rhs", "preferred_element_type", "config", "interpret"),
)
def gmm_mosaic(
    lhs: jax.Array,
    rhs: jax.Array | QuantizedWeight,
    group_sizes: jax.Array,
    *,
    transpose_rhs: bool = False,
    preferred_element_type: Any = None,
    config: MosaicConfig | None = None,
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
    """Grouped matmul on TPU: rows of group g times rhs[g]; rows past the groups are zero.

    Args:
      lhs: [M, K] float32 or bfloat16, rows grouped consecutively.
      rhs: [G, K, N], or [G, N, K] when `transpose_rhs`, same dtype as lhs; or a
        QuantizedWeight of that shape: its int8 blocks and their scale rows are fetched and
        dequantized in VMEM before the dot (the stored-axis-1 tile fitted by
        `_fit_scale_tile`).
      group_sizes: [G] int32, sum <= M (checked on the host by `moejax.pallas.gmm`).
      transpose_rhs: multiply by rhs[g].T (the d_lhs product of the forward gmm).
      preferred_element_type: result dtype (float32 or bfloat16); None = the input dtype.
      config: tiles; None = `TUNED_CONFIGS` entry for this product, dtype and shape class.
      interpret: True runs the Pallas TPU interpreter on the host; a `pltpu.InterpretParams`
        selects its options (race detection, ...).

    Returns:
      [M, N] in `preferred_element_type`.
    """
    check_config("mosaic", config, MosaicConfig)
    problem = check_gmm_args(lhs, rhs, group_sizes, transpose_rhs, preferred_element_type)
    m, k, n, num_groups, out_dtype = problem
    quantized = isinstance(rhs, QuantizedWeight)
    _check_dtype("lhs", lhs.dtype)
    if not quantized:
        _check_dtype("rhs", rhs.dtype)
    _check_dtype("preferred_element_type", out_dtype)
    in_dtype = lhs.dtype
    interpret = _resolve_interpret(interpret)
    if problem.is_empty:
        return jnp.zeros((m, n), out_dtype)

    product = "gmm_t" if transpose_rhs else "gmm"
    config = config or lookup_config(product, in_dtype, k, n)
    tm, tk, tn = _fit_tiles(config, m, k, n, _sublane_multiple(in_dtype, out_dtype))
    if quantized:
        # The tile along the stored axis 1 (K forward, N transposed) must meet the scale groups.
        if transpose_rhs:
            tn = _fit_scale_tile(tn, rhs)
        else:
            tk = _fit_scale_tile(tk, rhs)
    m_pad, k_pad, n_pad = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
    lhs_p = _pad2(lhs.astype(in_dtype), m_pad, k_pad)
    stored_pad = (n_pad, k_pad) if transpose_rhs else (k_pad, n_pad)
    if quantized:
        rhs_p = _pad2(rhs.values, *stored_pad)
        scale_p = _scale_tiles(rhs, tn if transpose_rhs else tk, *stored_pad)
    else:
        rhs_p = _pad2(rhs.astype(in_dtype), *stored_pad)
    tiles_k, tiles_n = k_pad // tk, n_pad // tn

    schedule = _make_schedule(
        group_sizes.astype(jnp.int32), m_pad=m_pad, tm=tm, zero_tail=True, visit_empty=False
    )
    num_row_steps = schedule.step_group_T.shape[0]
    precision = _precision(in_dtype)

    # Grid (n tile, row step, k tile): k innermost so each output block is finished in VMEM
    # before moving on; the row steps of one row tile are consecutive, so its output block
    # stays resident across the groups that share it and is written back once.
    def kernel(offsets, step_group, step_tile, fetch_tile, fetch_group, compute, num_steps,
               lhs_ref, rhs_ref, *refs):  # fmt: skip
        del fetch_tile, fetch_group  # used by the index maps only
        # refs: (scale_ref, out_ref, acc_ref) for a quantized rhs, else (out_ref, acc_ref).
        *scale_ref, out_ref, acc_ref = refs
        t, k_i = pl.program_id(1), pl.program_id(2)

        @pl.when(k_i == 0)
        def _zero_acc():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        @pl.when(compute[t] == 1)
        def _accumulate():
            dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
            w = rhs_ref[...]
            if quantized:
                # The int8 block and its [r, cols] scale rows, dequantized in VMEM.
                w = dequantize_tile(w, scale_ref[0][...], in_dtype)
            acc_ref[...] += lax.dot_general(
                lhs_ref[...],
                w,
                dims,
                precision=precision,
                preferred_element_type=jnp.float32,
            )

        # After the last k tile, write this group's rows of the tile and keep the other rows
        # (written by the neighbouring group's steps, before or after this one). Tail steps
        # never accumulated, so they write zeros.
        @pl.when((k_i == pl.num_programs(2) - 1) & (t < num_steps[0]))
        def _store():
            g = step_group[t]
            mask = _row_mask((tm, tn), step_tile[t], tm, offsets[g], offsets[g + 1])
            kept = out_ref[...].astype(jnp.float32)
            out_ref[...] = jnp.where(mask, acc_ref[...], kept).astype(out_ref.dtype)

    # Index maps receive the grid indices and then the scalar-prefetch refs. Steps that do not
    # multiply pin k to the last tile, which (with fetch_tile/fetch_group pointing at the last
    # computing step) repeats the block indices of the previous step: no copy is issued.
    def k_of(k_i, t, compute):
        return jnp.where(compute[t] == 1, k_i, tiles_k - 1)

    def lhs_map(n_i, t, k_i, offsets, step_group, step_tile, fetch_tile, fetch_group, compute, ns):
        return fetch_tile[t], k_of(k_i, t, compute)

    def rhs_map(n_i, t, k_i, offsets, step_group, step_tile, fetch_tile, fetch_group, compute, ns):
        if transpose_rhs:
            return fetch_group[t], n_i, k_of(k_i, t, compute)
        return fetch_group[t], k_of(k_i, t, compute), n_i

    def out_map(n_i, t, k_i, offsets, step_group, step_tile, fetch_tile, fetch_group, compute, ns):
        return step_tile[t], n_i

    rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
    in_specs = [pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)]
    blocks = [((tm, tk), in_dtype), (rhs_block[1:], rhs_p.dtype), ((tm, tn), out_dtype)]
    weight_bytes = num_groups * k * n * jnp.dtype(rhs_p.dtype).itemsize
    operands = (lhs_p, rhs_p)
    if quantized:
        # Scale block [r, cols] of stored-axis-1 tile i (scale_p is [G, tiles, r, cols]).
        def scale_map(n_i, t, k_i, offs, step_group, step_tile, fetch_tile, fetch_group, comp, ns):
            g, a1, a2 = rhs_map(n_i, t, k_i, offs, step_group, step_tile, fetch_tile, fetch_group,
                                comp, ns)  # fmt: skip
            return g, a1, 0, a2

        scale_block = (None, None, scale_p.shape[2], rhs_block[2])
        in_specs.append(pl.BlockSpec(scale_block, scale_map))
        # The scale rows, and the float tile they dequantize to (one, not double-buffered).
        blocks.append((scale_block[2:], jnp.float32))
        weight_bytes += scale_p.size * 4
        operands += (scale_p,)
    vmem = _vmem_bytes(blocks, (tm, tn)) + (tk * tn * 4 if quantized else 0)
    itemsize = jnp.dtype(in_dtype).itemsize
    cost = pl.CostEstimate(
        flops=2 * m * k * n,
        transcendentals=0,
        bytes_accessed=(
            m * k * itemsize * tiles_n  # lhs re-read per n tile
            + weight_bytes  # each group's weights (and scales) at least once
            + m * n * out_dtype.itemsize
        ),
    )
    call = pl.pallas_call(
        kernel,
        out_shape=kernel_out_struct((m_pad, n_pad), out_dtype, lhs, rhs, group_sizes),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(schedule),
            grid=(tiles_n, num_row_steps, tiles_k),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((tm, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        # n tiles write disjoint columns (split across TensorCores on megacore chips); the row
        # steps revisit output blocks and k accumulates, so both run in order.
        compiler_params=_compiler_params(("parallel", "arbitrary", "arbitrary"), vmem),
        interpret=interpret,
        cost_estimate=cost,
        name=f"moejax_{product}_quantized" if quantized else f"moejax_{product}",
    )
    out_MpxNp = call(*schedule, *operands)
    return out_MpxNp[:m, :n]


@functools.partial(
    jax.jit,
    static_argnames=("num_groups", "preferred_element_type", "config", "interpret"),
)
def tgmm_mosaic(
    lhs: jax.Array,
    grad: jax.Array,
    group_sizes: jax.Array,
    *,
    num_groups: int | None = None,
    preferred_element_type: Any = None,
    config: MosaicConfig | None = None,
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
    """Per-group lhs.T @ grad on TPU (the weight gradient of gmm); empty groups give zeros.

    Args:
      lhs: [M, K] float32 or bfloat16, rows grouped consecutively.
      grad: [M, N], same row grouping; rows past sum(group_sizes) are ignored.
      group_sizes: [G] int32, sum <= M.
      num_groups: G; None = group_sizes.shape[0] (must equal it when given).
      preferred_element_type: result dtype (float32 or bfloat16); None = the input dtype.
      config: tiles (tm over rows, tk over K, tn over N); None = `TUNED_CONFIGS`.
      interpret: as for `gmm_mosaic`.

    Returns:
      [G, K, N] in `preferred_element_type`.
    """
    check_config("mosaic", config, MosaicConfig)
    problem = check_tgmm_args(lhs, grad, group_sizes, num_groups, preferred_element_type)
    m, k, n, num_groups, out_dtype = problem
    _check_dtype("lhs", lhs.dtype)
    _check_dtype("grad", grad.dtype)
    _check_dtype("preferred_element_type", out_dtype)
    in_dtype = lhs.dtype
    interpret = _resolve_interpret(interpret)
    if problem.is_empty:
        return jnp.zeros((num_groups, k, n), out_dtype)

    config = config or lookup_config("tgmm", in_dtype, k, n)
    tm, tk, tn = _fit_tiles(config, m, k, n, _sublane_multiple(in_dtype, out_dtype))
    m_pad, k_pad, n_pad = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
    lhs_p = _pad2(lhs.astype(in_dtype), m_pad, k_pad)
    grad_p = _pad2(grad.astype(in_dtype), m_pad, n_pad)
    tiles_k, tiles_n = k_pad // tk, n_pad // tn

    schedule = _make_schedule(
        group_sizes.astype(jnp.int32), m_pad=m_pad, tm=tm, zero_tail=False, visit_empty=True
    )
    num_row_steps = schedule.step_group_T.shape[0]
    precision = _precision(in_dtype)

    # Grid (n tile, k tile, row step): the row steps are the contraction and run innermost; the
    # steps of one group are consecutive, so the [tk, tn] accumulator sums a whole group and is
    # stored when the next step belongs to another group.
    def kernel(offsets, step_group, step_tile, fetch_tile, fetch_group, compute, num_steps,
               lhs_ref, grad_ref, out_ref, acc_ref):  # fmt: skip
        del fetch_tile, fetch_group  # used by the index maps only
        t = pl.program_id(2)
        last = pl.num_programs(2) - 1
        g = step_group[t]
        first_of_group = (t == 0) | (step_group[jnp.maximum(t - 1, 0)] != g)
        last_of_group = (t == num_steps[0] - 1) | (step_group[jnp.minimum(t + 1, last)] != g)

        @pl.when(first_of_group)
        def _zero_acc():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        start, end = offsets[g], offsets[g + 1]
        tile = step_tile[t]
        # The tile lies inside the group unless the group starts after its first row or ends
        # before its last: only then are rows of other groups (or padding) masked to zero. Both
        # operands are masked so that inf/nan in foreign rows cannot leak in as 0 * inf.
        partial = (start > tile * tm) | (end < (tile + 1) * tm)

        def accumulate(lhs_TmxTk, grad_TmxTn):
            acc_ref[...] += lax.dot_general(
                lhs_TmxTk,
                grad_TmxTn,
                (((0,), (0,)), ((), ())),  # contract the rows: lhs.T @ grad
                precision=precision,
                preferred_element_type=jnp.float32,
            )

        @pl.when((compute[t] == 1) & jnp.logical_not(partial))
        def _full_tile():
            accumulate(lhs_ref[...], grad_ref[...])

        @pl.when((compute[t] == 1) & partial)
        def _partial_tile():
            # Select in float32: 16-bit selects are not native on every TPU generation.
            def masked(x):
                mask = _row_mask(x.shape, tile, tm, start, end)
                return jnp.where(mask, x.astype(jnp.float32), 0.0).astype(x.dtype)

            accumulate(masked(lhs_ref[...]), masked(grad_ref[...]))

        @pl.when(last_of_group & (t < num_steps[0]))
        def _store():
            out_ref[...] = acc_ref[...].astype(out_ref.dtype)

    # Steps that do not multiply (empty groups, idle steps) fetch the row tile of the last
    # computing step: unchanged block indices, no copy.
    def lhs_map(n_i, k_i, t, offsets, step_group, step_tile, fetch_tile, fetch_group, compute, ns):
        return fetch_tile[t], k_i

    def grad_map(n_i, k_i, t, offsets, step_group, step_tile, fetch_tile, fetch_group, compute, ns):
        return fetch_tile[t], n_i

    def out_map(n_i, k_i, t, offsets, step_group, step_tile, fetch_tile, fetch_group, compute, ns):
        return step_group[t], k_i, n_i

    vmem = _vmem_bytes(
        [((tm, tk), in_dtype), ((tm, tn), in_dtype), ((tk, tn), out_dtype)], (tk, tn)
    )
    itemsize = jnp.dtype(in_dtype).itemsize
    cost = pl.CostEstimate(
        flops=2 * m * k * n,
        transcendentals=0,
        bytes_accessed=(
            m * k * itemsize * tiles_n
            + m * n * itemsize * tiles_k
            + num_groups * k * n * out_dtype.itemsize
        ),
    )
    call = pl.pallas_call(
        kernel,
        out_shape=kernel_out_struct((num_groups, k_pad, n_pad), out_dtype, lhs, grad, group_sizes),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(schedule),
            grid=(tiles_n, tiles_k, num_row_steps),
            in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec((tm, tn), grad_map)],
            out_specs=pl.BlockSpec((None, tk, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
        ),
        # (n, k) tiles own disjoint output blocks; the row steps are the reduction.
        compiler_params=_compiler_params(("parallel", "parallel", "arbitrary"), vmem),
        interpret=interpret,
        cost_estimate=cost,
        name="moejax_tgmm",
    )
    out_GxKpxNp = call(*schedule, lhs_p, grad_p)
    return out_GxKpxNp[:, :k, :n]


GMM_KERNELS = GmmKernels(
    gmm=gmm_mosaic, tgmm=tgmm_mosaic, config_type=MosaicConfig, tuned_configs=TUNED_CONFIGS
)
