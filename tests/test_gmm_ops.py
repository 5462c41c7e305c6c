"""Contract of the public grouped matmul ops (moejax.pallas.gmm / tgmm), for every backend that
runs on CPU: forward, transposed and weight-gradient products and both gradients against a numpy
reference, ragged_dot semantics (zeros past the groups), and input validation.

The Triton kernels get the same checks (plus lowering) in test_gmm_triton.py.

Legend: M rows, K contraction width, N output width, G groups.
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gmm_reference import (
    CASES,
    PRODUCT_PARAMS,
    assert_close,
    np_gmm,
    np_tgmm,
    random_inputs,
)

import moejax.pallas
from moejax.pallas import gmm, ops, tgmm
from moejax.pallas.xla_gmm import XlaConfig

BACKENDS = ["xla", "ragged_dot"]
if importlib.util.find_spec("moejax.pallas.mosaic_gmm") is not None:
    BACKENDS.append("mosaic")
if importlib.util.find_spec("tokamax") is not None:
    BACKENDS.append("tokamax")  # its "xla" implementation on CPU (tokamax picks it)

# A small row tile for the XLA path so that the test shapes span several tiles; the other
# backends use their default tiling (shrunk to the problem).
SMALL_CONFIG = {"xla": XlaConfig(tile_m=16)}


def _kw(backend):
    return dict(backend=backend, config=SMALL_CONFIG.get(backend))


@pytest.mark.parametrize("case,dtype", PRODUCT_PARAMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_products_match_numpy(backend, case, dtype):
    m, k, n, sizes = CASES[case]
    lhs, rhs, grad = random_inputs(m, k, n, len(sizes), dtype)
    gs = jnp.asarray(sizes, jnp.int32)

    out = gmm(lhs, rhs, gs, **_kw(backend))
    assert out.shape == (m, n) and out.dtype == dtype
    assert_close(out, np_gmm(lhs, rhs, sizes), dtype)
    assert not np.asarray(out[sum(sizes) :], np.float32).any()

    out_t = gmm(lhs, jnp.swapaxes(rhs, 1, 2), gs, transpose_rhs=True, **_kw(backend))
    assert_close(out_t, np_gmm(lhs, rhs, sizes), dtype)

    d_rhs = tgmm(lhs, grad, gs, **_kw(backend))
    assert d_rhs.shape == (len(sizes), k, n) and d_rhs.dtype == dtype
    assert_close(d_rhs, np_tgmm(lhs, grad, sizes), dtype)
    for g, size in enumerate(sizes):
        if size == 0:
            assert not np.asarray(d_rhs[g], np.float32).any()


@pytest.mark.parametrize("transpose_rhs", [False, True], ids=["KxN", "NxK"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_numpy_and_oracle(backend, transpose_rhs):
    m, k, n, sizes = CASES["random_with_empty"]
    lhs, rhs, grad = random_inputs(m, k, n, len(sizes), jnp.float32, seed=1)
    gs = jnp.asarray(sizes, jnp.int32)
    rhs_in = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs

    def loss(x, w):
        return jnp.sum(gmm(x, w, gs, transpose_rhs=transpose_rhs, **_kw(backend)) * grad)

    d_lhs, d_rhs = jax.grad(loss, argnums=(0, 1))(lhs, rhs_in)
    oracle_lhs, oracle_rhs = jax.grad(
        lambda x, w: jnp.sum(jax.lax.ragged_dot(x, w, gs) * grad), argnums=(0, 1)
    )(lhs, rhs)
    np_d_lhs = np_gmm(grad, np.swapaxes(np.asarray(rhs), 1, 2), sizes)
    np_d_rhs = np_tgmm(lhs, grad, sizes)
    if transpose_rhs:
        d_rhs = jnp.swapaxes(d_rhs, 1, 2)
    assert_close(d_lhs, np_d_lhs, jnp.float32)
    assert_close(d_lhs, oracle_lhs, jnp.float32)
    assert_close(d_rhs, np_d_rhs, jnp.float32)
    assert_close(d_rhs, oracle_rhs, jnp.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_traced_group_sizes_and_mixed_precision(backend):
    m, k, n, sizes = CASES["random_with_empty"]
    lhs, rhs, grad = random_inputs(m, k, n, len(sizes), jnp.bfloat16, seed=2)
    fn = jax.jit(lambda x, w, gs: gmm(x, w, gs, preferred_element_type=jnp.float32, **_kw(backend)))
    for perm in (sizes, sizes[::-1]):
        out = fn(lhs, rhs, jnp.asarray(perm, jnp.int32))
        assert out.dtype == jnp.float32
        # bf16 products accumulated in f32: only the summation order differs from float64.
        np.testing.assert_allclose(out, np_gmm(lhs, rhs, perm), rtol=1e-4, atol=1e-4)
    # The gradient of a bf16 gmm is bf16 even when its output (and cotangent) is f32.
    d_lhs, d_rhs = jax.grad(
        lambda x, w: jnp.sum(fn(x, w, jnp.asarray(sizes, jnp.int32)) * grad.astype(jnp.float32)),
        argnums=(0, 1),
    )(lhs, rhs)
    assert d_lhs.dtype == jnp.bfloat16 and d_rhs.dtype == jnp.bfloat16
    assert_close(d_rhs, np_tgmm(lhs, grad, sizes), jnp.bfloat16)


def test_group_sizes_get_no_cotangent():
    lhs, rhs, _ = random_inputs(8, 16, 16, 2, jnp.float32)
    gs = jnp.array([3, 4], jnp.int32)
    out, vjp = jax.vjp(lambda x, w, s: gmm(x, w, s, backend="xla"), lhs, rhs, gs)
    _, _, d_gs = vjp(jnp.ones_like(out))
    assert d_gs.dtype == jax.dtypes.float0 and d_gs.shape == gs.shape


def test_auto_backend_and_interpret_on_cpu():
    assert jax.default_backend() == "cpu"
    assert moejax.pallas.resolve_backend("auto") == "xla"
    assert moejax.pallas.resolve_backend("mosaic") == "mosaic"
    assert set(moejax.pallas.BACKENDS) == {
        "auto",
        "xla",
        "triton",
        "mosaic",
        "ragged_dot",
        "tokamax",
    }
    with pytest.raises(ValueError, match=r"backend='cuda' is not one of \('auto'"):
        moejax.pallas.resolve_backend("cuda")
    assert ops._resolve_interpret(None) is True
    assert ops._resolve_interpret(False) is False
    lhs, rhs, _ = random_inputs(24, 16, 8, 3, jnp.float32, seed=5)
    sizes = [10, 0, 9]
    assert_close(gmm(lhs, rhs, jnp.array(sizes, jnp.int32)), np_gmm(lhs, rhs, sizes), jnp.float32)


F32 = jnp.float32


@pytest.mark.parametrize(
    "lhs_shape,rhs_shape,sizes,kwargs,match",
    [
        ((8,), (2, 8, 4), [4, 4], {}, r"lhs must have rank 2 \[M, K\], got shape \(8,\)"),
        ((8, 16), (16, 4), [4, 4], {}, r"rhs must have rank 3 \[G, K, N\]"),
        ((8, 16), (2, 12, 4), [4, 4], {}, r"disagree on K"),
        ((8, 16), (2, 16, 4), [4, 4], {"transpose_rhs": True}, r"\[G, N, K\].*disagree on K"),
        ((8, 16), (2, 16, 4), [4, 4, 0], {}, r"group_sizes must have shape \[G\]=\[2\]"),
        ((8, 16), (2, 16, 4), [5, -1], {}, r"group_sizes must be non-negative"),
        ((8, 16), (2, 16, 4), [5, 4], {}, r"sum\(group_sizes\)=9 exceeds the 8 rows"),
        ((8, 16), (2, 16, 4), [4, 4], {"backend": "cuda"}, r"backend='cuda' is not one of"),
        ((8, 16), (2, 16, 4), [4, 4], {"interpret": "yes"}, r"interpret must be"),
        (
            (8, 16),
            (2, 16, 4),
            [4, 4],
            {"preferred_element_type": jnp.int32},
            r"preferred_element_type must be None or a floating dtype",
        ),
    ],
)
def test_gmm_validation(lhs_shape, rhs_shape, sizes, kwargs, match):
    with pytest.raises(ValueError, match=match):
        gmm(
            jnp.ones(lhs_shape, F32),
            jnp.ones(rhs_shape, F32),
            jnp.array(sizes, jnp.int32),
            **kwargs,
        )


def test_gmm_validation_dtypes():
    gs = jnp.array([4, 4], jnp.int32)
    with pytest.raises(ValueError, match=r"lhs.dtype=float32 and rhs.dtype=bfloat16 must match"):
        gmm(jnp.ones((8, 16), F32), jnp.ones((2, 16, 4), jnp.bfloat16), gs)
    with pytest.raises(ValueError, match=r"lhs must be a floating-point array.*int32"):
        gmm(jnp.ones((8, 16), jnp.int32), jnp.ones((2, 16, 4), jnp.int32), gs)
    with pytest.raises(ValueError, match=r"group_sizes must be an integer array.*float32"):
        gmm(jnp.ones((8, 16), F32), jnp.ones((2, 16, 4), F32), jnp.array([4.0, 4.0]))


def test_tgmm_validation():
    gs = jnp.array([4, 4], jnp.int32)
    with pytest.raises(ValueError, match=r"grad must have rank 2 \[M, N\]"):
        tgmm(jnp.ones((8, 16), F32), jnp.ones((8,), F32), gs)
    with pytest.raises(ValueError, match=r"disagree on M"):
        tgmm(jnp.ones((8, 16), F32), jnp.ones((6, 4), F32), gs)
    with pytest.raises(ValueError, match=r"num_groups=3 must equal group_sizes.shape\[0\]=2"):
        tgmm(jnp.ones((8, 16), F32), jnp.ones((8, 4), F32), gs, num_groups=3)
    with pytest.raises(ValueError, match=r"lhs.dtype=float32 and grad.dtype=bfloat16"):
        tgmm(jnp.ones((8, 16), F32), jnp.ones((8, 4), jnp.bfloat16), gs)
    with pytest.raises(ValueError, match=r"sum\(group_sizes\)=12 exceeds the 8 rows"):
        tgmm(jnp.ones((8, 16), F32), jnp.ones((8, 4), F32), jnp.array([6, 6], jnp.int32))


def test_traced_bad_group_sizes_are_not_checked_on_host():
    # Under jit the sizes are not concrete: validation must not force a host sync (or fail).
    fn = jax.jit(lambda gs: gmm(jnp.ones((8, 16), F32), jnp.ones((2, 16, 4), F32), gs))
    assert fn(jnp.array([4, 4], jnp.int32)).shape == (8, 4)


@pytest.mark.parametrize("backend", BACKENDS + ["triton"])
def test_no_rows_and_no_contraction(backend):
    # M = 0 (no tokens routed here) and K = 0 are legal shapes: zeros, never an error.
    kw = dict(backend=backend, interpret=True if backend == "triton" else None)
    gs = jnp.zeros((2,), jnp.int32)
    out = gmm(jnp.ones((0, 16), F32), jnp.ones((2, 16, 8), F32), gs, **kw)
    assert out.shape == (0, 8)
    d_rhs = tgmm(jnp.ones((0, 16), F32), jnp.ones((0, 8), F32), gs, **kw)
    assert d_rhs.shape == (2, 16, 8) and not np.asarray(d_rhs).any()
    out = gmm(jnp.ones((5, 0), F32), jnp.ones((2, 0, 8), F32), jnp.array([2, 3], jnp.int32), **kw)
    assert out.shape == (5, 8) and not np.asarray(out).any()


def _wrong_configs():
    from moejax.pallas.mosaic_gmm import MosaicConfig
    from moejax.pallas.triton_gmm import TritonConfig

    return [
        ("xla", TritonConfig(), r"config for the xla backend must be a XlaConfig or None"),
        ("xla", 16, r"config for the xla backend must be a XlaConfig or None, got 16 \(int\)"),
        ("triton", XlaConfig(), r"config for the triton backend must be a TritonConfig"),
        ("mosaic", TritonConfig(), r"config for the mosaic backend must be a MosaicConfig"),
        ("ragged_dot", MosaicConfig(), r"the ragged_dot backend takes no config"),
    ]


@pytest.mark.parametrize("case", range(5))
def test_wrong_config_type_names_backend_and_type(case):
    backend, config, match = _wrong_configs()[case]
    lhs, rhs, grad = random_inputs(16, 16, 16, 2, jnp.float32)
    gs = jnp.array([8, 8], jnp.int32)
    kw = dict(backend=backend, config=config, interpret=True)
    with pytest.raises(ValueError, match=match):
        gmm(lhs, rhs, gs, **kw)
    with pytest.raises(ValueError, match=match):
        tgmm(lhs, grad, gs, **kw)


def test_backend_table_rows():
    """One row per backend; every backend's kernels take the same arguments and its tuned
    table holds configs of its own config type."""
    import inspect

    table = moejax.pallas.backends.BACKEND_TABLE
    assert moejax.pallas.BACKENDS == ("auto", *table)
    for name, row in table.items():
        assert row.name == name
        kernels = row.kernels()
        gmm_args = inspect.signature(kernels.gmm).parameters
        tgmm_args = inspect.signature(kernels.tgmm).parameters
        assert list(gmm_args)[:3] == ["lhs", "rhs", "group_sizes"], name
        assert list(tgmm_args)[:3] == ["lhs", "grad", "group_sizes"], name
        common = {"preferred_element_type", "config", "interpret"}
        assert common | {"transpose_rhs"} <= set(gmm_args), name
        assert common | {"num_groups"} <= set(tgmm_args), name
        for config in (kernels.tuned_configs or {}).values():
            assert isinstance(config, kernels.config_type), name


@pytest.mark.parametrize(
    "platform,want",
    [("cpu", "xla"), ("gpu", "triton"), ("cuda", "triton"), ("tpu", "mosaic")] + [("metal", "xla")],
)
def test_auto_is_resolved_from_the_table(monkeypatch, platform, want):
    monkeypatch.setattr(jax, "default_backend", lambda: platform)
    assert moejax.pallas.resolve_backend("auto") == want


def test_backend_modules_are_imported_on_first_use():
    import subprocess
    import sys

    code = (
        "import sys, jax.numpy as jnp, moejax.pallas as p\n"
        "p.gmm(jnp.ones((4, 8)), jnp.ones((2, 8, 8)), jnp.array([2, 2]), backend='xla')\n"
        "print(sorted(m for m in ('moejax.pallas.triton_gmm', 'moejax.pallas.mosaic_gmm',\n"
        "    'moejax.pallas.ragged_gmm') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
