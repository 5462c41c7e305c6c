"""Decoder LM: scan vs unrolled, remat, layer pattern and params layout, tied head, dtypes, positions."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.layers import ModelConfig, MoEConfig, Transformer
from moejax.layers.moe import MoE
from moejax.layers.transformer import (
    layer_location,
    layer_segments,
    scan_to_unrolled,
    unrolled_to_scan,
)

MOE = MoEConfig(num_experts=4, top_k=2, d_ff=16, use_expert_bias=True)
DENSE_CFG = ModelConfig(
    vocab_size=64, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, d_ff=48, max_len=16,
    moe=None,
)  # fmt: skip
# 5 layers: dense prefix (layer 0), two periods of [dense, moe] (layers 1-4).
MOE_CFG = dataclasses.replace(DENSE_CFG, num_layers=5, moe=MOE, first_dense_layers=1, moe_every=2)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(2, 6)), jnp.int32)


def init(cfg):
    """Unboxed variables of cfg's own layout (scan or unrolled); values depend only on the seed,
    so scan and unrolled variants hold the same numbers (converted with scan_to_unrolled)."""
    return _init(dataclasses.replace(cfg, remat="none", dtype="float32"))


@functools.cache
def _init(cfg):
    if not cfg.scan_layers:
        scanned = _init(dataclasses.replace(cfg, scan_layers=True))
        return {name: scan_to_unrolled(cfg, tree) for name, tree in scanned.items()}
    return nn.meta.unbox(jax.jit(Transformer(cfg).init)(jax.random.key(0), TOKENS))


@functools.cache
def loss_and_grads(cfg):
    """(loss, (logits, aux), d loss / d params) for a loss touching every logit and the MoE aux
    loss (so router gradients are compared too). Cached: several tests share one compile."""
    variables = init(cfg)
    rest = {k: v for k, v in variables.items() if k != "params"}
    cot = jax.random.normal(jax.random.key(1), (*TOKENS.shape, cfg.vocab_size))

    def loss(params):
        logits, aux = Transformer(cfg).apply({"params": params, **rest}, TOKENS)
        return jnp.sum(logits * cot) + aux["aux_loss"], (logits, aux)

    (val, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    return val, out, grads


def assert_trees_close(a, b, rtol=1e-5, atol=1e-5):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


@pytest.mark.parametrize("cfg", [DENSE_CFG, MOE_CFG], ids=["dense", "moe"])
def test_scan_and_unrolled_give_same_logits_aux_and_grads(cfg):
    variables = init(cfg)
    ucfg = dataclasses.replace(cfg, scan_layers=False)
    uvars = init(ucfg)
    # The unrolled model's own init has exactly the converted tree's structure and shapes.
    own = jax.eval_shape(Transformer(ucfg).init, jax.random.key(0), TOKENS)
    assert jax.tree.map(jnp.shape, nn.meta.unbox(own)) == jax.tree.map(jnp.shape, uvars)
    back = {k: unrolled_to_scan(cfg, v) for k, v in uvars.items()}
    assert_trees_close(back, variables, rtol=0, atol=0)

    val, (logits, aux), grads = loss_and_grads(cfg)
    uval, (ulogits, uaux), ugrads = loss_and_grads(ucfg)
    np.testing.assert_allclose(logits, ulogits, rtol=1e-5, atol=1e-5)
    assert_trees_close(aux, uaux)
    np.testing.assert_allclose(val, uval, rtol=1e-5)
    assert_trees_close(grads, unrolled_to_scan(cfg, ugrads), rtol=1e-4, atol=1e-5)
    # Every parameter receives gradient (nothing silently disconnected).
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize(
    "remat,base",
    [
        ("full", MOE_CFG),
        ("dots", DENSE_CFG),
        ("full", dataclasses.replace(DENSE_CFG, scan_layers=False)),
    ],
    ids=["full-moe", "dots-dense", "full-unrolled"],
)
def test_remat_gives_identical_values_and_grads(remat, base):
    val, (logits, aux), grads = loss_and_grads(base)
    rval, (rlogits, raux), rgrads = loss_and_grads(dataclasses.replace(base, remat=remat))
    # Recomputation may fuse differently: equal up to float32 rounding.
    np.testing.assert_allclose(val, rval, rtol=1e-6)
    np.testing.assert_allclose(logits, rlogits, rtol=1e-5, atol=1e-5)
    assert_trees_close(aux, raux, rtol=1e-5, atol=1e-6)
    assert_trees_close(grads, rgrads, rtol=1e-5, atol=1e-4)


def test_remat_is_really_applied():
    cfg = dataclasses.replace(DENSE_CFG, remat="full")
    variables = init(cfg)
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: Transformer(cfg).apply(p, TOKENS)[0].sum()))(
        variables
    )
    assert "remat" in str(jaxpr) or "checkpoint" in str(jaxpr)


def program_size(cfg):
    """Characters of the lowered StableHLO of a forward + backward pass (no compilation)."""
    abstract = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), TOKENS)

    def loss(variables):
        logits, aux = Transformer(cfg).apply(variables, TOKENS)
        return logits.sum() + aux["aux_loss"]

    return len(jax.jit(jax.grad(loss)).lower(nn.meta.unbox(abstract)).as_text())


def test_scanned_program_size_does_not_grow_with_depth():
    base = dataclasses.replace(MOE_CFG, first_dense_layers=0, moe_every=2)
    sizes = {n: program_size(dataclasses.replace(base, num_layers=n)) for n in (2, 8)}
    # Only the stacked dimensions' digits change between 2 and 8 layers.
    assert sizes[8] <= sizes[2] * 1.01, sizes
    # The measure does see depth: the unrolled model's program grows ~linearly.
    unrolled = [
        program_size(dataclasses.replace(base, num_layers=n, scan_layers=False)) for n in (2, 4)
    ]
    assert unrolled[1] > 1.6 * unrolled[0], unrolled


@pytest.mark.parametrize(
    "num_layers,first_dense,every,moe_layers",
    [
        (4, 0, 1, [0, 1, 2, 3]),
        (5, 1, 2, [2, 4]),
        (6, 2, 3, [4]),
        (3, 3, 1, []),
        (7, 1, 2, [2, 4, 6]),
        (4, 0, 3, [2]),
    ],
)
def test_layer_pattern_and_params_tree(num_layers, first_dense, every, moe_layers):
    cfg = dataclasses.replace(
        MOE_CFG, num_layers=num_layers, first_dense_layers=first_dense, moe_every=every
    )
    assert [i for i in range(num_layers) if cfg.is_moe_layer(i)] == moe_layers
    segments = layer_segments(cfg)
    assert sum(s.repeats * len(s.kinds) for s in segments) == num_layers
    abstract = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), TOKENS)
    boxed_params = abstract["params"]
    params = nn.meta.unbox(boxed_params)
    seg_names = {s.name for s in segments}
    assert set(params) == seg_names | {"embed", "final_norm", "lm_head"}
    for i in range(num_layers):
        path, index = layer_location(cfg, i)
        layer = params
        for key in path:
            layer = layer[key]
        ffn = "moe" if i in moe_layers else "mlp"
        assert set(layer) == {"attn_norm", "attn", "ffn_norm", ffn}, (i, path, set(layer))
        repeats = next(s.repeats for s in segments if s.name == path[0])
        assert 0 <= index < repeats
        assert layer["attn"]["q"]["kernel"].shape == (repeats, 32, 4, 8)
        if ffn == "moe":
            assert layer["moe"]["experts"]["wi_gate"].shape == (repeats, 4, 32, 16)
        else:
            assert layer["mlp"]["wo"].shape == (repeats, 48, 32)
    # The stacked axis carries the logical name "layers".
    names = jax.tree.map(
        lambda b: b.names, boxed_params, is_leaf=lambda b: isinstance(b, nn.LogicallyPartitioned)
    )
    first = segments[0]
    attn_names = (names[first.name] if len(first.kinds) == 1 else names[first.name]["layer_0"])[
        "attn"
    ]
    assert attn_names["q"]["kernel"] == ("layers", "embed", "heads", "head_dim")
    assert names["embed"]["embedding"] == ("vocab", "embed")
    assert names["lm_head"]["kernel"] == ("embed", "vocab")
    # aux: one expert_load row per MoE layer (the dense model's [0, 1] when there are none).
    out = jax.eval_shape(Transformer(cfg).apply, nn.meta.unbox(abstract), TOKENS)
    assert out[0].shape == (*TOKENS.shape, 64) and out[0].dtype == jnp.float32
    want = (len(moe_layers), 4) if moe_layers else (0, 1)
    assert out[1]["expert_load"].shape == want


def test_moe_aux_is_mean_over_moe_layers_and_stats_are_stacked():
    cfg = MOE_CFG
    variables = init(cfg)
    (_, aux), stats = jax.jit(lambda v: Transformer(cfg).apply(v, TOKENS, mutable=["moe_stats"]))(
        variables
    )
    # Rebuild each MoE layer's block aux from its own input (captured in the unrolled model).
    ucfg = dataclasses.replace(cfg, scan_layers=False)
    uvars = init(ucfg)

    def captured_moe_aux(uvars):
        _, inter = Transformer(ucfg).apply(
            uvars, TOKENS, capture_intermediates=True, mutable=["intermediates"]
        )
        blocks = []
        for i in (2, 4):
            h = inter["intermediates"][f"layers_{i}"]["ffn_norm"]["__call__"][0]
            moe_vars = {c: uvars[c][f"layers_{i}"]["moe"] for c in ("params", "moe_state")}
            blocks.append(MoE(MOE, cfg.d_model).apply(moe_vars, h)[1])
        return blocks

    blocks = jax.jit(captured_moe_aux)(uvars)
    for k in ("load_balance_loss", "router_z_loss", "aux_loss", "router_entropy"):
        np.testing.assert_allclose(aux[k], (blocks[0][k] + blocks[1][k]) / 2, rtol=1e-5)
    np.testing.assert_allclose(
        aux["expert_load"], jnp.stack([b["expert_load"] for b in blocks]), rtol=1e-5
    )
    # The router's moe_stats / moe_state follow the stacked layout [R, E].
    load = stats["moe_stats"]["moe_layers"]["layer_1"]["moe"]["router"]["expert_load"]
    np.testing.assert_allclose(load, aux["expert_load"], rtol=1e-6)
    bias = variables["moe_state"]["moe_layers"]["layer_1"]["moe"]["router"]["expert_bias"]
    assert bias.shape == (2, 4)


def test_dense_model_aux_is_zero_with_empty_expert_load():
    _, (_, aux), _ = loss_and_grads(DENSE_CFG)
    for k in ("load_balance_loss", "router_z_loss", "aux_loss", "dropped_fraction"):
        assert float(aux[k]) == 0.0
    assert float(aux["router_entropy"]) == 0.0
    assert aux["expert_load"].shape == (0, 1)


def test_tied_embeddings_share_the_table():
    cfg = dataclasses.replace(DENSE_CFG, num_layers=1, tie_embeddings=True)
    variables = init(cfg)
    assert "lm_head" not in variables["params"]
    table = variables["params"]["embed"]["embedding"]
    # The same network with an untied head holding embedding.T gives the same logits and the
    # tied table's gradient is the sum of the untied input and output gradients.
    ucfg = dataclasses.replace(cfg, tie_embeddings=False)
    untied = {"params": {**variables["params"], "lm_head": {"kernel": table.T}}}

    def logits_and_grad(c, p):
        def loss(p):
            logits = Transformer(c).apply(p, TOKENS)[0]
            return jnp.sum(jnp.sin(logits)), logits

        return jax.jit(jax.grad(loss, has_aux=True))(p)

    g, logits = logits_and_grad(cfg, variables)
    ug, ulogits = logits_and_grad(ucfg, untied)
    np.testing.assert_allclose(logits, ulogits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        g["params"]["embed"]["embedding"],
        ug["params"]["embed"]["embedding"] + ug["params"]["lm_head"]["kernel"].T,
        rtol=1e-5,
        atol=1e-5,
    )


def test_bf16_compute_with_f32_params():
    cfg = dataclasses.replace(MOE_CFG, dtype="bfloat16", param_dtype="float32")
    variables = init(cfg)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables["params"]))
    _, (logits, aux), grads = loss_and_grads(cfg)
    _, (ref, ref_aux), ref_grads = loss_and_grads(MOE_CFG)
    assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())
    # bf16 carries ~3 significant digits through 5 layers.
    np.testing.assert_allclose(logits, ref, atol=0.05 * float(jnp.abs(ref).max()))
    np.testing.assert_allclose(aux["load_balance_loss"], ref_aux["load_balance_loss"], rtol=0.1)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        assert g.dtype == jnp.float32 and bool(jnp.isfinite(g).all())
        # Same direction as the float32 gradient (bf16 noise, not a different function).
        cos = jnp.sum(g * r) / (jnp.linalg.norm(g) * jnp.linalg.norm(r))
        assert float(cos) > 0.9, g.shape


def test_positions_argument():
    cfg = DENSE_CFG
    variables = init(cfg)
    apply = jax.jit(lambda v, p: Transformer(cfg).apply(v, TOKENS, positions=p)[0])
    _, (default, _), _ = loss_and_grads(cfg)
    length = TOKENS.shape[1]
    np.testing.assert_allclose(apply(variables, jnp.arange(length)), default, atol=1e-5)
    # RoPE is relative: shifting every position by a constant leaves the logits unchanged.
    shifted = jnp.broadcast_to(jnp.arange(length) + 37, TOKENS.shape)
    np.testing.assert_allclose(apply(variables, shifted), default, atol=2e-4)
    # Per-sequence positions are honoured: changing row 1's positions changes only row 1.
    mixed = jnp.stack([jnp.arange(length), jnp.arange(length) * 3])
    out = apply(variables, mixed)
    np.testing.assert_allclose(out[0], default[0], atol=1e-5)
    assert float(jnp.abs(out[1] - default[1]).max()) > 1e-3
    with pytest.raises(ValueError, match="positions"):
        Transformer(cfg).apply(variables, TOKENS, positions=jnp.arange(length + 1))


def test_bad_inputs_raise():
    variables = init(DENSE_CFG)
    with pytest.raises(ValueError, match="tokens_BxL"):
        Transformer(DENSE_CFG).apply(variables, jnp.zeros((6,), jnp.int32))
    with pytest.raises(ValueError, match="tokens_BxL"):
        Transformer(DENSE_CFG).apply(variables, jnp.zeros((2, 6), jnp.float32))
    with pytest.raises(ValueError, match="layer index"):
        layer_location(DENSE_CFG, 3)
