"""Forward+backward time of the dropless MoE layer on CPU against its baselines, in one run.

    python benchmarks/moe_layer.py                       # B8 L1024 D512 F1024 E8 top-2
    python benchmarks/moe_layer.py --batch 1 --length 256 --repeats 3   # quick look

Rows (each: jitted value-and-grad w.r.t. every weight and the input, median of --repeats):
  moejax MoE, dropless         the layer as configured by default on CPU (gmm_backend="auto":
                               tokens gathered straight into the tile-padded layout, one loop
                               over the experts and their row tiles runs each tile's whole
                               expert MLP, one its backward);
  moejax MoE, compact layout   same router/weights, rows unpadded and the experts run through
                               the public moejax.pallas.gmm (backend "xla"), which pads inside;
  moejax MoE, ragged_dot       gmm_backend="ragged_dot" (jax.lax.ragged_dot: every group dense);
  dense SwiGLU (same FLOPs)    one MLP of width F * top_k over all T tokens, flattened to
                               [T, D] (the target), and the same MLP applied to [B, L, D];
  HF MixtralSparseMoeBlock     transformers' block in torch (CPU, default eager experts), loaded
                               with the same weights; its output is checked against moejax's.
Routing is "uniform" (random router, zero-mean inputs) or "skewed" (inputs and router share a
direction whose per-expert weight falls off like log(rank), so a few experts get most tokens);
the same inputs and router weights go to every implementation, and the measured expert loads
are printed. Timing: wall clock and process CPU time (all threads), median over rounds that
interleave the implementations, so that other processes on a shared machine slow all of them
alike; the dense baseline is timed in every routing's rounds. Results: a table on stdout and
benchmarks/results/moe_layer.{md,json}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax.layers import MoE, MoEConfig, MoEExecution
from moejax.layers.mlp import MLP
from moejax.moe import ExpertWeights, dropless_ffn, topk_route

RESULTS = pathlib.Path(__file__).parent / "results"


def timed(fn):
    """(wall seconds, process CPU seconds) of one call; CPU time sums all threads, so it counts
    the work done even when other processes share the cores."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def interleaved(cases, repeats):
    """Median wall and CPU time per case, with the repeats interleaved round-robin so that a
    change in machine load hits every case alike. `cases`: name -> (thunk, repeats or None)."""
    for thunk, _ in cases.values():
        thunk()  # compile + warm up
    samples = {name: [] for name in cases}
    for r in range(repeats):
        for name, (thunk, reps) in cases.items():
            if reps is None or r < reps:
                samples[name].append(timed(thunk))
    return {n: tuple(float(np.median(v)) for v in zip(*s, strict=True)) for n, s in samples.items()}


def make_inputs(args, routing, rng):
    t, d, e = args.batch * args.length, args.d_model, args.num_experts
    x = rng.normal(size=(t, d)).astype(np.float32)
    kernel = rng.normal(size=(d, e)).astype(np.float32) / np.sqrt(d)
    if routing == "skewed":
        u = rng.normal(size=d).astype(np.float32)
        u /= np.linalg.norm(u)
        x += 2.0 * u
        kernel += np.outer(u, -1.5 * np.log1p(np.arange(e))).astype(np.float32)
    return x.reshape(args.batch, args.length, d), kernel


def moejax_step(model):
    def loss(params, x, cot):
        y, _ = model.apply({"params": params}, x)
        return jnp.vdot(y, cot)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def compact_step(cfg):
    """The same layer with the rows unpadded and the experts through moejax.pallas.gmm."""

    def loss(params, x, cot):
        x_TxD = x.reshape(-1, x.shape[-1])
        r = topk_route(x_TxD @ params["router"]["kernel"], cfg)
        ex = params["experts"]
        experts = ExpertWeights(ex["wi_gate"], ex["wi_up"], ex["wo"])
        # The XLA gmm on the compact layout (tile_m=None: no padded rows).
        compact = dataclasses.replace(
            cfg, execution=dataclasses.replace(cfg.execution, gmm_backend="xla")
        )
        y = dropless_ffn(x_TxD, r.weights, r.indices, experts, compact, tile_m=None)
        return jnp.vdot(y.reshape(x.shape), cot)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def torch_block(args, params, kernel):
    import torch
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    hf_cfg = MixtralConfig(
        hidden_size=args.d_model,
        intermediate_size=args.d_ff,
        num_local_experts=args.num_experts,
        num_experts_per_tok=args.top_k,
    )
    block = MixtralSparseMoeBlock(hf_cfg).float()
    ex = {k: np.asarray(v) for k, v in params["experts"].items()}
    with torch.no_grad():
        block.gate.weight.copy_(torch.from_numpy(kernel.T.copy()))
        gate_up = np.concatenate([ex["wi_gate"], ex["wi_up"]], axis=2).transpose(0, 2, 1)
        block.experts.gate_up_proj.copy_(torch.from_numpy(gate_up.copy()))
        block.experts.down_proj.copy_(torch.from_numpy(ex["wo"].transpose(0, 2, 1).copy()))
    return block


