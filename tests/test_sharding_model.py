"""The whole decoder LM and the train step on 8 fake CPU devices vs one device.

Meshes cover data, fsdp and expert parallelism alone and fsdp x expert x tensor together; the
MoE layers run expert-parallel (both strategies across the cases), routing skewed by a router
bias so some experts take most of the tokens. Tiny sizes: each case is one compile.

Legend: B batch, L length, V vocab, D model width, E experts.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax.layers import ModelConfig, MoEConfig, MoEExecution, Transformer
from moejax.sharding import logical_shardings, make_mesh, sharding_context, unbox
from moejax.train.state import create_train_state
from moejax.train.step import jit_train_step

B, L, V, D, E = 8, 4, 32, 16, 8

MESHES = {
    "data8": dict(data=8),
    "fsdp8": dict(data=1, fsdp=8),
    "data2_exp4": dict(data=2, expert=4),
    "exp8": dict(data=1, expert=8),
    "fsdp2_exp2_ten2": dict(data=1, fsdp=2, expert=2, tensor=2),
}
STRATEGY = {  # alternated so each mesh sees both strategies between the two tests
    "data8": "all_to_all",
    "fsdp8": "all_gather",
    "data2_exp4": "all_to_all",
    "exp8": "all_gather",
    "fsdp2_exp2_ten2": "all_to_all",
}
OTHER = {"all_to_all": "all_gather", "all_gather": "all_to_all"}


def _model_cfg(expert_parallel: str = "none") -> ModelConfig:
    moe = MoEConfig(
        num_experts=E,
        top_k=2,
        d_ff=8,
        num_shared_experts=1,
        execution=MoEExecution(
            gmm_tile=8,
            expert_parallel=expert_parallel,
            ep_capacity_factor=float(E),  # a bound that always holds: all_to_all is exact
        ),
    )
    return ModelConfig(
        vocab_size=V,
        d_model=D,
        num_layers=2,
        num_heads=2,
        num_kv_heads=2,
        d_ff=16,
        max_len=16,
        moe=moe,
    )


def _tokens(length=L):
    return jax.random.randint(jax.random.key(7), (B, length), 0, V)


def _skew(params):
    """Adds a per-expert router bias (through the kernel and the mean of the inputs)."""
    bonus = jnp.linspace(4.0, 0.0, E) / D

    def one(path, leaf):
        name = jax.tree_util.keystr(path)
        return leaf + bonus if "router" in name and "kernel" in name else leaf

    return jax.tree_util.tree_map_with_path(one, params)


def _assert_close(got, want, rtol=2e-5):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * max(1.0, np.abs(w).max()))


def _forward(cfg, params, tokens):
    return jax.jit(functools.partial(Transformer(cfg).apply, deterministic=False))(
        {"params": params}, tokens
    )


@functools.cache
def _single_device_model():
    tokens = _tokens()
    cfg = _model_cfg()
    params = _skew(unbox(Transformer(cfg).init(jax.random.key(0), tokens))["params"])
    return tokens, params, _forward(cfg, params, tokens)


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_transformer_matches_single_device(mesh_name):
    """Logits and aux (gradients: the train-step test below)."""
    tokens, params, (logits0, aux0) = _single_device_model()
    mesh = make_mesh(**MESHES[mesh_name])
    cfg = _model_cfg(STRATEGY[mesh_name])
    # Parameters laid out by the rules (experts split on "expert", embed on fsdp, ...).
    with sharding_context(mesh):
        abstract = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens)
        params_sharded = jax.device_put(params, logical_shardings(abstract, mesh)["params"])
        wi_up = params_sharded["moe_layers"]["moe"]["experts"]["wi_up"]  # [layers, E, D, F]
        assert wi_up.sharding.spec[1] == "expert"
        logits1, aux1 = _forward(cfg, params_sharded, tokens)
    assert float(aux0["expert_load"].max()) > 2.0 / E  # routing is skewed
    _assert_close(logits1, logits0)
    _assert_close(aux1, aux0)


@functools.cache
def _single_device_step():
    return _train_step(_model_cfg(), make_mesh(data=1, devices=jax.devices()[:1]))


def _train_step(cfg, mesh):
    """One SGD step (plain SGD: the update is the gradient, so it tests the gradient)."""
    state, setup = create_train_state(cfg, optax.sgd(0.5), mesh, None, seq_len=L, seed=0)
    state = dataclasses.replace(state, params=_skew(state.params))
    state = jax.device_put(state, setup.state_shardings)
    batch = jax.device_put(_tokens(L + 1), setup.batch_sharding)
    with sharding_context(mesh):
        new_state, metrics = jit_train_step(setup)(state, batch)
    return jax.device_get(new_state.params), jax.device_get(metrics)


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_train_step_matches_single_device(mesh_name):
    """Loss, aux metrics, gradient norm and the SGD-updated parameters (= the gradients)."""
    params0, metrics0 = _single_device_step()
    cfg = _model_cfg(OTHER[STRATEGY[mesh_name]])
    params1, metrics1 = _train_step(cfg, make_mesh(**MESHES[mesh_name]))
    assert set(metrics1) == set(metrics0)
    _assert_close(metrics1, metrics0)
    _assert_close(params1, params0)
