"""Sparse upcycling (moejax.upcycle): copy / partition / shared against the dense model.

Each method is checked where it provably computes the dense function: copy for any router
(norm_topk_prob=True), partition with all experts active at unit weight (a zero router, top_k=E,
routed_scaling_factor=E: softmax 1/E renormalised, times E), shared with the routed experts'
`wo` zeroed. Negative controls show the comparisons can fail.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from moejax.layers import ModelConfig, MoEConfig, Transformer
from moejax.layers.transformer import scan_to_unrolled
from moejax.upcycle import balanced_kmeans, upcycle

E = 4
DENSE = ModelConfig(
    vocab_size=32, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1, d_ff=32, max_len=16,
    moe=None,
)  # fmt: skip
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 32, size=(2, 8)), jnp.int32)


def dense(scan_layers: bool, first_dense_layers: int = 0):
    """A dense config and its variables; scan and unrolled variants hold the same numbers."""
    cfg = dataclasses.replace(DENSE, scan_layers=scan_layers, first_dense_layers=first_dense_layers)
    params = _dense_params()
    if not scan_layers:
        params = scan_to_unrolled(DENSE, params)
    return cfg, {"params": params}


@functools.cache
def _dense_params():
    """Random dense params in the init's structure, built without compiling the init."""
    shapes = jax.eval_shape(
        lambda k: nn.meta.unbox(Transformer(DENSE).init(k, TOKENS)), jax.random.key(0)
    )["params"]
    rng = np.random.default_rng(42)

    params = traverse_util.flatten_dict(shapes, sep="/")
    for path, s in params.items():
        scale = rng.uniform(0.5, 1.5, size=s.shape)  # norm scales: not all ones
        noise = rng.normal(size=s.shape) / np.sqrt(DENSE.d_model)
        params[path] = jnp.asarray(scale if path.endswith("scale") else noise, s.dtype)
    return traverse_util.unflatten_dict(params, sep="/")


@functools.cache
def _logits_fn(cfg: ModelConfig):
    return jax.jit(lambda v, t: Transformer(cfg).apply(v, t)[0])


def logits(cfg, variables, tokens=TOKENS):
    return np.asarray(_logits_fn(cfg)(variables, tokens))


@functools.cache
def dense_logits():
    """The dense model's logits (the same for every layout of the same numbers)."""
    return logits(DENSE, {"params": _dense_params()})


def flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


@functools.cache
def _init_shapes(cfg):
    return jax.eval_shape(
        lambda k: nn.meta.unbox(Transformer(cfg).init(k, TOKENS)), jax.random.key(0)
    )


def assert_like_init(cfg, variables):
    """Same paths, shapes and dtypes as the unboxed init of cfg, and plain arrays."""
    got, want = flat(variables), flat(_init_shapes(cfg))
    assert sorted(got) == sorted(want)
    for path, w in want.items():
        assert isinstance(got[path], jax.Array), path
        assert (got[path].shape, got[path].dtype) == (w.shape, w.dtype), path


def unrolled(cfg, variables):
    return {c: scan_to_unrolled(cfg, t) if cfg.scan_layers else t for c, t in variables.items()}


def set_leaves(variables, suffix, fn):
    """A copy of variables with fn applied to every params leaf whose path ends with suffix."""
    out = flat(variables)
    for path in out:
        if path.endswith(suffix):
            out[path] = fn(out[path])
    return traverse_util.unflatten_dict(out, sep="/")


def assert_non_ffn_copied(dense_cfg, dense_vars, cfg, variables):
    d = flat(unrolled(dense_cfg, dense_vars)["params"])
    m = flat(unrolled(cfg, variables)["params"])
    for path, w in d.items():
        layer = path.split("/")[0]
        if "/mlp/" in path and cfg.is_moe_layer(int(layer.split("_")[1])):
            assert path not in m
        else:
            np.testing.assert_array_equal(m[path], w, err_msg=path)


def expert_columns(dense_wi_up_DxF, experts_wi_up_ExDxf):
    """For each expert, the dense hidden units its columns are (exact matches) [E, f]."""
    d = np.asarray(dense_wi_up_DxF)
    out = []
    for w in np.asarray(experts_wi_up_ExDxf):
        matches = [np.flatnonzero((d == w[:, [j]]).all(axis=0)) for j in range(w.shape[1])]
        assert all(len(m) == 1 for m in matches), "an expert column is not a dense column"
        out.append([int(m[0]) for m in matches])
    return np.asarray(out)


