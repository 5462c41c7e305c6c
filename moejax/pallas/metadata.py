"""Which row tiles each group touches: the one work list behind every grouped-matmul backend.

Rows are grouped consecutively (range j owns rows [group_offsets[j], group_offsets[j + 1])) and
cut into row tiles of `tile` rows. A kernel walks the row axis as a list of work items, one per
(range, row tile) pair in which the range has rows, in row order: a tile that straddles a
boundary is visited once per range with rows in it, and those visits are consecutive. How many
items there are depends on `group_sizes`, a device array, so the list has a static length W (a
derived bound, `num_work_items`) and the items past the real count are idle: they repeat the last
real item, which lets a pipelined kernel skip their copies.

One function serves every kernel through two flags (megablox's `make_group_metadata` is the
model):
  zero_tail    appends the range of rows [sum(group_sizes), num_rows) (gmm: its items store
               zeros, so every output row is written exactly once, ragged_dot semantics);
  visit_empty  gives each empty group one item (tgmm: the item stores the group's zero result).

Users: `triton_gmm` (gmm grid over the items; tgmm loops over each group's tile range),
`mosaic_gmm` (the row steps of both grids, by scalar prefetch) and `xla_gmm` (the padded layout
is the work list of the group sizes rounded up to whole tiles, where no tile is shared).

Legend: G groups, R row ranges (G, or G + 1 with the tail), W work items (static length).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class GroupMetadata(NamedTuple):
    """The row ranges, their row tiles, and the work list over them (all int32, on device).

    Attributes:
      group_offsets: [R + 1], range j owns rows [group_offsets[j], group_offsets[j + 1]).
      first_tile_R: [R], first row tile of each range (clamped into [0, cdiv(num_rows, tile))).
      num_tiles_R: [R], row tiles holding rows of each range (0 for an empty range).
      item_group_W: [W], the range of each work item, in [0, R).
      item_tile_W: [W], the row tile of each work item.
      num_items: scalar, the real items; items at and past it repeat item num_items - 1 (or
        item 0's values when there is no real item).
    """

    group_offsets: jax.Array
    first_tile_R: jax.Array
    num_tiles_R: jax.Array
    item_group_W: jax.Array
    item_tile_W: jax.Array
    num_items: jax.Array


def num_work_items(num_rows: int, num_ranges: int, tile: int) -> int:
    """Static bound on the work items of R row ranges over num_rows rows: cdiv(M, tile) + R - 1.

    Summing the tiles of the non-empty ranges counts each tile once, plus once more for every
    boundary between two consecutive non-empty ranges that falls inside a tile: at most R - 1
    extra visits. An empty range given one item (visit_empty) is not a non-empty range, so it
    adds one item but removes one possible boundary. With the tail, R = G + 1: cdiv(M, tile) + G.
    """
    return max(-(-num_rows // tile) + num_ranges - 1, 1)


def make_group_metadata(
    group_sizes: jax.Array,
    *,
    num_rows: int,
    tile: int,
    zero_tail: bool = False,
    visit_empty: bool = False,
    max_items: int | None = None,
) -> GroupMetadata:
    """The (range, row tile) work items for grouped rows, computed in XLA (no host sync).

    Args:
      group_sizes: [G] integer rows per group, consecutive, sum <= num_rows.
      num_rows: M, the rows the tiles cover (the tail, if any, ends there).
      tile: rows per row tile.
      zero_tail: append the range [sum(group_sizes), num_rows) as range G.
      visit_empty: give every empty range one work item (its tile is first_tile_R).
      max_items: static length W of the work list; None = `num_work_items`, which holds for any
        group sizes. A caller that knows more may pass less (whole-tile groups share no tile:
        W = the tile count); items past W are dropped, so it must hold for every input.

    Returns:
      GroupMetadata with W = max_items or num_work_items(num_rows, R, tile).
    """
    num_tiles = max(-(-num_rows // tile), 1)
    # Defensive clamps (the public ops validate concrete sizes): negative sizes count as empty,
    # and rows past num_rows do not exist, so no item can address a tile outside the operand.
    ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes.astype(jnp.int32), 0)), num_rows)
    ends = ends.astype(jnp.int32)
    if zero_tail:
        ends = jnp.concatenate([ends, jnp.full((1,), num_rows, jnp.int32)])
    num_ranges = ends.shape[0]
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    group_offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])

    # (1) Row tiles of each range. A non-empty range of rows [start, end) touches tiles
    #     start // tile .. (end - 1) // tile inclusive; two neighbouring ranges share a tile
    #     exactly when the boundary between them is not a multiple of tile. An empty range at
    #     the very end starts at num_rows: its first tile is clamped to the last one.
    first_tile = jnp.minimum(starts // tile, num_tiles - 1)
    nonempty = ends > starts
    num_tiles_R = jnp.where(nonempty, (ends - 1) // tile - first_tile + 1, 0)
    items_R = jnp.where(nonempty, num_tiles_R, 1) if visit_empty else num_tiles_R

    # (2) The static length: the derived bound of `num_work_items` unless the caller knows less.
    w_len = num_work_items(num_rows, num_ranges, tile) if max_items is None else max_items

    # (3) Item ranges per range: range j owns items [item_starts[j], item_ends[j]).
    item_ends = jnp.cumsum(items_R).astype(jnp.int32)
    item_starts = item_ends - items_R
    num_items = item_ends[-1]

    # (4) For each item w, its range and row tile. Idle items (w >= num_items) are clamped to the
    #     last real one, so their indices repeat it. searchsorted(side="right") finds the first
    #     range whose item range ends after w, skipping ranges with no items (the clamp to R - 1
    #     only acts when there is no item at all). Within range j, item w is its
    #     (w - item_starts[j])-th tile counted from first_tile[j].
    w = jnp.minimum(jnp.arange(w_len, dtype=jnp.int32), jnp.maximum(num_items - 1, 0))
    item_group = jnp.searchsorted(item_ends, w, side="right").astype(jnp.int32)
    item_group = jnp.minimum(item_group, num_ranges - 1)
    item_tile = first_tile[item_group] + w - item_starts[item_group]
    return GroupMetadata(
        group_offsets=group_offsets,
        first_tile_R=first_tile,
        num_tiles_R=num_tiles_R.astype(jnp.int32),
        item_group_W=item_group,
        item_tile_W=item_tile.astype(jnp.int32),
        num_items=num_items,
    )
