"""RMSNorm, RoPE and GQA attention against plain numpy / jnp references (forward and gradients)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.layers.attention import (
    QUERY_BLOCKS,
    Attention,
    causal_attention,
    causal_mask,
    dot_product_attention,
)
from moejax.layers.common import Embed, RMSNorm, apply_rope, rope_inv_freq
from moejax.layers.config import ModelConfig

CFG = ModelConfig(
    vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64, max_len=16,
    moe=None,
)  # fmt: skip


def np_rope(x_BxLxHxK, positions_BxL, theta):
    """HF `apply_rotary_pos_emb` (rotate_half), written out in float64 numpy."""
    k = x_BxLxHxK.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, k, 2, dtype=np.float64) / k)
    freqs = positions_BxL[..., None].astype(np.float64) * inv_freq
    emb = np.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    x1, x2 = x_BxLxHxK[..., : k // 2], x_BxLxHxK[..., k // 2 :]
    rotate_half = np.concatenate([-x2, x1], axis=-1)
    return x_BxLxHxK * np.cos(emb) + rotate_half * np.sin(emb)


def ref_attention(q_BxLxHxK, k_BxSxNxK, v_BxSxNxK, mask_LxS, scale):
    """Plain attention with HF `repeat_kv`: kv head n serves query heads n*G .. n*G+G-1."""
    groups = q_BxLxHxK.shape[2] // k_BxSxNxK.shape[2]
    k_BxSxHxK = jnp.repeat(k_BxSxNxK, groups, axis=2)
    v_BxSxHxK = jnp.repeat(v_BxSxNxK, groups, axis=2)
    scores = jnp.einsum("blhk,bshk->bhls", q_BxLxHxK, k_BxSxHxK) * scale
    scores = jnp.where(mask_LxS, scores, -1e30)
    return jnp.einsum("bhls,bshk->blhk", jax.nn.softmax(scores, axis=-1), v_BxSxHxK)


def ref_rms(x, scale, eps):
    return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def ref_attention_layer(p, x_BxLxD, cfg, positions_BxL):
    """The Attention module rebuilt from its params with the references above."""
    b, length, _ = x_BxLxD.shape
    h, n, k = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim

    def proj(name):
        y = jnp.einsum("bld,dhk->blhk", x_BxLxD, p[name]["kernel"])
        return y + p[name]["bias"] if cfg.qkv_bias else y

    q, kk, v = proj("q"), proj("k"), proj("v")
    if cfg.qk_norm == "head":
        q = ref_rms(q, p["q_norm"]["scale"], cfg.norm_eps)
        kk = ref_rms(kk, p["k_norm"]["scale"], cfg.norm_eps)
    elif cfg.qk_norm == "full":
        q = ref_rms(q.reshape(b, length, h * k), p["q_norm"]["scale"], cfg.norm_eps)
        kk = ref_rms(kk.reshape(b, length, n * k), p["k_norm"]["scale"], cfg.norm_eps)
        q, kk = q.reshape(b, length, h, k), kk.reshape(b, length, n, k)
    q = apply_rope(q, positions_BxL, cfg.rope_theta)
    kk = apply_rope(kk, positions_BxL, cfg.rope_theta)
    mask = np.tril(np.ones((length, length), bool))
    out = ref_attention(q, kk, v, mask, k**-0.5)
    return jnp.einsum("blhk,hkd->bld", out, p["o"]["kernel"])


def test_rope_matches_numpy_rotate_half():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
    positions = rng.integers(0, 1000, size=(2, 5))
    got = apply_rope(jnp.asarray(x), jnp.asarray(positions), 500.0)
    np.testing.assert_allclose(got, np_rope(x, positions, 500.0), rtol=1e-4, atol=1e-4)


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(1)
    q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32) for _ in range(2))

    def score(m, n):
        qm = apply_rope(q, jnp.array([[m]]), 10000.0)
        kn = apply_rope(k, jnp.array([[n]]), 10000.0)
        return float(jnp.sum(qm * kn))

    np.testing.assert_allclose(score(7, 3), score(104, 100), rtol=1e-4)
    assert abs(score(7, 3) - score(3, 7)) > 1e-3  # not symmetric: position actually matters


def test_rope_keeps_dtype_and_rejects_odd_head_dim():
    x = jnp.ones((1, 2, 1, 4), jnp.bfloat16)
    assert apply_rope(x, jnp.zeros((1, 2), jnp.int32), 1e4).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="head_dim"):
        rope_inv_freq(5, 1e4)


def test_rmsnorm_matches_reference_in_float32():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 3, 16)).astype(np.float32) * 5
    norm = RMSNorm(eps=1e-5)
    params = norm.init(jax.random.key(0), x)
    scale = rng.normal(size=16).astype(np.float32)
    params = {"params": {"scale": jnp.asarray(scale)}}
    want = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + 1e-5) * scale
    np.testing.assert_allclose(norm.apply(params, x), want, rtol=1e-5, atol=1e-5)
    # bf16 in/out, statistics in f32: matches the f32 result up to bf16 rounding of in/out.
    y16 = RMSNorm(eps=1e-5, dtype=jnp.bfloat16).apply(params, jnp.asarray(x, jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (6, 1)])
def test_dot_product_attention_matches_reference_fwd_and_grad(heads, kv_heads):
    rng = np.random.default_rng(3)
    b, length, k = 2, 5, 8
    q = jnp.asarray(rng.normal(size=(b, length, heads, k)), jnp.float32)
    kk = jnp.asarray(rng.normal(size=(b, length, kv_heads, k)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, length, kv_heads, k)), jnp.float32)
    mask = causal_mask(jnp.arange(length), jnp.arange(length))
    np.testing.assert_array_equal(mask, np.tril(np.ones((length, length), bool)))
    out = dot_product_attention(q, kk, v, mask, scale=0.3)
    np.testing.assert_allclose(out, ref_attention(q, kk, v, mask, 0.3), rtol=1e-5, atol=1e-5)
    # The first query sees only the first key: its output is exactly v[:, 0] of its kv head.
    groups = heads // kv_heads
    np.testing.assert_allclose(out[:, 0], jnp.repeat(v[:, 0], groups, axis=1), atol=1e-6)
    cot = jnp.asarray(rng.normal(size=out.shape), jnp.float32)
    grads = jax.jit(
        jax.grad(lambda *a: jnp.sum(dot_product_attention(*a, mask, scale=0.3) * cot), (0, 1, 2))
    )
    ref_grads = jax.jit(jax.grad(lambda *a: jnp.sum(ref_attention(*a, mask, 0.3) * cot), (0, 1, 2)))
    for g, r in zip(grads(q, kk, v), ref_grads(q, kk, v), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("length", [128, 136, 130])
def test_blocked_causal_attention_matches_reference_fwd_and_grad(length):
    """L = 128 and 136 run in QUERY_BLOCKS query blocks (each over the keys up to its end), 130
    unblocked: all equal the full masked reference, forward and backward."""
    rng = np.random.default_rng(5)
    b, heads, kv_heads, k = 2, 4, 2, 8
    q = jnp.asarray(rng.normal(size=(b, length, heads, k)), jnp.float32)
    kk = jnp.asarray(rng.normal(size=(b, length, kv_heads, k)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, length, kv_heads, k)), jnp.float32)
    slots = jnp.arange(length)
    mask = np.tril(np.ones((length, length), bool))
    out = causal_attention(q, kk, v, slots, slots, scale=0.3)
    np.testing.assert_allclose(out, ref_attention(q, kk, v, mask, 0.3), rtol=1e-5, atol=1e-5)
    cot = jnp.asarray(rng.normal(size=out.shape), jnp.float32)
    grads = jax.grad(
        lambda *a: jnp.sum(causal_attention(*a, slots, slots, scale=0.3) * cot), (0, 1, 2)
    )
    ref_grads = jax.grad(lambda *a: jnp.sum(ref_attention(*a, mask, 0.3) * cot), (0, 1, 2))
    for g, r in zip(grads(q, kk, v), ref_grads(q, kk, v), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
    # The blocked path really is taken on CPU (QUERY_BLOCKS score matmuls), and only there.
    f = jax.jit(lambda *a: causal_attention(*a, slots, slots, scale=0.3))
    blocked = length % QUERY_BLOCKS == 0
    cpu = f.trace(q, kk, v).lower(lowering_platforms=("cpu",)).as_text()
    assert cpu.count("stablehlo.dot_general") == (2 * QUERY_BLOCKS if blocked else 2)
    gpu = f.trace(q, kk, v).lower(lowering_platforms=("cuda",)).as_text()
    assert gpu.count("stablehlo.dot_general") == 2


def test_dot_product_attention_rejects_bad_head_counts():
    q = jnp.zeros((1, 2, 3, 4))
    kv = jnp.zeros((1, 2, 2, 4))
    with pytest.raises(ValueError, match="multiple of kv heads"):
        dot_product_attention(q, kv, kv, jnp.ones((2, 2), bool), scale=1.0)


@pytest.mark.parametrize(
    "qk_norm,qkv_bias,kv_heads",
    [("head", True, 2), ("full", False, 1)],
)
def test_attention_module_matches_reference_fwd_and_grad(qk_norm, qkv_bias, kv_heads):
    cfg = dataclasses.replace(CFG, qk_norm=qk_norm, qkv_bias=qkv_bias, num_kv_heads=kv_heads)
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(2, 6, cfg.d_model)), jnp.float32)
    positions = jnp.asarray(rng.integers(0, 50, size=(2, 6)), jnp.int32)
    attn = Attention(cfg)
    params = nn.meta.unbox(jax.jit(attn.init)(jax.random.key(0), x, positions))["params"]
    # Random (not init-valued) norm scales and biases so their use is actually checked.
    params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(1), a.shape), params)
    expected_keys = {"q", "k", "v", "o"} | ({"q_norm", "k_norm"} if qk_norm != "none" else set())
    assert set(params) == expected_keys
    assert ("bias" in params["q"]) == qkv_bias
    h, k = cfg.num_heads, cfg.resolved_head_dim
    if qk_norm == "head":
        assert params["q_norm"]["scale"].shape == (k,)
    if qk_norm == "full":
        assert params["q_norm"]["scale"].shape == (h * k,)
        assert params["k_norm"]["scale"].shape == (kv_heads * k,)

    def value_and_grads(fn):
        def loss(p, x):
            y = fn(p, x)
            return jnp.sum(jnp.sin(y)), y

        return jax.jit(jax.grad(loss, (0, 1), has_aux=True))(params, x)

    g_mine, y_mine = value_and_grads(lambda p, x: attn.apply({"params": p}, x, positions))
    g_ref, y_ref = value_and_grads(lambda p, x: ref_attention_layer(p, x, cfg, positions))
    np.testing.assert_allclose(y_mine, y_ref, rtol=1e-4, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g_mine, g_ref)


def test_attention_decode_token_by_token_equals_full():
    cfg = dataclasses.replace(CFG, qk_norm="head", qkv_bias=True)
    x = jax.random.normal(jax.random.key(2), (2, 7, cfg.d_model))
    attn = Attention(cfg)
    params = jax.jit(attn.init)(jax.random.key(0), x)["params"]
    full = jax.jit(attn.apply)({"params": params}, x)
    step = jax.jit(lambda v, x: Attention(cfg, decode=True).apply(v, x, mutable=["cache"]))
    # Prefill 3 tokens (creates the cache), then one token at a time.
    out, cache = step({"params": params}, x[:, :3])
    outs = [out]
    for t in range(3, 7):
        out, cache = step({"params": params, **cache}, x[:, t : t + 1])
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)
    assert int(cache["cache"]["cache_index"]) == 7
    assert cache["cache"]["cached_key"].shape == (2, cfg.max_len, cfg.num_kv_heads, 8)


def test_attention_decode_errors():
    x = jnp.zeros((1, 2, CFG.d_model))
    params = Attention(CFG).init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match="mutable"):
        Attention(CFG, decode=True).apply({"params": params}, x)
    too_long = jnp.zeros((1, CFG.max_len + 1, CFG.d_model))
    with pytest.raises(ValueError, match="max_len"):
        Attention(CFG, decode=True).apply({"params": params}, too_long, mutable=["cache"])


def test_embed_lookup_and_tied_attend():
    emb = Embed(vocab_size=10, d_model=4)
    tokens = jnp.array([[1, 9, 0]])
    params = nn.meta.unbox(emb.init(jax.random.key(0), tokens))
    table = params["params"]["embedding"]
    np.testing.assert_array_equal(emb.apply(params, tokens), table[tokens])
    x = jax.random.normal(jax.random.key(1), (1, 3, 4))
    logits = emb.apply(params, x, method=Embed.attend)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, x @ table.T, rtol=1e-5, atol=1e-6)
