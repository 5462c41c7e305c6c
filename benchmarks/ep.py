"""Expert-parallel strategies on a fake 8-device CPU mesh: step time and bytes communicated.

    python benchmarks/ep.py                                  # T=4096 D256 F512 E8 top-2
    python benchmarks/ep.py --tokens 1024 --repeats 3        # quick look

For each mesh and strategy, the MoE layer's forward+backward (value and grad w.r.t. every
weight and the input) is jitted under the mesh and measured:
  step ms      median wall time over --repeats rounds, interleaved across the strategies so that
               load from other processes hits them alike (8 fake devices share the host cores:
               the figures are relative, not a prediction for real accelerators);
  comm bytes   bytes per device, summed over the compiled HLO's collectives (all-to-all,
               all-gather, reduce-scatter, all-reduce, collective-permute) as the sizes of their
               operands, split by collective kind.
Strategies (`STRATEGIES`): "all_to_all" and "all_gather" (moejax.moe.parallel, inside
shard_map); "all_to_all_worst" (ep_capacity_factor=None: send buffers for the worst case,
nothing dropped); "all_to_all_chunks2" (ep_chunks=2: two independent exchanges per layer that
an accelerator's scheduler can overlap with the other chunk's matmuls; the CPU runs them in
turn); and "gspmd" (expert_parallel="none": the single-device dispatch with the experts sharded
by the logical rules, XLA's SPMD partitioner choosing the collectives), with routing skewed so
that a few experts take most tokens. The all_to_all send-buffer bound is --ep-capacity-factor;
the dropped fraction it caused is reported. Results: a table on stdout and
benchmarks/results/ep.{md,json}.

    python benchmarks/ep.py --deviceless                     # gpu-h100-8, tpu-v5p-16 (aot extra)

The ragged exchange (ep_exchange="ragged", `jax.lax.ragged_all_to_all`) does not run on CPU, so
it is compared with the fixed buffers from deviceless compiles instead (no accelerator, no
times): the MoE layer's fwd+bwd (E16 top-2 D1024 F1024, 1024 bf16 tokens per device, expert=8)
for each target, exchange and ep_capacity_factor. Per device and step: the token collectives'
buffer bytes read off the optimized HLO (all-to-all operands; for ragged-all-to-all the data
operand, the most it can send, which for the way back is the R-row receive buffer), the bytes
the ragged exchange actually moves when every kept row crosses (4 x A x D x 2 bytes: there and
back, forward and backward; A = tokens x top-k rows, the same for any routing when nothing is
dropped), and the compiler's temporaries (`memory_analysis`). Results: benchmarks/results/
ep.deviceless.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from moejax.layers import MoE, MoEConfig, MoEExecution  # noqa: E402
from moejax.sharding import logical_shardings, make_mesh, sharding_context, unbox  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
COLLECTIVES = (
    "all-to-all",
    "ragged-all-to-all",
    "all-gather",
    "reduce-scatter",
    "all-reduce",
    "collective-permute",
)
DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1}
MESHES = {"data2_exp4": dict(data=2, expert=4), "exp8": dict(data=1, expert=8)}
# name -> (MoEExecution.expert_parallel, other MoEExecution fields; ep_capacity_factor "arg" =
# --ep-capacity-factor)
STRATEGIES = {
    "all_to_all": ("all_to_all", {"ep_capacity_factor": "arg"}),
    "all_to_all_worst": ("all_to_all", {"ep_capacity_factor": None}),
    "all_to_all_chunks2": ("all_to_all", {"ep_capacity_factor": "arg", "ep_chunks": 2}),
    "all_gather": ("all_gather", {}),
    "gspmd": ("none", {}),
}

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*?)\)(,|$)")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")


def _type_bytes(type_str: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(type_str):
        size = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
        total += size * DTYPE_BYTES.get(dtype, 4)
    return total


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes per device of each collective kind: the sum of its operands' sizes.

    Each instruction's result type is recorded by name, so an operand's size is looked up from
    the instruction that defines it (async pairs count once, at their -start).
    """
    sizes: dict[str, int] = {}
    out = dict.fromkeys(COLLECTIVES, 0)
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        name, type_str, opcode, operands = m.groups()[:4]
        sizes[name] = _type_bytes(type_str)
        kind = opcode.removesuffix("-start")
        if kind in out and not opcode.endswith("-done"):
            names = re.findall(r"%([\w.\-]+)", operands)
            # ragged-all-to-all(data, output, offsets and sizes...): only `data` is sent, and
            # at most all of it.
            for op in names[:1] if kind == "ragged-all-to-all" else names:
                out[kind] += sizes.get(op, 0)
    return out


