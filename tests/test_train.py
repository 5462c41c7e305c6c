"""Train step and loop: loss falls, restart == uninterrupted, accumulation, non-finite, bias."""

import functools
import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax import sharding
from moejax.layers import model_config_from_dict
from moejax.train import state as state_lib
from moejax.train import step as step_lib
from moejax.train.trainer import NonFiniteError, train_and_evaluate

REPO = Path(__file__).resolve().parent.parent


def load_config(name="tiny"):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def tiny_config(steps=6):
    """configs/tiny.py shrunk to seconds: D32, 2 layers, 4 experts, L16, batch 8."""
    c = load_config()
    c.model.update(d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, d_ff=64, max_len=64)
    c.moe.update(num_experts=4, top_k=2, d_ff=32)
    c.moe.execution.gmm_tile = 16
    c.data.max_files = 40
    c.train.update(
        steps=steps,
        batch_size=8,
        seq_len=16,
        log_every=1,
        eval_every=steps,
        eval_batches=2,
        checkpoint_every=steps,
        sample_tokens=0,
    )
    c.opt.update(lr=1e-2, warmup_steps=2)
    return c


def train_records(workdir):
    recs = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in recs if r["split"] == "train"}


def test_restart_matches_uninterrupted_run(tmp_path):
    """2N steps straight == N steps, then a restart with fresh objects, then N more steps.

    Also the end-to-end check of a tiny run: the loss falls and every output is written."""
    n = 4
    straight = tiny_config(steps=2 * n)
    straight.opt.decay_steps = 2 * n  # same schedule whether the run is split or not
    s_full = train_and_evaluate(straight, tmp_path / "full")

    first = tiny_config(steps=n)
    first.opt.decay_steps = 2 * n
    first.train.checkpoint_every = n
    s_a = train_and_evaluate(first, tmp_path / "split")
    assert s_a["start_step"] == 0
    second = tiny_config(steps=2 * n)  # fresh config, model, state, iterator, manager
    second.opt.decay_steps = 2 * n
    s_b = train_and_evaluate(second, tmp_path / "split")
    assert s_b["start_step"] == n

    full, split = train_records(tmp_path / "full"), train_records(tmp_path / "split")
    for k in range(1, 2 * n + 1):
        assert full[k]["loss"] == split[k]["loss"], k  # bitwise on CPU
        assert full[k]["expert_load"] == split[k]["expert_load"], k
    assert s_full["final_eval_loss"] == s_b["final_eval_loss"]
    # The run learns: ~5.5 nats/byte at init, clearly lower after 8 steps.
    assert full[1]["ce_loss"] > 5.0 and full[2 * n]["ce_loss"] < full[1]["ce_loss"] - 1.0
    assert s_full["final_eval_loss"] < 5.0 and s_full["skipped_steps"] == 0
    load = np.array(full[2 * n]["expert_load"])
    assert load.shape == (2, 4)
    np.testing.assert_allclose(load.sum(-1), 1.0, atol=1e-4)
    for name in ("loss.png", "expert_load.png", "metrics.jsonl"):
        assert (tmp_path / "full" / name).is_file()
    assert list((tmp_path / "full" / "tensorboard").glob("events.out.tfevents*"))
    assert s_full["params_active"] < s_full["params_total"]
    jax.tree.map(
        np.testing.assert_array_equal,
        jax.device_get(s_full["final_state"]),
        jax.device_get(s_b["final_state"]),
    )

    # Resume hygiene: the step-8 checkpoint is lost (a kill before its commit), so the run
    # resumes from step 4 and logs steps 5..8 again; each step stays in the logs once.
    import shutil

    shutil.rmtree(tmp_path / "split" / "checkpoints" / str(2 * n))
    s_c = train_and_evaluate(tiny_config(steps=2 * n), tmp_path / "split")
    assert s_c["start_step"] == n
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    keys = [(r["split"], r["step"]) for r in map(json.loads, lines)]
    assert len(keys) == len(set(keys)) and ("eval", 2 * n) in keys
    split = train_records(tmp_path / "split")
    assert [split[k]["loss"] for k in range(1, 2 * n + 1)] == [
        full[k]["loss"] for k in range(1, 2 * n + 1)
    ]


def _setup(moe_updates=None, seed=0):
    c = tiny_config()
    if moe_updates:
        c.moe.update(moe_updates)
    model_cfg = model_config_from_dict(c.model.to_dict(), c.moe.to_dict())
    mesh = sharding.make_mesh(data=1, devices=jax.devices()[:1])
    tx = state_lib.make_optimizer(c.opt, 10)
    st, setup = state_lib.create_train_state(model_cfg, tx, mesh, None, seq_len=16, seed=seed)
    return st, setup, model_cfg


def _tokens(batch=8, seq=16, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (batch, seq + 1)), jnp.int32)


@pytest.fixture(scope="module")
def base():
    """(state, setup, jitted default train step) shared by the step tests (one compile)."""
    st, setup, model_cfg = _setup()
    fn = jax.jit(functools.partial(step_lib.train_step, model=setup.model, tx=setup.tx))
    return st, setup, fn


