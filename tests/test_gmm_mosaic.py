"""Pallas Mosaic (TPU) grouped matmul kernels, run on CPU in the TPU interpreter.

Checks the three products (gmm, gmm with transposed rhs, tgmm) against `jax.lax.ragged_dot` and a
float64 numpy reference, the gradients through `moejax.pallas.gmm(..., backend="mosaic")`, the
absence of races (interpreter race detector), what the step schedule adds to the shared work
list (whose coverage tests/test_gmm_metadata.py checks), and that every tuned tiling lowers for
the real TPU target (`lower(lowering_platforms=("tpu",))`, no device).

Legend: M rows, K contraction width, N output width, G groups.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gmm_reference import np_gmm, np_tgmm
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

import moejax.pallas
from moejax.pallas import metadata, mosaic_gmm
from moejax.pallas.mosaic_gmm import MosaicConfig, gmm_mosaic, tgmm_mosaic

# Relative/absolute tolerances per input dtype: f32 differs from the oracle only by summation
# order; bf16 results are rounded to 8 mantissa bits (when the output is bf16).
TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-4), jnp.bfloat16: dict(rtol=1.6e-2, atol=2e-2)}


def ragged_tgmm(lhs_MxK, grad_MxN, group_sizes):
    """The oracle for tgmm: ragged_dot_general with the rows as the ragged contracting axis."""
    dims = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(([0], [0]), ([], [])),
        lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[],
    )
    return jax.lax.ragged_dot_general(
        lhs_MxK, grad_MxN, group_sizes, dims, preferred_element_type=jnp.float32
    )


def _f32(x):
    return np.asarray(jnp.asarray(x, jnp.float32))


# (M, K, N, group sizes, tiles): sizes not multiples of the tiles (M, K and N all padded), empty
# groups, groups sharing row tiles, sum < M, several k and n tiles; and the tuned-table path
# (config=None, tiles shrunk to the problem).
CASES = {
    "random_with_empty_and_tail": (
        200,
        200,
        250,
        [30, 0, 77, 1, 50],
        MosaicConfig(tm=32, tk=128, tn=128),
    ),
    "tuned_table_tiles": (96, 128, 128, [0, 40, 8, 0, 30], None),
}


def _check_all_products(lhs, rhs, grad, sizes, config, tol):
    """gmm, transposed-rhs gmm and tgmm against ragged_dot and numpy; exact zeros where due."""
    m, n = grad.shape
    group_sizes = jnp.asarray(sizes, jnp.int32)
    total = int(np.sum(sizes))
    msg = f"group sizes {list(sizes)}"

    # Forward, output in the input dtype.
    out = gmm_mosaic(lhs, rhs, group_sizes, config=config, interpret=True)
    assert out.shape == (m, n) and out.dtype == lhs.dtype
    oracle = jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
    np.testing.assert_allclose(_f32(out), _f32(oracle), **tol, err_msg=msg)
    np.testing.assert_allclose(_f32(out), np_gmm(_f32(lhs), _f32(rhs), sizes), **tol, err_msg=msg)
    # Exactly zero (not merely small, not the interpreter's NaN fill) past the groups.
    assert np.all(_f32(out)[total:] == 0.0), msg

    # d_lhs product: rhs stored [G, N, K], f32 output requested.
    out_t = gmm_mosaic(
        lhs,
        jnp.swapaxes(rhs, 1, 2),
        group_sizes,
        transpose_rhs=True,
        preferred_element_type=jnp.float32,
        config=config,
        interpret=True,
    )
    assert out_t.dtype == jnp.float32
    np.testing.assert_allclose(_f32(out_t), _f32(oracle), rtol=1e-5, atol=1e-4, err_msg=msg)
    assert np.all(_f32(out_t)[total:] == 0.0), msg

    # d_rhs product, f32 output.
    d_rhs = tgmm_mosaic(
        lhs, grad, group_sizes, preferred_element_type=jnp.float32, config=config, interpret=True
    )
    assert d_rhs.shape == (len(sizes), lhs.shape[1], n) and d_rhs.dtype == jnp.float32
    np.testing.assert_allclose(
        _f32(d_rhs), _f32(ragged_tgmm(lhs, grad, group_sizes)), rtol=1e-5, atol=1e-4, err_msg=msg
    )
    np.testing.assert_allclose(
        _f32(d_rhs), np_tgmm(_f32(lhs), _f32(grad), sizes), rtol=1e-5, atol=1e-4, err_msg=msg
    )
    for g, size in enumerate(sizes):
        if size == 0:
            assert np.all(_f32(d_rhs[g]) == 0.0), msg


def _operands(m, k, n, g, dtype, seed):
    rng = np.random.default_rng(seed)
    lhs = jnp.asarray(rng.standard_normal((m, k)), dtype)
    rhs = jnp.asarray(rng.standard_normal((g, k, n)), dtype)
    grad = jnp.asarray(rng.standard_normal((m, n)), dtype)
    return lhs, rhs, grad


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_products_match_ragged_dot_and_numpy(case, dtype):
    m, k, n, sizes, config = CASES[case]
    lhs, rhs, grad = _operands(m, k, n, len(sizes), dtype, seed=0)
    _check_all_products(lhs, rhs, grad, sizes, config, TOL[dtype])


# One shape (so each kernel compiles once) with many group-size patterns.
PATTERN_SHAPE = dict(m=120, k=128, n=128, g=6)
PATTERN_CONFIG = MosaicConfig(tm=16, tk=128, tn=128)


def test_group_size_patterns():
    """Random sizes with zeros, one group with all rows, all groups empty, tile-aligned."""
    m, g = PATTERN_SHAPE["m"], PATTERN_SHAPE["g"]
    lhs, rhs, grad = _operands(**PATTERN_SHAPE, dtype=jnp.float32, seed=1)
    rng = np.random.default_rng(1)
    patterns = [
        [0, 0, m, 0, 0, 0],  # one group owns every row
        [0, 0, 0, 0, 0, 0],  # no rows at all: every output row is tail
        [16, 32, 0, 16, 48, 8],  # boundaries on tile edges, sum == M
        [0, 0, 0, 0, 0, 7],  # only the last group, ends mid-tile
    ]
    for _ in range(3):
        total = int(rng.integers(0, m + 1))
        cuts = np.sort(rng.integers(0, total + 1, size=g - 1))
        sizes = np.diff(np.concatenate([[0], cuts, [total]]))
        sizes[rng.integers(0, g - 1)] = 0
        sizes[-1] += total - sizes.sum()
        patterns.append(sizes.tolist())
    for sizes in patterns:
        _check_all_products(lhs, rhs, grad, sizes, PATTERN_CONFIG, TOL[jnp.float32])


def test_rows_past_groups_do_not_leak():
    """inf/nan in rows past sum(group_sizes) must not reach the results (0 * inf = nan)."""
    lhs, rhs, grad = _operands(**PATTERN_SHAPE, dtype=jnp.float32, seed=2)
    # Ends mid-tile: the tile holding row 49 mixes real and foreign rows.
    sizes = [10, 0, 13, 0, 26, 0]
    lhs = np.asarray(lhs).copy()
    grad = np.asarray(grad).copy()
    lhs[49:] = np.inf
    grad[49:] = np.nan
    group_sizes = jnp.asarray(sizes, jnp.int32)
    out = gmm_mosaic(jnp.asarray(lhs), rhs, group_sizes, config=PATTERN_CONFIG, interpret=True)
    np.testing.assert_allclose(_f32(out[:49]), np_gmm(lhs[:49], rhs, sizes), **TOL[jnp.float32])
    assert np.all(_f32(out[49:]) == 0.0)
    d_rhs = tgmm_mosaic(
        jnp.asarray(lhs), jnp.asarray(grad), group_sizes, config=PATTERN_CONFIG, interpret=True
    )
    np.testing.assert_allclose(_f32(d_rhs), np_tgmm(lhs[:49], grad[:49], sizes), **TOL[jnp.float32])


@pytest.mark.parametrize(
    "dtype,transpose_rhs", [(jnp.float32, False), (jnp.bfloat16, True)], ids=["f32", "bf16_t"]
)
def test_gradients_through_public_op(dtype, transpose_rhs):
    """jax.grad through moejax.pallas.gmm(backend="mosaic") equals the ragged_dot gradient."""
    m, k, n, sizes = 72, 128, 136, [20, 0, 33, 9]
    config = MosaicConfig(tm=16, tk=128, tn=128)
    rng = np.random.default_rng(3)
    lhs = jnp.asarray(rng.standard_normal((m, k)), dtype)
    shape = (len(sizes), n, k) if transpose_rhs else (len(sizes), k, n)
    rhs = jnp.asarray(rng.standard_normal(shape), dtype)
    cot = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
    group_sizes = jnp.asarray(sizes, jnp.int32)

    def loss(lhs, rhs, backend, **kw):
        out = moejax.pallas.gmm(
            lhs,
            rhs,
            group_sizes,
            transpose_rhs=transpose_rhs,
            preferred_element_type=jnp.float32,
            backend=backend,
            **kw,
        )
        return jnp.sum(out * cot)

    grads = jax.grad(loss, argnums=(0, 1))(lhs, rhs, "mosaic", config=config, interpret=True)
    oracle = jax.grad(loss, argnums=(0, 1))(lhs, rhs, "ragged_dot")
    for got, want in zip(grads, oracle, strict=True):
        assert got.dtype == dtype
        np.testing.assert_allclose(_f32(got), _f32(want), **TOL[dtype])
    # Independent check of d_rhs against numpy: tgmm of the bf16-rounded cotangent (the op
    # brings the f32 cotangent to the input dtype before the backward kernels).
    cot_in = _f32(cot.astype(dtype))
    want_drhs = np_tgmm(_f32(lhs), cot_in, sizes)
    if transpose_rhs:
        want_drhs = np.swapaxes(want_drhs, 1, 2)
    np.testing.assert_allclose(_f32(grads[1]), want_drhs, **TOL[dtype])


def test_race_detector_finds_no_races_on_two_cores():
    """Two simulated TensorCores split the "parallel" grid axes; no block is written by both."""
    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2, random_seed=7)
    m, k, n, sizes = 80, 256, 256, [20, 0, 45, 3]
    config = MosaicConfig(tm=16, tk=128, tn=128)
    rng = np.random.default_rng(4)
    lhs = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    rhs = jnp.asarray(rng.standard_normal((len(sizes), k, n)), jnp.float32)
    group_sizes = jnp.asarray(sizes, jnp.int32)

    out = gmm_mosaic(lhs, rhs, group_sizes, config=config, interpret=params)
    out.block_until_ready()
    assert not tpu_interpret.races.races_found
    np.testing.assert_allclose(_f32(out), np_gmm(lhs, rhs, sizes), **TOL[jnp.float32])

    d_rhs = tgmm_mosaic(lhs, out, group_sizes, config=config, interpret=params)
    d_rhs.block_until_ready()
    assert not tpu_interpret.races.races_found
    np.testing.assert_allclose(_f32(d_rhs), np_tgmm(lhs, out, sizes), **TOL[jnp.float32])


def test_race_detector_is_live():
    """Canary: the same interpreter settings do flag two cores writing one block."""

    def racy(x_ref, o_ref):
        o_ref[...] = x_ref[...] + pl.program_id(0).astype(jnp.float32)

    call = pl.pallas_call(
        racy,
        out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
        grid=(4,),
        in_specs=[pl.BlockSpec((8, 128), lambda i: (0, 0))],
        out_specs=pl.BlockSpec((8, 128), lambda i: (0, 0)),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2),
    )
    call(jnp.ones((8, 128), jnp.float32)).block_until_ready()
    assert tpu_interpret.races.races_found


@pytest.mark.parametrize("zero_tail,visit_empty", [(True, False), (False, True)])
def test_schedule_invariants(zero_tail, visit_empty):
    """Mosaic's steps are the shared work list (tests/test_gmm_metadata.py checks its coverage
    and bound) over the padded rows; on top, only real non-empty groups compute, and steps that
    do not compute repeat the previous step's input blocks (no DMA)."""
    tm, m_pad = 16, 160
    rng = np.random.default_rng(5)
    g = 5
    flags = dict(zero_tail=zero_tail, visit_empty=visit_empty)
    make = jax.jit(lambda sizes: mosaic_gmm._make_schedule(sizes, m_pad=m_pad, tm=tm, **flags))
    shared = jax.jit(
        lambda sizes: metadata.make_group_metadata(sizes, num_rows=m_pad, tile=tm, **flags)
    )
    for _ in range(30):
        total = int(rng.integers(0, 150 + 1))
        cuts = np.sort(rng.integers(0, total + 1, size=g - 1))
        sizes = np.diff(np.concatenate([[0], cuts, [total]])).astype(np.int32)
        sched, meta = make(jnp.asarray(sizes)), shared(jnp.asarray(sizes))
        np.testing.assert_array_equal(sched.step_group_T, meta.item_group_W)
        np.testing.assert_array_equal(sched.step_tile_T, meta.item_tile_W)
        np.testing.assert_array_equal(sched.group_offsets, meta.group_offsets)
        num = int(sched.num_steps[0])
        assert num == int(meta.num_items) >= 1
        groups, tiles = np.asarray(sched.step_group_T), np.asarray(sched.step_tile_T)
        compute = np.asarray(sched.compute_T)
        ends = np.cumsum(sizes)
        starts = ends - sizes
        want_compute = [j < g and ends[j] > starts[j] for j in groups[:num]]
        np.testing.assert_array_equal(compute[:num], want_compute)
        assert not compute[num:].any()
        # Computing steps fetch their own blocks; the others repeat the previous step's blocks
        # (no DMA), and the weight block index is always a real group.
        fetch_tile, fetch_group = np.asarray(sched.fetch_tile_T), np.asarray(sched.fetch_group_T)
        on = compute == 1
        np.testing.assert_array_equal(fetch_tile[on], tiles[on])
        np.testing.assert_array_equal(fetch_group[on], groups[on])
        idle = np.flatnonzero(~on)
        idle = idle[idle > 0]
        np.testing.assert_array_equal(fetch_tile[idle], fetch_tile[idle - 1])
        np.testing.assert_array_equal(fetch_group[idle], fetch_group[idle - 1])
        assert fetch_group.min() >= 0 and fetch_group.max() < g