def _skewed_inputs(tokens: int, d_model: int, num_experts: int, seed: int = 0):
    """Inputs and a router bias sharing a direction: expert e's share falls off with e."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    direction = jax.random.normal(k1, (d_model,))
    direction = direction / jnp.linalg.norm(direction)
    x = jax.random.normal(k2, (tokens // 16, 16, d_model)) + 2.0 * direction
    bonus = jnp.log1p(jnp.arange(num_experts, dtype=jnp.float32))[::-1] * 0.5
    return x, direction[:, None] * bonus[None, :]


def build(strategy: str, mesh, args):
    """Jitted fwd+bwd of the MoE layer under `mesh`, with its inputs laid out."""
    if strategy not in STRATEGIES:
        raise SystemExit(f"--strategies: {strategy!r} is invalid; allowed: {', '.join(STRATEGIES)}")
    ep, execution = STRATEGIES[strategy]
    execution = {k: args.ep_capacity_factor if v == "arg" else v for k, v in execution.items()}
    cfg = MoEConfig(
        num_experts=args.experts,
        top_k=args.top_k,
        d_ff=args.d_ff,
        execution=MoEExecution(expert_parallel=ep, **execution),
    )
    model = MoE(cfg, d_model=args.d_model)
    x, router_bonus = _skewed_inputs(args.tokens, args.d_model, args.experts)

    def loss(params, x):
        y, aux = model.apply({"params": params}, x)
        return jnp.mean(y.astype(jnp.float32) ** 2) + aux["aux_loss"], aux

    with sharding_context(mesh):
        abstract = jax.eval_shape(model.init, jax.random.key(0), x)
        shardings = logical_shardings(abstract, mesh)
        params = jax.jit(
            lambda k: nn.meta.unbox(model.init(k, x))["params"], out_shardings=shardings["params"]
        )(jax.random.key(0))
        router = params["router"]["kernel"]
        params = {**params, "router": {"kernel": router + router_bonus}}
        step = jax.jit(jax.value_and_grad(loss, has_aux=True))
        compiled = step.lower(params, x).compile()
    comm = collective_bytes(compiled.as_text())

    def run():
        with sharding_context(mesh):
            (value, aux), grads = step(params, x)
        jax.block_until_ready(grads)
        return aux

    aux = run()
    return run, comm, aux


# Deviceless comparison: (exchange, ep_capacity_factor) per row.
DEVICELESS_CASES = (("fixed", 2.0), ("fixed", None), ("ragged", 2.0), ("ragged", None))
DL_E, DL_K, DL_D, DL_F, DL_TOKENS = 16, 2, 1024, 1024, 1024


def deviceless_compile(
    target_name: str,
    exchange: str,
    factor: float | None,
    *,
    experts: int = DL_E,
    top_k: int = DL_K,
    d_model: int = DL_D,
    d_ff: int = DL_F,
    tokens_per_device: int = DL_TOKENS,
):
    """The MoE layer's fwd+bwd (grads of params and input) compiled for `target_name` on a
    mesh of its devices all on "expert", all_to_all with `exchange`; needs the `aot` extra.

    Returns:
      The jax Compiled (as_text, memory_analysis).
    """
    import ml_collections

    from moejax.compile.report import target_mesh
    from moejax.compile.targets import parse_target

    target = parse_target(target_name)
    axes = ml_collections.ConfigDict(dict(data=1, fsdp=1, expert=-1, tensor=1))
    mesh = target_mesh(target, axes)
    cfg = MoEConfig(
        num_experts=experts,
        top_k=top_k,
        d_ff=d_ff,
        execution=MoEExecution(
            expert_parallel="all_to_all",
            ep_exchange=exchange,
            ep_capacity_factor=factor,
            gmm_backend="mosaic" if target.platform == "tpu" else "xla",
            gmm_interpret=False,
        ),
    )
    model = MoE(cfg, d_model=d_model, dtype=jnp.bfloat16)
    tokens = tokens_per_device * target.num_devices
    seq = 64
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert"))
    x = jax.ShapeDtypeStruct((tokens // seq, seq, d_model), jnp.bfloat16, sharding=batch)

    def loss(params, x):
        y, aux = model.apply({"params": params}, x)
        return jnp.sum(y.astype(jnp.float32) ** 2) + aux["aux_loss"]

    with sharding_context(mesh), jax.default_matmul_precision("default"):
        # Inputs made inside the traced init: every array in it then belongs to the mesh.
        abstract = jax.eval_shape(
            lambda key: model.init(key, jnp.zeros(x.shape, x.dtype)),
            jax.ShapeDtypeStruct((2,), jnp.uint32),
        )
        shardings = logical_shardings(abstract, mesh)["params"]
        params = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            unbox(abstract)["params"],
            shardings,
        )
        return jax.jit(jax.grad(loss, argnums=(0, 1))).trace(params, x).lower().compile()


def deviceless_main(args):
    lines = [
        f"MoE layer fwd+bwd, E{DL_E} top-{DL_K} D{DL_D} F{DL_F}, {DL_TOKENS} bf16 tokens per "
        "device, all devices on expert; deviceless compiles (HLO buffer sizes and the "
        "compiler's temporaries; no times)",
        "",
        "| target | exchange | ep_capacity_factor | token buffers sent MiB/device (HLO) | "
        "moved when all rows cross MiB | temporaries MiB |",
        "|---|---|---|---|---|---|",
    ]
    moved = 4 * DL_TOKENS * DL_K * DL_D * 2
    for target in args.targets.split(","):
        for exchange, factor in DEVICELESS_CASES:
            compiled = deviceless_compile(target, exchange, factor)
            comm = collective_bytes(compiled.as_text())
            sent = comm["ragged-all-to-all"] if exchange == "ragged" else comm["all-to-all"]
            actual = moved if exchange == "ragged" else sent
            temp = compiled.memory_analysis().temp_size_in_bytes
            lines.append(
                f"| {target} | {exchange} | {factor} | {sent / 2**20:.2f} | "
                f"{actual / 2**20:.2f} | {temp / 2**20:.1f} |"
            )
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    command = f"Command: {' '.join(sys.orig_argv)}"
    (RESULTS / "ep.deviceless.md").write_text(table + "\n\n" + command + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--deviceless", action="store_true", help="ragged vs fixed, compiled only")
    p.add_argument("--targets", default="gpu-h100-8,tpu-v5p-16")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--ep-capacity-factor", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    args = p.parse_args()
    if args.deviceless:
        deviceless_main(args)
        return

    rows = []
    for mesh_name, mesh_kw in MESHES.items():
        mesh = make_mesh(**mesh_kw)
        cases = {s: build(s, mesh, args) for s in args.strategies.split(",")}
        times = {s: [] for s in cases}
        for _ in range(args.repeats):
            for s, (run, _, _) in cases.items():
                t0 = time.perf_counter()
                run()
                times[s].append(time.perf_counter() - t0)
        for s, (_, comm, aux) in cases.items():
            rows.append(
                {
                    "mesh": mesh_name,
                    "strategy": s,
                    "step_ms": 1e3 * float(np.median(times[s])),
                    "comm_bytes": int(sum(comm.values())),
                    "comm_by_kind": {k: v for k, v in comm.items() if v},
                    "dropped_fraction": float(aux["dropped_fraction"]),
                    "max_expert_load": float(jnp.max(aux["expert_load"])),
                }
            )

    header = (
        f"MoE layer fwd+bwd, T={args.tokens} D={args.d_model} F={args.d_ff} E={args.experts} "
        f"top-{args.top_k}, skewed routing, ep_capacity_factor={args.ep_capacity_factor}, "
        f"8 fake CPU devices ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores), median of {args.repeats}"
    )
    lines = [
        header,
        "",
        "| mesh | strategy | step ms | comm MiB/device | by collective (MiB) | dropped "
        "| max load |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kinds = ", ".join(f"{k} {v / 2**20:.2f}" for k, v in r["comm_by_kind"].items())
        lines.append(
            f"| {r['mesh']} | {r['strategy']} | {r['step_ms']:.1f} | "
            f"{r['comm_bytes'] / 2**20:.2f} | {kinds} | {r['dropped_fraction']:.4f} | "
            f"{r['max_expert_load']:.3f} |"
        )
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ep.md").write_text(table + "\n\nCommand: python benchmarks/ep.py " + _argv() + "\n")
    (RESULTS / "ep.json").write_text(json.dumps({"config": vars(args), "rows": rows}, indent=2))


def _argv() -> str:
    return " ".join(sys.argv[1:])


if __name__ == "__main__":
    main()