def torch_thunk(block, x, cot):
    import torch

    xt = torch.from_numpy(x).requires_grad_(True)
    ct = torch.from_numpy(cot)

    def step():
        block.zero_grad(set_to_none=True)
        xt.grad = None
        y = block(xt)
        (y * ct).sum().backward()
        return y.detach().numpy()

    return step


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--d_model", type=int, default=512)
    p.add_argument("--d_ff", type=int, default=1024)
    p.add_argument("--num_experts", type=int, default=8)
    p.add_argument("--top_k", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ragged_repeats", type=int, default=2, help="ragged_dot is ~10x slower")
    p.add_argument("--skip_torch", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "moe_layer"))
    args = p.parse_args()
    load_before = os.getloadavg()[0]

    cfg = MoEConfig(num_experts=args.num_experts, top_k=args.top_k, d_ff=args.d_ff)
    model = MoE(cfg, d_model=args.d_model)
    ragged_cfg = dataclasses.replace(cfg, execution=MoEExecution(gmm_backend="ragged_dot"))
    ragged = MoE(ragged_cfg, d_model=args.d_model)
    dense = MLP(args.d_ff * args.top_k, "swiglu")
    rng = np.random.default_rng(0)
    shape = (args.batch, args.length, args.d_model)
    cot = rng.normal(size=shape).astype(np.float32)
    x0 = jnp.zeros(shape, jnp.float32)
    params = nn.unbox(model.init(jax.random.key(0), x0)["params"])
    dense_params = nn.unbox(dense.init(jax.random.key(1), x0)["params"])

    def dense_loss(p, x, c):
        # Flattened to [T, D] like the MoE's tokens: XLA:CPU runs the same MLP on [B, L, D]
        # about 2x slower in fwd+bwd (the 3-d row shows it), which would flatter the MoE.
        return jnp.vdot(dense.apply({"params": p}, x.reshape(-1, x.shape[-1])), c.reshape(-1))

    def dense_loss_3d(p, x, c):
        return jnp.vdot(dense.apply({"params": p}, x), c)

    dense_step = jax.jit(jax.value_and_grad(dense_loss, argnums=(0, 1)))
    dense_step_3d = jax.jit(jax.value_and_grad(dense_loss_3d, argnums=(0, 1)))
    xd = x0 + cot

    def run(fn, *a):
        return lambda: jax.block_until_ready(fn(*a))

    dense_name = "dense SwiGLU on [T, D], width F*top_k (target)"
    steps = {
        "moejax MoE dropless (auto: padded gather + tile scan)": (moejax_step(model), None),
        "moejax MoE dropless, compact rows + pallas.gmm(xla)": (compact_step(cfg), None),
        "moejax MoE dropless, gmm_backend=ragged_dot": (moejax_step(ragged), args.ragged_repeats),
    }
    rows = []
    for routing in ("uniform", "skewed"):
        x, kernel = make_inputs(args, routing, rng)
        prm = {**params, "router": {"kernel": jnp.asarray(kernel)}}
        y_j, aux = model.apply({"params": prm}, x)
        load = np.asarray(aux["expert_load"])
        load_s = f"max {load.max():.2f} min {load.min():.3f}"
        # The dense baseline runs in every round too, so each routing has its own reference.
        cases = {dense_name: (run(dense_step, dense_params, xd, cot), None)}
        cases.update({n: (run(f, prm, x, cot), r) for n, (f, r) in steps.items()})
        cases["dense SwiGLU module on [B, L, D] (same FLOPs)"] = (
            run(dense_step_3d, dense_params, xd, cot),
            None,
        )
        extra = {}
        if not args.skip_torch:
            import torch

            thunk = torch_thunk(torch_block(args, prm, kernel), x, cot)
            err = float(np.abs(thunk() - np.asarray(y_j)).max())
            name = f"HF MixtralSparseMoeBlock (torch CPU eager, {torch.get_num_threads()} threads)"
            cases[name] = (thunk, None)
            extra[name] = {"max_abs_diff_vs_moejax": err}
        times = interleaved(cases, args.repeats)
        wall0, cpu0 = times[dense_name]
        for name, (wall, cpu) in times.items():
            row = {"impl": name, "routing": routing, "load": load_s, "wall_s": wall, "cpu_s": cpu}
            row.update(wall_vs_dense=wall / wall0, cpu_vs_dense=cpu / cpu0, **extra.get(name, {}))
            rows.append(row)
            print(f"{name:60s} {routing:8s} wall {wall:7.3f} s  cpu {cpu:7.3f} s", flush=True)
        for name, e in extra.items():
            print(f"{name}: max |y_hf - y_moejax| = {e['max_abs_diff_vs_moejax']:.1e}")

    lines = [
        f"B={args.batch} L={args.length} D={args.d_model} F={args.d_ff} E={args.num_experts} "
        f"top_k={args.top_k}, fwd+bwd (grads w.r.t. all weights and x), median of {args.repeats} "
        f"interleaved rounds (ragged_dot: {args.ragged_repeats}); jax {jax.__version__}, "
        f"{platform.machine()}, {os.cpu_count()} cores, load average before start "
        f"{load_before:.1f}",
        "",
        "| implementation | routing | expert load | wall (s) | wall/dense | CPU (s) | CPU/dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['impl']} | {r['routing']} | {r['load']} | {r['wall_s']:.3f} | "
            f"{r['wall_vs_dense']:.2f}x | {r['cpu_s']:.3f} | {r['cpu_vs_dense']:.2f}x |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table + "\n")
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
