"""`python -m moejax.train`: a tiny end-to-end run, invalid config values and bad data."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moejax.train.trainer import train_and_evaluate

REPO = Path(__file__).resolve().parent.parent


def load_config(name="tiny"):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


TINY = [
    "--config.model.d_model=32",
    "--config.model.num_layers=2",
    "--config.model.num_heads=2",
    "--config.model.num_kv_heads=1",
    "--config.model.max_len=64",
    "--config.moe.num_experts=4",
    "--config.moe.d_ff=32",
    "--config.moe.execution.gmm_tile=16",
    "--config.data.max_files=40",
    "--config.train.steps=10",
    "--config.train.batch_size=8",
    "--config.train.seq_len=16",
    "--config.train.log_every=5",
    "--config.train.eval_every=10",
    "--config.train.eval_batches=2",
    "--config.train.sample_tokens=8",
    "--config.opt.lr=0.01",
    "--config.opt.warmup_steps=2",
]


def run_cli(*args, cwd=REPO, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "moejax.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_tiny_run_default_config(tmp_path):
    # No --config: the default configs/tiny.py is found from outside the repo too.
    r = run_cli(f"--workdir={tmp_path}", *TINY, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "val loss" in r.stdout and "sample" in r.stdout and "est. MFU" in r.stdout
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = {x["step"]: x for x in recs if x["split"] == "train"}
    assert sorted(train) == [1, 5, 10]
    assert train[10]["ce_loss"] < train[1]["ce_loss"] - 1.0
    assert [x["step"] for x in recs if x["split"] == "eval"] == [10]
    assert (tmp_path / "checkpoints" / "10").is_dir()
    for name in ("loss.png", "expert_load.png"):
        assert (tmp_path / name).stat().st_size > 1000


@pytest.mark.parametrize(
    ("section", "field", "value", "message"),
    [
        ("moe", "top_k", 9, "MoEConfig.top_k=9"),
        ("model", "num_kv_heads", 3, "ModelConfig.num_kv_heads=3"),
        ("train", "nonfinite", "maybe", "config.train.nonfinite='maybe'"),
        ("train", "microbatches", 3, "config.train.microbatches=3"),
        ("train", "seq_len", 4096, "config.train.seq_len=4096"),
        ("opt", "lr", -1.0, "config.opt.lr=-1.0"),
        ("data", "source", "text", "data.path is required"),
        ("data", "val_fraction", 0.0, "data.val_fraction=0.0"),
    ],
)
def test_invalid_values_name_the_field(tmp_path, section, field, value, message):
    """What the CLI catches and prints (before any compilation or checkpoint is made)."""
    c = load_config()
    c[section][field] = value
    with pytest.raises(ValueError) as e:
        train_and_evaluate(c, tmp_path)
    assert message in str(e.value)
    assert not (tmp_path / "checkpoints").exists()


def test_cli_subprocess_reports_field_and_fails(tmp_path):
    r = run_cli(f"--workdir={tmp_path}", "--config.moe.num_experts=0", "--config.moe.top_k=1")
    assert r.returncode != 0
    assert "num_experts" in r.stderr and "Traceback" not in r.stderr
    bad = run_cli(
        f"--workdir={tmp_path}", "--config.data.source=text", f"--config.data.path={tmp_path}/none"
    )
    assert bad.returncode != 0 and "data.path" in bad.stderr and "does not exist" in bad.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config=configs/nope.py"], "--config=configs/nope.py: no such config file"),
        (["--config.train.stepz=3"], "--config.train.stepz: the config has no field 'stepz'"),
        (
            ["--config=configs/tiny.py", "--config.train.stepz=3"],
            "(did you mean 'steps'?)",
        ),
        (["--config.train.steps=abc"], "--config.train.steps=abc"),
        (
            ["--config.moe.execution.gmm_backend=fast"],
            "error: MoEExecution.gmm_backend='fast' is invalid: allowed values are 'auto', ",
        ),
        # The execution knobs live in moe.execution, not beside the model fields.
        (["--config.moe.gmm_backend=xla"], "the config has no field 'gmm_backend'"),
    ],
)
def test_cli_bad_file_and_unknown_field_one_line_exit_2(tmp_path, args, message):
    r = run_cli(f"--workdir={tmp_path}", *args)
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