def _lower_for_tpu(fn, *args):
    lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",))
    text = lowered.as_text()
    assert "tpu_custom_call" in text
    return text


@pytest.mark.parametrize("key", list(mosaic_gmm.TUNED_CONFIGS), ids=lambda k: "-".join(k))
def test_tuned_tiling_lowers_for_tpu(key):
    """Every tuned entry lowers for TPU (Pallas/Mosaic block-shape rules) with all products."""
    product, dtype_name, size_class = key
    config = mosaic_gmm.TUNED_CONFIGS[key]
    dtype = jnp.dtype(dtype_name)
    m, g = 4096, 8
    k, n = (2048, 5120) if size_class == "large" else (512, 1536)
    assert mosaic_gmm.lookup_config(product, dtype, k, n) is config
    # These shapes keep the entry's tiles as they are (no shrinking), so they are what lowers.
    fitted = mosaic_gmm._fit_tiles(config, m, k, n, mosaic_gmm._sublane_multiple(dtype))
    assert fitted == (config.tm, config.tk, config.tn)
    sds = jax.ShapeDtypeStruct
    lhs, sizes = sds((m, k), dtype), sds((g,), jnp.int32)
    rhs = sds((g, k, n), dtype)
    rhs_t = sds((g, n, k), dtype)
    grad = sds((m, n), dtype)
    for out_dtype in (None, jnp.float32):
        # The product the entry is tuned for, through the table lookup (config=None) ...
        if product == "tgmm":
            _lower_for_tpu(
                functools.partial(tgmm_mosaic, preferred_element_type=out_dtype), lhs, grad, sizes
            )
        else:
            transpose = product == "gmm_t"
            _lower_for_tpu(
                functools.partial(
                    gmm_mosaic, transpose_rhs=transpose, preferred_element_type=out_dtype
                ),
                lhs,
                rhs_t if transpose else rhs,
                sizes,
            )
        # ... and the entry's tiles on all three products.
        kw = dict(preferred_element_type=out_dtype, config=config)
        _lower_for_tpu(functools.partial(gmm_mosaic, **kw), lhs, rhs, sizes)
        _lower_for_tpu(functools.partial(gmm_mosaic, transpose_rhs=True, **kw), lhs, rhs_t, sizes)
        _lower_for_tpu(functools.partial(tgmm_mosaic, **kw), lhs, grad, sizes)
    # Fits the default scoped VMEM with the widest (f32) output.
    tm, tk, tn = config.tm, config.tk, config.tn
    if product == "tgmm":
        blocks = [((tm, tk), dtype), ((tm, tn), dtype), ((tk, tn), jnp.float32)]
        acc = (tk, tn)
    else:
        blocks = [((tm, tk), dtype), ((tk, tn), dtype), ((tm, tn), jnp.float32)]
        acc = (tm, tn)
    assert mosaic_gmm._vmem_bytes(blocks, acc) <= mosaic_gmm._DEFAULT_SCOPED_VMEM_BYTES


