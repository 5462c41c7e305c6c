"""Starting a run from another run's checkpoint (config.init): as is, and upcycled dense -> MoE."""

import shutil

import jax
import numpy as np
import pytest

from moejax import sharding
from moejax.train.step import eval_step
from moejax.train.trainer import train_and_evaluate, validate_config
from moejax.train.warm_start import load_run, state_setup, warm_start
from tests.test_train import tiny_config


def _dense(steps=4):
    c = tiny_config(steps=steps)
    c.moe = None  # the same model with a dense FFN of width model.d_ff = 64 in every layer
    return c


def _moe_from(source, steps=2, method="copy"):
    c = tiny_config(steps=steps)
    c.moe.d_ff = c.model.d_ff if method == "copy" else c.model.d_ff // c.moe.num_experts
    c.init.from_checkpoint = str(source)
    c.init.upcycle = method
    return c


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dense")
    train_and_evaluate(_dense(), workdir)
    return workdir


def _tokens(seed=0):
    return jax.random.randint(jax.random.key(seed), (4, 17), 0, 256)


def test_copy_upcycled_start_computes_the_dense_model(dense_run):
    mesh = sharding.make_mesh(data=-1)
    _, dense_state, dense_setup, step = load_run(dense_run, mesh)
    assert step == 4
    config = _moe_from(dense_run)
    state, setup = state_setup(config, mesh)
    started = warm_start(config, state, setup)
    assert int(started.step) == 0
    # A fresh optimizer: Adam's moments are zero.
    moments = [x for x in jax.tree.leaves(started.opt_state) if np.ndim(x) >= 1]
    assert moments and all(not np.asarray(x).any() for x in moments)
    for seed in range(2):
        want = eval_step(dense_state, _tokens(seed), model=dense_setup.model)["ce_loss"]
        got = eval_step(started, _tokens(seed), model=setup.model)["ce_loss"]
        np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


def _leaf(params, *names):
    """The one array whose path ends with `names` (the stack's module name varies)."""
    (leaf,) = [
        x
        for path, x in jax.tree_util.tree_leaves_with_path(params)
        if tuple(k.key for k in path[-len(names) :]) == names
    ]
    return np.asarray(jax.device_get(leaf))


def test_partition_upcycled_start_with_calibration(dense_run):
    mesh = sharding.make_mesh(data=-1)
    config = _moe_from(dense_run, method="partition")
    state, setup = state_setup(config, mesh)
    calib = [np.asarray(_tokens(3))[:, :-1]]
    started = warm_start(config, state, setup, calibration=calib)
    _, dense_state, _, _ = load_run(dense_run, mesh)
    # Scanned layout [layers, ...]: each layer's experts hold a permutation of the dense FFN's
    # hidden units, 64 / 4 = 16 each.
    up_NxExDxf = _leaf(started.params, "experts", "wi_up")
    dense_NxDxF = _leaf(dense_state.params, "mlp", "wi_up")
    assert up_NxExDxf.shape == (2, 4, 32, 16)
    for layer in range(2):
        cols = up_NxExDxf[layer].transpose(0, 2, 1).reshape(64, 32)
        want = dense_NxDxF[layer].T
        np.testing.assert_array_equal(np.sort(cols, axis=0), np.sort(want, axis=0))
        assert sorted(map(tuple, cols)) == sorted(map(tuple, want))
    loss = eval_step(started, _tokens(0), model=setup.model)["ce_loss"]
    assert np.isfinite(float(loss))


def test_upcycled_run_trains_and_resumes_without_the_source(tmp_path, dense_run):
    source = tmp_path / "dense_copy"
    shutil.copytree(dense_run, source)
    s = train_and_evaluate(_moe_from(source, steps=2), tmp_path / "moe")
    assert s["start_step"] == 0 and s["final_train_loss"] < 5.0  # not a random init (~5.5)
    shutil.rmtree(source)  # a resume reads this run's own checkpoint, never the source
    s = train_and_evaluate(_moe_from(source, steps=3), tmp_path / "moe")
    assert s["start_step"] == 2 and s["steps"] == 3


def test_plain_start_takes_the_parameters_as_they_are(tmp_path):
    src = tiny_config(steps=2)
    train_and_evaluate(src, tmp_path / "src")
    mesh = sharding.make_mesh(data=-1)
    _, src_state, _, _ = load_run(tmp_path / "src", mesh)
    config = tiny_config(steps=2)
    config.opt.lr = 1e-3  # another optimizer setting: a fine-tune of the same model
    config.init.from_checkpoint = str(tmp_path / "src")
    state, setup = state_setup(config, mesh)
    started = warm_start(config, state, setup)
    jax.tree.map(
        np.testing.assert_array_equal,
        jax.device_get(started.params),
        jax.device_get(src_state.params),
    )
    assert int(started.step) == 0


def test_bad_init_values_name_the_field(tmp_path, dense_run):
    c = _moe_from(dense_run)
    c.init.upcycle = "clone"
    with pytest.raises(ValueError, match="config.init.upcycle='clone' is invalid"):
        validate_config(c)
    c = tiny_config()
    c.init.upcycle = "copy"
    with pytest.raises(ValueError, match="needs config.init.from_checkpoint"):
        validate_config(c)
    mesh = sharding.make_mesh(data=-1)
    for config, message in (
        (_moe_from(tmp_path / "nowhere"), "config.init.from_checkpoint=.*nowhere: no checkpoints"),
        (_dense(), "config.init.upcycle='copy': this run's model is dense"),
    ):
        config.init.from_checkpoint = config.init.from_checkpoint or str(dense_run)
        config.init.upcycle = "copy"
        state, setup = state_setup(config, mesh)
        with pytest.raises(ValueError, match=message):
            warm_start(config, state, setup)
    # Taken as they are, dense parameters do not fit an MoE model: the error says what to set.
    config = _moe_from(dense_run)
    config.init.upcycle = None
    state, setup = state_setup(config, mesh)
    with pytest.raises(ValueError, match="do not fit this run's model.*config.init.upcycle"):
        warm_start(config, state, setup)
    # A source whose other fields differ cannot be upcycled into this model.
    config = _moe_from(dense_run)
    config.model.num_heads = 4
    state, setup = state_setup(config, mesh)
    with pytest.raises(ValueError, match="differs from this run's in config.model fields"):
        warm_start(config, state, setup)
