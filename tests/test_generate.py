"""KV-cache decoding and generation: cache vs full forward, greedy vs recompute, top-p sampling,
batches of prompts of different lengths (left padding) and eos stopping."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.generate import Generation, _next_token, generate, left_pad, top_p_filter
from moejax.layers import ModelConfig, MoEConfig, Transformer

MOE_CFG = ModelConfig(
    vocab_size=64, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, d_ff=48, max_len=16,
    moe=MoEConfig(num_experts=4, top_k=2, d_ff=16, dispatch="dropless"), first_dense_layers=1,
    qk_norm="head",
)  # fmt: skip
DENSE_CFG = dataclasses.replace(
    MOE_CFG, moe=None, scan_layers=False, qk_norm="full", qkv_bias=True, tie_embeddings=True
)
MLA_CFG = dataclasses.replace(
    MOE_CFG, attention="mla", num_kv_heads=4, qk_norm="none", q_lora_rank=None, kv_lora_rank=8,
    qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=6,
)  # fmt: skip
CFGS = pytest.mark.parametrize(
    "cfg", [MOE_CFG, DENSE_CFG, MLA_CFG], ids=["moe-scan", "dense-unrolled-tied", "mla-moe"]
)
PROMPT = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(2, 4)), jnp.int32)


@functools.cache
def init(cfg):
    tokens = jnp.zeros((2, cfg.max_len), jnp.int32)
    return nn.meta.unbox(jax.jit(Transformer(cfg).init)(jax.random.key(0), tokens))


@functools.cache
def forward(cfg):
    return jax.jit(Transformer(cfg).apply)


@functools.cache
def greedy(cfg, n):
    return generate(cfg, init(cfg), PROMPT, max_new_tokens=n)


@pytest.mark.parametrize("cfg", [MOE_CFG, DENSE_CFG], ids=["moe-scan", "dense-unrolled-tied"])
def test_decode_with_cache_equals_full_forward(cfg):
    variables = init(cfg)
    # Same shape as the greedy test's recompute: one shared forward compile.
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, size=(2, 11)), jnp.int32)
    full, _ = forward(cfg)(variables, tokens)

    @jax.jit
    def step(cache, chunk):
        (logits, _), mutated = Transformer(cfg).apply(
            {**variables, **cache}, chunk, decode=True, mutable=["cache"]
        )
        return logits, mutated

    # Prefill 3 tokens (creates the cache), then one token at a time.
    logits, cache = step({}, tokens[:, :3])
    outs = [logits]
    for t in range(3, 11):
        logits, cache = step(cache, tokens[:, t : t + 1])
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-4, atol=1e-4)
    index = jax.tree.leaves({k: v for k, v in cache["cache"].items()})
    assert any(a.dtype == jnp.int32 and bool((a == 11).all()) for a in index)


@pytest.mark.parametrize("cfg", [MOE_CFG, DENSE_CFG], ids=["moe-scan", "dense-unrolled-tied"])
def test_greedy_generation_equals_argmax_recompute(cfg):
    n = 7
    out = greedy(cfg, n)
    assert out.shape == (2, 4 + n) and out.dtype == jnp.int32
    np.testing.assert_array_equal(out[:, :4], PROMPT)

    # No cache: rerun the whole (right-padded) sequence and take the argmax after position t - 1;
    # causal attention makes the padding invisible, and one fixed shape means one compile.
    seq = jnp.zeros((2, 4 + n), jnp.int32).at[:, :4].set(PROMPT)
    for t in range(4, 4 + n):
        logits, _ = forward(cfg)(init(cfg), seq)
        seq = seq.at[:, t].set(jnp.argmax(logits[:, t - 1], axis=-1))
    np.testing.assert_array_equal(out, seq)


def test_tiny_top_p_sampling_equals_greedy():
    cfg = MOE_CFG
    sampled = generate(
        cfg, init(cfg), PROMPT, max_new_tokens=7, temperature=0.7, top_p=1e-6, rng=jax.random.key(3)
    )
    np.testing.assert_array_equal(sampled, greedy(cfg, 7))


def test_sampling_is_reproducible_and_uses_the_rng():
    cfg = MOE_CFG
    kwargs = dict(max_new_tokens=7, temperature=2.0, top_p=1.0)
    a = generate(cfg, init(cfg), PROMPT, rng=jax.random.key(5), **kwargs)
    b = generate(cfg, init(cfg), PROMPT, rng=jax.random.key(5), **kwargs)
    c = generate(cfg, init(cfg), PROMPT, rng=jax.random.key(6), **kwargs)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)  # 14 tokens at T=2 over 64 ids: a clash is ~impossible
    assert int(a.min()) >= 0 and int(a.max()) < cfg.vocab_size


def np_top_p(logits, top_p):
    """Reference nucleus filter: sort descending, keep tokens until the mass reaches top_p."""
    out = np.full_like(logits, -np.inf)
    for row, lg in enumerate(logits):
        order = np.argsort(-lg, kind="stable")
        probs = np.exp(lg[order] - lg.max())
        probs /= probs.sum()
        mass = 0.0
        for idx, p in zip(order, probs, strict=True):
            if mass >= top_p:
                break
            out[row, idx] = lg[idx]
            mass += p
    return out


@pytest.mark.parametrize("top_p", [1e-6, 0.3, 0.9, 1.0])
def test_top_p_filter_matches_reference(top_p):
    logits = np.random.default_rng(2).normal(size=(4, 10)).astype(np.float32) * 2
    got = jax.jit(top_p_filter)(jnp.asarray(logits), jnp.float32(top_p))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(np_top_p(logits, top_p)))
    np.testing.assert_array_equal(np.where(np.isfinite(got), got, 0), np.where(
        np.isfinite(got), logits, 0))  # fmt: skip
    assert bool(jnp.isfinite(got).any(axis=-1).all())


def test_sampled_frequencies_follow_the_renormalised_nucleus():
    logits = jnp.log(jnp.array([0.5, 0.25, 0.15, 0.07, 0.03]))
    n = 20000
    draws = jax.jit(_next_token, static_argnames="greedy")(
        jnp.broadcast_to(logits, (n, 5)), jax.random.key(0), 1.0, 0.8, greedy=False
    )
    freq = np.bincount(np.asarray(draws), minlength=5) / n
    # top_p=0.8 keeps {0.5, 0.25, 0.15} (mass before the third is 0.75 < 0.8), renormalised.
    want = np.array([0.5, 0.25, 0.15, 0.0, 0.0]) / 0.9
    np.testing.assert_allclose(freq, want, atol=0.015)


def test_zero_and_one_new_tokens():
    cfg = DENSE_CFG
    np.testing.assert_array_equal(generate(cfg, init(cfg), PROMPT, max_new_tokens=0), PROMPT)
    one = generate(cfg, init(cfg), PROMPT, max_new_tokens=1)
    np.testing.assert_array_equal(one, greedy(cfg, 7)[:, :5])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(max_new_tokens=13), "max_len"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(max_new_tokens=2.0), "max_new_tokens"),
        (dict(max_new_tokens=2, top_p=0.0), "top_p"),
        (dict(max_new_tokens=2, top_p=1.5), "top_p"),
        (dict(max_new_tokens=2, temperature=-1.0), "temperature"),
        (dict(max_new_tokens=2, temperature=1.0), "rng"),
        (dict(max_new_tokens=2, prompt=jnp.zeros((4,), jnp.int32)), "prompts"),
        (dict(max_new_tokens=2, prompt=jnp.zeros((2, 0), jnp.int32)), "prompts"),
        (dict(max_new_tokens=2, prompt=jnp.full((2, 3), 64, jnp.int32)), "vocab_size"),
        (dict(max_new_tokens=2, variables={}), "params"),
    ],
)
def test_generate_rejects_bad_arguments(kwargs, match):
    prompt = kwargs.pop("prompt", PROMPT)
    variables = kwargs.pop("variables", {"params": {}})
    with pytest.raises(ValueError, match=match):
        generate(DENSE_CFG, variables, prompt, **kwargs)


# Mixed lengths 3, 7, 5: P = 7 and P + N = 13 <= max_len = 16.
MIXED = [np.random.default_rng(4).integers(0, 64, size=n).astype(np.int32) for n in (3, 7, 5)]
N_MIXED = 6


@functools.cache
def greedy_mixed(cfg):
    return generate(cfg, init(cfg), MIXED, max_new_tokens=N_MIXED)


def test_left_pad_layout():
    tokens, segment_ids, positions = left_pad([[7, 8], [1, 2, 3, 4], np.array([9])], pad_id=5)
    np.testing.assert_array_equal(tokens, [[5, 5, 7, 8], [1, 2, 3, 4], [5, 5, 5, 9]])
    np.testing.assert_array_equal(segment_ids, [[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    np.testing.assert_array_equal(positions, [[0, 0, 0, 1], [0, 1, 2, 3], [0, 0, 0, 0]])
    assert tokens.dtype == segment_ids.dtype == positions.dtype == np.int32


@CFGS
def test_left_padded_prefill_logits_equal_unpadded_forward(cfg):
    variables = init(cfg)
    tokens, segment_ids, positions = left_pad(MIXED, pad_id=11)
    (logits, _), _ = jax.jit(
        functools.partial(Transformer(cfg).apply, decode=True, mutable=["cache"])
    )(variables, tokens, positions=positions, segment_ids=segment_ids)
    # The unpadded forward of every prompt in one call: right-padded, positions from 0 and no
    # segment ids; causal attention (and dropless routing) keep the padding out of the prefix.
    p = tokens.shape[1]
    right = np.zeros_like(tokens)
    for b, prompt in enumerate(MIXED):
        right[b, : len(prompt)] = prompt
    alone, _ = forward(cfg)(variables, right)
    for b, prompt in enumerate(MIXED):
        n = len(prompt)
        np.testing.assert_allclose(logits[b, p - n :], alone[b, :n], rtol=1e-5, atol=1e-5)


@CFGS
@pytest.mark.parametrize("row", range(len(MIXED)))
def test_greedy_mixed_lengths_equal_each_prompt_alone(cfg, row):
    out = greedy_mixed(cfg)  # one batched run per config, shared by the rows
    assert isinstance(out, Generation)
    p = max(len(prompt) for prompt in MIXED)
    assert out.tokens_BxT.shape == (3, p + N_MIXED) and out.tokens_BxT.dtype == jnp.int32
    np.testing.assert_array_equal(out.prompt_lengths_B, [3, 7, 5])
    np.testing.assert_array_equal(out.new_lengths_B, [N_MIXED] * 3)
    prompt = MIXED[row]
    alone = generate(cfg, init(cfg), jnp.asarray(prompt)[None], max_new_tokens=N_MIXED)[0]
    np.testing.assert_array_equal(out.sequences()[row], alone)
    np.testing.assert_array_equal(out.tokens_BxT[row, : p - len(prompt)], 0)  # pad_id
    np.testing.assert_array_equal(out.tokens_BxT[row, p:], alone[len(prompt) :])


def test_eos_stops_a_row_and_fills_with_eos():
    cfg = MOE_CFG
    free = np.asarray(greedy_mixed(cfg).tokens_BxT)
    p = free.shape[1] - N_MIXED
    new = free[:, p:]
    # An eos that the free run first produces mid-continuation (k >= 1) of some row, so the
    # test sees a row stop early and the fill after it.
    eos = next(
        int(new[b, k]) for b in range(3) for k in range(1, N_MIXED) if new[b, k] not in new[b, :k]
    )
    out = generate(cfg, init(cfg), MIXED, max_new_tokens=N_MIXED, eos_id=eos)
    got = np.asarray(out.tokens_BxT)
    np.testing.assert_array_equal(got[:, :p], free[:, :p])
    stopped = 0
    for b in range(3):
        hits = np.flatnonzero(new[b] == eos)
        length = int(hits[0]) + 1 if hits.size else N_MIXED
        assert int(out.new_lengths_B[b]) == length
        np.testing.assert_array_equal(got[b, p : p + length], new[b, :length])
        np.testing.assert_array_equal(got[b, p + length :], eos)
        np.testing.assert_array_equal(out.sequences()[b][-length:], new[b, :length])
        stopped += length < N_MIXED
    assert stopped >= 1

    # An equal-length array with eos_id also returns a Generation (prompt lengths = P).
    arr = generate(cfg, init(cfg), PROMPT, max_new_tokens=7, eos_id=eos)
    assert isinstance(arr, Generation)
    np.testing.assert_array_equal(arr.prompt_lengths_B, [4, 4])
    plain = np.asarray(greedy(cfg, 7))
    for b in range(2):
        length = int(arr.new_lengths_B[b])
        np.testing.assert_array_equal(arr.tokens_BxT[b, : 4 + length], plain[b, : 4 + length])
        assert length == N_MIXED + 1 or plain[b, 3 + length] == eos


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(prompts=[]), "prompts"),
        (dict(prompts=[[1, 2], []]), r"prompts\[1\]"),
        (dict(prompts=[[1, 2], [[3]]]), r"prompts\[1\]"),
        (dict(prompts=[[1, 2], [0.5]]), r"prompts\[1\]"),
        (dict(prompts=[[1, 2], [3] * 11]), "max_len"),
        (dict(prompts=[[1, 2], [64]]), "vocab_size"),
        (dict(prompts=[[1, 2], [-1]]), "vocab_size"),
        (dict(prompts=[[1, 2]], pad_id=64), "pad_id"),
        (dict(eos_id=64), "eos_id"),
        (dict(eos_id=True), "eos_id"),
        (dict(eos_id=1.0), "eos_id"),
    ],
)
def test_generate_rejects_bad_batched_arguments(kwargs, match):
    prompts = kwargs.pop("prompts", MIXED)
    with pytest.raises(ValueError, match=match):
        generate(DENSE_CFG, {"params": {}}, prompts, max_new_tokens=6, **kwargs)


def test_zero_new_tokens_with_mixed_lengths():
    out = generate(DENSE_CFG, {"params": {}}, MIXED, max_new_tokens=0)
    np.testing.assert_array_equal(out.tokens_BxT, left_pad(MIXED)[0])
    np.testing.assert_array_equal(out.new_lengths_B, [0, 0, 0])
    for got, want in zip(out.sequences(), MIXED, strict=True):
        np.testing.assert_array_equal(got, want)
