"""Multi-process runs on localhost: 2 processes x 2 CPU devices == 1 process x 4 devices.

Each run goes through the CLI (`python -m moejax.train`) in subprocesses that join with
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, the JAX distributed runtime
and its CPU collectives. The data is process-count invariant (moejax.train.data), so every
logged train and eval metric must match the one-process run over the same 4 devices, and a
2-process checkpoint resumed by one process continues with the same batches.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from moejax.train.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
DEVICES = 4  # in every run: 1 process x 4 devices or 2 processes x 2 devices
RUN_TIMEOUT_S = 420  # per run, all its processes together (a loaded 2-core CPU)

# Where the expert-execution knobs (expert_parallel, gmm_tile) live in the config.
MOE_EXECUTION = "--config.moe.execution."

STEPS = 6
TINY = [
    "--config=configs/tiny.py",
    "--config.model.d_model=32",
    "--config.model.num_layers=2",
    "--config.model.num_heads=2",
    "--config.model.num_kv_heads=1",
    "--config.model.d_ff=64",
    "--config.model.max_len=64",
    "--config.moe.num_experts=4",
    "--config.moe.d_ff=32",
    f"{MOE_EXECUTION}gmm_tile=16",
    "--config.data.max_files=40",
    "--config.train.batch_size=8",
    "--config.train.seq_len=16",
    "--config.train.log_every=1",
    "--config.train.eval_every=3",
    "--config.train.eval_batches=2",
    "--config.train.checkpoint_every=3",
    "--config.train.sample_tokens=0",
    "--config.opt.lr=0.01",
    "--config.opt.warmup_steps=2",
]

LAYOUTS = {
    "data_parallel": {"mesh.data": 4},
    "fsdp": {"mesh.data": 1, "mesh.fsdp": 4},
    "all_to_all": {"mesh.data": 1, "mesh.expert": 4, "expert_parallel": "all_to_all"},
    "all_gather": {"mesh.data": 2, "mesh.expert": 2, "expert_parallel": "all_gather"},
}

# LLVM's optimisation passes are a third of the (CPU) compile time of these few-step runs; every
# run compiles with the same flags, so the comparisons are unaffected.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

# Metrics that are timing, not model state.
UNTIMED = ("tokens_per_s", "mfu")
# Measured: 2 processes differ from 1 by at most 4.8e-7 (2.2e-7 relative) over these 6 steps,
# float32 rounding of the cross-process reductions (the CPU collectives sum in another order);
# the process-count-dependent batches this guards against moved the losses by 0.05 to 0.5.
RTOL, ATOL = 1e-5, 1e-6
# metrics.jsonl rounds list values (expert_load, per-layer metrics) to 5 decimals: a rounding
# difference is one step of 1e-5.
ROUNDED_ATOL = 1.01e-5


def run_flags(name: str) -> list[str]:
    """The command-line overrides of a STEPS-step run with the mesh of LAYOUTS[name]."""
    flags = [f"--config.train.steps={STEPS}"]
    for key, value in LAYOUTS[name].items():
        prefix = MOE_EXECUTION if key == "expert_parallel" else "--config."
        flags.append(f"{prefix}{key}={value}")
    return flags


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(workdir: Path, flags: list[str], *, processes: int, cache_dir: Path) -> None:
    """Trains with the CLI in `processes` processes (DEVICES in all) into `workdir`.

    Every process is killed (its whole process group) when the run fails, times out or the
    test is interrupted; a failing process's log tail is in the assertion message.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(
        PYTHONPATH=str(REPO),
        PYTHONWARNINGS="ignore",
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES // processes} {FAST_COMPILE}",
        # Runs of one layout compile the same programs (the resume legs reuse them).
        JAX_COMPILATION_CACHE_DIR=str(cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    if processes > 1:
        env.update(
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}", JAX_NUM_PROCESSES=str(processes)
        )
    command = [sys.executable, "-m", "moejax.train", *TINY, *flags, f"--workdir={workdir}"]
    procs, logs = [], []
    try:
        for rank in range(processes):
            log_path = workdir / f"process{rank}.log"
            logs.append(log_path)
            with open(log_path, "a") as log:
                procs.append(
                    subprocess.Popen(
                        command,
                        cwd=REPO,
                        env=dict(env, JAX_PROCESS_ID=str(rank)) if processes > 1 else env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,  # its own process group, killed as one
                    )
                )
        deadline = time.monotonic() + RUN_TIMEOUT_S
        # Until all exit, one fails (the others would wait for it in a collective) or timeout.
        while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(procs[0].args, RUN_TIMEOUT_S)
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    failed = [(p, log) for p, log in zip(procs, logs, strict=True) if p.returncode]
    assert not failed, "\n".join(
        f"process {logs.index(log)} exit {p.returncode}:\n{log.read_text()[-3000:]}"
        for p, log in failed
    )


def assert_same_metrics(got_dir: Path, want_dir: Path) -> None:
    """Every logged train and eval record matches: same steps, once each, same values."""
    got, want = read_metrics(got_dir), read_metrics(want_dir)
    assert sorted(got) == sorted(want) == ["eval", "train"]
    for split in want:
        assert [r["step"] for r in got[split]] == [r["step"] for r in want[split]]
        for g, w in zip(got[split], want[split], strict=True):
            assert sorted(g) == sorted(w)
            for key in sorted(set(w) - {"split", *UNTIMED}):
                rounded = isinstance(w[key], list)
                np.testing.assert_allclose(
                    g[key],
                    w[key],
                    rtol=0 if rounded else RTOL,
                    atol=ROUNDED_ATOL if rounded else ATOL,
                    err_msg=f"{split} step {w['step']} {key}",
                )
    lines = (got_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == sum(len(recs) for recs in got.values())  # each step once


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("xla_cache")


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory, cache_dir):
    """The 1-process x 4-device reference run of each layout, trained on first use."""
    runs: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in runs:
            workdir = tmp_path_factory.mktemp(f"{name}_1proc")
            run_cli(workdir, run_flags(name), processes=1, cache_dir=cache_dir)
            runs[name] = workdir
        return runs[name]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(LAYOUTS) - {"fsdp"}))
def test_two_processes_equal_one(name, tmp_path, cache_dir, one_process_runs):
    run_cli(tmp_path, run_flags(name), processes=2, cache_dir=cache_dir)
    want = one_process_runs(name)
    assert [r["step"] for r in read_metrics(want)["train"]] == list(range(1, STEPS + 1))
    assert [r["step"] for r in read_metrics(want)["eval"]] == [3, 6]
    assert_same_metrics(tmp_path, want)


@pytest.mark.slow
def test_fsdp_two_processes_equal_one_and_resume_on_one(tmp_path, cache_dir, one_process_runs):
    # The parameters and optimizer state are split over both processes' devices here, so the
    # checkpoint is written in two halves; one process must restore it whole.
    run_cli(tmp_path, run_flags("fsdp"), processes=2, cache_dir=cache_dir)
    want = one_process_runs("fsdp")
    assert_same_metrics(tmp_path, want)
    # The run is stopped after step 6 before its last save commits: step 3 is the latest
    # checkpoint, and metrics.jsonl holds steps 4..6 that the resumed run logs again.
    shutil.rmtree(tmp_path / "checkpoints" / str(STEPS))
    assert (tmp_path / "checkpoints" / "3").is_dir()
    run_cli(tmp_path, run_flags("fsdp"), processes=1, cache_dir=cache_dir)
    log = (tmp_path / "process0.log").read_text()
    assert "steps        3 -> 6" in log  # restored state and the global data position
    assert_same_metrics(tmp_path, want)
