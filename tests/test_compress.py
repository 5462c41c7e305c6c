"""moejax.compress: routing statistics against a brute-force numpy reference, pruning and
merging exactness on constructed models, selection rules, and field-naming errors."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.compress import (
    LayerStats,
    expert_groups,
    kept_experts,
    match_hidden_units,
    merge_experts,
    permute_hidden_units,
    prune_experts,
    routing_stats,
)
from moejax.layers import ModelConfig, MoEConfig, Transformer
from moejax.layers.common import RMSNorm
from moejax.layers.transformer import scan_to_unrolled, unrolled_to_scan

D, V = 16, 32


def _cfg(*, scan, num_experts=4, top_k=2, first_dense=1, num_layers=3, **moe_kw):
    moe = MoEConfig(num_experts=num_experts, top_k=top_k, d_ff=8, **moe_kw)
    return ModelConfig(
        vocab_size=V,
        d_model=D,
        num_layers=num_layers,
        num_heads=2,
        num_kv_heads=1,
        d_ff=16,
        max_len=16,
        moe=moe,
        first_dense_layers=first_dense,
        scan_layers=scan,
    )


@functools.cache
def _init(cfg, seed=0):
    init = jax.jit(Transformer(cfg).init)
    variables = init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))
    return jax.tree.map(np.asarray, nn.meta.unbox(variables))


@functools.cache
def _forward(cfg):
    return jax.jit(lambda variables, tokens: Transformer(cfg).apply(variables, tokens)[0])


@functools.cache
def _ffn_inputs(cfg):
    """Jitted: the inputs of every layer's FFN, captured (unrolled cfg)."""

    def run(variables, tokens):
        _, state = Transformer(cfg).apply(
            variables,
            tokens,
            capture_intermediates=lambda mdl, _: (
                isinstance(mdl, RMSNorm) and mdl.name == "ffn_norm"
            ),
            mutable=["intermediates"],
        )
        return state["intermediates"]

    return jax.jit(run)


def _unrolled(cfg, variables):
    if not cfg.scan_layers:
        return dataclasses.replace(cfg, scan_layers=False), variables
    return dataclasses.replace(cfg, scan_layers=False), {
        col: scan_to_unrolled(cfg, tree) for col, tree in variables.items()
    }


def _to_layout(cfg, unrolled_vars):
    if not cfg.scan_layers:
        return unrolled_vars
    return {col: unrolled_to_scan(cfg, tree) for col, tree in unrolled_vars.items()}


def _moe_layers(cfg):
    return [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]


def _batches(n=2, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, V, (2, 8)).astype(np.int32) for _ in range(n)]


def _logits(cfg, variables, tokens):
    return np.asarray(_forward(cfg)(variables, jnp.asarray(tokens)))


def _set_bias(cfg, variables, bias_by_layer):
    """variables (cfg's layout) with moe_state expert_bias of MoE layer i = bias_by_layer[i]."""
    ucfg, uvars = _unrolled(cfg, variables)
    uvars = jax.tree.map(np.array, uvars)
    for i, bias in bias_by_layer.items():
        uvars["moe_state"][f"layers_{i}"]["moe"]["router"]["expert_bias"] = np.asarray(
            bias, np.float32
        )
    return _to_layout(cfg, uvars)


