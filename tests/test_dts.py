"""router="dts" (EvoMoE's dense-to-sparse gate) against a numpy reference, its temperature
schedule, evaluation routing, and exact resumption mid-schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.layers import MoEConfig
from moejax.moe.routing import ROUTERS, dts_tau, topk_route
from moejax.train.trainer import train_and_evaluate
from tests.test_train import tiny_config, train_records

E = 8


def _cfg(**kw):
    base = dict(router="dts", num_experts=E, top_k=2, max_k=4, dts_threshold=0.05)
    return MoEConfig(**{**base, **kw})


def _route(logits, cfg, tau, key=None):
    key = jax.random.key(1) if key is None else key
    return ROUTERS["dts"].route(logits, cfg, None, key=key, capacity=None, tau=jnp.float32(tau))


def _reference(logits, noise, cfg, tau):
    """numpy: gates = softmax((logits + noise) / tau); keep the max_k best, drop those below
    the threshold but the best; weights = kept gates (renormalised)."""
    z = (np.asarray(logits, np.float64) + noise) / tau
    gates = np.exp(z - z.max(-1, keepdims=True))
    gates /= gates.sum(-1, keepdims=True)
    order = np.argsort(-gates, axis=-1, kind="stable")[:, : cfg.max_k]
    top = np.take_along_axis(gates, order, -1)
    keep = top >= cfg.dts_threshold
    keep[:, 0] = True
    weights = np.where(keep, top, 0.0)
    if cfg.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdims=True)
    return np.where(keep, order, cfg.num_experts), weights * cfg.routed_scaling_factor


@pytest.mark.parametrize("tau", [3.0, 0.7, 0.05])
@pytest.mark.parametrize("norm", [True, False])
def test_dts_matches_numpy_reference(tau, norm):
    cfg = _cfg(norm_topk_prob=norm, routed_scaling_factor=1.5)
    logits = jax.random.normal(jax.random.key(0), (96, E)) * 2.0
    key = jax.random.key(3)
    noise = np.asarray(jax.random.gumbel(key, logits.shape, jnp.float32), np.float64)
    r = _route(logits, cfg, tau, key)
    idx, w = _reference(logits, noise, cfg, tau)
    np.testing.assert_array_equal(np.asarray(r.indices), idx)
    np.testing.assert_allclose(np.asarray(r.weights), w, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(r.experts_per_token), (idx < E).sum(-1))
    # probs are the plain softmax of the logits (what the load-balance loss reads).
    np.testing.assert_allclose(np.asarray(r.probs), jax.nn.softmax(logits), rtol=1e-6)


def test_dts_gradient_matches_dense_reference():
    """The weights' gradient reaches the logits through the gates: compare with the same gate
    written densely over E (kept mask fixed), in plain jnp."""
    cfg = _cfg()
    logits = jax.random.normal(jax.random.key(0), (32, E))
    key, tau = jax.random.key(5), 0.8
    noise = jax.random.gumbel(key, logits.shape, jnp.float32)
    c_TxE = jax.random.normal(jax.random.key(6), (32, E))
    r = _route(logits, cfg, tau, key)
    kept_TxE = jnp.zeros((32, E + 1)).at[jnp.arange(32)[:, None], r.indices].set(1.0)[:, :E]

    def ours(lg):
        rt = _route(lg, cfg, tau, key)
        c = jnp.take_along_axis(jnp.pad(c_TxE, ((0, 0), (0, 1))), rt.indices, -1)
        return (rt.weights * c).sum()

    def dense(lg):
        gates = jax.nn.softmax((lg + noise) / tau, axis=-1) * kept_TxE
        return (gates / gates.sum(-1, keepdims=True) * c_TxE).sum()

    np.testing.assert_allclose(ours(logits), dense(logits), rtol=1e-5)
    np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(dense)(logits), atol=1e-5)


def test_dts_large_tau_is_uniform_over_max_k_and_tiny_tau_picks_one():
    cfg = _cfg(dts_threshold=0.01)
    logits = jax.random.normal(jax.random.key(0), (256, E)) * 3.0
    hot = _route(logits, cfg, 1e4)
    assert (np.asarray(hot.experts_per_token) == cfg.max_k).all()
    np.testing.assert_allclose(np.asarray(hot.weights), 1.0 / cfg.max_k, atol=1e-3)
    cold = _route(logits, cfg, 1e-6)
    assert (np.asarray(cold.experts_per_token) == 1).all()
    np.testing.assert_allclose(np.asarray(cold.weights[:, 0]), 1.0)


def test_dts_evaluation_is_top_k_on_the_logits():
    cfg = _cfg()
    logits = jax.random.normal(jax.random.key(0), (40, E))
    ev = ROUTERS["dts"].eval_route(logits, cfg, None)
    ref = topk_route(logits, MoEConfig(num_experts=E, top_k=2))
    assert ev.indices.shape == (40, cfg.max_k)
    np.testing.assert_array_equal(np.asarray(ev.indices[:, :2]), np.asarray(ref.indices))
    np.testing.assert_array_equal(np.asarray(ev.indices[:, 2:]), E)
    np.testing.assert_array_equal(np.asarray(ev.weights[:, :2]), np.asarray(ref.weights))
    np.testing.assert_array_equal(np.asarray(ev.weights[:, 2:]), 0.0)


def test_dts_tau_schedule_is_cosine_then_constant():
    cfg = _cfg(dts_tau_start=2.0, dts_tau_end=0.2, dts_steps=100)
    got = [float(dts_tau(cfg, s)) for s in (0, 50, 100, 1000)]
    np.testing.assert_allclose(got, [2.0, 1.1, 0.2, 0.2], rtol=1e-6)
    assert float(dts_tau(cfg, 25)) > float(dts_tau(cfg, 26))


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(score_func="sigmoid"), "score_func"),
        (dict(top_k=3, max_k=2), "top_k"),
        (dict(max_k=9), "max_k"),
        (dict(use_expert_bias=True), "use_expert_bias"),
        (dict(dts_threshold=1.0), "dts_threshold"),
        (dict(dts_tau_end=0.0), "dts_tau_end"),
        (dict(dts_steps=0), "dts_steps"),
    ],
)
def test_dts_bad_config_names_the_field(kw, field):
    with pytest.raises(ValueError, match=f"MoEConfig.{field}="):
        _cfg(**kw)


def _dts_config(steps):
    c = tiny_config(steps=steps)
    c.moe.update(router="dts", max_k=3, dts_steps=8, dts_tau_start=2.0, dts_tau_end=0.1)
    c.opt.decay_steps = 8
    return c


def test_dts_run_resumed_mid_schedule_equals_uninterrupted(tmp_path):
    full = train_and_evaluate(_dts_config(8), tmp_path / "full")
    first = _dts_config(4)
    first.train.checkpoint_every = 4
    train_and_evaluate(first, tmp_path / "split")
    resumed = train_and_evaluate(_dts_config(8), tmp_path / "split")
    assert resumed["start_step"] == 4
    a, b = train_records(tmp_path / "full"), train_records(tmp_path / "split")
    assert [a[k]["loss"] for k in range(1, 9)] == [b[k]["loss"] for k in range(1, 9)]
    # The temperature fell with the schedule: more experts per token early than late.
    assert a[1]["experts_per_token"] > a[8]["experts_per_token"]
    state = jax.device_get(full["final_state"])
    taus = [v for p, v in jax.tree_util.tree_leaves_with_path(state.moe_state)]
    assert taus and all(np.allclose(t, 0.1) for t in taus)
    jax.tree.map(np.testing.assert_array_equal, state, jax.device_get(resumed["final_state"]))
