"""Shrinking a trained MoE by half its experts: pruning and merging from router statistics.

    python benchmarks/compress_experts.py    # trains the 16-expert tiny model (500 steps)
    python benchmarks/compress_experts.py --steps 100    # quick look

Trains configs/tiny.py with 16 experts (expert width 128, top-2) on the embedded corpus into
--workdir (resumed, or only evaluated, when it already holds the run), gathers routing
statistics (`moejax.compress.routing_stats`) on --calib_batches validation batches, and
compresses every MoE layer to --experts experts with:

  prune: frequency     the most used experts (by calibration-token count)
  prune: output_norm   EASY-EP: the largest gate-weighted output norm
  prune: similarity    STUN: drop the less used of the most similar pair, pair by pair
  prune: random        a seeded random subset: the baseline every score must beat
  merge: MC-SMoE       most used experts as centres, the rest joined to the most similar centre
                       by router-logit similarity, hidden units aligned by weight matching, then
                       usage-weighted averages (router columns merged alike)
  merge: plain avg     the same groups and weights without the alignment (the ablation)
  merge: EASY-EP centres  MC-SMoE with the centres picked by gate-weighted output norm (the
                       pruning score that keeps the best experts here) instead of usage

  quantize: int8 / int4  the uncompressed model's experts with qwix int8 / int4 weights
                       (per channel, or groups of 32 contraction rows), and the "mixed" policy
                       (the quarter most used experts of each layer at int8, the rest int4)

Each row: experts per layer, the expert weights' bytes (float32; quantized: values at their
width plus the scales), the validation cross-entropy on the run's own evaluation batches (nats
per byte) and its change from the uncompressed model, right after compression and after
--finetune_steps steps of recovery fine-tuning (AdamW, lr 1e-3, 10 warmup steps, the run's
training data; quantized rows are not fine-tuned). Results: a table on stdout and
benchmarks/results/compress_experts.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from moejax import sharding  # noqa: E402
from moejax.compress.__main__ import compressed_state, evaluate, run_data  # noqa: E402
from moejax.compress.merge import merge_experts  # noqa: E402
from moejax.compress.prune import prune_experts  # noqa: E402
from moejax.compress.quantize import expert_nbytes, quantize_experts  # noqa: E402
from moejax.compress.stats import routing_stats  # noqa: E402
from moejax.train import data as data_lib  # noqa: E402
from moejax.train.step import jit_train_step  # noqa: E402
from moejax.train.trainer import train_and_evaluate  # noqa: E402
from moejax.train.warm_start import load_run, state_setup  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))

# (row label, method, keyword arguments)
METHODS = (
    ("prune: frequency", "prune", {"score": "frequency"}),
    ("prune: output_norm (EASY-EP)", "prune", {"score": "output_norm"}),
    ("prune: similarity (STUN)", "prune", {"score": "similarity"}),
    ("prune: random", "prune", {"score": "random"}),
    ("merge: MC-SMoE", "merge", {}),
    ("merge: plain average", "merge", {"align": False}),
    ("merge: MC-SMoE, EASY-EP centres", "merge", {"centres": "output_norm"}),
    ("quantize: int8", "quantize", {"bits": 8}),
    ("quantize: int4", "quantize", {"bits": 4}),
    ("quantize: int4, groups of 32", "quantize", {"bits": 4, "group_size": 32}),
    ("quantize: mixed int8/int4", "quantize", {"bits": 4, "policy": "mixed"}),
)


def train_config(args):
    from configs.tiny import get_config

    config = get_config()
    config.moe.num_experts = args.train_experts
    config.train.steps = args.steps
    config.train.sample_tokens = 0
    return config


def finetune(config, setup, state, corpus, steps: int):
    """`steps` AdamW steps from `state` on the run's training data (a fresh iterator)."""
    step_fn = jit_train_step(setup)
    it = data_lib.train_iterator(
        corpus,
        seq_len=config.train.seq_len,
        batch_size=config.train.batch_size,
        seed=config.data.seed + 1,
        sharding=setup.batch_sharding,
    )
    with sharding.sharding_context(setup.mesh, setup.rules):
        for _ in range(steps):
            state, _ = step_fn(state, data_lib.global_batch(next(it), setup.batch_sharding))
    return state


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=str(REPO / "runs" / "bench_compression_e16"))
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--train_experts", type=int, default=16)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--calib_batches", type=int, default=8)
    p.add_argument("--finetune_steps", type=int, default=100)
    args = p.parse_args()

    t0 = time.time()
    summary = train_and_evaluate(train_config(args), args.workdir)
    print(
        f"trained {args.workdir}: val loss {summary['final_eval_loss']:.4f} "
        f"({time.time() - t0:.0f} s)",
        flush=True,
    )

    mesh = sharding.make_mesh(data=-1)
    config, state, setup, step = load_run(args.workdir, mesh)
    model_cfg = setup.model_cfg
    t = config.train
    corpus, eval_set, calib = run_data(config, setup, args.calib_batches)
    variables = jax.device_get({"params": state.params, "moe_state": state.moe_state})
    stats = routing_stats(model_cfg, variables, calib)

    base_loss = evaluate(setup, state, eval_set)
    base_tuned = None
    if args.finetune_steps:  # the same recovery steps, uncompressed: the fair reference
        base_config = config.copy_and_resolve_references()
        base_config.train.steps = args.finetune_steps
        base_config.opt.update(lr=1e-3, warmup_steps=10)
        fresh, base_setup = state_setup(base_config, mesh)
        tuned_state = finetune(
            base_config,
            base_setup,
            fresh.replace(params=state.params, moe_state=state.moe_state),
            corpus,
            args.finetune_steps,
        )
        base_tuned = evaluate(base_setup, tuned_state, eval_set)
    rows = [
        {
            "method": "none (uncompressed)",
            "experts": model_cfg.moe.num_experts,
            "expert_bytes": expert_nbytes(model_cfg, variables),
            "val_loss": base_loss,
            "finetuned_loss": base_tuned,
        }
    ]
    for label, method, kw in METHODS:
        if method == "merge":
            new_cfg, new_vars = merge_experts(model_cfg, variables, stats, args.experts, **kw)
        elif method == "prune":
            new_cfg, new_vars = prune_experts(model_cfg, variables, stats, args.experts, **kw)
        else:
            new_cfg, new_vars = quantize_experts(model_cfg, variables, stats=stats, **kw)
        new_config = config.copy_and_resolve_references()
        new_config.moe.num_experts = new_cfg.moe.num_experts
        new_config.moe.expert_bits = new_cfg.moe.expert_bits
        new_config.moe.expert_group_size = new_cfg.moe.expert_group_size
        new_config.train.steps = max(args.finetune_steps, 1)
        new_config.opt.update(lr=1e-3, warmup_steps=10)
        new_state, new_setup = compressed_state(new_config, mesh, new_vars)
        loss = evaluate(new_setup, new_state, eval_set)
        tuned = None
        if method != "quantize" and args.finetune_steps:
            tuned_state = finetune(new_config, new_setup, new_state, corpus, args.finetune_steps)
            tuned = evaluate(new_setup, tuned_state, eval_set)
        rows.append(
            {
                "method": label,
                "experts": new_cfg.moe.num_experts,
                "expert_bytes": expert_nbytes(new_cfg, new_vars),
                "val_loss": loss,
                "finetuned_loss": tuned,
            }
        )
        print(f"{label}: {loss:.4f} -> {tuned}", flush=True)

    header = (
        f"configs/tiny.py with {model_cfg.moe.num_experts} experts (top-{model_cfg.moe.top_k}, "
        f"width {model_cfg.moe.d_ff}), {step} steps, pruned or merged to {args.experts} experts "
        f"per MoE layer, or quantized; routing statistics from {len(calib)} validation batches "
        f"of {t.batch_size}x{t.seq_len}; validation cross-entropy over {len(eval_set)} batches, "
        f"then after {args.finetune_steps} recovery steps"
    )
    lines = [
        header,
        "",
        f"| method | experts | expert MiB | val loss | vs uncompressed | after "
        f"{args.finetune_steps} steps | vs uncompressed |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tuned = r["finetuned_loss"]
        after = "-" if tuned is None else f"{tuned:.4f} | {tuned - base_loss:+.4f}"
        if tuned is None:
            after = "- | -"
        lines.append(
            f"| {r['method']} | {r['experts']} | {r['expert_bytes'] / 2**20:.2f} | "
            f"{r['val_loss']:.4f} | {r['val_loss'] - base_loss:+.4f} | {after} |"
        )
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    command = "python benchmarks/compress_experts.py " + " ".join(sys.argv[1:])
    (RESULTS / "compress_experts.md").write_text(table + "\n\nCommand: " + command.rstrip() + "\n")
    (RESULTS / "compress_experts.json").write_text(
        json.dumps({"config": vars(args), "step": step, "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
