"""The Router module (top-k, expert choice, random) and update_expert_bias against plain numpy
and jnp references.

Legend: T tokens, D model width, E experts, K experts per token, G groups, S experts per group,
C capacity.
"""

import dataclasses
import itertools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from moejax.layers import MoEConfig, Router, load_balance_loss, update_expert_bias

T, D, E = 24, 16, 8


def _data(seed, t=T, d=D, e=E):
    rng = np.random.default_rng(seed)
    x_TxD = rng.standard_normal((t, d)).astype(np.float32)
    w_DxE = (rng.standard_normal((d, e)) / np.sqrt(d)).astype(np.float32)
    return x_TxD, w_DxE


def _variables(w_DxE, bias_E=None):
    variables = {"params": {"kernel": jnp.asarray(w_DxE)}}
    if bias_E is not None:
        variables["moe_state"] = {"expert_bias": jnp.asarray(bias_E, jnp.float32)}
    return variables


def _np_scores(logits, score_func):
    if score_func == "softmax":
        z = np.exp(logits - logits.max(-1, keepdims=True))
        return z / z.sum(-1, keepdims=True)
    return 1.0 / (1.0 + np.exp(-logits))


def _np_allowed_groups(sel_TxE, n_groups, topk_groups):
    """Brute force: try every set of topk_groups groups, keep the one with the best total score."""
    t, e = sel_TxE.shape
    s = e // n_groups
    allowed = np.zeros((t, e), bool)
    for i in range(t):
        group_score = [
            np.sort(sel_TxE[i, g * s : (g + 1) * s])[::-1][:2].sum() for g in range(n_groups)
        ]
        best = max(
            itertools.combinations(range(n_groups), topk_groups),
            key=lambda c: sum(group_score[g] for g in c),
        )
        for g in best:
            allowed[i, g * s : (g + 1) * s] = True
    return allowed


def np_topk_router(x_TxD, w_DxE, cfg, bias_E=None):
    """Float64 numpy token-choice router: (weights, indices, probs, logits)."""
    logits = np.asarray(x_TxD, np.float64) @ np.asarray(w_DxE, np.float64)
    probs = _np_scores(logits, cfg.score_func)
    sel = probs + (0.0 if bias_E is None else np.asarray(bias_E, np.float64))
    allowed = np.ones_like(sel, bool)
    if cfg.n_groups > 1:
        allowed = _np_allowed_groups(sel, cfg.n_groups, cfg.topk_groups)
    indices = np.stack(
        [
            sorted(np.flatnonzero(allowed[i]), key=lambda e: -sel[i, e])[: cfg.top_k]
            for i in range(len(sel))
        ]
    )
    weights = np.take_along_axis(probs, indices, axis=-1)
    if cfg.norm_topk_prob:
        weights = weights / (
            weights.sum(-1, keepdims=True) + (1e-20 if cfg.score_func == "sigmoid" else 0.0)
        )
    return weights * cfg.routed_scaling_factor, indices, probs, logits


