"""Tile-aware token rounding (SonicMoE) against a numpy reference, forward and backward, and in
the MoE block (training only)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.layers import MoE, MoEConfig, MoEExecution
from moejax.moe.rounding import round_token_counts, rounded_counts
from moejax.moe.routing import topk_route

E, T = 8, 64


def _reference(indices, weights, probs, mode, tile, scale=1.0, extra=2):
    """numpy loops: per expert, the picks by weight, then the tokens that have it among their
    `extra` best unpicked experts by score; keep the first rounded(n) of them (rounding up only
    as far as those candidates reach). Returns dense [T, E] weights (0 = not computed)."""
    t, e = probs.shape[0], E
    chosen = np.zeros((t, e), bool)
    w = np.zeros((t, e))
    for i in range(t):
        for k, j in enumerate(indices[i]):
            if j < e:
                chosen[i, j] = True
                w[i, j] += weights[i, k]
    candidate = np.zeros((t, e), bool)
    if mode != "down":
        for i in range(t):
            unpicked = [j for j in np.argsort(-probs[i, :e], kind="stable") if not chosen[i, j]]
            candidate[i, unpicked[:extra]] = True
    out = np.zeros((t, e))
    for j in range(e):
        n = chosen[:, j].sum()
        room = min(t, n + candidate[:, j].sum())
        down, up = n // tile * tile, -(-n // tile) * tile
        up = up if up <= room else down
        target = {"down": down, "up": up, "nearest": down if n - down < up - n else up}[mode]
        picks = sorted(np.flatnonzero(chosen[:, j]), key=lambda i: (-w[i, j], i))
        others = sorted(np.flatnonzero(candidate[:, j]), key=lambda i: (-probs[i, j], i))
        for i in (picks + others)[:target]:
            out[i, j] = w[i, j] if chosen[i, j] else probs[i, j] * scale
    return out


def _dense(routing):
    out = np.zeros((routing.indices.shape[0], E + 1))
    idx = np.minimum(np.asarray(routing.indices), E)
    np.add.at(out, (np.arange(idx.shape[0])[:, None], idx), np.asarray(routing.weights))
    return out[:, :E]


def _routing(cfg, seed=0):
    logits = jax.random.normal(jax.random.key(seed), (T, E + cfg.num_null_experts)) * 1.5
    return topk_route(logits, cfg), logits


@pytest.mark.parametrize("mode", ["down", "up", "nearest"])
@pytest.mark.parametrize("nulls", [0, 2])
def test_rounding_matches_numpy_reference(mode, nulls):
    cfg = MoEConfig(
        num_experts=E,
        top_k=2,
        token_rounding=mode,
        num_null_experts=nulls,
        routed_scaling_factor=1.5,
    )
    routing, _ = _routing(cfg)
    out = round_token_counts(routing, cfg, tile=8)
    r = [np.asarray(a) for a in (routing.indices, routing.weights, routing.probs)]
    want = _reference(*r, mode, 8, scale=1.5)
    np.testing.assert_allclose(_dense(out), want, rtol=1e-6)
    counts = (_dense(out) > 0).sum(axis=0)
    assert (counts % 8 == 0).all(), counts
    picked = _dense(routing) > 0
    width = routing.indices.shape[1] + (0 if mode == "down" else cfg.rounding_extra)
    assert out.indices.shape == (T, width)
    if mode == "down":  # a subset of the picks
        assert not ((_dense(out) > 0) & ~picked).any()
    if mode == "up":  # a superset, and a strict one here
        assert not (picked & ~(_dense(out) > 0)).any()
        assert (_dense(out) > 0).sum() > picked.sum()
    np.testing.assert_array_equal(np.asarray(out.experts_per_token), (_dense(out) > 0).sum(1))


def test_rounding_gradient_matches_dense_reference():
    cfg = MoEConfig(num_experts=E, top_k=2, token_rounding="up")
    routing, logits = _routing(cfg, seed=1)
    c_TxE = jax.random.normal(jax.random.key(2), (T, E))
    keep = _dense(round_token_counts(routing, cfg, tile=8)) > 0
    chosen = _dense(routing) > 0

    def ours(lg):
        r = round_token_counts(topk_route(lg, cfg), cfg, tile=8)
        c = jnp.take_along_axis(jnp.pad(c_TxE, ((0, 0), (0, 1))), jnp.minimum(r.indices, E), -1)
        return (r.weights * c).sum()

    def dense(lg):
        p = jax.nn.softmax(lg, axis=-1)
        picked = jnp.where(chosen, p, 0.0)
        w = jnp.where(chosen, picked / picked.sum(-1, keepdims=True), p)
        return (jnp.where(keep, w, 0.0) * c_TxE).sum()

    np.testing.assert_allclose(ours(logits), dense(logits), rtol=1e-5)
    np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(dense)(logits), atol=1e-5)


def test_rounded_counts_edges():
    c = jnp.array([0, 1, 4, 7, 8, 9, 60])
    np.testing.assert_array_equal(rounded_counts(c, 8, "down", 64), [0, 0, 0, 0, 8, 8, 56])
    np.testing.assert_array_equal(rounded_counts(c, 8, "up", 64), [0, 8, 8, 8, 8, 16, 64])
    np.testing.assert_array_equal(rounded_counts(c, 8, "nearest", 64), [0, 0, 8, 8, 8, 8, 64])
    # More rows than tokens is impossible: round down instead.
    np.testing.assert_array_equal(rounded_counts(jnp.array([61]), 8, "up", 62), [56])
    # Nor more than the expert's picks plus candidates.
    room = jnp.array([0, 1, 8, 7, 8, 16, 64])
    np.testing.assert_array_equal(rounded_counts(c, 8, "up", 64, room), [0, 0, 8, 0, 8, 16, 64])


def test_moe_block_rounds_in_training_only():
    ex = MoEExecution(gmm_backend="xla", gmm_tile=8)
    base = dict(num_experts=E, top_k=2, d_ff=16, execution=ex)
    x = jax.random.normal(jax.random.key(0), (2, 32, 16))
    plain = MoE(MoEConfig(**base), d_model=16)
    params = plain.init(jax.random.key(1), x, deterministic=True)
    rounded = MoE(MoEConfig(**base, token_rounding="down"), d_model=16)
    for det in (True, False):
        y0, aux0 = plain.apply(params, x, deterministic=det)
        y1, aux1 = rounded.apply(params, x, deterministic=det)
        # The router's losses read its own choices either way.
        np.testing.assert_array_equal(aux0["load_balance_loss"], aux1["load_balance_loss"])
        if det:
            np.testing.assert_array_equal(y0, y1)
        else:
            assert float(aux1["experts_per_token"]) < float(aux0["experts_per_token"])
            assert not np.allclose(y0, y1)


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(token_rounding="floor"), "token_rounding"),
        (dict(token_rounding="up", router="expert_choice"), "token_rounding"),
        (dict(rounding_tile=0), "rounding_tile"),
        (dict(rounding_extra=0), "rounding_extra"),
    ],
)
def test_bad_rounding_config_names_the_field(kw, field):
    with pytest.raises(ValueError, match=f"MoEConfig.{field}="):
        MoEConfig(**kw)
