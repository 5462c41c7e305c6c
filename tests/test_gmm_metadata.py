"""The shared group-tile work list (moejax.pallas.metadata) that the Triton, Mosaic and XLA
backends walk: every row of every range covered exactly once, in row order, within the derived
bound, for empty groups, groups not multiple of the tile, all rows in one group and
sum(group_sizes) < M; and the bound is reached, so it cannot be lowered.

Legend: M rows, G groups, R row ranges (G, or G + 1 with the tail), W work items.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.pallas import metadata

MODES = [
    pytest.param(True, False, id="gmm-zero_tail"),
    pytest.param(False, True, id="tgmm-visit_empty"),
    pytest.param(False, False, id="plain"),
]

# (M, tile, group sizes)
PATTERNS = [
    (61, 16, [9, 0, 23, 0, 17]),  # empty groups, boundaries inside tiles, sum < M
    (40, 16, [0, 0, 40, 0]),  # all rows in one group, M not a multiple of the tile
    (64, 16, [16, 32, 0, 16]),  # boundaries on tile edges, sum == M
    (50, 16, [5, 20, 11]),  # sum < M
    (20, 8, [0, 0, 0]),  # no rows in any group
    (33, 1, [1, 0, 30, 2]),  # one-row tiles
    (7, 32, [3, 0, 4]),  # one tile larger than M
    (5, 16, [0, 0, 0, 0, 0, 0, 5]),  # only the last group
]


@functools.cache
def _make(num_rows, tile, zero_tail, visit_empty):
    return jax.jit(
        functools.partial(
            metadata.make_group_metadata,
            num_rows=num_rows,
            tile=tile,
            zero_tail=zero_tail,
            visit_empty=visit_empty,
        )
    )


def _check_invariants(sizes, num_rows, tile, zero_tail, visit_empty):
    meta = _make(num_rows, tile, zero_tail, visit_empty)(jnp.asarray(sizes, jnp.int32))
    msg = f"sizes={list(sizes)} M={num_rows} tile={tile}"
    ends = np.cumsum(sizes)
    if zero_tail:
        ends = np.append(ends, num_rows)
    starts = np.concatenate([[0], ends[:-1]])
    num_ranges = len(ends)
    num_tiles = -(-num_rows // tile)
    np.testing.assert_array_equal(meta.group_offsets, np.concatenate([[0], ends]), err_msg=msg)

    # Per range: its tile span from first principles.
    want_tiles = np.where(ends > starts, (ends - 1) // tile - starts // tile + 1, 0)
    np.testing.assert_array_equal(meta.num_tiles_R, want_tiles, err_msg=msg)
    nonempty = ends > starts
    np.testing.assert_array_equal(
        np.asarray(meta.first_tile_R)[nonempty], (starts // tile)[nonempty], err_msg=msg
    )

    # The bound: static length W = cdiv(M, tile) + R - 1, and the real items fit in it.
    groups, tiles = np.asarray(meta.item_group_W), np.asarray(meta.item_tile_W)
    num = int(meta.num_items)
    assert len(groups) == metadata.num_work_items(num_rows, num_ranges, tile), msg
    assert len(groups) == max(num_tiles + num_ranges - 1, 1), msg
    assert num <= len(groups), msg
    assert np.all((groups >= 0) & (groups < num_ranges)), msg
    assert np.all((tiles >= 0) & (tiles < num_tiles)), msg

    # Every row of every range is covered by exactly one real item; no other row is.
    covered = np.zeros(num_rows, int)
    empty_visits = np.zeros(num_ranges, int)
    for j, t in zip(groups[:num], tiles[:num], strict=True):
        rows = np.arange(t * tile, min((t + 1) * tile, num_rows))
        rows = rows[(rows >= starts[j]) & (rows < ends[j])]
        if len(rows) == 0:
            # Only an empty range visited on purpose may have an item without rows.
            assert visit_empty and starts[j] == ends[j], msg
            empty_visits[j] += 1
        covered[rows] += 1
    np.testing.assert_array_equal(covered[: ends[-1]], 1, err_msg=msg)
    assert not covered[ends[-1] :].any(), msg
    np.testing.assert_array_equal(empty_visits, np.where(visit_empty & ~nonempty, 1, 0))
    assert num == want_tiles.sum() + (visit_empty * (~nonempty).sum()), msg

    # Row order: ranges and tiles never go back, so a shared tile's visits are consecutive.
    assert np.all(np.diff(groups[:num]) >= 0) and np.all(np.diff(tiles[:num]) >= 0), msg
    # Idle items repeat the last real one (a pipelined kernel then issues no copy).
    if num:
        assert np.all(groups[num:] == groups[num - 1]), msg
        assert np.all(tiles[num:] == tiles[num - 1]), msg


@pytest.mark.parametrize("zero_tail,visit_empty", MODES)
@pytest.mark.parametrize("num_rows,tile,sizes", PATTERNS)
def test_patterns_cover_every_row_once_within_bound(num_rows, tile, sizes, zero_tail, visit_empty):
    _check_invariants(np.asarray(sizes), num_rows, tile, zero_tail, visit_empty)


@pytest.mark.parametrize("zero_tail,visit_empty", MODES)
def test_random_sizes_cover_every_row_once_within_bound(zero_tail, visit_empty):
    rng = np.random.default_rng(0)
    num_rows, tile, g = 150, 16, 6
    for _ in range(25):
        total = int(rng.integers(0, num_rows + 1))
        cuts = np.sort(rng.integers(0, total + 1, size=g - 1))
        sizes = np.diff(np.concatenate([[0], cuts, [total]]))
        _check_invariants(sizes, num_rows, tile, zero_tail, visit_empty)


@pytest.mark.parametrize("zero_tail", [True, False])
def test_bound_is_reached(zero_tail):
    """Every boundary inside a tile and every range non-empty: exactly cdiv(M, tile) + R - 1."""
    num_rows, tile = 64, 16
    sizes = [8, 16, 16, 16] if zero_tail else [8, 16, 16, 24]  # the tail (if any) is 8 rows
    meta = _make(num_rows, tile, zero_tail, False)(jnp.asarray(sizes, jnp.int32))
    assert int(meta.num_items) == meta.item_group_W.shape[0] == 4 + len(sizes) + zero_tail - 1


def test_visit_empty_keeps_the_bound():
    """An empty group's one visit takes the place of a boundary it cannot have: still <= W."""
    num_rows, tile = 64, 16
    sizes = [8, 0, 16, 0, 16, 0, 24]
    meta = _make(num_rows, tile, False, True)(jnp.asarray(sizes, jnp.int32))
    assert int(meta.num_items) <= meta.item_group_W.shape[0] == 4 + len(sizes) - 1
    _check_invariants(np.asarray(sizes), num_rows, tile, False, True)


def test_bad_traced_sizes_stay_inside_the_operand():
    """Negative sizes and a sum past M (not checkable under jit) never address a missing tile."""
    meta = _make(40, 16, True, False)(jnp.asarray([-5, 30, 30], jnp.int32))
    assert np.asarray(meta.group_offsets).max() <= 40
    assert np.asarray(meta.item_tile_W).max() < 3
    assert int(meta.num_items) <= meta.item_group_W.shape[0]


def test_whole_tile_groups_with_a_smaller_bound():
    """The padded layout's use: groups of whole tiles share no tile, so item t is tile t and the
    caller's tile count is enough items."""
    tile, sizes = 4, np.array([8, 0, 12, 4])
    num_tiles = 7
    meta = metadata.make_group_metadata(
        jnp.asarray(sizes, jnp.int32), num_rows=num_tiles * tile, tile=tile, max_items=num_tiles
    )
    num = int(meta.num_items)
    assert num == 6 and meta.item_group_W.shape == (num_tiles,)
    np.testing.assert_array_equal(np.asarray(meta.item_tile_W)[:num], np.arange(num))
    np.testing.assert_array_equal(np.asarray(meta.item_group_W), [0, 0, 2, 2, 2, 3, 3])