def test_gradient_accumulation_equals_full_batch():
    microbatches = 4
    # Switch load-balance loss is a product of batch means (not additive over microbatches);
    # with it off every term is a token mean, so accumulation must reproduce the full batch.
    st, setup, _ = _setup(moe_updates={"load_balance_coef": 0.0})
    sgd = optax.sgd(1.0)  # params_new = params - grad: compares gradients directly
    st = st.replace(opt_state=sgd.init(st.params))
    tokens = _tokens()
    run = lambda m: jax.jit(  # noqa: E731
        functools.partial(step_lib.train_step, model=setup.model, tx=sgd, microbatches=m)
    )(st, tokens)
    full_state, full_m = run(1)
    acc_state, acc_m = run(microbatches)
    np.testing.assert_allclose(acc_m["loss"], full_m["loss"], rtol=1e-5)
    np.testing.assert_allclose(acc_m["grad_norm"], full_m["grad_norm"], rtol=1e-4)
    np.testing.assert_allclose(acc_m["expert_load"], full_m["expert_load"], atol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        acc_state.params,
        full_state.params,
    )
    with pytest.raises(ValueError, match="microbatches"):
        step_lib.train_step(st, tokens, model=setup.model, tx=sgd, microbatches=3)


def test_train_step_matches_reference_loss_and_update(base):
    st, setup, fn = base
    tokens = _tokens()
    new, m = fn(st, tokens)
    logits, aux = setup.model.apply(
        {"params": st.params}, tokens[:, :-1], deterministic=False, rngs={"jitter": st.rng}
    )
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    ce = -np.take_along_axis(np.asarray(logp), np.asarray(tokens[:, 1:, None]), -1).mean()
    np.testing.assert_allclose(m["ce_loss"], ce, rtol=1e-5)
    np.testing.assert_allclose(m["loss"], ce + aux["aux_loss"], rtol=1e-5)
    assert int(new.step) == 1 and int(new.skipped) == 0
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(st.params), strict=True)
    )
    ev = step_lib.eval_step(new, tokens, model=setup.model)
    assert np.isfinite(ev["ce_loss"]) and ev["ce_loss"] < m["ce_loss"]


def test_nonfinite_step_is_skipped_and_counted(base):
    st, setup, fn = base
    params = jax.tree.map(lambda p: p, st.params)
    params["embed"] = jax.tree.map(lambda e: e.at[0, 0].set(jnp.inf), params["embed"])
    bad = st.replace(params=params)
    tokens = _tokens().at[:, 0].set(0)  # token 0 hits the inf embedding
    new, m = fn(bad, tokens)
    assert float(m["skipped"]) == 1.0 and int(new.skipped) == 1 and int(new.step) == 1
    jax.tree.map(np.testing.assert_array_equal, new.params, bad.params)
    jax.tree.map(np.testing.assert_array_equal, new.opt_state, bad.opt_state)


def test_nonfinite_stop_policy_in_loop(tmp_path):
    policy = "stop"  # "skip" is the step-level behaviour tested above
    c = tiny_config(steps=4)
    c.opt.update(lr=1e30, warmup_steps=0, grad_clip=0.0)  # step 1 blows the weights up
    c.train.update(nonfinite=policy, checkpoint_every=1, sample_tokens=0)
    with pytest.raises(NonFiniteError, match="non-finite"):
        train_and_evaluate(c, tmp_path)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    recs = train_records(tmp_path)
    bad = min(k for k, r in recs.items() if r["skipped"])
    assert bad >= 2 and steps and all(s < bad for s in steps)  # never checkpointed


def test_expert_bias_update_moves_load_toward_balance():
    # Skewed routing: a large initial bias sends most tokens to expert 0. With the optimizer
    # practically off (lr 1e-12) only the aux-loss-free bias update can rebalance the load.
    st, setup, model_cfg = _setup(
        moe_updates={"use_expert_bias": True, "bias_update_rate": 0.05, "load_balance_coef": 0.0}
    )
    assert "expert_bias" not in str(jax.tree_util.tree_structure(st.opt_state))
    skew = jnp.zeros(model_cfg.moe.num_experts).at[0].set(1.0)
    moe_state = jax.tree.map(lambda b: b + skew, st.moe_state)
    tx = optax.adamw(1e-12)
    st = st.replace(moe_state=moe_state, opt_state=tx.init(st.params))
    fn = jax.jit(
        functools.partial(
            step_lib.train_step,
            model=setup.model,
            tx=tx,
            bias_rate=step_lib.bias_update_rate(model_cfg),
        )
    )
    tokens = _tokens(batch=16)
    loads = []
    for _ in range(40):
        st, m = fn(st, tokens)
        loads.append(np.asarray(m["expert_load"]))
    balanced = 1.0 / model_cfg.moe.num_experts
    start = np.abs(loads[0] - balanced).max()
    end = np.abs(np.mean(loads[-5:], axis=0) - balanced).max()
    # Expert 0 starts in every token's top-2 (load 1/K = 0.5, the maximum) in every layer.
    assert loads[0][:, 0].min() >= 0.49
    assert end < 0.5 * start, (start, end)
    bias = np.asarray(jax.tree.leaves(st.moe_state)[0])
    assert (bias[:, 0] < 1.0).all()  # the overloaded expert's bias went down
