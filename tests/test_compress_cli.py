"""`python -m moejax.compress`: a trained run's checkpoint -> a smaller run that trains on."""

import json

import jax
import numpy as np
import pytest

from moejax.compress.__main__ import compress_run, load_run, main
from moejax.sharding import make_mesh
from moejax.train import config_defaults as defaults
from moejax.train.trainer import train_and_evaluate


def _config(steps):
    config = defaults.base_config(defaults.model_section(), defaults.moe_section())
    config.model.num_layers, config.model.d_model, config.model.d_ff = 2, 32, 64
    config.model.num_heads = config.model.num_kv_heads = 2
    config.moe.d_ff, config.moe.num_experts = 32, 8
    t = config.train
    t.steps, t.batch_size, t.seq_len, t.eval_batches, t.sample_tokens = steps, 8, 16, 2, 0
    t.log_every = t.eval_every = steps
    config.data.max_files = 20
    return config


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("src")
    train_and_evaluate(_config(3), workdir)
    return workdir


@pytest.mark.parametrize("method", ["merge", "prune"])
def test_compressed_run_has_fewer_experts_and_trains_on(source_run, tmp_path, method):
    out = tmp_path / "out"
    s = compress_run(source_run, out, experts=4, method=method, score="output_norm")
    assert s["experts"] == (8, 4) and s["source_step"] == 3
    assert s["params_total"][1] < s["params_total"][0]
    assert np.isfinite(s["val_loss"]).all()
    mesh = make_mesh(data=-1)
    config, state, setup, step = load_run(out, mesh)
    assert step == 0 and int(state.step) == 0 and config.moe.num_experts == 4
    wi = jax.tree.leaves(state.params["moe_layers"]["moe"]["experts"])[0]
    assert wi.shape[1] == 4  # [layers, E, ...]
    assert json.loads((out / "config.json").read_text())["moe"]["num_experts"] == 4
    if method == "prune":
        return  # one method's run trains on (below); the checkpoint layout is the same
    # The written run resumes from its step-0 checkpoint and keeps training.
    config.train.steps = 2
    summary = train_and_evaluate(config, out)
    assert summary["start_step"] == 0 and np.isfinite(summary["final_eval_loss"])


def test_cli_errors_name_the_argument(source_run, tmp_path, capsys):
    assert (
        main(
            [
                "--workdir",
                str(tmp_path / "none"),
                "--out",
                str(tmp_path / "o"),
                "--experts",
                "4",
                "--method",
                "merge",
            ]
        )
        == 2
    )
    assert "--workdir" in capsys.readouterr().err
    assert (
        main(
            [
                "--workdir",
                str(source_run),
                "--out",
                str(tmp_path / "o"),
                "--experts",
                "9",
                "--method",
                "prune",
            ]
        )
        == 2
    )
    assert "num_experts=9" in capsys.readouterr().err
    merge_by_similarity = ["--experts", "4", "--method", "merge", "--score", "similarity"]
    assert (
        main(["--workdir", str(source_run), "--out", str(tmp_path / "o"), *merge_by_similarity])
        == 2
    )
    assert "--score='similarity' is invalid with --method=merge" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--workdir", str(source_run), "--out", "o", "--experts", "4", "--method", "x"])
