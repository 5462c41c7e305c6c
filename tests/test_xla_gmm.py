"""moejax.pallas.xla_gmm against jax.lax.ragged_dot and a numpy per-group reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moejax.pallas
from moejax.pallas import xla_gmm
from moejax.pallas.xla_gmm import XlaConfig


def _random_sizes(rng, m, g, *, slack, zeros):
    """Group sizes summing to m - slack, with `zeros` groups forced empty."""
    sizes = rng.multinomial(m - slack, np.ones(g) / g)
    for i in rng.choice(g, size=zeros, replace=False):
        sizes[(i + 1) % g] += sizes[i]
        sizes[i] = 0
    return sizes


def _np_tgmm(lhs, grad, sizes):
    out = np.zeros((len(sizes), lhs.shape[1], grad.shape[1]))
    start = 0
    for g, s in enumerate(sizes):
        out[g] = lhs[start : start + s].T.astype(np.float64) @ grad[start : start + s]
        start += s
    return out


CASES = [
    # (M, K, N, G, tile_m, slack, zeros)
    (37, 5, 7, 4, 8, 0, 1),
    (64, 8, 3, 3, 16, 10, 0),
    (5, 4, 4, 6, 256, 0, 2),
    (100, 16, 8, 8, 7, 13, 3),
    (48, 6, 5, 2, 48, 48, 0),  # every row past the groups: all zeros
    (33, 4, 6, 5, 1, 2, 4),  # a single non-empty group, tile of one row
]


@pytest.mark.parametrize(
    "m,k,n,g,tile_m,slack,zeros,transpose_rhs",
    [(*case, False) for case in CASES] + [(*CASES[0], True), (*CASES[3], True)],
)
def test_gmm_matches_ragged_dot(m, k, n, g, tile_m, slack, zeros, transpose_rhs):
    rng = np.random.default_rng(m * 31 + g)
    sizes = _random_sizes(rng, m, g, slack=slack, zeros=zeros)
    lhs = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
    rhs = jnp.asarray(rng.normal(size=(g, k, n)), jnp.float32)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    ref = jax.lax.ragged_dot(lhs, rhs, group_sizes)
    rhs_in = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
    fn = jax.jit(
        lambda a, b, s: xla_gmm.gmm_xla(
            a, b, s, transpose_rhs=transpose_rhs, config=XlaConfig(tile_m)
        )
    )
    out = fn(lhs, rhs_in, group_sizes)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(out)[sizes.sum() :] == 0)


@pytest.mark.parametrize("m,k,n,g,tile_m,slack,zeros", CASES)
def test_tgmm_matches_numpy(m, k, n, g, tile_m, slack, zeros):
    rng = np.random.default_rng(m * 17 + g)
    sizes = _random_sizes(rng, m, g, slack=slack, zeros=zeros)
    lhs = rng.normal(size=(m, k)).astype(np.float32)
    grad = rng.normal(size=(m, n)).astype(np.float32)
    out = jax.jit(lambda a, b, s: xla_gmm.tgmm_xla(a, b, s, config=XlaConfig(tile_m)))(
        lhs, grad, jnp.asarray(sizes, jnp.int32)
    )
    ref = _np_tgmm(lhs, grad, sizes)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)
    assert np.all(np.asarray(out)[sizes == 0] == 0)


def test_bf16_inputs_accumulate_in_f32():
    rng = np.random.default_rng(0)
    m, k, n, g = 50, 64, 16, 3
    sizes = np.array([20, 0, 27])
    lhs = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    rhs = jnp.asarray(rng.normal(size=(g, k, n)), jnp.bfloat16)
    s = jnp.asarray(sizes, jnp.int32)
    out = xla_gmm.gmm_xla(lhs, rhs, s, preferred_element_type=jnp.float32, config=XlaConfig(16))
    ref = jax.lax.ragged_dot(lhs, rhs, s, preferred_element_type=jnp.float32)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)
    out_bf16 = xla_gmm.gmm_xla(lhs, rhs, s, config=XlaConfig(16))
    assert out_bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(out_bf16.astype(jnp.float32), ref, rtol=2e-2, atol=5e-2)
    t = xla_gmm.tgmm_xla(
        lhs, lhs[:, :n], s, preferred_element_type=jnp.float32, config=XlaConfig(16)
    )
    t_ref = _np_tgmm(np.asarray(lhs, np.float32), np.asarray(lhs[:, :n], np.float32), sizes)
    np.testing.assert_allclose(t, t_ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("m,g,tile_m", [(1, 1, 4), (10, 3, 4), (16384, 8, 256), (7, 20, 3)])
def test_padded_tile_bound_is_tight_enough(m, g, tile_m):
    """The static tile count covers the worst case: n groups with one row more than full tiles."""
    n = min(g, m)
    bound = xla_gmm.num_padded_tiles(m, g, tile_m)
    worst = sum(-(-s // tile_m) for s in _worst_sizes(m, n, tile_m))
    assert bound >= worst
    assert bound <= -(-m // tile_m) + g


def _worst_sizes(m, n, tile_m):
    full = (m - n) // tile_m
    sizes = [1] * n
    sizes[0] += full * tile_m
    return sizes


def test_padded_layout_round_trip():
    sizes = np.array([5, 0, 9, 1])
    m, tile_m = 20, 4
    layout = xla_gmm.padded_layout(jnp.asarray(sizes, jnp.int32), m, tile_m)
    src, dst = np.asarray(layout.src_row_P), np.asarray(layout.dst_row_M)
    total = sizes.sum()
    # Real rows go to padded rows that point back at them; rows past the sum map to "none".
    np.testing.assert_array_equal(src[dst[:total]], np.arange(total))
    assert np.all(dst[total:] == src.shape[0])
    starts = np.concatenate([[0], np.cumsum(sizes)])
    for p in np.flatnonzero(src < m):
        group = np.asarray(layout.tile_group_Tp)[p // tile_m]
        assert starts[group] <= src[p] < starts[group + 1]
    assert int(layout.num_used_tiles) == sum(-(-s // tile_m) for s in sizes)


def test_effective_tile_shrinks_for_few_rows():
    assert xla_gmm.effective_tile(16384, 8, 256) == 256
    assert xla_gmm.effective_tile(16, 8, 256) == 2  # decoding-sized: mean group of 2 rows
    assert xla_gmm.effective_tile(26, 4, 8) == 8
    for m, g in [(1, 1), (3, 8), (100, 3), (1000, 64)]:
        tile = xla_gmm.effective_tile(m, g, 256)
        padded = xla_gmm.num_padded_tiles(m, g, tile) * tile
        assert padded <= 3 * m + g


def _ragged_mlp(x, wg, wu, wo, sizes, act):
    """The expert MLP through jax.lax.ragged_dot (float32): the differentiable reference."""
    up = jax.lax.ragged_dot(x, wu, sizes)
    h = act(jax.lax.ragged_dot(x, wg, sizes)) * up if wg is not None else act(up)
    return jax.lax.ragged_dot(h, wo, sizes)


@pytest.mark.parametrize(
    "case,gated,dtype",
    [(CASES[0], True, jnp.float32), (CASES[3], False, jnp.float32), (CASES[5], True, jnp.float32)]
    + [(CASES[2], True, jnp.bfloat16)],
)
def test_mlp_padded_and_grads_match_ragged_dot(case, gated, dtype):
    m, d, f, g, tile_m, slack, zeros = case
    rng = np.random.default_rng(m * 7 + g)
    sizes = jnp.asarray(_random_sizes(rng, m, g, slack=slack, zeros=zeros), jnp.int32)
    x, wg, wu, wo, dy = (
        jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[-2] if len(shape) == 3 else 1), dtype)
        for shape in ((m, d), (g, d, f), (g, d, f), (g, f, d), (m, d))
    )
    wg = wg if gated else None
    act = jax.nn.silu if gated else jax.nn.relu
    layout = xla_gmm.padded_layout(sizes, m, tile_m)
    pad = lambda a: jnp.concatenate([a, jnp.zeros((1, d), a.dtype)])[layout.src_row_P]  # noqa: E731
    unpad = lambda a: jnp.concatenate([a, jnp.zeros((1, d), a.dtype)])[layout.dst_row_M]  # noqa: E731
    tiles = (layout.tile_group_Tp, layout.num_used_tiles)

    @jax.jit
    def padded(x, wg, wu, wo, dy):
        y, pre = xla_gmm.mlp_padded(pad(x), wg, wu, wo, *tiles, act=act, tile_m=tile_m)
        grads = xla_gmm.mlp_padded_bwd(
            pad(x), wg, wu, wo, *tiles, pre, pad(dy), act=act, tile_m=tile_m
        )
        return unpad(y), unpad(grads[0]), *grads[1:]

    f32 = lambda a: None if a is None else a.astype(jnp.float32)  # noqa: E731
    y_ref, vjp = jax.vjp(lambda *a: _ragged_mlp(*a, sizes, act), f32(x), f32(wg), f32(wu), f32(wo))
    refs = (y_ref, *vjp(f32(dy)))
    tol = 1e-4 if dtype == jnp.float32 else 5e-2
    for out, ref in zip(padded(x, wg, wu, wo, dy), refs, strict=True):
        if ref is None:
            assert out is None
            continue
        assert out.dtype == dtype
        np.testing.assert_allclose(f32(out), ref, rtol=tol, atol=tol * np.abs(ref).max())


def _jnp_mlp(x_MxD, wg, wu, wo, sizes, act):
    """Plain-jnp expert MLP in float32: each real row uses its group's weights (gathered per
    row); rows past sum(sizes) give zeros."""
    group_M = np.repeat(np.arange(len(sizes)), sizes)
    x = x_MxD[: len(group_M)].astype(jnp.float32)
    up = jnp.einsum("md,mdf->mf", x, wu.astype(jnp.float32)[group_M])
    if wg is not None:
        h = act(jnp.einsum("md,mdf->mf", x, wg.astype(jnp.float32)[group_M])) * up
    else:
        h = act(up)
    y = jnp.einsum("mf,mfd->md", h, wo.astype(jnp.float32)[group_M])
    return jnp.zeros(x_MxD.shape, jnp.float32).at[: len(group_M)].set(y)


@pytest.mark.parametrize(
    "sizes,gated,dtype",
    [
        ([7, 0, 12, 3], True, jnp.float32),
        ([0, 9, 0, 10], False, jnp.float32),
        ([7, 0, 12, 3], True, jnp.bfloat16),
        ([0, 0, 0, 0], True, jnp.float32),
    ],
)
def test_expert_mlp_padded_and_grads_match_jnp(sizes, gated, dtype):
    """The public op (custom_vjp): forward, d_x and every weight gradient via jax.vjp."""
    m, d, f, tile_m = 26, 8, 12, 4
    rng = np.random.default_rng(sum(sizes) + gated)
    x, wg, wu, wo, dy = (
        jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[-2] if len(shape) == 3 else 1), dtype)
        for shape in ((m, d), (4, d, f), (4, d, f), (4, f, d), (m, d))
    )
    wg = wg if gated else None
    act = jax.nn.silu if gated else jax.nn.gelu
    group_sizes = jnp.asarray(sizes, jnp.int32)
    layout = moejax.pallas.padded_layout(group_sizes, m, tile_m)
    pad = lambda a: jnp.concatenate([a, jnp.zeros((1, d), a.dtype)])[layout.src_row_P]  # noqa: E731
    unpad = lambda a: jnp.concatenate([a, jnp.zeros((1, d), a.dtype)])[layout.dst_row_M]  # noqa: E731

    def op(x, wg, wu, wo):
        y_PxD = moejax.pallas.expert_mlp_padded(
            pad(x), wg, wu, wo, layout.tile_group_Tp, layout.num_used_tiles,
            act=act, gated=gated, tile_m=tile_m,
        )  # fmt: skip
        return unpad(y_PxD)

    y, vjp = jax.vjp(jax.jit(op), x, wg, wu, wo)
    y_ref, vjp_ref = jax.vjp(lambda *a: _jnp_mlp(*a, sizes, act), x, wg, wu, wo)
    # A float32 cotangent on bf16 rows is brought to the rows' dtype by the op's backward.
    outs, refs = (y, *vjp(dy)), (y_ref, *vjp_ref(dy.astype(jnp.float32)))
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    for out, ref in zip(outs, refs, strict=True):
        if ref is None:
            assert out is None
            continue
        assert out.dtype == dtype
        ref = np.asarray(ref, np.float32)
        np.testing.assert_allclose(
            np.asarray(out, np.float32), ref, rtol=tol, atol=tol * max(np.abs(ref).max(), 1)
        )
    assert not np.asarray(y[sum(sizes) :], np.float32).any()
    if 0 in sizes and gated:
        assert not np.asarray(vjp(dy)[1][sizes.index(0)], np.float32).any()


def test_expert_mlp_padded_rejects_gate_mismatch():
    layout = moejax.pallas.padded_layout(jnp.array([3, 1], jnp.int32), 4, 2)
    w = jnp.ones((2, 4, 6))
    with pytest.raises(ValueError, match="gated=True needs wi_gate_GxDxF"):
        moejax.pallas.expert_mlp_padded(
            jnp.ones((8, 4)), None, w, jnp.ones((2, 6, 4)), layout.tile_group_Tp,
            layout.num_used_tiles, act=jax.nn.relu, gated=True, tile_m=2,
        )  # fmt: skip


@pytest.mark.parametrize("tile_m", [0, -4, 2.0, True])
def test_xla_config_rejects_bad_tiles(tile_m):
    with pytest.raises(ValueError, match=r"XlaConfig.tile_m must be a positive int"):
        XlaConfig(tile_m)