COPY = MoEConfig(num_experts=E, top_k=2, d_ff=DENSE.d_ff, use_expert_bias=True)


@pytest.mark.parametrize("scan_layers,first", [(True, 1), (False, 0)])
def test_copy_equals_dense_for_any_router(scan_layers, first):
    dense_cfg, dense_vars = dense(scan_layers, first)
    routers = []
    for seed in range(3):
        cfg, variables = upcycle(
            dense_cfg, dense_vars, COPY, method="copy", key=jax.random.key(seed)
        )
        assert cfg == dataclasses.replace(dense_cfg, moe=COPY)
        assert cfg.num_moe_layers == DENSE.num_layers - first
        assert_like_init(cfg, variables)
        assert_non_ffn_copied(dense_cfg, dense_vars, cfg, variables)
        np.testing.assert_allclose(logits(cfg, variables), dense_logits(), rtol=1e-5, atol=1e-5)
        v = flat(unrolled(cfg, variables)["params"])
        kernel = v[f"layers_{DENSE.num_layers - 1}/moe/router/kernel"]
        # lecun_normal, the router's initializer: std 1 / sqrt(D).
        assert 0.5 / np.sqrt(DENSE.d_model) < np.std(kernel) < 1.5 / np.sqrt(DENSE.d_model)
        bias = flat(unrolled(cfg, variables)["moe_state"])
        assert all(np.array_equal(b, np.zeros(E)) for b in bias.values()) and bias
        routers.append(kernel)
    assert not np.allclose(routers[0], routers[1])


def unit_weight_moe(**kw):
    # Zero router -> softmax 1/E for every expert; top_k=E keeps all; renormalised 1/E; x E = 1.
    return MoEConfig(
        num_experts=E, top_k=E, d_ff=DENSE.d_ff // E, routed_scaling_factor=float(E), **kw
    )


@pytest.mark.parametrize("scan_layers,first", [(False, 1)])
def test_partition_with_unit_weights_equals_dense(scan_layers, first):
    dense_cfg, dense_vars = dense(scan_layers, first)
    ref = dense_logits()
    moe = unit_weight_moe()
    cfg, variables = upcycle(dense_cfg, dense_vars, moe, method="partition", key=jax.random.key(1))
    assert_like_init(cfg, variables)
    assert_non_ffn_copied(dense_cfg, dense_vars, cfg, variables)
    # Negative control: the fresh router weighs the experts unevenly.
    assert not np.allclose(logits(cfg, variables), ref, atol=1e-4)
    zeroed = set_leaves(variables, "router/kernel", jnp.zeros_like)
    np.testing.assert_allclose(logits(cfg, zeroed), ref, rtol=1e-5, atol=1e-5)

    d = unrolled(dense_cfg, dense_vars)["params"]
    m = unrolled(cfg, variables)["params"]
    groupings = []
    for i in range(first, DENSE.num_layers):
        mlp, experts = d[f"layers_{i}"]["mlp"], m[f"layers_{i}"]["moe"]["experts"]
        cols = expert_columns(mlp["wi_up"], experts["wi_up"])
        np.testing.assert_array_equal(np.sort(cols.ravel()), np.arange(DENSE.d_ff))
        for name in ("wi_gate", "wi_up"):
            np.testing.assert_array_equal(experts[name], np.moveaxis(mlp[name][:, cols], 1, 0))
        np.testing.assert_array_equal(experts["wo"], np.asarray(mlp["wo"])[cols])
        groupings.append(cols)
    assert not np.array_equal(groupings[0], np.arange(DENSE.d_ff).reshape(E, -1))


def test_balanced_kmeans_recovers_planted_groups():
    rng = np.random.default_rng(0)
    size, t = 8, 64
    planted = np.repeat(np.arange(E), size)  # unit -> group; group g fires on tokens t % E == g
    fires = (np.arange(t)[None] % E) == planted[:, None]
    features = np.where(fires, 1.0 + rng.random((E * size, t)), 0.1 * rng.random((E * size, t)))
    features *= rng.uniform(0.2, 5.0, size=(E * size, 1))  # magnitudes must not matter
    perm = rng.permutation(E * size)
    for seed in range(3):
        groups = balanced_kmeans(features[perm], E, jax.random.key(seed))
        assert groups.shape == (E, size) and groups.dtype == np.int32
        found = {frozenset(perm[g].tolist()) for g in groups}
        assert found == {frozenset(np.flatnonzero(planted == g).tolist()) for g in range(E)}
    with pytest.raises(ValueError, match="num_groups"):
        balanced_kmeans(features[:30], E, jax.random.key(0))


