"""Checkpointer: round trip of state + data + config, keep-last-K, half-written saves ignored."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from moejax.train.checkpoint import Checkpointer
from moejax.train.state import TrainState


def _state(value: float, step: int) -> TrainState:
    return TrainState(
        step=jnp.asarray(step, jnp.int32),
        params={"w": jnp.full((3, 4), value, jnp.float32), "b": jnp.arange(4, dtype=jnp.float32)},
        opt_state=({"mu": jnp.full((3, 4), -value)}, jnp.asarray(7, jnp.int32)),
        moe_state={"layer": {"router": {"expert_bias": jnp.full((2, 4), value / 10)}}},
        rng=jax.random.PRNGKey(step),
        skipped=jnp.asarray(0, jnp.int32),
    )


def _target(state: TrainState) -> TrainState:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


def test_round_trip_and_keep_last(tmp_path):
    ck = Checkpointer(tmp_path, every=2, keep=2)
    cfg = json.dumps({"train": {"steps": 10}, "mesh": {"rules": [["batch", ["data"]]]}})
    saved = []
    for step in range(1, 7):
        if ck.save(step, _state(float(step), step), {"next_index": step * 3}, cfg):
            saved.append(step)
    ck.wait()
    assert saved == [1, 2, 4, 6]  # orbax always saves the first step, then every 2
    assert ck.all_steps() == [4, 6]  # keep=2
    state, data_state, config = ck.restore(_target(_state(0.0, 0)))
    want = _state(6.0, 6)
    jax.tree.map(np.testing.assert_array_equal, state, want)
    assert data_state == {"next_index": 18}
    assert config == json.loads(cfg)
    ck.close()


def test_half_written_checkpoint_is_ignored(tmp_path):
    ck = Checkpointer(tmp_path, every=1, keep=5)
    ck.save(3, _state(3.0, 3), {"next_index": 9}, "{}")
    ck.save(5, _state(5.0, 5), {"next_index": 15}, "{}")
    ck.close()
    # A crash during the save of step 7: orbax had only written its temporary directory (the
    # rename that commits a step never happened), with partial, unreadable contents.
    shutil.copytree(tmp_path / "5", tmp_path / "7.orbax-checkpoint-tmp-1234567")
    for f in (tmp_path / "7.orbax-checkpoint-tmp-1234567").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00garbage")
    fresh = Checkpointer(tmp_path, every=1, keep=5)
    assert fresh.latest_step() == 5
    state, data_state, _ = fresh.restore(_target(_state(0.0, 0)))
    jax.tree.map(np.testing.assert_array_equal, state, _state(5.0, 5))
    assert data_state == {"next_index": 15}
    fresh.close()


def test_no_checkpoint_returns_none(tmp_path):
    ck = Checkpointer(tmp_path / "empty", every=1, keep=1)
    assert ck.latest_step() is None and ck.restore(_target(_state(0.0, 0))) is None
    ck.close()
