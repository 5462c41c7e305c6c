"""moejax.compile: the HLO statistics, and deviceless compiles of a small MoE for a TPU and a
GPU target (the `aot` extra: libtpu and the jax CUDA plugin; skipped with a reason without it).

The compiles run the real TPU compiler (Mosaic kernels) and XLA's CUDA compiler (Triton
kernels) on this CPU-only host, as `python -m moejax.compile` does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from moejax.compile import hlo, targets

REPO = Path(__file__).resolve().parent.parent

# A while loop run 4 times whose body has a [8, 16] x [16, 32] dot and an all-gather of
# f32[8, 32] (4 ways -> f32[32, 32]), inside a fusion and at top level respectively.
_HLO = """HloModule m

%fused_dot (p0: f32[8,16], p1: f32[16,32]) -> f32[8,32] {
  %p0 = f32[8,16]{1,0} parameter(0)
  %p1 = f32[16,32]{1,0} parameter(1)
  ROOT %dot.1 = f32[8,32]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (arg: (s32[], f32[8,16], f32[16,32])) -> (s32[], f32[8,16], f32[16,32]) {
  %arg = (s32[], f32[8,16], f32[16,32]) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %x = f32[8,16]{1,0} get-tuple-element(%arg), index=1
  %w = f32[16,32]{1,0} get-tuple-element(%arg), index=2
  %f = f32[8,32]{1,0} fusion(%x, %w), kind=kOutput, calls=%fused_dot
  %ag = f32[32,32]{1,0} all-gather(%f), dimensions={0}, replica_groups={{0,1,2,3}}
  ROOT %t = (s32[], f32[8,16], f32[16,32]) tuple(%i, %x, %w)
}

%cond (arg.1: (s32[], f32[8,16], f32[16,32])) -> pred[] {
  %arg.1 = (s32[], f32[8,16], f32[16,32]) parameter(0)
  %n = s32[] constant(4)
  %i.1 = s32[] get-tuple-element(%arg.1), index=0
  ROOT %lt = pred[] compare(%i.1, %n), direction=LT
}

ENTRY %main (a: (s32[], f32[8,16], f32[16,32])) -> (s32[], f32[8,16], f32[16,32]) {
  %a = (s32[], f32[8,16], f32[16,32]) parameter(0)
  ROOT %loop = (s32[], f32[8,16], f32[16,32]) while(%a), condition=%cond, body=%body
}
"""


def test_hlo_stats_apply_trip_counts():
    stats = hlo.analyze_hlo(_HLO)
    assert stats.unknown_trip_counts == 0
    assert stats.flops == 4 * 2 * 8 * 16 * 32
    assert stats.collective_bytes == {"all-gather": 4 * 32 * 32 * 4}
    assert stats.collective_counts == {"all-gather": 4}
    # Per iteration the fusion reads x and w and writes its output (the dot inside it moves
    # nothing more), and the condition compares two s32 into a pred.
    assert stats.hbm_bytes == 4 * ((8 * 16 + 16 * 32 + 8 * 32) * 4 + 4 + 4 + 1)


def test_known_trip_count_wins_over_the_condition():
    text = _HLO.replace("body=%body", 'body=%body, backend_config={"known_trip_count":{"n":"7"}}')
    assert hlo.analyze_hlo(text).collective_counts == {"all-gather": 7}


def _small_config(**mesh):
    from moejax.configs.tiny import get_config

    config = get_config()
    config.model.num_layers = 2  # a scanned stack: the trip count must be applied
    config.model.d_model = 64
    config.model.num_heads = 2
    config.model.num_kv_heads = 1
    config.model.max_len = 64
    config.model.dtype = "bfloat16"
    config.moe.num_experts = 4
    config.moe.d_ff = 128
    config.train.batch_size = 8
    config.train.seq_len = 64
    for axis, size in mesh.items():
        config.mesh[axis] = size
    return config


def _check_sane(report):
    assert report.fits and report.shortfall is None
    assert 0 < report.param_bytes and 0 < report.expert_bytes < report.param_bytes
    assert report.opt_state_bytes >= 2 * report.param_bytes  # Adam's two float32 moments
    assert report.temp_bytes > 0 and 0 < report.total_bytes < report.device_bytes
    assert report.step_seconds > 0 and 0 < report.mfu < 1
    # Per-device HLO FLOPs (remat, padded kernel rows) are close to the model's share.
    share = report.model_flops / report.target.num_devices
    assert 0.8 * share < report.flops < 4 * share


def test_tpu_report_mosaic_sharded():
    pytest.importorskip("libtpu", reason="needs the aot extra (libtpu)")
    from moejax.compile import compile_report

    config = _small_config(data=1, fsdp=2, expert=2)
    config.moe.execution.expert_parallel = "all_to_all"
    report = compile_report(config, "tpu-v5e-4")
    _check_sane(report)
    assert report.mesh == {"data": 1, "fsdp": 2, "expert": 2, "tensor": 1}
    assert report.gmm_backend == "mosaic"
    # Tokens to their experts: ep_exchange="auto" is the ragged exchange on TPU.
    assert report.collective_bytes["ragged-all-to-all"] > 0
    assert report.collective_bytes["all-gather"] > 0  # fsdp weights
    assert {"mosaic:moejax_gmm", "mosaic:moejax_tgmm"} <= set(report.kernels)


def test_tpu_report_mosaic_data_parallel_without_expert_parallel():
    """expert_parallel="none" on 4 TPU chips: the Mosaic kernels run per shard (GSPMD cannot
    partition them: "Mosaic kernels cannot be automatically partitioned" before), with the
    experts replicated and no token exchange."""
    pytest.importorskip("libtpu", reason="needs the aot extra (libtpu)")
    from moejax.compile import compile_report

    report = compile_report(_small_config(data=4), "tpu-v5e-4")
    _check_sane(report)
    assert report.mesh == {"data": 4, "fsdp": 1, "expert": 1, "tensor": 1}
    assert {"mosaic:moejax_gmm", "mosaic:moejax_tgmm"} <= set(report.kernels)
    assert "all-to-all" not in report.collective_bytes
    assert "ragged-all-to-all" not in report.collective_bytes


def test_gpu_report_triton():
    pytest.importorskip("jax_cuda13_plugin", reason="needs the aot extra (jax CUDA plugin)")
    from moejax.compile import compile_report

    report = compile_report(_small_config(), "gpu-h100-1")
    _check_sane(report)
    assert report.gmm_backend == "triton"
    assert report.collective_bytes == {}
    assert any(k.startswith("triton:") and "tgmm" in k for k in report.kernels)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "moejax.compile", f"--config={REPO / 'configs' / 'tiny.py'}", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )


def test_cli_names_the_shortfall():
    pytest.importorskip("libtpu", reason="needs the aot extra (libtpu)")
    # A 2^26-token vocabulary: 64 GiB of embedding and output weights on a 16 GiB chip, so the
    # state alone does not fit and nothing is compiled.
    out = _cli(
        "--target=tpu-v5e-1",
        "--config.model.vocab_size=67108864",
        "--config.model.num_layers=1",
    )
    assert out.returncode == 1, out.stderr[-2000:]
    assert "fits                    NO" in out.stdout or "NO: tpu-v5e-1" in out.stdout
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("does not fit: tpu-v5e-1: the train state alone needs ")
    assert "GiB more than its 16 GiB (parameters 64.0, optimizer 128.0 GiB)" in last


def test_bad_target_exit_2(capsys):
    from moejax.compile.__main__ import main

    def flag(value):
        return types.SimpleNamespace(value=value)

    assert main(["compile"], config_flag=flag(_small_config()), target_flag=flag("tpu-v9-8")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --target='tpu-v9-8' is invalid; allowed:")


def test_compiler_out_of_memory_messages():
    from moejax.compile.report import _oom_total

    used = "RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 20.50G of 15.75G hbm."
    assert _oom_total(used, 0) == int(20.5 * 2**30)
    temps = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (258.01G) exceeds available HBM (15.75G)."
    )
    assert _oom_total(temps, 2**30) == 2**30 + int(258.01 * 2**30)
    assert _oom_total("INVALID_ARGUMENT: something else", 0) is None


def test_trainer_peaks_come_from_targets_and_a_measured_cpu_matmul():
    from moejax.train import trainer

    assert targets.target_of_device_kind("TPU v5 lite").name == "tpu-v5e-1"
    assert targets.target_of_device_kind("TPU v5").name == "tpu-v5p-1"
    h100 = targets.target_of_device_kind("NVIDIA H100 80GB HBM3")
    assert h100.name == "gpu-h100-1" and round(h100.peak_flops / 1e12) == 989
    assert targets.target_of_device_kind("NVIDIA A100-SXM4-40GB") is None
    config = types.SimpleNamespace(train=types.SimpleNamespace(peak_flops=None))
    peak = trainer._peak_flops(config)
    assert 1e8 < peak < 1e14  # a 2-core laptop to a large server, in float32 FLOP/s
    assert trainer._peak_flops(config) == peak  # measured once per process


def test_gpu_report_triton_inside_expert_parallel_shard_map():
    """The Triton kernels' output types carry the shard_map's varying axes (as Mosaic's do), so
    a Triton MoE under the expert-parallel exchange compiles for a multi-GPU target."""
    pytest.importorskip("jax_cuda13_plugin", reason="needs the aot extra (jax CUDA plugin)")
    from moejax.compile import compile_report

    config = _small_config(data=2, expert=2)
    config.moe.execution.expert_parallel = "all_to_all"
    report = compile_report(config, "gpu-h100-4")
    _check_sane(report)
    assert report.gmm_backend == "triton"
    assert report.collective_bytes["ragged-all-to-all"] > 0  # ep_exchange="auto" on GPU
    assert {"triton:gmm", "triton:tgmm"} <= set(report.kernels)


def _ep_overlap_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "ep_overlap", REPO / "benchmarks" / "ep_overlap.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ep_chunks_overlap_the_exchange_with_expert_matmuls_on_gpu():
    """Deviceless H100 x 8 compile of the routed experts (benchmarks/ep_overlap.py): XLA:GPU
    makes the all_to_alls asynchronous, and with ep_chunks=2 one chunk's exchange is in flight
    across grouped matmuls of the other chunk, more of them than with one chunk."""
    pytest.importorskip("jax_cuda13_plugin", reason="needs the aot extra (jax CUDA plugin)")
    bench = _ep_overlap_module()
    in_flight = {}
    for chunks in (1, 2):
        text = bench.compiled_text("gpu-h100-8", chunks, tokens_per_device=256)
        overlap = hlo.async_overlap(text, matmuls=True)
        assert len(overlap) == 3 * chunks  # every exchange asynchronous
        in_flight[chunks] = sum(overlap)
    assert in_flight[2] > in_flight[1]
    # A synchronous collective has no start/done pair, so nothing is counted for it.
    assert hlo.async_overlap(_HLO, "all-gather") == []