def test_illegal_tiling_is_caught_by_tpu_lowering(monkeypatch):
    """The lowering check is not vacuous: a 64-wide K tile violates the (8, 128) rule."""
    # Bypass the wrapper's own tile checks on purpose, so that only the lowering can object.
    monkeypatch.setattr(mosaic_gmm, "_fit_tiles", lambda *args: (128, 64, 128))
    sds = jax.ShapeDtypeStruct
    with pytest.raises(Exception, match="divisible by 8 and 128"):
        _lower_for_tpu(
            functools.partial(gmm_mosaic, config=MosaicConfig(tm=128, tk=128, tn=128)),
            sds((512, 512), jnp.bfloat16),
            sds((4, 512, 512), jnp.bfloat16),
            sds((4,), jnp.int32),
        )


@pytest.mark.parametrize(
    "dim,tile,want",
    [
        (4096, 1024, 1024),
        (1408, 1024, 1408),  # DeepSeek's expert width: one whole tile, no padded weight copy
        (1408, 512, 128),  # 1408 = 11 x 128: only 128 divides it up to 2 x 512
        (100, 512, 128),
        (640, 512, 640),
        (5120, 1024, 1024),
        (14336, 1024, 1024),  # Mixtral's expert width
        (1000, 512, 512),  # not a multiple of 128: padded (1024), within 1/8
    ],
)
def test_lane_tile_limits_padding(dim, tile, want):
    """A multiple of 128 gets a tile dividing it (no padding, so no per-call weight copy);
    otherwise padding stays within 1/8 of the 128-rounded size."""
    got = mosaic_gmm._fit_lane_tile(dim, tile)
    assert got == want and got % 128 == 0
    minimal = -(-dim // 128) * 128
    if dim % 128 == 0:
        assert dim % got == 0 and got <= 2 * tile
    assert -(-minimal // got) * got - minimal <= minimal // 8


def test_bad_arguments_raise_value_error():
    lhs = jnp.zeros((32, 128), jnp.bfloat16)
    rhs = jnp.zeros((2, 128, 128), jnp.bfloat16)
    sizes = jnp.array([16, 16], jnp.int32)
    with pytest.raises(ValueError, match="MosaicConfig.tm"):
        MosaicConfig(tm=12)
    with pytest.raises(ValueError, match="MosaicConfig.tn"):
        MosaicConfig(tn=96)
    with pytest.raises(ValueError, match="tm=8 must be a multiple of 16"):
        gmm_mosaic(lhs, rhs, sizes, config=MosaicConfig(tm=8), interpret=True)
    with pytest.raises(ValueError, match="lhs must be float32 or bfloat16"):
        gmm_mosaic(lhs.astype(jnp.float16), rhs.astype(jnp.float16), sizes, interpret=True)
    with pytest.raises(ValueError, match="lhs.dtype=float32 and rhs.dtype=bfloat16 must match"):
        gmm_mosaic(lhs.astype(jnp.float32), rhs, sizes, interpret=True)
    with pytest.raises(ValueError, match="disagree on K"):
        gmm_mosaic(lhs, jnp.zeros((2, 128, 256), jnp.bfloat16), sizes, transpose_rhs=True)
    with pytest.raises(ValueError, match=r"num_groups=3 must equal group_sizes.shape\[0\]=2"):
        tgmm_mosaic(lhs, lhs, sizes, num_groups=3, interpret=True)
    with pytest.raises(ValueError, match="config for the mosaic backend must be a MosaicConfig"):
        gmm_mosaic(lhs, rhs, sizes, config=128, interpret=True)
    with pytest.raises(ValueError, match="interpret must be"):
        gmm_mosaic(lhs, rhs, sizes, interpret="yes")


def test_lowers_for_tpu_inside_shard_map_with_check_vma():
    """Expert parallelism calls the kernels per shard under shard_map(check_vma=True): the
    outputs must declare the mesh axes they vary over, or tracing fails."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((4,), ("expert",), devices=jax.devices()[:4])

    def per_shard(lhs, rhs, sizes):
        out = gmm_mosaic(lhs, rhs, sizes)
        d_lhs = gmm_mosaic(out, rhs, sizes, transpose_rhs=True)
        d_rhs = tgmm_mosaic(lhs, out, sizes, preferred_element_type=jnp.float32)
        return out, d_lhs, d_rhs

    fn = jax.shard_map(
        per_shard,
        mesh=mesh,
        in_specs=(P("expert"),) * 3,
        out_specs=(P("expert"),) * 3,
        check_vma=True,
    )
    sharding = NamedSharding(mesh, P("expert"))
    sds = functools.partial(jax.ShapeDtypeStruct, sharding=sharding)
    text = _lower_for_tpu(
        fn,
        sds((4 * 256, 512), jnp.bfloat16),
        sds((8, 512, 512), jnp.bfloat16),
        sds((8,), jnp.int32),
    )
    assert text.count("tpu_custom_call") == 3