@jax.jit
def ffn_features(tokens):
    """Reference |hidden activations| [F, T] of each dense layer's FFN over tokens."""
    params = scan_to_unrolled(DENSE, _dense_params())
    _, state = Transformer(dataclasses.replace(DENSE, scan_layers=False)).apply(
        {"params": params},
        tokens,
        capture_intermediates=lambda m, _: m.name == "ffn_norm",
        mutable=["intermediates"],
    )
    out = []
    for layer in range(DENSE.num_layers):
        (h,) = state["intermediates"][f"layers_{layer}"]["ffn_norm"]["__call__"]
        mlp = params[f"layers_{layer}"]["mlp"]
        x = h.reshape(-1, DENSE.d_model)
        gate, up = x @ mlp["wi_gate"], x @ mlp["wi_up"]
        out.append(jnp.abs(gate / (1.0 + jnp.exp(-gate)) * up).T)  # swiglu, written out
    return out


def coherence(features_FxT, groups_Gxf):
    """Mean cosine similarity of the activation patterns of units in the same group."""
    x = features_FxT / np.linalg.norm(features_FxT, axis=1, keepdims=True)
    sims = [(x[g] @ x[g].T)[np.triu_indices(len(g), 1)].mean() for g in groups_Gxf]
    return float(np.mean(sims))


def test_partition_with_calibration_groups_coactivated_units():
    dense_cfg, dense_vars = dense(False, 1)
    calib = [
        jnp.asarray(np.random.default_rng(s).integers(0, 32, size=(4, 16)), jnp.int32)
        for s in (1, 2)
    ]
    moe = unit_weight_moe()
    key = jax.random.key(3)
    cfg, clustered = upcycle(
        dense_cfg, dense_vars, moe, method="partition", key=key, calibration=calib
    )
    _, random = upcycle(dense_cfg, dense_vars, moe, method="partition", key=key)
    assert_like_init(cfg, clustered)
    zeroed = set_leaves(clustered, "router/kernel", jnp.zeros_like)
    np.testing.assert_allclose(logits(cfg, zeroed), dense_logits(), rtol=1e-5, atol=1e-5)
    d = unrolled(dense_cfg, dense_vars)["params"]
    for layer in range(1, DENSE.num_layers):
        feats = np.concatenate([ffn_features(t)[layer] for t in calib], axis=1)
        groups = {}
        for name, v in (("clustered", clustered), ("random", random)):
            experts = unrolled(cfg, v)["params"][f"layers_{layer}"]["moe"]["experts"]
            groups[name] = expert_columns(d[f"layers_{layer}"]["mlp"]["wi_up"], experts["wi_up"])
        np.testing.assert_array_equal(np.sort(groups["clustered"].ravel()), np.arange(DENSE.d_ff))
        assert coherence(feats, groups["clustered"]) > coherence(feats, groups["random"]) + 0.02


@pytest.mark.parametrize("scan_layers,first,d_ff", [(True, 1, 8), (False, 0, 16)])
def test_shared_with_zero_routed_experts_equals_dense(scan_layers, first, d_ff):
    dense_cfg, dense_vars = dense(scan_layers, first)
    ref = dense_logits()
    moe = MoEConfig(num_experts=E, top_k=2, d_ff=d_ff, num_shared_experts=1, shared_d_ff=DENSE.d_ff)
    cfg, variables = upcycle(dense_cfg, dense_vars, moe, method="shared", key=jax.random.key(2))
    assert_like_init(cfg, variables)
    assert_non_ffn_copied(dense_cfg, dense_vars, cfg, variables)
    assert not np.allclose(logits(cfg, variables), ref, atol=1e-4)  # routed experts contribute
    zeroed = set_leaves(variables, "experts/wo", jnp.zeros_like)
    np.testing.assert_allclose(logits(cfg, zeroed), ref, rtol=1e-5, atol=1e-5)

    d = unrolled(dense_cfg, dense_vars)["params"]
    m = unrolled(cfg, variables)["params"]
    segments = DENSE.d_ff // d_ff
    for i in range(first, DENSE.num_layers):
        mlp, block = d[f"layers_{i}"]["mlp"], m[f"layers_{i}"]["moe"]
        for name in ("wi_gate", "wi_up", "wo"):
            np.testing.assert_array_equal(block["shared"][name], mlp[name])
        cols = expert_columns(mlp["wi_up"], block["experts"]["wi_up"])
        # Expert e = segment e mod F/f of the hidden units; the segments tile the dense FFN.
        np.testing.assert_array_equal(np.sort(cols[:segments].ravel()), np.arange(DENSE.d_ff))
        np.testing.assert_array_equal(cols, cols[np.arange(E) % segments])
        np.testing.assert_array_equal(block["experts"]["wo"], np.asarray(mlp["wo"])[cols])


