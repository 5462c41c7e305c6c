r"""The memory effect of each remat policy (ModelConfig.remat), compiled deviceless for a target.

    python benchmarks/remat.py      # writes benchmarks/results/remat.md (and remat.json)
    python benchmarks/remat.py --target=tpu-v5e-8 --set train.batch_size=64

Needs the `aot` extra (libtpu for TPU targets). For each policy the train step of the config is
compiled with the target's real compiler (`moejax.compile.compile_report`, no accelerator) and
the row gives the compiler's per-device temporaries (activations kept for the backward pass,
gradients, workspace), host temporaries (what "moe_offload" moves to pinned host memory), the
per-device total, and the roofline step time with the FLOPs and HBM bytes it is derived from
(read from the optimized HLO: recomputation shows as extra FLOPs). All of it is the compiler's
view, an estimate, not a measurement on a device.

Default: configs/deepseek_moe.py (64 fine-grained experts, top-6: the dispatched rows are 6x
the tokens) on tpu-v5p-8 (4 chips) with its experts split 4 ways (mesh expert=4,
expert_parallel=all_to_all: Mosaic kernels run inside the exchange's shard_map).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from moejax.compile import compile_report  # noqa: E402
from moejax.layers.config import REMAT_POLICIES  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "results" / "remat.md"
DEFAULT_SETS = ("mesh.data=1", "mesh.expert=4", "moe.execution.expert_parallel=all_to_all")
_MIB = 2**20


def _load(path: Path, sets: list[str]):
    spec = importlib.util.spec_from_file_location("remat_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for item in sets:
        key, _, text = item.partition("=")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare string, e.g. all_to_all
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def _row(policy: str, config, target: str) -> dict:
    config.model.remat = policy
    start = time.time()
    # At the default matmul precision, whatever the environment sets.
    with jax.default_matmul_precision("default"):
        report = compile_report(config, target)
    row = {
        "policy": policy,
        "temp_bytes": report.temp_bytes,
        "total_bytes": report.total_bytes,
        "host_temp_bytes": report.host_temp_bytes,
        "flops": report.flops,
        "hbm_bytes": report.hbm_bytes,
        "step_seconds": report.step_seconds,
        "bound": report.bound,
        "exchange_bytes": sum(
            v for k, v in report.collective_bytes.items() if k.endswith("all-to-all")
        ),
        "fits": report.fits,
        "wall_seconds": time.time() - start,
    }
    print(json.dumps(row), flush=True)
    return row


def _table(rows: list[dict]) -> list[str]:
    base = next(r for r in rows if r["policy"] == "none")
    lines = [
        "| remat | temporaries (MiB) | vs none | host temporaries (MiB) | total (MiB) "
        "| step time (ms) | bound | FLOPs / device | HBM bytes / device "
        "| all-to-all (MiB) |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['policy']} | {r['temp_bytes'] / _MIB:,.1f} "
            f"| {r['temp_bytes'] / base['temp_bytes']:.2f}x "
            f"| {r['host_temp_bytes'] / _MIB:,.1f} | {r['total_bytes'] / _MIB:,.1f} "
            f"| {r['step_seconds'] * 1e3:.2f} | {r['bound']} | {r['flops']:.3e} "
            f"| {r['hbm_bytes']:.3e} | {r['exchange_bytes'] / _MIB:,.1f} |"
        )
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=REPO / "configs" / "deepseek_moe.py")
    p.add_argument("--target", default="tpu-v5p-8")
    p.add_argument(
        "--set",
        action="append",
        default=None,
        help=f"config override key=value (repeatable); default {' '.join(DEFAULT_SETS)}",
    )
    p.add_argument("--policies", default=",".join(REMAT_POLICIES))
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    sets = list(DEFAULT_SETS) if args.set is None else args.set
    policies = args.policies.split(",")
    if "none" not in policies:
        policies.insert(0, "none")
    rows = [_row(policy, _load(args.config, sets), args.target) for policy in policies]

    config = _load(args.config, sets)
    m = config.model
    command = f"python benchmarks/remat.py --config={args.config.relative_to(REPO)}"
    command += f" --target={args.target}" + "".join(f" --set {s}" for s in sets)
    lines = [
        "# Remat policies: per-device memory and step time, compiled deviceless",
        "",
        f"`{command}` (`jax {jax.__version__}`; the same numbers come from "
        f"`python -m moejax.compile --config={args.config.relative_to(REPO)} "
        f"--target={args.target} --config.model.remat=<policy>` with the same overrides).",
        "",
        f"Model: d_model {m.d_model}, {m.num_layers} layers, {config.moe.num_experts} experts "
        f"top-{config.moe.top_k} of width {config.moe.d_ff}, {m.dtype}; batch "
        f"{config.train.batch_size} x {config.train.seq_len} tokens; mesh "
        + ", ".join(f"{a}={config.mesh[a]}" for a in ("data", "fsdp", "expert", "tensor"))
        + ".",
        "",
        *_table(rows),
        "",
        "Temporaries and host temporaries: the compiler's buffer assignment "
        "(`memory_analysis()`); total: arguments + outputs - aliased + temporaries + code. "
        "Step time: max(FLOPs / peak, HBM bytes / bandwidth) over the optimized HLO with loop "
        "trip counts applied (`moejax.compile.hlo`); recomputation shows in the FLOPs, host "
        "transfers and collectives are not in it. all-to-all: bytes of the expert-parallel "
        "exchange per step (all-to-all and ragged-all-to-all; a policy that recomputes the "
        "exchange in the backward pass sends more). Estimates from the compiler, not "
        "measurements.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
