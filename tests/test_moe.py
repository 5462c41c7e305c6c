"""The MoE block against a plain numpy loop over tokens and chosen experts (forward) and a jnp
dense-gather reference with the same discrete routing (gradients w.r.t. x and every weight)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.layers import MoE, MoEConfig, MoEExecution

B, L, D, F, E = 2, 7, 8, 12, 4  # T = 14 tokens
TILE8 = MoEExecution(gmm_tile=8)  # several row tiles even at 14 tokens


def np_act(name, x):
    if name in ("swiglu", "silu"):
        return x / (1 + np.exp(-x))
    if name in ("geglu", "gelu"):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    return np.maximum(x, 0)


def jnp_act(name):
    return {
        "swiglu": jax.nn.silu,
        "silu": jax.nn.silu,
        "geglu": lambda v: jax.nn.gelu(v, approximate=True),
        "gelu": lambda v: jax.nn.gelu(v, approximate=True),
        "relu": jax.nn.relu,
    }[name]


GATED = ("swiglu", "geglu")


def np_mlp(x, wg, wu, wo, activation):
    up = x @ wu
    h = np_act(activation, x @ wg) * up if activation in GATED else np_act(activation, up)
    return h @ wo


def np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def np_routing(p, x_TxD, cfg):
    """Numpy top-k routing, capacity drops (own loop) and expert-choice picks."""
    logits = x_TxD.astype(np.float64) @ np.asarray(p["router"]["kernel"], np.float64)
    probs = np_softmax(logits)
    if cfg.router == "expert_choice":
        cap = min(cfg.capacity(x_TxD.shape[0], train=False), x_TxD.shape[0])
        tok = np.argsort(-probs.T, axis=1, kind="stable")[:, :cap]
        return probs, logits, tok, None, None
    idx = np.argsort(-probs, axis=1, kind="stable")[:, : cfg.top_k]
    w = np.take_along_axis(probs, idx, 1)
    w = w / w.sum(1, keepdims=True)
    keep = np.ones(idx.shape, bool)
    if cfg.dispatch == "capacity":
        cap = cfg.capacity(x_TxD.shape[0], train=False)
        pairs = [(t, k) for t in range(idx.shape[0]) for k in range(cfg.top_k)]
        if cfg.drop_policy == "probs":
            pairs = sorted(pairs, key=lambda q: -w[q])
        fill = np.zeros(cfg.num_experts, int)
        for t, k in pairs:
            keep[t, k] = fill[idx[t, k]] < cap
            fill[idx[t, k]] += keep[t, k]
    return probs, logits, idx, w, keep


def np_moe(p, x_BxLxD, cfg):
    """Forward reference: loop over tokens and their kept experts."""
    x = np.asarray(x_BxLxD, np.float64).reshape(-1, D)
    probs, logits, idx, w, keep = np_routing(p, x, cfg)
    ex = {k: np.asarray(v, np.float64) for k, v in p["experts"].items()}
    wg = ex.get("wi_gate", np.zeros_like(ex["wi_up"]))
    y = np.zeros_like(x)
    if cfg.router == "expert_choice":
        for e in range(E):
            for t in idx[e]:
                y[t] += probs[t, e] * np_mlp(
                    x[t], wg[e], ex["wi_up"][e], ex["wo"][e], cfg.activation
                )
    else:
        for t in range(x.shape[0]):
            for k in range(cfg.top_k):
                if keep[t, k]:
                    e = idx[t, k]
                    y[t] += w[t, k] * np_mlp(
                        x[t], wg[e], ex["wi_up"][e], ex["wo"][e], cfg.activation
                    )
    if cfg.num_shared_experts:
        sh = {k: np.asarray(v, np.float64) for k, v in p["shared"].items()}
        s = np_mlp(x, sh.get("wi_gate"), sh["wi_up"], sh["wo"], cfg.activation)
        if cfg.shared_expert_gate:
            s = s / (1 + np.exp(-(x @ np.asarray(p["shared_gate"]["kernel"], np.float64))))
        y = y + s
    return y.reshape(x_BxLxD.shape), (probs, logits, idx, keep)


def jnp_moe(p, x_BxLxD, cfg, idx, keep):
    """Differentiable reference with the routing decisions (idx, keep) fixed from numpy."""
    act = jnp_act(cfg.activation)
    x = x_BxLxD.reshape(-1, D)
    probs = jax.nn.softmax(x @ p["router"]["kernel"], axis=-1)
    ex = p["experts"]

    def expert_out(xs, wg, wu, wo):  # xs [..., D], weights gathered per row
        up = jnp.einsum("...d,...df->...f", xs, wu)
        if cfg.activation in GATED:
            up = act(jnp.einsum("...d,...df->...f", xs, wg)) * up
        else:
            up = act(up)
        return jnp.einsum("...f,...fd->...d", up, wo)

    wg = ex.get("wi_gate", ex["wi_up"])
    if cfg.router == "expert_choice":
        out = expert_out(x[idx], wg[:, None], ex["wi_up"][:, None], ex["wo"][:, None])
        w = probs.T[jnp.arange(E)[:, None], idx]
        y = jnp.zeros_like(x).at[idx.ravel()].add((w[..., None] * out).reshape(-1, D))
    else:
        w = jnp.take_along_axis(probs, idx, 1)
        w = w / w.sum(1, keepdims=True)
        out = expert_out(x[:, None, :], wg[idx], ex["wi_up"][idx], ex["wo"][idx])
        y = jnp.einsum("tk,tkd->td", w * keep, out)
    if cfg.num_shared_experts:
        sh = p["shared"]
        s = expert_out(x, sh.get("wi_gate", sh["wi_up"]), sh["wi_up"], sh["wo"])
        if cfg.shared_expert_gate:
            s = jax.nn.sigmoid(x @ p["shared_gate"]["kernel"]) * s
        y = y + s
    return y.reshape(x_BxLxD.shape)


def _setup(cfg, seed=0, dtype=jnp.float32):
    model = MoE(cfg, d_model=D, dtype=dtype)
    x = jax.random.normal(jax.random.key(seed), (B, L, D))
    params = nn.unbox(model.init(jax.random.key(seed + 1), x))["params"]
    # Larger router weights make the softmax decisive, so that no top-k choice is a near tie.
    params["router"]["kernel"] = params["router"]["kernel"] * 3.0
    return model, params, x


def _check(cfg, *, seed=0, tol=1e-4):
    model, params, x = _setup(cfg, seed)
    y, aux = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x)
    y_ref, (probs, logits, idx, keep) = np_moe(params, x, cfg)
    np.testing.assert_allclose(y, y_ref, rtol=tol, atol=tol)

    def loss(fn):
        return lambda p, x: jnp.sum(jnp.sin(fn(p, x)))

    g = jax.jit(jax.grad(loss(lambda p, x: model.apply({"params": p}, x)[0]), argnums=(0, 1)))(
        params, x
    )
    ref_fn = lambda p, x: jnp_moe(p, x, cfg, jnp.asarray(idx), keep)  # noqa: E731
    g_ref = jax.jit(jax.grad(loss(ref_fn), argnums=(0, 1)))(params, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=tol, atol=tol), g, g_ref)
    assert jax.tree.structure(g[0]) == jax.tree.structure(params)
    return aux, probs, logits, idx, keep


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "gelu", "relu"])
def test_dropless_forward_grad_and_aux(activation):
    cfg = MoEConfig(num_experts=E, top_k=2, d_ff=F, activation=activation, execution=TILE8)
    aux, probs, logits, idx, _ = _check(cfg)
    load = np.bincount(idx.ravel(), minlength=E) / idx.size
    np.testing.assert_allclose(aux["expert_load"], load, atol=1e-6)
    lb = E * np.sum(load * probs.mean(0))
    np.testing.assert_allclose(aux["load_balance_loss"], lb, rtol=1e-5)
    z = np.mean(np.log(np.exp(logits).sum(-1)) ** 2)
    np.testing.assert_allclose(aux["router_z_loss"], z, rtol=1e-5)
    np.testing.assert_allclose(
        aux["aux_loss"], cfg.load_balance_coef * lb + cfg.router_z_coef * z, rtol=1e-5
    )
    ent = -np.mean(np.sum(probs * np.log(probs), -1))
    np.testing.assert_allclose(aux["router_entropy"], ent, rtol=1e-5)
    assert float(aux["dropped_fraction"]) == 0.0


def test_top_k_equals_num_experts_ragged_dot_backend():
    ragged = MoEExecution(gmm_backend="ragged_dot")
    _check(MoEConfig(num_experts=E, top_k=E, d_ff=F, execution=ragged))


@pytest.mark.parametrize("policy", ["position", "probs"])
def test_capacity_most_tokens_dropped(policy):
    # capacity = ceil(14 * 2 / 4 * 0.25) = 2 slots per expert: at most 8 of 28 assignments kept.
    cfg = MoEConfig(
        num_experts=E,
        top_k=2,
        d_ff=F,
        dispatch="capacity",
        drop_policy=policy,
        eval_capacity_factor=0.25,
        min_capacity=1,
    )
    aux, _, _, idx, keep = _check(cfg, seed=3)
    np.testing.assert_allclose(aux["dropped_fraction"], 1 - keep.mean(), rtol=1e-6)
    assert keep.mean() <= 8 / 28
    # Tokens with every choice dropped come out of the block as exact zeros (no shared expert).
    model, params, x = _setup(cfg, seed=3)
    y = np.asarray(model.apply({"params": params}, x)[0]).reshape(-1, D)
    assert (~keep.any(1)).any() and np.all(y[~keep.any(1)] == 0)


def test_expert_choice():
    cfg = MoEConfig(
        num_experts=E, top_k=2, d_ff=F, router="expert_choice", eval_capacity_factor=1.0
    )
    aux, _, _, tok, _ = _check(cfg, seed=5)
    np.testing.assert_allclose(
        aux["dropped_fraction"], 1 - len(np.unique(tok)) / (B * L), rtol=1e-6
    )
    np.testing.assert_allclose(aux["expert_load"], np.full(E, 1 / E))


@pytest.mark.parametrize("gate", [False, True])
def test_shared_experts(gate):
    cfg = MoEConfig(
        num_experts=E,
        top_k=2,
        d_ff=F,
        num_shared_experts=2,
        shared_expert_gate=gate,
        execution=TILE8,
    )
    _check(cfg, seed=7)


def test_bf16_compute_f32_params():
    cfg = MoEConfig(num_experts=E, top_k=2, d_ff=F, execution=TILE8)
    model, params, x = _setup(cfg, dtype=jnp.bfloat16)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(params))
    y, aux = model.apply({"params": params}, x)
    assert y.dtype == jnp.bfloat16 and aux["load_balance_loss"].dtype == jnp.float32
    y_ref, _ = np_moe(params, x, cfg)
    np.testing.assert_allclose(np.asarray(y, np.float32), y_ref, rtol=5e-2, atol=5e-2)
    g = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x)[0].astype(jnp.float32))))(
        params
    )
    g32 = jax.jit(jax.grad(lambda p: jnp.sum(MoE(cfg, D).apply({"params": p}, x)[0])))(params)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g32), strict=True):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=0.1, atol=0.05 * float(np.abs(b).max()) + 1e-3)


def test_param_names_shapes_and_axes():
    cfg = MoEConfig(num_experts=E, top_k=2, d_ff=F, num_shared_experts=1, shared_expert_gate=True)
    # eval_shape: names and shapes without compiling or running the initialisers.
    boxed = jax.eval_shape(MoE(cfg, D).init, jax.random.key(0), jnp.zeros((B, L, D)))["params"]
    shapes = jax.tree.map(lambda a: a.shape, nn.unbox(boxed))
    assert shapes["router"]["kernel"] == (D, E)
    assert shapes["experts"] == {"wi_gate": (E, D, F), "wi_up": (E, D, F), "wo": (E, F, D)}
    assert shapes["shared"] == {"wi_gate": (D, F), "wi_up": (D, F), "wo": (F, D)}
    assert shapes["shared_gate"]["kernel"] == (D, 1)
    assert boxed["experts"]["wi_up"].names == ("exp", "embed_moe", "mlp_moe")
    assert boxed["experts"]["wo"].names == ("exp", "mlp_moe", "embed_moe")
    relu = MoE(MoEConfig(num_experts=E, top_k=1, d_ff=F, activation="relu"), D)
    relu_params = jax.eval_shape(relu.init, jax.random.key(0), jnp.zeros((B, L, D)))["params"]
    assert "wi_gate" not in relu_params["experts"]
    with pytest.raises(ValueError, match="d_model"):
        jax.eval_shape(MoE(cfg, D).init, jax.random.key(0), jnp.zeros((B, L, D + 1)))