def _reference_stats(cfg, variables, batches):
    """Brute force on the unrolled model: capture each MoE layer's input, route in numpy, run
    every expert on every token."""
    ucfg, uvars = _unrolled(cfg, variables)
    moe = cfg.moe
    e, m, k = moe.num_experts, moe.num_null_experts, moe.top_k
    out = {i: {} for i in _moe_layers(cfg)}

    def add(i, name, value):
        out[i][name] = out[i].get(name, 0.0) + value

    for tokens in batches:
        _, state = Transformer(ucfg).apply(
            uvars,
            jnp.asarray(tokens),
            capture_intermediates=lambda mdl, _: (
                isinstance(mdl, RMSNorm) and mdl.name == "ffn_norm"
            ),
            mutable=["intermediates"],
        )
        for i in _moe_layers(cfg):
            x = np.asarray(state["intermediates"][f"layers_{i}"]["ffn_norm"]["__call__"][0])
            x = x.reshape(-1, D).astype(np.float64)
            t = x.shape[0]
            p = uvars["params"][f"layers_{i}"]["moe"]
            kernel = np.asarray(p["router"]["kernel"], np.float64)
            if m:
                kernel = np.concatenate([kernel, p["router"]["null_kernel"]], axis=1)
            logits = x @ kernel
            probs = np.exp(logits - logits.max(1, keepdims=True))
            probs /= probs.sum(1, keepdims=True)
            sel = probs.copy()
            if moe.use_expert_bias:
                bias = uvars["moe_state"][f"layers_{i}"]["moe"]["router"]["expert_bias"]
                sel[:, :e] += bias
            top = np.argsort(-sel, axis=1, kind="stable")[:, :k]
            w = np.where(top < e, np.take_along_axis(probs, top, 1), 0.0)
            denom = w.sum(1, keepdims=True)
            w = w / np.where(denom > 0, denom, 1.0)
            chosen = np.zeros((t, e + m))
            weights = np.zeros((t, e + m))
            np.put_along_axis(chosen, top, 1.0, 1)
            np.put_along_axis(weights, top, w, 1)
            chosen, weights = chosen[:, :e], weights[:, :e]
            ex = p["experts"]
            norms = np.zeros((t, e))
            for j in range(e):
                g = x @ ex["wi_gate"][j]
                h = g / (1.0 + np.exp(-g)) * (x @ ex["wi_up"][j])
                norms[:, j] = np.linalg.norm(h @ ex["wo"][j], axis=1)
            add(i, "tokens", t)
            add(i, "counts", chosen.sum(0))
            add(i, "coactivation", chosen.T @ chosen)
            add(i, "gram", logits[:, :e].T @ logits[:, :e])
            add(i, "norm_sum", (chosen * norms).sum(0))
            add(i, "weighted_norm_sum", (weights * norms).sum(0))
    return out


