"""Quantized weights in `moejax.pallas.gmm` (QuantizedWeight: int8 values + float32 scales).

Every backend (Triton and Mosaic kernels in interpret mode) against two references: gmm on the
dequantized float weight (tight float32 tolerance: the same elementwise dequantization, only the
accumulation order differs) and the original float weight, within the rigorous quantization
bound |x @ (w - dequant(w))| <= |x| @ (scale / 2). Forward, the transposed product (d_lhs), the
gradients (lhs and scales; the int8 values get a float0 zero), empty groups, rows past
sum(group_sizes), a quantized model's logits against its dequantized twin, and bad inputs.

Legend: M rows, K contraction width, N output width, G groups, S scale rows per weight.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import pallas
from moejax.pallas import QuantizedWeight
from moejax.pallas.mosaic_gmm import MosaicConfig

M, K, N = 40, 64, 48
SIZES = [9, 0, 20, 0]  # empty groups, and rows 29..39 past sum(group_sizes)
BACKENDS = ("xla", "ragged_dot", "triton", "mosaic")
F32 = dict(rtol=1e-5, atol=1e-5)


def np_quantize(w_GxKxN: np.ndarray, bits: int, group: int | None):
    """Symmetric absmax quantization (numpy reference): int8 values in [-2^(b-1), 2^(b-1) - 1]
    and float32 scales [G, K / group, N] over groups of `group` rows of axis 1."""
    g, k, n = w_GxKxN.shape
    group = group or k
    qmax = 2 ** (bits - 1) - 1
    w = w_GxKxN.reshape(g, k // group, group, n)
    scale = np.maximum(np.abs(w).max(axis=2), 1e-12) / qmax
    values = np.clip(np.round(w / scale[:, :, None, :]), -qmax - 1, qmax)
    return values.reshape(g, k, n).astype(np.int8), scale.astype(np.float32)


def np_dequantize(values, scale):
    g, k, n = values.shape
    return np.repeat(scale.astype(np.float64), k // scale.shape[1], axis=1) * values


def np_gmm(lhs, rhs_GxKxN, sizes):
    """float64 reference: rows of group g times rhs[g]; other rows zero."""
    lhs = np.asarray(lhs, np.float64)
    out = np.zeros((lhs.shape[0], rhs_GxKxN.shape[2]))
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    for g in range(len(sizes)):
        rows = slice(offsets[g], offsets[g + 1])
        out[rows] = lhs[rows] @ np.asarray(rhs_GxKxN[g], np.float64)
    return out


def _inputs(bits, group, k=K, n=N, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(len(SIZES), k, n)) / np.sqrt(k)
    values, scale = np_quantize(w, bits, group)
    lhs = jnp.asarray(rng.normal(size=(M, k)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(M, n)), jnp.float32)
    return w, QuantizedWeight(jnp.asarray(values), jnp.asarray(scale)), lhs, dy


def _gmm(backend, config=None):
    return functools.partial(pallas.gmm, backend=backend, config=config, interpret=True)


QUANT = [
    pytest.param(8, None, id="int8-per-channel"),
    pytest.param(8, 16, id="int8-group16"),
    pytest.param(4, None, id="int4-per-channel"),
    pytest.param(4, 32, id="int4-group32"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits, group", [QUANT[0], QUANT[1], QUANT[3]])
def test_forward_and_transposed_match_dequantized_and_float_weights(backend, bits, group):
    w, qw, lhs, dy = _inputs(bits, group)
    gs = jnp.asarray(SIZES, jnp.int32)
    gmm = _gmm(backend)
    dequant = np_dequantize(*map(np.asarray, qw))
    np.testing.assert_array_equal(np.asarray(qw.dequantize()), dequant.astype(np.float32))

    out = gmm(lhs, qw, gs)
    assert out.shape == (M, N) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, np_gmm(lhs, dequant, SIZES), **F32)
    ref = pallas.gmm(lhs, qw.dequantize(), gs, backend="ragged_dot")
    np.testing.assert_allclose(out, ref, **F32)
    assert not np.asarray(out[sum(SIZES) :]).any()  # exactly zero past the groups
    # Against the float weight: each weight error is at most half its scale.
    half_step = np.repeat(np.asarray(qw.scale), K // qw.scale.shape[1], axis=1) / 2
    bound = np_gmm(np.abs(lhs), half_step, SIZES) + 1e-5
    err = np.abs(np.asarray(out, np.float64) - np_gmm(lhs, w, SIZES))
    assert (err <= bound).all()
    assert err.max() > 0  # the test sees quantization at all

    # The d_lhs product: the same stored array contracted over its last axis.
    out_t = gmm(dy, qw, gs, transpose_rhs=True)
    assert out_t.shape == (M, K)
    np.testing.assert_allclose(out_t, np_gmm(dy, np.swapaxes(dequant, 1, 2), SIZES), **F32)
    assert not np.asarray(out_t[sum(SIZES) :]).any()


@pytest.mark.parametrize(
    "backend, bits, group",
    [("xla", 4, None), ("ragged_dot", 8, 16), ("triton", 8, 16), ("mosaic", 4, None)],
)
def test_gradients_match_the_dequantized_reference(backend, bits, group):
    _, qw, lhs, dy = _inputs(bits, group, seed=1)
    gs = jnp.asarray(SIZES, jnp.int32)
    gmm = _gmm(backend)

    def loss(x, scale):
        return (gmm(x, QuantizedWeight(qw.values, scale), gs) * dy).sum()

    def ref_loss(x, scale):
        w = QuantizedWeight(qw.values, scale).dequantize()
        return (jax.lax.ragged_dot(x, w, gs) * dy).sum()

    d_x, d_scale = jax.jit(jax.grad(loss, (0, 1)))(lhs, qw.scale)
    ref_x, ref_scale = jax.grad(ref_loss, (0, 1))(lhs, qw.scale)
    np.testing.assert_allclose(d_x, ref_x, **F32)
    np.testing.assert_allclose(d_scale, ref_scale, rtol=1e-5, atol=1e-4)
    # Empty groups' scales get no gradient; rows past the groups contribute nothing to d_x.
    assert not np.asarray(d_scale[np.asarray(SIZES) == 0]).any()
    assert not np.asarray(d_x[sum(SIZES) :]).any()

    # Integer values have no tangent space: a float0 zero, and no error differentiating x only.
    d_w = jax.grad(lambda w: (gmm(lhs, w, gs) * dy).sum(), allow_int=True)(qw)
    assert d_w.values.dtype == jax.dtypes.float0
    np.testing.assert_allclose(d_w.scale, ref_scale, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(jax.grad(loss)(lhs, qw.scale), ref_x, **F32)


def test_mosaic_tile_inside_one_scale_group():
    """K tile 128 inside scale groups of 256 rows: one scale row per block (the other case of
    `_fit_scale_tile`), forward and transposed."""
    _, qw, lhs, dy = _inputs(8, 256, k=512, n=128, seed=2)
    gs = jnp.asarray(SIZES, jnp.int32)
    gmm = _gmm("mosaic", MosaicConfig(tm=16, tk=128, tn=128))
    dequant = np_dequantize(*map(np.asarray, qw))
    np.testing.assert_allclose(gmm(lhs, qw, gs), np_gmm(lhs, dequant, SIZES), **F32)
    out_t = gmm(dy, qw, gs, transpose_rhs=True)
    np.testing.assert_allclose(out_t, np_gmm(dy, np.swapaxes(dequant, 1, 2), SIZES), **F32)


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
def test_bf16_inputs_dequantize_to_bf16(backend):
    """The kernels dequantize to the input dtype, as the old full-dequant path did."""
    _, qw, lhs, _ = _inputs(8, 16, seed=3)
    gs = jnp.asarray(SIZES, jnp.int32)
    lhs16 = lhs.astype(jnp.bfloat16)
    out = _gmm(backend)(lhs16, qw, gs, preferred_element_type=jnp.float32)
    ref = jax.lax.ragged_dot(
        lhs16, qw.dequantize(jnp.bfloat16), gs, preferred_element_type=jnp.float32
    )
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["xla", "triton"])
def test_quantized_model_logits_unchanged(backend):
    """The new path (QuantizedWeight into gmm on the compact layout; dequantized in
    run_experts on the padded one, backend "xla") gives the old path's logits: those of the
    same model with its experts dequantized in full before the grouped matmul."""
    pytest.importorskip("qwix")
    from moejax.compress.quantize import dequantize_experts, quantize_experts  # noqa: PLC0415
    from moejax.layers import ModelConfig, MoEConfig, Transformer  # noqa: PLC0415
    from moejax.layers.config import MoEExecution  # noqa: PLC0415

    execution = MoEExecution(gmm_backend=backend, gmm_interpret=True)
    cfg = ModelConfig(
        vocab_size=64,
        d_model=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        d_ff=32,
        max_len=16,
        moe=MoEConfig(num_experts=4, top_k=2, d_ff=32, execution=execution),
    )
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)))
    variables = nn.meta.unbox(Transformer(cfg).init(jax.random.key(0), tokens))
    q_cfg, q_vars = quantize_experts(cfg, variables, 4, 16)
    f_cfg, f_vars = dequantize_experts(q_cfg, q_vars)
    new, _ = jax.jit(Transformer(q_cfg).apply)(q_vars, tokens)
    old, _ = jax.jit(Transformer(f_cfg).apply)(f_vars, tokens)
    np.testing.assert_allclose(new, old, rtol=1e-6, atol=1e-6)
    # On the compact layout the kernel itself takes the int8 weights.
    jaxpr = str(jax.make_jaxpr(Transformer(q_cfg).apply)(q_vars, tokens))
    assert ("gmm_quantized" in jaxpr) == (backend == "triton")


def _bad(**kw):
    values = jnp.zeros((2, 32, 16), jnp.int8)
    scale = jnp.ones((2, 2, 16), jnp.float32)
    return QuantizedWeight(kw.get("values", values), kw.get("scale", scale))


@pytest.mark.parametrize(
    "rhs, lhs_cols, match",
    [
        (_bad(values=jnp.zeros((2, 32, 16), jnp.float32)), 32, "rhs.values must be int8"),
        (_bad(values=jnp.zeros((32, 16), jnp.int8)), 32, r"rhs.values must have rank 3"),
        (_bad(scale=jnp.ones((2, 2, 16), jnp.bfloat16)), 32, "rhs.scale must be float32"),
        (_bad(scale=jnp.ones((2, 3, 16), jnp.float32)), 32, r"rhs.scale must have shape"),
        (_bad(scale=jnp.ones((2, 2, 8), jnp.float32)), 32, r"rhs.scale must have shape"),
        (_bad(scale=jnp.ones((2, 16), jnp.float32)), 32, r"rhs.scale must have shape"),
        (_bad(), 16, "disagree on K"),
    ],
)
def test_bad_quantized_inputs_raise(rhs, lhs_cols, match):
    lhs = jnp.zeros((8, lhs_cols), jnp.float32)
    gs = jnp.asarray([4, 4], jnp.int32)
    for backend in BACKENDS:
        with pytest.raises(ValueError, match=match):
            pallas.gmm(lhs, rhs, gs, backend=backend, interpret=True)


def test_integer_lhs_and_unfit_groups_raise():
    gs = jnp.asarray([4, 4], jnp.int32)
    with pytest.raises(ValueError, match="lhs must be a floating-point array"):
        pallas.gmm(jnp.zeros((8, 32), jnp.int8), _bad(), gs, backend="xla")
    # Groups of 8 rows: no power-of-two Triton block >= 16 divides them.
    odd = _bad(scale=jnp.ones((2, 4, 16), jnp.float32))
    with pytest.raises(ValueError, match="TritonConfig.block_k"):
        pallas.gmm(jnp.zeros((8, 32), jnp.float32), odd, gs, backend="triton", interpret=True)
    # Groups of 100 rows: no multiple of 128 divides them or is divided by them.
    odd = QuantizedWeight(jnp.zeros((2, 200, 16), jnp.int8), jnp.ones((2, 2, 16), jnp.float32))
    with pytest.raises(ValueError, match="do not fit the mosaic backend"):
        pallas.gmm(jnp.zeros((8, 200), jnp.float32), odd, gs, backend="mosaic", interpret=True)
