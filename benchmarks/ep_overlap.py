"""Does ep_chunks let the expert exchange overlap the expert matmuls? Read from the schedule of
deviceless compiles for real targets (the `aot` extra), no accelerator needed.

    python benchmarks/ep_overlap.py                       # gpu-h100-8, tpu-v5p-16; chunks 1, 2, 4
    LIBTPU_INIT_ARGS=--xla_tpu_enable_async_all_to_all=true python benchmarks/ep_overlap.py

One MoE layer's routed experts (`moejax.moe.parallel.expert_parallel_ffn`, all_to_all, worst-
case buffers, E16 top-2 D1024 F1024, 1024 bf16 tokens per device, balanced random routing) is
compiled forward for each target and ep_chunks. For each one the table gives the all_to_alls
in the compiled module, how many are asynchronous (a start/done pair), and the compute ops
(fusions, kernels, loops) the schedule puts between each asynchronous start and its done
(`moejax.compile.hlo.async_overlap`): what the exchange can hide behind; the last column
counts only the grouped matmuls among them (Pallas kernels, the XLA gmm's tile loops). XLA:GPU makes
all_to_all asynchronous by default; libtpu only with `--xla_tpu_enable_async_all_to_all=true`
in LIBTPU_INIT_ARGS (read once per process, so it is one run each way). Expert matmuls: the
GPU rows use the XLA grouped matmul (as when they were first measured, before the Triton kernels
compiled inside an expert-parallel shard_map), TPU rows the Mosaic kernel. The exchange is the
fixed one by default; `--exchange=ragged` compiles the ragged one (jax.lax.ragged_all_to_all,
what "auto" picks on these targets) and counts its ragged-all-to-alls instead.
Results: a table on stdout and benchmarks/results/ep_overlap.md (appended per run).
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import argparse  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from moejax.compile.hlo import async_overlap  # noqa: E402
from moejax.compile.targets import parse_target, topology  # noqa: E402
from moejax.layers import MoEConfig, MoEExecution  # noqa: E402
from moejax.moe.experts import ExpertWeights  # noqa: E402
from moejax.moe.parallel import expert_parallel_ffn  # noqa: E402
from moejax.moe.routing import Routing  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
E, D, F, K, TOKENS_PER_DEVICE = 16, 1024, 1024, 2, 1024


def compiled_text(
    target_name: str,
    chunks: int,
    tokens_per_device: int = TOKENS_PER_DEVICE,
    exchange: str = "fixed",
) -> str:
    """Optimized HLO of the routed experts on `target_name` with ep_chunks=chunks and
    ep_exchange=exchange."""
    target = parse_target(target_name)
    devices = topology(target).devices
    n = len(devices)
    mesh = Mesh(
        np.array(devices).reshape(1, 1, n, 1),
        ("data", "fsdp", "expert", "tensor"),
        axis_types=(AxisType.Auto,) * 4,
    )
    backend = "mosaic" if target.platform == "tpu" else "xla"
    cfg = MoEConfig(
        num_experts=E,
        top_k=K,
        d_ff=F,
        execution=MoEExecution(
            expert_parallel="all_to_all",
            ep_exchange=exchange,
            ep_capacity_factor=None,
            ep_chunks=chunks,
            gmm_backend=backend,
            gmm_interpret=False,
        ),
    )
    t = tokens_per_device * n

    def routed(x, idx, w, wi_gate, wi_up, wo):
        zeros = jnp.zeros((t, E), jnp.float32)
        routing = Routing(w, idx, zeros, zeros, jnp.full((t,), K, jnp.int32))
        experts = ExpertWeights(wi_gate, wi_up, wo)
        return expert_parallel_ffn(x, routing, experts, cfg, capacity=1, mesh=mesh)[0]

    tok = NamedSharding(mesh, P("expert", None))
    wts = NamedSharding(mesh, P("expert", None, None))
    spec = jax.ShapeDtypeStruct
    args = (
        spec((t, D), jnp.bfloat16, sharding=tok),
        spec((t, K), jnp.int32, sharding=tok),
        spec((t, K), jnp.float32, sharding=tok),
        spec((E, D, F), jnp.bfloat16, sharding=wts),
        spec((E, D, F), jnp.bfloat16, sharding=wts),
        spec((E, F, D), jnp.bfloat16, sharding=wts),
    )
    with jax.set_mesh(mesh):
        return jax.jit(routed).trace(*args).lower().compile().as_text()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default="gpu-h100-8,tpu-v5p-16")
    p.add_argument("--chunks", default="1,2,4")
    p.add_argument("--exchange", default="fixed", choices=("fixed", "ragged"))
    args = p.parse_args()
    kind = "all-to-all" if args.exchange == "fixed" else "ragged-all-to-all"
    flags = os.environ.get("LIBTPU_INIT_ARGS", "")
    lines = [
        f"LIBTPU_INIT_ARGS={flags!r}, ep_exchange={args.exchange!r}",
        "",
        "| target | ep_chunks | all_to_alls | asynchronous | compute ops in flight per async "
        "all_to_all | of them grouped matmuls |",
        "|---|---|---|---|---|---|",
    ]
    for target in args.targets.split(","):
        for chunks in (int(c) for c in args.chunks.split(",")):
            text = compiled_text(target, chunks, exchange=args.exchange)
            total = len(re.findall(rf" {kind}(?:-start)?\(", text))
            overlap = async_overlap(text, kind)
            matmuls = async_overlap(text, kind, matmuls=True)
            lines.append(
                f"| {target} | {chunks} | {total} | {len(overlap)} | "
                f"{' '.join(map(str, overlap)) or '-'} | {' '.join(map(str, matmuls)) or '-'} |"
            )
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    import sys

    env = f"LIBTPU_INIT_ARGS={flags} " if flags else ""
    command = f"Command: {env}python benchmarks/ep_overlap.py {' '.join(sys.argv[1:])}".rstrip()
    with (RESULTS / "ep_overlap.md").open("a") as f:
        f.write(table + "\n\n" + command + "\n\n")


if __name__ == "__main__":
    main()