def jnp_weights_given_indices(w_DxE, x_TxD, indices_TxK, cfg):
    """Plain-jnp differentiable path for fixed selections: (weights, probs)."""
    logits = x_TxD.astype(jnp.float32) @ w_DxE.astype(jnp.float32)
    if cfg.score_func == "softmax":
        probs = jnp.exp(logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
    else:
        probs = 1.0 / (1.0 + jnp.exp(-logits))
    weights = jnp.take_along_axis(probs, indices_TxK, axis=-1)
    if cfg.norm_topk_prob:
        weights = weights / (
            weights.sum(-1, keepdims=True) + (1e-20 if cfg.score_func == "sigmoid" else 0.0)
        )
    return weights * cfg.routed_scaling_factor, probs


CASES = [
    dict(score_func="softmax"),
    dict(score_func="softmax", norm_topk_prob=False),
    dict(score_func="softmax", top_k=3, routed_scaling_factor=2.5),
    dict(score_func="sigmoid"),
    dict(score_func="sigmoid", norm_topk_prob=False, routed_scaling_factor=2.5),
    dict(score_func="sigmoid", n_groups=4, topk_groups=2, top_k=3, routed_scaling_factor=2.5),
    dict(score_func="softmax", n_groups=2, topk_groups=1, top_k=2),
    dict(score_func="sigmoid", n_groups=8, topk_groups=3, top_k=3),  # groups of one expert
    dict(score_func="sigmoid", use_expert_bias=True, n_groups=4, topk_groups=2, top_k=4),
    dict(score_func="softmax", use_expert_bias=True),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_topk_forward_matches_numpy(kw):
    cfg = MoEConfig(num_experts=E, **kw)
    x, w = _data(0)
    bias = None
    if cfg.use_expert_bias:
        # Large enough to change many selections relative to the unbiased scores.
        bias = np.random.default_rng(1).uniform(-0.3, 0.3, E).astype(np.float32)
    out = Router(cfg).apply(_variables(w, bias), jnp.asarray(x), deterministic=True)
    ref_w, ref_i, ref_p, ref_l = np_topk_router(x, w, cfg, bias)
    assert out.weights.dtype == jnp.float32 and out.probs.dtype == jnp.float32
    assert out.indices.dtype == jnp.int32 and out.logits.dtype == jnp.float32
    assert out.weights.shape == (T, cfg.top_k) and out.probs.shape == (T, E)
    np.testing.assert_allclose(out.logits, ref_l, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.probs, ref_p, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out.indices, ref_i)
    np.testing.assert_allclose(out.weights, ref_w, rtol=1e-5, atol=1e-6)
    if cfg.norm_topk_prob:
        np.testing.assert_allclose(out.weights.sum(-1), cfg.routed_scaling_factor, rtol=1e-5)
    if cfg.use_expert_bias:
        unbiased = np_topk_router(x, w, cfg)[1]
        assert (np.sort(unbiased, -1) != np.sort(np.asarray(out.indices), -1)).any()


@pytest.mark.parametrize("n_groups,topk_groups,top_k", [(4, 1, 2), (4, 2, 3), (8, 2, 2), (2, 1, 4)])
def test_group_limited_selects_only_kept_groups(n_groups, topk_groups, top_k):
    cfg = MoEConfig(
        num_experts=E, top_k=top_k, n_groups=n_groups, topk_groups=topk_groups, score_func="sigmoid"
    )
    x, w = _data(2, t=64)
    out = Router(cfg).apply(_variables(w), jnp.asarray(x), deterministic=True)
    logits = x.astype(np.float64) @ w.astype(np.float64)
    allowed = _np_allowed_groups(_np_scores(logits, "sigmoid"), n_groups, topk_groups)
    idx = np.asarray(out.indices)
    assert np.take_along_axis(allowed, idx, axis=-1).all()
    # Each token's experts lie within at most topk_groups groups.
    s = E // n_groups
    assert max(len(set(row // s)) for row in idx) <= topk_groups
    free = np.argsort(-_np_scores(logits, "sigmoid"), axis=-1)[:, :top_k]
    if s == 1:
        # Groups of one expert: the best groups are the best experts, the limit changes nothing.
        np.testing.assert_array_equal(idx, free)
    else:
        # The limit binds: unrestricted top-k would have picked outside the kept groups.
        assert not np.take_along_axis(allowed, free, axis=-1).all()


@pytest.mark.parametrize(
    "kw",
    [
        dict(score_func="softmax"),
        dict(score_func="softmax", norm_topk_prob=False),
        dict(score_func="sigmoid", routed_scaling_factor=2.5),
        dict(score_func="sigmoid", norm_topk_prob=False),
        dict(score_func="sigmoid", n_groups=4, topk_groups=2, top_k=3, use_expert_bias=True),
    ],
    ids=str,
)
def test_topk_gradients_match_reference(kw):
    cfg = MoEConfig(num_experts=E, **kw)
    x, w = _data(3, t=12)
    bias = np.linspace(-0.1, 0.1, E).astype(np.float32) if cfg.use_expert_bias else None
    rng = np.random.default_rng(4)
    c_w = jnp.asarray(rng.standard_normal((12, cfg.top_k)), jnp.float32)
    c_p = jnp.asarray(rng.standard_normal((12, E)), jnp.float32)
    c_l = jnp.asarray(rng.standard_normal((12, E)), jnp.float32)
    router = Router(cfg)
    indices = router.apply(_variables(w, bias), jnp.asarray(x), deterministic=True).indices

    def loss(w_DxE, x_TxD):
        out = router.apply(_variables(w_DxE, bias), x_TxD, deterministic=True)
        return (
            jnp.sum(out.weights * c_w) + jnp.sum(out.probs * c_p) + 0.1 * jnp.sum(out.logits * c_l)
        )

    def ref_loss(w_DxE, x_TxD):
        weights, probs = jnp_weights_given_indices(w_DxE, x_TxD, indices, cfg)
        logits = x_TxD @ w_DxE
        return jnp.sum(weights * c_w) + jnp.sum(probs * c_p) + 0.1 * jnp.sum(logits * c_l)

    args = (jnp.asarray(w), jnp.asarray(x))
    np.testing.assert_allclose(loss(*args), ref_loss(*args), rtol=1e-5)
    grads = jax.grad(loss, argnums=(0, 1))(*args)
    ref_grads = jax.grad(ref_loss, argnums=(0, 1))(*args)
    for g, r in zip(grads, ref_grads, strict=True):
        assert np.isfinite(g).all()
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
    # Finite differences on the real module: selection is piecewise constant, so small steps
    # measure the gradient of the gathered weights.
    check_grads(jax.jit(loss), args, order=1, modes=("rev",), eps=1e-3, atol=2e-2, rtol=2e-2)


def test_bias_shifts_selection_not_weights():
    cfg = MoEConfig(num_experts=E, top_k=2, use_expert_bias=True, score_func="sigmoid")
    x, w = _data(5)
    bias = np.zeros(E, np.float32)
    bias[5] = 10.0  # dominates every sigmoid score: expert 5 is always chosen first
    router = Router(cfg)
    out = router.apply(_variables(w, bias), jnp.asarray(x), deterministic=True)
    plain = router.apply(_variables(w, np.zeros(E)), jnp.asarray(x), deterministic=True)
    assert (np.asarray(out.indices[:, 0]) == 5).all()
    assert (np.asarray(plain.indices[:, 0]) != 5).any()
    np.testing.assert_array_equal(out.probs, plain.probs)
    np.testing.assert_array_equal(out.logits, plain.logits)
    # Weights are the unbiased scores of the selected experts, renormalised.
    sel = np.take_along_axis(np.asarray(out.probs), np.asarray(out.indices), axis=-1)
    np.testing.assert_allclose(out.weights, sel / sel.sum(-1, keepdims=True), rtol=1e-6)
    assert np.asarray(out.weights).max() < 1.0


def test_expert_bias_and_load_variables():
    cfg = MoEConfig(num_experts=E, top_k=2, use_expert_bias=True)
    x, _ = _data(6)
    router = Router(cfg)
    variables = router.init(jax.random.key(0), jnp.asarray(x), deterministic=True)
    assert set(variables) == {"params", "moe_state"}  # no moe_stats written at init
    assert variables["params"]["kernel"].names == ("embed", "unmodeled")
    np.testing.assert_array_equal(variables["moe_state"]["expert_bias"], np.zeros(E))
    assert variables["moe_state"]["expert_bias"].dtype == jnp.float32
    out, stats = router.apply(variables, jnp.asarray(x), deterministic=True, mutable=["moe_stats"])
    load = np.bincount(np.asarray(out.indices).ravel(), minlength=E) / (T * 2)
    np.testing.assert_allclose(stats["moe_stats"]["expert_load"], load, rtol=1e-6)
    # Not mutable: nothing stored, and apply returns the bare output.
    assert router.apply(variables, jnp.asarray(x), deterministic=True).indices.shape == (T, 2)
    no_bias = Router(MoEConfig(num_experts=E)).init(
        jax.random.key(0), jnp.asarray(x), deterministic=True
    )
    assert set(no_bias) == {"params"}


def test_update_expert_bias_is_exact_and_treewise():
    load_E = jnp.array([0.25, 0.125, 0.125, 0.0, 0.5, 0.0, 0.0, 0.0])  # mean 0.125
    stacked_LxE = jnp.array([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.0, 0.1, 0.2, 0.7]])
    state = {
        "layer_0": {"moe": {"router": {"expert_bias": jnp.full((8,), 0.5)}}},
        "layers": {"moe": {"router": {"expert_bias": jnp.zeros((3, 4))}}},
    }
    stats = {
        "layer_0": {"moe": {"router": {"expert_load": load_E}}},
        "layers": {"moe": {"router": {"expert_load": stacked_LxE}}},
    }
    rate = 0.01
    new = update_expert_bias(flax.core.freeze(state), stats, rate)
    assert isinstance(new, flax.core.FrozenDict)
    expected_E = 0.5 + rate * np.array([-1, 0, 0, 1, -1, 1, 1, 1])
    np.testing.assert_array_equal(
        new["layer_0"]["moe"]["router"]["expert_bias"], expected_E.astype(np.float32)
    )
    expected_LxE = rate * np.array([[-1, -1, 1, 1], [0, 0, 0, 0], [1, 1, 1, -1]], np.float32)
    np.testing.assert_array_equal(new["layers"]["moe"]["router"]["expert_bias"], expected_LxE)
    # Pure: the input is untouched.
    np.testing.assert_array_equal(state["layers"]["moe"]["router"]["expert_bias"], 0.0)
    # jit-able with a traced rate.
    jitted = jax.jit(update_expert_bias)(state, stats, jnp.float32(rate))
    np.testing.assert_array_equal(jitted["layers"]["moe"]["router"]["expert_bias"], expected_LxE)


def test_update_expert_bias_bad_trees():
    state = {"router": {"expert_bias": jnp.zeros(4)}}
    with pytest.raises(ValueError, match="router/expert_load"):
        update_expert_bias(state, {"router": {}}, 0.1)
    with pytest.raises(ValueError, match="moe_stats has no entry at router"):
        update_expert_bias(state, {}, 0.1)
    with pytest.raises(ValueError, match="shape"):
        update_expert_bias(state, {"router": {"expert_load": jnp.zeros(5)}}, 0.1)


def test_bias_updates_move_load_toward_balance():
    cfg = MoEConfig(num_experts=E, top_k=2, use_expert_bias=True, score_func="sigmoid")
    rng = np.random.default_rng(7)
    x = rng.standard_normal((256, D)).astype(np.float32)
    x[:, 0] = 1.0  # constant feature: row 0 of the kernel is a per-expert logit offset
    w = (0.3 * rng.standard_normal((D, E))).astype(np.float32)
    w[0] = np.linspace(2.0, -2.0, E)  # strongly prefers the low-numbered experts
    router = Router(cfg)

    @jax.jit
    def step(state, _):
        variables = {"params": {"kernel": jnp.asarray(w)}, "moe_state": state}
        _, stats = router.apply(
            variables, jnp.asarray(x), deterministic=True, mutable=["moe_stats"]
        )
        return update_expert_bias(state, stats["moe_stats"], 0.02), stats["moe_stats"][
            "expert_load"
        ]

    state = {"expert_bias": jnp.zeros(E)}
    state, loads = jax.lax.scan(step, state, None, length=150)
    loads = np.asarray(loads)
    first, last = loads[0], loads[-10:].mean(0)
    assert first.max() > 2.5 / E and first.min() == 0.0
    assert last.max() < 1.35 / E and last.min() > 0.7 / E
    # Underloaded experts ended with the higher bias.
    assert np.asarray(state["expert_bias"])[-1] > np.asarray(state["expert_bias"])[0]


def test_jitter_train_only_and_needs_rng():
    eps = 0.2
    cfg = MoEConfig(num_experts=4, top_k=1, jitter_eps=eps)
    x = jnp.asarray(np.random.default_rng(8).uniform(0.5, 1.5, (32, 4)), jnp.float32)
    variables = _variables(np.eye(4, dtype=np.float32))  # logits == jittered x
    router = Router(cfg)
    det = router.apply(variables, x, deterministic=True)  # no rng needed
    np.testing.assert_array_equal(det.logits, x)
    with pytest.raises(ValueError, match="'jitter'"):
        router.apply(variables, x, deterministic=False)
    a = router.apply(variables, x, deterministic=False, rngs={"jitter": jax.random.key(0)})
    b = router.apply(variables, x, deterministic=False, rngs={"jitter": jax.random.key(1)})
    ratio = np.asarray(a.logits) / np.asarray(x)
    assert ratio.min() >= 1 - eps - 1e-6 and ratio.max() <= 1 + eps + 1e-6
    assert ratio.std() > eps / 4  # spread over the interval, not a no-op
    assert not np.array_equal(a.logits, b.logits)
    # eps = 0 needs no rng even in train mode.
    plain = Router(MoEConfig(num_experts=4, top_k=1))
    np.testing.assert_array_equal(plain.apply(variables, x, deterministic=False).logits, x)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_top_k_equals_num_experts(score_func):
    cfg = MoEConfig(num_experts=E, top_k=E, score_func=score_func, norm_topk_prob=False)
    x, w = _data(9)
    out = Router(cfg).apply(_variables(w), jnp.asarray(x), deterministic=True)
    idx = np.asarray(out.indices)
    np.testing.assert_array_equal(np.sort(idx, -1), np.broadcast_to(np.arange(E), (T, E)))
    np.testing.assert_allclose(out.weights, -np.sort(-np.asarray(out.probs), -1), rtol=1e-6)
    ref = np_topk_router(x, w, cfg)
    np.testing.assert_allclose(out.weights, ref[0], rtol=1e-5)


def _skewed(seed, offsets):
    x, w = _data(seed)
    x[:, 0] = 1.0
    w[0] = offsets
    return x, w


def test_expert_that_receives_no_token():
    offsets = np.zeros(E, np.float32)
    offsets[3] = -30.0
    x, w = _skewed(10, offsets)
    cfg = MoEConfig(num_experts=E, top_k=2)
    router = Router(cfg)
    out, stats = router.apply(
        _variables(w), jnp.asarray(x), deterministic=True, mutable=["moe_stats"]
    )
    load = np.asarray(stats["moe_stats"]["expert_load"])
    assert load[3] == 0.0 and np.isclose(load.sum(), 1.0)
    np.testing.assert_array_equal(out.indices, np_topk_router(x, w, cfg)[1])

    def lb(w_DxE):
        o = router.apply(_variables(w_DxE), jnp.asarray(x), deterministic=True)
        return load_balance_loss(o.probs[None], o.indices[None], num_experts=E, per_sequence=False)

    g = jax.grad(lb)(jnp.asarray(w))
    assert np.isfinite(g).all() and np.abs(g).max() > 0


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_all_tokens_to_one_expert(score_func):
    offsets = np.zeros(E, np.float32)
    offsets[6] = 40.0
    x, w = _skewed(11, offsets)
    cfg = MoEConfig(num_experts=E, top_k=1, score_func=score_func)
    out, stats = Router(cfg).apply(
        _variables(w), jnp.asarray(x), deterministic=True, mutable=["moe_stats"]
    )
    assert (np.asarray(out.indices) == 6).all()
    np.testing.assert_allclose(out.weights, 1.0)
    expected = np.zeros(E)
    expected[6] = 1.0
    np.testing.assert_array_equal(stats["moe_stats"]["expert_load"], expected)
    lb = load_balance_loss(out.probs[None], out.indices[None], num_experts=E, per_sequence=False)
    p = np.asarray(out.probs, np.float64)
    np.testing.assert_allclose(lb, E * (p[:, 6] / p.sum(-1)).mean(), rtol=1e-5)
    if score_func == "softmax":
        assert lb > E - 0.01  # the worst case of the Switch loss


def test_bf16_input_keeps_float32_router_math():
    # Two experts whose logits differ by 2^-8, below bfloat16 resolution at 1.0 (2^-7): a bf16
    # matmul would tie them and top_k would pick expert 0; float32 math picks expert 1.
    x = jnp.ones((4, 2), jnp.bfloat16)
    w = jnp.array([[1.0, 1.0, -1.0], [0.0, 2.0**-8, 0.0]], jnp.bfloat16)
    cfg = MoEConfig(num_experts=3, top_k=1)
    router = Router(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    out = router.apply({"params": {"kernel": w}}, x, deterministic=True)
    assert out.logits.dtype == jnp.float32 and out.weights.dtype == jnp.float32
    assert out.probs.dtype == jnp.float32
    assert (np.asarray(out.indices) == 1).all()
    np.testing.assert_allclose(out.logits[0], [1.0, 1.0 + 2.0**-8, -1.0], rtol=0, atol=0)
    # Random bf16 inputs: equal to the float64 reference on the bf16 values.
    xr, wr = _data(12)
    xb, wb = jnp.asarray(xr, jnp.bfloat16), jnp.asarray(wr, jnp.bfloat16)
    cfg = MoEConfig(num_experts=E, top_k=2, score_func="sigmoid")
    out = Router(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16).apply(
        {"params": {"kernel": wb}}, xb, deterministic=True
    )
    ref = np_topk_router(np.asarray(xb, np.float32), np.asarray(wb, np.float32), cfg)
    np.testing.assert_allclose(out.logits, ref[3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.weights, ref[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out.indices, ref[1])


def test_kernel_init_dtype_and_bad_rank():
    cfg = MoEConfig(num_experts=E)
    x = jnp.zeros((T, D), jnp.bfloat16)
    variables = Router(cfg, param_dtype=jnp.bfloat16).init(jax.random.key(0), x, deterministic=True)
    kernel = variables["params"]["kernel"].value
    assert kernel.shape == (D, E) and kernel.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match=r"Router expects x of shape \[T, D\]"):
        Router(cfg).init(jax.random.key(0), jnp.zeros((2, T, D)), deterministic=True)


def np_expert_choice(x_TxD, w_DxE, cfg, capacity):
    logits = np.asarray(x_TxD, np.float64) @ np.asarray(w_DxE, np.float64)
    probs = _np_scores(logits, cfg.score_func)
    token_indices = np.argsort(-probs.T, axis=-1, kind="stable")[:, :capacity]
    weights = np.take_along_axis(probs.T, token_indices, axis=-1) * cfg.routed_scaling_factor
    return weights, token_indices, probs, logits


@pytest.mark.parametrize(
    "kw,deterministic,capacity",
    [
        (dict(top_k=2, capacity_factor=1.0), False, 6),  # ceil(24 * 2 / 8 * 1.0)
        (dict(top_k=2, capacity_factor=1.0, eval_capacity_factor=1.5), True, 9),
        (dict(top_k=1, capacity_factor=1.0, min_capacity=5, score_func="sigmoid"), False, 5),
        (dict(top_k=8, eval_capacity_factor=2.0, routed_scaling_factor=2.0), True, T),  # capped
    ],
)
def test_expert_choice_matches_numpy(kw, deterministic, capacity):
    cfg = MoEConfig(num_experts=E, router="expert_choice", **kw)
    x, w = _data(13)
    router = Router(cfg)
    out = router.apply(_variables(w), jnp.asarray(x), deterministic=deterministic)
    ref_w, ref_i, ref_p, ref_l = np_expert_choice(x, w, cfg, capacity)
    # Token-major: place e of token t holds e iff expert e took t (else the sentinel E).
    want_idx = np.full((T, E), E)
    want_w = np.zeros((T, E))
    for e in range(E):
        want_idx[ref_i[e], e] = e
        want_w[ref_i[e], e] = ref_w[e]
    assert out.weights.shape == (T, E) and out.indices.dtype == jnp.int32
    np.testing.assert_array_equal(out.indices, want_idx)
    np.testing.assert_array_equal(out.experts_per_token, (want_idx < E).sum(1))
    np.testing.assert_allclose(out.weights, want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.probs, ref_p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.logits, ref_l, rtol=1e-5, atol=1e-6)

    c_ExC = jnp.asarray(np.random.default_rng(14).standard_normal((E, capacity)), jnp.float32)
    c_TxE = jnp.zeros((T, E)).at[ref_i, jnp.arange(E)[:, None]].set(c_ExC)

    def loss(w_DxE, x_TxD):
        o = router.apply(_variables(w_DxE), x_TxD, deterministic=deterministic)
        return jnp.sum(o.weights * c_TxE)

    def ref_loss(w_DxE, x_TxD):
        logits = x_TxD @ w_DxE
        if cfg.score_func == "softmax":
            probs = jnp.exp(logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
        else:
            probs = 1.0 / (1.0 + jnp.exp(-logits))
        picked = jnp.take_along_axis(probs.T, jnp.asarray(ref_i), axis=-1)
        return jnp.sum(picked * cfg.routed_scaling_factor * c_ExC)

    args = (jnp.asarray(w), jnp.asarray(x))
    grads = jax.grad(loss, argnums=(0, 1))(*args)
    ref_grads = jax.grad(ref_loss, argnums=(0, 1))(*args)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_expert_choice_rejects_token_choice_features():
    x = jnp.zeros((T, D))
    for kw, field in [
        (dict(use_expert_bias=True), "use_expert_bias"),
        (dict(n_groups=2), "n_groups"),
    ]:
        with pytest.raises(ValueError, match=field):
            cfg = MoEConfig(num_experts=E, router="expert_choice", **kw)
            Router(cfg).init(jax.random.key(0), x, deterministic=True)


def test_expert_choice_jitter_and_init():
    cfg = MoEConfig(num_experts=E, router="expert_choice", jitter_eps=0.1)
    x, _ = _data(15)
    router = Router(cfg)
    variables = router.init(jax.random.key(0), jnp.asarray(x), deterministic=True)
    assert variables["params"]["kernel"].names == ("embed", "unmodeled")
    with pytest.raises(ValueError, match="'jitter'"):
        router.apply(variables, jnp.asarray(x), deterministic=False)
    det = router.apply(variables, jnp.asarray(x), deterministic=True)
    jit = router.apply(
        variables, jnp.asarray(x), deterministic=False, rngs={"jitter": jax.random.key(2)}
    )
    assert not np.allclose(det.logits, jit.logits)


def test_router_under_scan_stacks_state_and_stats():
    """The decoder scans layers: bias and load come out stacked [layers, E] at matching paths."""
    import flax.linen as nn

    cfg = MoEConfig(num_experts=4, top_k=2, use_expert_bias=True, jitter_eps=0.1)

    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return x, Router(cfg, name="router")(x, deterministic=False).indices

    stack = nn.scan(
        Layer,
        variable_axes={"params": 0, "moe_state": 0, "moe_stats": 0},
        split_rngs={"params": True, "jitter": True},
        length=3,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )()
    x = jnp.asarray(_data(16, t=10)[0])
    rngs = {"params": jax.random.key(0), "jitter": jax.random.key(1)}
    variables = stack.init(rngs, x, None)
    assert "moe_stats" not in variables
    apply = jax.jit(
        lambda v, x: stack.apply(
            v, x, None, mutable=["moe_stats"], rngs={"jitter": jax.random.key(2)}
        )
    )
    (_, indices_LxTxK), stats = apply(variables, x)
    load_LxE = np.asarray(stats["moe_stats"]["router"]["expert_load"])
    assert load_LxE.shape == (3, 4)
    for layer in range(3):
        ref = np.bincount(np.asarray(indices_LxTxK[layer]).ravel(), minlength=4) / 20
        np.testing.assert_allclose(load_LxE[layer], ref)
    new = update_expert_bias(variables["moe_state"], stats["moe_stats"], 0.5)
    np.testing.assert_array_equal(new["router"]["expert_bias"], 0.5 * np.sign(0.25 - load_LxE))


def test_random_router_uniform_distinct_and_repeatable():
    """router="random": top_k distinct experts per token, uniform over experts, weights from the
    real scores at the chosen experts; training draws from rng "router", eval is repeatable."""
    cfg = MoEConfig(num_experts=E, top_k=2, router="random", norm_topk_prob=False)
    x, w = _data(21, t=4000)
    router = Router(cfg)
    variables = _variables(w)
    with pytest.raises(ValueError, match="'router'"):
        router.apply(variables, jnp.asarray(x), deterministic=False)
    a = router.apply(
        variables, jnp.asarray(x), deterministic=False, rngs={"router": jax.random.key(0)}
    )
    b = router.apply(
        variables, jnp.asarray(x), deterministic=False, rngs={"router": jax.random.key(1)}
    )
    idx = np.asarray(a.indices)
    assert idx.shape == (4000, 2) and np.all(idx[:, 0] != idx[:, 1])
    assert not np.array_equal(idx, np.asarray(b.indices))
    counts = np.bincount(idx.ravel(), minlength=E) / idx.size
    np.testing.assert_allclose(counts, 1 / E, atol=0.02)  # 8000 draws: sd ~ 0.004
    # Selection ignores the logits; weights are the scores of the chosen experts.
    probs = _np_scores(x.astype(np.float64) @ w, "softmax")
    np.testing.assert_allclose(a.weights, np.take_along_axis(probs, idx, 1), rtol=1e-5)
    e1 = router.apply(variables, jnp.asarray(x), deterministic=True)
    e2 = router.apply(variables, jnp.asarray(x), deterministic=True)
    np.testing.assert_array_equal(e1.indices, e2.indices)
    with pytest.raises(ValueError, match="use_expert_bias"):
        MoEConfig(num_experts=E, router="random", use_expert_bias=True)


@pytest.mark.parametrize("rule", ["sign", "centered_sign", "proportional"])
def test_bias_update_rules_match_numpy(rule):
    load = np.array([[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.3, 0.2]], np.float32)
    bias = np.array([[0.0, 0.1, -0.1, 0.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
    mean = load.mean(-1, keepdims=True)
    if rule == "sign":
        step = np.sign(mean - load)
    elif rule == "centered_sign":
        step = np.sign(mean - load) - np.sign(mean - load).mean(-1, keepdims=True)
    else:
        step = (mean - load) / mean
    new = update_expert_bias({"expert_bias": bias}, {"expert_load": load}, 0.01, rule)
    np.testing.assert_allclose(new["expert_bias"], bias + 0.01 * step, rtol=1e-6, atol=1e-8)
    if rule == "centered_sign":  # the biases keep their sum
        np.testing.assert_allclose(new["expert_bias"].sum(-1), bias.sum(-1), atol=1e-7)


def test_bias_update_schedule_inv_sqrt():
    from moejax.layers import ModelConfig
    from moejax.train.step import bias_update_rate

    moe = MoEConfig(num_experts=E, use_expert_bias=True, bias_update_schedule="inv_sqrt")
    update = bias_update_rate(ModelConfig(moe=moe))
    rates = [float(update.rate_at(jnp.asarray(t))) for t in (0, 3, 99)]
    np.testing.assert_allclose(rates, [1e-3, 1e-3 / 2, 1e-3 / 10], rtol=1e-6)
    constant = bias_update_rate(
        ModelConfig(moe=dataclasses.replace(moe, bias_update_schedule="constant"))
    )
    assert float(constant.rate_at(jnp.asarray(99))) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="bias_update"):
        MoEConfig(num_experts=E, bias_update="exp")