def _bad(**kw):
    return MoEConfig(**{"num_experts": E, "top_k": 2, "d_ff": DENSE.d_ff, **kw})


@pytest.mark.parametrize(
    "method,moe,dense_kw,kw,match",
    [
        ("copy", _bad(d_ff=16), {}, {}, r"MoEConfig\.d_ff=16 must equal ModelConfig\.d_ff=32"),
        ("copy", _bad(activation="gelu"), {}, {}, r"MoEConfig\.activation='gelu'"),
        ("copy", _bad(num_shared_experts=1), {}, {}, r"MoEConfig\.num_shared_experts=1"),
        ("partition", _bad(num_experts=5, d_ff=6), {}, {}, r"MoEConfig\.num_experts=5"),
        ("partition", _bad(d_ff=16), {}, {}, r"MoEConfig\.d_ff=16 must equal .* = 8"),
        ("shared", _bad(), {}, {}, r"MoEConfig\.num_shared_experts=0"),
        ("shared", _bad(num_shared_experts=2), {}, {}, r"MoEConfig\.shared_d_ff"),
        ("shared", _bad(d_ff=12, num_shared_experts=1, shared_d_ff=32), {}, {}, "MoEConfig.d_ff=12"),
        ("copy", _bad(), {"num_layers": 3}, {}, r"ModelConfig\.num_layers=3 .* hold 2 layers"),
        ("copy", _bad(), {"d_model": 32, "num_heads": 2}, {}, r"params/embed/embedding has shape"),
        ("copy", _bad(), {"moe": _bad()}, {}, r"ModelConfig\.moe"),
        ("copy", _bad(), {}, {"first_dense_layers": 2}, r"ModelConfig\.first_dense_layers=2"),
        ("copy", _bad(), {}, {"calibration": TOKENS}, r"calibration is unused"),
        ("copy", _bad(), {}, {"noise": -1.0}, r"noise=-1\.0"),
        ("grow", _bad(), {}, {}, r"method='grow' is invalid"),
    ],
)  # fmt: skip
def test_unmappable_raises_naming_the_field(method, moe, dense_kw, kw, match):
    cfg, variables = dense(False)
    cfg = dataclasses.replace(cfg, **dense_kw)
    with pytest.raises(ValueError, match=match):
        upcycle(cfg, variables, moe, method=method, key=jax.random.key(0), **kw)


def test_noisy_copy_trains():
    dense_cfg, dense_vars = dense(True, 1)
    cfg, variables = upcycle(
        dense_cfg, dense_vars, COPY, method="copy", key=jax.random.key(0), noise=0.05
    )
    w = np.asarray(dense_vars["params"]["dense_layers"]["mlp"]["wo"][1])
    w_e = np.asarray(variables["params"]["moe_layers"]["moe"]["experts"]["wo"][0])
    assert 0.03 < (w_e - w[None]).std() / w.std() < 0.07  # noise of relative scale 0.05
    assert not np.allclose(w_e[0], w_e[1])
    rest = {k: v for k, v in variables.items() if k != "params"}

    def loss(params):
        out, aux = Transformer(cfg).apply(
            {"params": params, **rest},
            TOKENS[:, :-1],
            deterministic=False,
        )
        ce = optax.softmax_cross_entropy_with_integer_labels(out, TOKENS[:, 1:]).mean()
        return ce + aux["aux_loss"]

    value, grads = jax.jit(jax.value_and_grad(loss))(variables["params"])
    assert np.isfinite(value)
    for path, g in flat(grads).items():
        assert np.isfinite(g).all(), path
    g = flat(grads)
    assert np.abs(g["moe_layers/moe/router/kernel"]).max() > 0
    assert np.abs(g["moe_layers/moe/experts/wi_up"]).max() > 0