@pytest.mark.parametrize("scan, nulls", [(False, 0), (True, 1)])
def test_routing_stats_match_brute_force(scan, nulls):
    cfg = _cfg(scan=scan, use_expert_bias=True, num_null_experts=nulls)
    variables = _init(cfg)
    rng = np.random.default_rng(1)
    variables = _set_bias(cfg, variables, {i: rng.normal(0, 0.1, 4) for i in _moe_layers(cfg)})
    batches = _batches()
    stats = routing_stats(cfg, variables, batches)
    ref = _reference_stats(cfg, variables, batches)

    assert [s.layer for s in stats] == _moe_layers(cfg) == [1, 2]
    for s in stats:
        r = ref[s.layer]
        assert s.num_tokens == r["tokens"] == 32
        np.testing.assert_array_equal(s.counts_E, r["counts"])
        np.testing.assert_array_equal(s.coactivation_ExE, r["coactivation"])
        np.testing.assert_allclose(s.logit_gram_ExE, r["gram"], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(s.norm_sum_E, r["norm_sum"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(
            s.weighted_norm_sum_E, r["weighted_norm_sum"], rtol=1e-4, atol=1e-5
        )
        np.testing.assert_allclose(s.frequency.sum(), 1.0)
        np.testing.assert_allclose(np.diag(s.similarity), 1.0, rtol=1e-6)
        np.testing.assert_allclose(s.output_norm, r["norm_sum"] / np.maximum(r["counts"], 1), 1e-4)
    if nulls:  # null picks are no assignment: fewer than T * K real ones
        assert all(s.counts_E.sum() < 32 * 2 for s in stats)


def test_pruning_unrouted_experts_keeps_the_output():
    cfg = _cfg(scan=True, num_experts=6, use_expert_bias=True)
    variables = _init(cfg)
    # The bias steers selection only: a -1e3 bias means never chosen (norm_topk_prob=True, so
    # the kept experts' weights do not depend on the dropped ones).
    dead = {1: [1, 4], 2: [0, 5]}
    bias = {}
    for i, experts in dead.items():
        bias[i] = np.zeros(6)
        bias[i][experts] = -1e3
    variables = _set_bias(cfg, variables, bias)
    batches = _batches()
    stats = routing_stats(cfg, variables, batches)
    for s in stats:
        alive = np.setdiff1d(np.arange(6), dead[s.layer])
        assert (s.counts_E[dead[s.layer]] == 0).all() and (s.counts_E[alive] > 0).all()
        # EASY-EP's score: an expert with no tokens adds nothing to the output either.
        np.testing.assert_array_equal(kept_experts(s, 4, "output_norm", 1), alive)

    new_cfg, new_vars = prune_experts(cfg, variables, stats, 4, score="frequency")

    assert new_cfg.moe.num_experts == 4 and isinstance(new_cfg.moe, MoEConfig)
    _, old_u = _unrolled(cfg, variables)
    _, new_u = _unrolled(new_cfg, new_vars)
    for i, experts in dead.items():
        keep = np.setdiff1d(np.arange(6), experts)
        old_p, new_p = old_u["params"][f"layers_{i}"]["moe"], new_u["params"][f"layers_{i}"]["moe"]
        np.testing.assert_array_equal(new_p["router"]["kernel"], old_p["router"]["kernel"][:, keep])
        for name in ("wi_gate", "wi_up", "wo"):
            np.testing.assert_array_equal(new_p["experts"][name], old_p["experts"][name][keep])
        new_bias = new_u["moe_state"][f"layers_{i}"]["moe"]["router"]["expert_bias"]
        np.testing.assert_array_equal(new_bias, np.zeros(4))
    for tokens in batches:
        np.testing.assert_allclose(
            _logits(new_cfg, new_vars, tokens), _logits(cfg, variables, tokens), atol=1e-5
        )


def _hand_stats(counts, *, gram=None, weighted=None, layer=1):
    counts = np.asarray(counts, np.float64)
    e = len(counts)
    return LayerStats(
        layer=layer,
        num_tokens=100,
        counts_E=counts,
        coactivation_ExE=np.diag(counts),
        logit_gram_ExE=np.eye(e) if gram is None else gram,
        norm_sum_E=np.ones(e),
        weighted_norm_sum_E=np.ones(e) if weighted is None else np.asarray(weighted),
    )


def test_selection_rules():
    counts = [5, 1, 7, 0, 3, 2]
    s = _hand_stats(counts, weighted=[0.1, 5, 0.2, 3, 4, 1])
    np.testing.assert_array_equal(kept_experts(s, 4, "frequency", 1), [0, 2, 4, 5])
    np.testing.assert_array_equal(kept_experts(s, 4, "output_norm", 1), [1, 3, 4, 5])

    # STUN: 3 is a near-copy of 0 (less used: dropped), 5 of 2 (more used: 2 is dropped).
    rng = np.random.default_rng(0)
    cols = rng.normal(size=(20, 6))
    cols[:, 3] = cols[:, 0] + 1e-3 * rng.normal(size=20)
    cols[:, 5] = cols[:, 2] + 1e-3 * rng.normal(size=20)
    s = _hand_stats([5, 1, 2, 4, 3, 6], gram=cols.T @ cols)
    np.testing.assert_array_equal(kept_experts(s, 4, "similarity", 1), [0, 1, 4, 5])

    # Group-limited routing: each of the 2 groups keeps 2, though group 0 is the most used.
    s = _hand_stats([9, 8, 7, 6, 1, 2, 0, 3])
    np.testing.assert_array_equal(kept_experts(s, 4, "frequency", 2), [0, 1, 5, 7])

    # Merging: centres are the most used; members join the most similar centre.
    groups = expert_groups(_hand_stats([6, 5, 4, 1, 3, 2], gram=cols.T @ cols), 4, 1)
    assert [list(g) for g in groups] == [[0, 3], [1], [2, 5], [4]]
    # centres="output_norm": the centres are the largest gate-weighted norms (1, 3, 4, 5);
    # 0 and 2 join their most similar centre (3 is 0's near-copy, 5 is 2's).
    s = _hand_stats([6, 5, 4, 1, 3, 2], gram=cols.T @ cols, weighted=[0.1, 5, 0.2, 3, 4, 1])
    groups = expert_groups(s, 4, 1, centres="output_norm")
    assert [list(g) for g in groups] == [[1], [3, 0], [4], [5, 2]]
    with pytest.raises(ValueError, match="centres='usage' is invalid: allowed values are"):
        expert_groups(s, 4, 1, centres="usage")


@pytest.mark.parametrize("gated", [True, False])
def test_alignment_recovers_a_known_permutation(gated):
    rng = np.random.default_rng(0)
    ref = {"wi_up": rng.normal(size=(D, 8)), "wo": rng.normal(size=(8, D))}
    if gated:
        ref["wi_gate"] = rng.normal(size=(D, 8))
    perm = rng.permutation(8)
    other = permute_hidden_units(ref, perm)
    back = match_hidden_units(ref, other)
    np.testing.assert_array_equal(back, np.argsort(perm))
    for name, w in permute_hidden_units(other, back).items():
        np.testing.assert_array_equal(w, ref[name])


def test_merging_permuted_copies_recovers_the_model():
    # Top-1 with renormalised weights; experts 2, 3 are hidden-unit permutations of 0, 1 with
    # the same router columns, in every MoE layer.
    cfg = _cfg(scan=True, num_experts=4, top_k=1)
    variables = _init(cfg)
    ucfg, uvars = _unrolled(cfg, variables)
    uvars = jax.tree.map(np.array, uvars)
    rng = np.random.default_rng(0)
    for i in _moe_layers(cfg):
        p = uvars["params"][f"layers_{i}"]["moe"]
        p["router"]["kernel"][:, 2:] = p["router"]["kernel"][:, :2]
        for j in (0, 1):
            copy = permute_hidden_units(
                {n: p["experts"][n][j] for n in ("wi_gate", "wi_up", "wo")}, rng.permutation(8)
            )
            for n, w in copy.items():
                p["experts"][n][j + 2] = w
    variables = _to_layout(cfg, uvars)
    batches = _batches()
    stats = routing_stats(cfg, variables, batches)
    # Ties go to the lower index, so the copies get no tokens; equal usage makes the merge
    # average each pair half and half, which is exact only if the alignment undoes the
    # permutation.
    assert all((s.counts_E[2:] == 0).all() for s in stats)
    stats = [dataclasses.replace(s, counts_E=np.ones(4)) for s in stats]
    assert [list(g) for g in expert_groups(stats[0], 2, 1)] == [[0, 2], [1, 3]]

    new_cfg, new_vars = merge_experts(cfg, variables, stats, 2)

    assert new_cfg.moe.num_experts == 2
    assert new_vars["params"]["moe_layers"]["moe"]["experts"]["wo"].shape == (2, 2, 8, D)
    for tokens in batches:
        np.testing.assert_allclose(
            _logits(new_cfg, new_vars, tokens), _logits(cfg, variables, tokens), atol=1e-5
        )
    # Plain averaging (the ablation) mixes unaligned hidden units: the model changes.
    _, plain = merge_experts(cfg, variables, stats, 2, align=False)
    gap = np.abs(_logits(new_cfg, plain, batches[0]) - _logits(cfg, variables, batches[0]))
    assert gap.max() > 1e-2


def test_random_pruning_is_a_seeded_subset():
    s = _hand_stats([5, 1, 7, 0, 3, 2], layer=3)
    kept = kept_experts(s, 4, "random", 1)
    assert len(set(kept.tolist())) == 4 and kept.tolist() == sorted(kept.tolist())
    np.testing.assert_array_equal(kept, kept_experts(s, 4, "random", 1))  # deterministic
    others = {tuple(kept_experts(_hand_stats([1] * 6, layer=i), 4, "random", 1)) for i in range(8)}
    assert len(others) > 1  # each layer its own draw


def test_compressed_models_run():
    cfg = _cfg(scan=False, num_experts=4, top_k=2, use_expert_bias=True, first_dense=0)
    variables = _init(cfg)
    batches = _batches(1)
    stats = routing_stats(cfg, variables, batches)
    assert [s.layer for s in stats] == [0, 1, 2]
    for new_cfg, new_vars in (
        merge_experts(cfg, variables, stats, 2),
        prune_experts(cfg, variables, stats, 2, score="similarity"),
    ):
        assert new_cfg.moe.num_experts == 2
        assert new_vars["moe_state"]["layers_0"]["moe"]["router"]["expert_bias"].shape == (2,)
        assert new_vars["params"]["layers_1"]["moe"]["router"]["kernel"].shape == (D, 2)
        logits = _logits(new_cfg, new_vars, batches[0])
        assert logits.shape == (2, 8, V) and np.isfinite(logits).all()


def test_errors_name_the_field():
    cfg = _cfg(scan=True, num_experts=4, top_k=2)
    stats = [_hand_stats([1, 2, 3, 4], layer=i) for i in (1, 2)]
    for compress in (prune_experts, merge_experts):
        with pytest.raises(ValueError, match="MoEConfig.top_k"):
            compress(cfg, {}, stats, 1)
        with pytest.raises(ValueError, match="num_experts"):
            compress(cfg, {}, stats, 5)
        with pytest.raises(ValueError, match="num_experts"):
            compress(cfg, {}, stats, 0)
        with pytest.raises(ValueError, match="stats"):
            compress(cfg, {}, stats[:1], 2)
    with pytest.raises(ValueError, match="score"):
        prune_experts(cfg, {}, stats, 2, score="bogus")
    grouped = _cfg(scan=True, num_experts=4, top_k=2, n_groups=2, topk_groups=2)
    with pytest.raises(ValueError, match="MoEConfig.n_groups"):
        prune_experts(grouped, {}, stats, 3)
    with pytest.raises(ValueError, match="batches"):
        routing_stats(cfg, {}, [])
