"""Token-adaptive routers against numpy references: null experts (AdaMoE) and top-p routing.

Forward (indices, weights, experts per token) and gradients through the MoE block; m = 0 is
bitwise plain top-k; top-p with max_k = 1 is top-1; a token whose picks are all null gets zero
from the routed experts and costs no grouped-matmul rows.

Legend: T tokens, D model width, E experts, m null experts, K top-k, F expert hidden width.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.layers import MoE, MoEConfig, Router
from moejax.moe import dropless_plan

T, D, E, F = 24, 16, 6, 8


def _data(seed, t=T):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, D)).astype(np.float32)
    w = (rng.standard_normal((D, E)) / np.sqrt(D)).astype(np.float32)
    w_null = (rng.standard_normal((D, 3)) / np.sqrt(D)).astype(np.float32)
    return x, w, w_null


def _softmax(z):
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def np_null_topk(x, w, w_null, k, norm):
    """AdaMoE in numpy: top-k over E + m scores; null picks weigh 0, renormalise over the real."""
    probs = _softmax(x.astype(np.float64) @ np.concatenate([w, w_null], 1))
    idx = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    wts = np.take_along_axis(probs, idx, 1) * (idx < E)
    if norm:
        s = wts.sum(-1, keepdims=True)
        wts = wts / np.where(s > 0, s, 1.0)
    return idx, wts, probs


def np_top_p(x, w, p, max_k, norm):
    probs = _softmax(x.astype(np.float64) @ w)
    idx = np.full((x.shape[0], max_k), E)
    wts = np.zeros((x.shape[0], max_k))
    for t in range(x.shape[0]):
        order = np.argsort(-probs[t], kind="stable")
        total = 0.0
        for i in range(max_k):
            if total >= p:
                break
            idx[t, i], wts[t, i] = order[i], probs[t, order[i]]
            total += probs[t, order[i]]
    if norm:
        wts = wts / wts.sum(-1, keepdims=True)
    return idx, wts, probs


def _router_vars(w, w_null=None):
    params = {"kernel": jnp.asarray(w)}
    if w_null is not None:
        params["null_kernel"] = jnp.asarray(w_null)
    return {"params": params}


@pytest.mark.parametrize("m, k, norm", [(1, 2, True), (3, 2, True), (3, 3, False), (2, 1, True)])
def test_null_experts_match_numpy(m, k, norm):
    x, w, w_null = _data(m * 10 + k)
    cfg = MoEConfig(num_experts=E, top_k=k, num_null_experts=m, norm_topk_prob=norm)
    out = Router(cfg).apply(_router_vars(w, w_null[:, :m]), jnp.asarray(x), deterministic=True)
    idx, wts, probs = np_null_topk(x, w, w_null[:, :m], k, norm)
    np.testing.assert_array_equal(out.indices, idx)
    np.testing.assert_allclose(out.weights, wts, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.probs, probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out.experts_per_token, (idx < E).sum(1))
    assert (idx >= E).any()  # the cases really pick null experts


def test_null_experts_zero_is_bitwise_top_k():
    """m = 0 equals the plain top-k formula (written out here in jnp, as it was before null
    experts existed), bit for bit: the null-expert code paths are not taken."""
    x, w, _ = _data(3)
    for score_func in ("softmax", "sigmoid"):
        cfg = MoEConfig(num_experts=E, top_k=2, score_func=score_func, num_null_experts=0)
        got = Router(cfg).apply(_router_vars(w), jnp.asarray(x), deterministic=True)
        logits = jnp.dot(jnp.asarray(x), jnp.asarray(w), precision=jax.lax.Precision.HIGHEST)
        probs = jax.nn.softmax(logits, -1) if score_func == "softmax" else jax.nn.sigmoid(logits)
        _, idx = jax.lax.top_k(probs, 2)
        wts = jnp.take_along_axis(probs, idx, -1)
        denom = wts.sum(-1, keepdims=True) + (1e-20 if score_func == "sigmoid" else 0.0)
        np.testing.assert_array_equal(got.indices, idx)
        np.testing.assert_array_equal(got.weights, wts / denom)
        np.testing.assert_array_equal(got.probs, probs)


def test_null_kernel_is_its_own_parameter():
    cfg = MoEConfig(num_experts=E, top_k=2, num_null_experts=3)
    variables = Router(cfg).init(jax.random.key(0), jnp.zeros((T, D)), deterministic=True)
    assert variables["params"]["kernel"].value.shape == (D, E)  # HF-shaped, unchanged
    assert variables["params"]["null_kernel"].value.shape == (D, 3)
    assert variables["params"]["null_kernel"].names == ("embed", "unmodeled")


def _block(cfg, x_BxLxD, null_bias=0.0):
    model = MoE(cfg, d_model=D)
    variables = nn.meta.unbox(model.init(jax.random.key(0), x_BxLxD))
    params = variables["params"]
    if cfg.num_null_experts:
        router = dict(params["router"])
        router["null_kernel"] = router["null_kernel"] + null_bias
        params = {**params, "router": router}
    return model, params


def test_all_null_token_gets_zero_and_no_rows():
    # A large null logit for every token whose first feature is positive: those tokens pick
    # only null experts.
    x = jax.random.normal(jax.random.key(1), (2, 6, D))
    x = x.at[..., 0].set(jnp.where(jnp.arange(6) % 2 == 0, 5.0, -5.0))
    cfg = MoEConfig(num_experts=E, top_k=2, d_ff=F, num_null_experts=2)
    model, params = _block(cfg, x)
    router = dict(params["router"])
    router["null_kernel"] = router["null_kernel"].at[0].set(20.0)
    params = {**params, "router": router}
    y, aux = model.apply({"params": params}, x)
    routing = Router(cfg).apply({"params": router}, x.reshape(-1, D), deterministic=True)
    all_null = np.asarray(routing.experts_per_token) == 0
    assert all_null.sum() == 6 and np.all(all_null[::2])
    np.testing.assert_array_equal(np.asarray(y).reshape(-1, D)[all_null], 0.0)
    assert float(aux["null_fraction"]) > 0.4
    np.testing.assert_allclose(aux["experts_per_token"], (~all_null).sum() * 2 / 12, rtol=1e-6)
    for tile_m in (None, 8):  # compact and padded layouts: null picks get no row
        plan = dropless_plan(routing.indices, E, tile_m=tile_m)
        assert int(plan.group_sizes_E.sum()) == int(routing.experts_per_token.sum())


def _np_expert(x, e, p):
    up = x @ p["wi_up"][e]
    g = x @ p["wi_gate"][e]
    return (g / (1 + np.exp(-g)) * up) @ p["wo"][e]


def _np_block(x_TxD, idx, wts, params):
    y = np.zeros_like(x_TxD, dtype=np.float64)
    ex = {k: np.asarray(v, np.float64) for k, v in params["experts"].items()}
    for t in range(x_TxD.shape[0]):
        for i in range(idx.shape[1]):
            if idx[t, i] < E:
                y[t] += wts[t, i] * _np_expert(x_TxD[t], idx[t, i], ex)
    return y


@pytest.mark.parametrize("router", ["null", "top_p"])
@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_block_matches_numpy_forward_and_grads(router, dispatch):
    x = jax.random.normal(jax.random.key(2), (2, 6, D))
    kw = dict(num_experts=E, top_k=2, d_ff=F, dispatch=dispatch, capacity_factor=4.0)
    if router == "null":
        cfg = MoEConfig(**kw, num_null_experts=2)
    else:
        cfg = MoEConfig(**kw, router="top_p", top_p=0.5, max_k=3)
    model, params = _block(cfg, x)
    y, _ = model.apply({"params": params}, x)
    x_TxD = np.asarray(x, np.float64).reshape(-1, D)
    w = np.asarray(params["router"]["kernel"], np.float64)
    if router == "null":
        idx, wts, _ = np_null_topk(x_TxD, w, np.asarray(params["router"]["null_kernel"]), 2, True)
    else:
        idx, wts, _ = np_top_p(x_TxD, w, 0.5, 3, True)
    assert (idx >= E).any() and (idx < E).sum(1).max() > 1  # adaptive: 0 or 1 .. K experts
    np.testing.assert_allclose(
        np.asarray(y).reshape(-1, D), _np_block(x_TxD, idx, wts, params), atol=2e-5
    )

    # Gradients: the block against a dense jnp reference on the same (fixed) selection.
    cot = jax.random.normal(jax.random.key(3), x.shape)

    def loss(p, x):
        return jnp.vdot(model.apply({"params": p}, x)[0], cot)

    def ref_loss(p, x):
        x_TxD = x.reshape(-1, D)
        kernel = p["router"]["kernel"]
        if router == "null":
            kernel = jnp.concatenate([kernel, p["router"]["null_kernel"]], 1)
        probs = jax.nn.softmax(jnp.dot(x_TxD, kernel, precision="highest"), -1)
        real = jnp.asarray(idx < E)
        sel = jnp.where(real, jnp.asarray(idx), 0)
        picked = jnp.where(real, jnp.take_along_axis(probs, sel, 1), 0.0)
        wts = picked / jnp.maximum(picked.sum(-1, keepdims=True), 1e-30)
        ex = p["experts"]
        g = jnp.einsum("td,tkdf->tkf", x_TxD, ex["wi_gate"][sel])
        up = jnp.einsum("td,tkdf->tkf", x_TxD, ex["wi_up"][sel])
        out = jnp.einsum("tkf,tkfd->tkd", jax.nn.silu(g) * up, ex["wo"][sel])
        y = jnp.einsum("tk,tkd->td", wts, out)
        return jnp.vdot(y.reshape(x.shape), cot)

    got = jax.grad(loss, argnums=(0, 1))(params, x)
    want = jax.grad(ref_loss, argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_top_p_matches_numpy_and_max_k_one_is_top_one():
    x, w, _ = _data(7)
    for p, max_k, norm in [(0.4, 4, True), (0.7, 3, False), (1.0, 6, True)]:
        cfg = MoEConfig(num_experts=E, router="top_p", top_p=p, max_k=max_k, norm_topk_prob=norm)
        out = Router(cfg).apply(_router_vars(w), jnp.asarray(x), deterministic=True)
        idx, wts, _ = np_top_p(x, w, p, max_k, norm)
        np.testing.assert_array_equal(out.indices, idx)
        np.testing.assert_allclose(out.weights, wts, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(out.experts_per_token, (idx < E).sum(1))
    one = MoEConfig(num_experts=E, router="top_p", top_p=0.9, max_k=1)
    top1 = MoEConfig(num_experts=E, top_k=1)
    a = Router(one).apply(_router_vars(w), jnp.asarray(x), deterministic=True)
    b = Router(top1).apply(_router_vars(w), jnp.asarray(x), deterministic=True)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.weights, b.weights)


def test_entropy_coef_adds_router_entropy_to_aux_loss():
    x = jax.random.normal(jax.random.key(4), (2, 6, D))
    base = MoEConfig(num_experts=E, top_k=2, d_ff=F)
    model, params = _block(base, x)
    _, aux0 = model.apply({"params": params}, x)
    coef = MoEConfig(num_experts=E, top_k=2, d_ff=F, router_entropy_coef=0.5)
    _, aux1 = MoE(coef, d_model=D).apply({"params": params}, x)
    np.testing.assert_allclose(
        aux1["aux_loss"], aux0["aux_loss"] + 0.5 * aux0["router_entropy"], rtol=1e-6
    )


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(num_null_experts=-1), "num_null_experts"),
        (dict(num_null_experts=2, n_groups=2), "num_null_experts"),
        (dict(router="expert_choice", num_null_experts=1), "num_null_experts"),
        (dict(router="top_p", top_p=0.0), "top_p"),
        (dict(router="top_p", max_k=9), "max_k"),
        (dict(router="top_p", use_expert_bias=True), "use_expert_bias"),
        (dict(router_entropy_coef=-1.0), "router_entropy_coef"),
    ],
)
def test_bad_adaptive_config_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        MoEConfig(num_experts=E, top_k=2, **kw)
