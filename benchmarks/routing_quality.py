"""Routing quality on the embedded corpus: validation loss against expert compute actually spent.

    python benchmarks/routing_quality.py                    # 500 steps per row (tiny.py's)
    python benchmarks/routing_quality.py --steps 200        # quicker, noisier
    python benchmarks/routing_quality.py --rows top2,adamoe # some rows only
    python benchmarks/routing_quality.py --seed 1           # another init and data order

Every row trains configs/tiny.py's model (the same data order, seed, optimizer and steps) with
one routing change, in this process, one after the other, and reports:
  val loss        validation cross-entropy (nats/byte) after the last step;
  experts/token   real experts per token, measured on the validation batches (aux
                  "experts_per_token", the mean over MoE layers; null picks and unused top-p
                  places are not counted; expert choice: the mean experts a token got);
  train experts/token  the same in training, the mean of the logged steps (token rounding and
                  the DTS gate compute other rows in training than in evaluation);
  expert GFLOP/tok  forward FLOPs of the routed experts per token over all layers,
                  experts/token x 3 matmuls x 2 x D x F x layers (the dense row: its FFN);
  vs top-2        that, relative to the top-2 row;
  wall s          training wall time (CPU, shared machine: compare within one run only).
Results: a table on stdout and benchmarks/results/routing_quality.{md,json}; with --seed N
(N != 0: parameter init, per-step rng and data shuffle seeds, alike for every row)
benchmarks/results/routing_quality_seedN.{md,json}.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from moejax.configs import dense_baseline, tiny  # noqa: E402

from moejax.train.metrics import read_metrics  # noqa: E402
from moejax.train.trainer import train_and_evaluate  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"


def _row(**moe):
    def make():
        config = tiny.get_config()
        for k, v in moe.items():
            setattr(config.moe, k, v)
        return config

    return make


ROWS = {
    "dense": ("dense FFN of the MoE's active width", dense_baseline.get_config),
    "top1": ("top-1", _row(top_k=1)),
    "top2": ("top-2 (tiny.py)", _row()),
    "adamoe": ("AdaMoE: top-2 + 4 null experts", _row(num_null_experts=4)),
    "top_p": ("top-p, p=0.4, max_k=4", _row(router="top_p", top_p=0.4, max_k=4)),
    "adamoe_k3n8": ("AdaMoE: top-3 + 8 null experts", _row(top_k=3, num_null_experts=8)),
    "adamoe_k4n12": ("AdaMoE: top-4 + 12 null experts", _row(top_k=4, num_null_experts=12)),
    "adamoe_k4n16": ("AdaMoE: top-4 + 16 null experts", _row(top_k=4, num_null_experts=16)),
    "adamoe_k4n20": ("AdaMoE: top-4 + 20 null experts", _row(top_k=4, num_null_experts=20)),
    "top_p05": ("top-p, p=0.5, max_k=4", _row(router="top_p", top_p=0.5, max_k=4)),
    "top_p06": ("top-p, p=0.6, max_k=4", _row(router="top_p", top_p=0.6, max_k=4)),
    "expert_choice": ("expert choice, C = T*2/E", _row(router="expert_choice")),
    "round_up": (
        "top-2, token rounding up (tile 128)",
        _row(token_rounding="up", rounding_tile=128),
    ),
    "round_down": (
        "top-2, token rounding down (tile 128)",
        _row(token_rounding="down", rounding_tile=128),
    ),
    "round_nearest": (
        "top-2, token rounding nearest (tile 128)",
        _row(token_rounding="nearest", rounding_tile=128),
    ),
    "dts": (
        "DTS gate (tau 2 -> 0.1, max_k 4; eval top-2)",
        _row(router="dts", max_k=4, dts_steps=500),
    ),
}


def results_stem(seed: int) -> str:
    """The results file name (no suffix) of a seed: seed 0 is the reference table."""
    return "routing_quality" if seed == 0 else f"routing_quality_seed{seed}"


def run_row(name: str, steps: int, workdir: pathlib.Path, seed: int = 0) -> dict:
    label, make = ROWS[name]
    config = make()
    config.train.seed = seed  # parameter init and per-step rng
    config.data.seed = seed  # data shuffle
    config.train.steps = steps
    config.train.eval_every = steps
    config.train.checkpoint_every = steps
    config.train.log_every = max(1, steps // 10)
    t0 = time.time()
    summary = train_and_evaluate(config, str(workdir / name), progress=False)
    wall = time.time() - t0
    metrics = read_metrics(workdir / name)
    last_eval = metrics["eval"][-1]
    m = config.model
    if config.moe is None:
        experts, flops = None, 3 * 2 * m.d_model * m.d_ff * m.num_layers
        train_experts = None
    else:
        experts = last_eval["experts_per_token"]
        # Training may compute other rows than evaluation (token rounding, the DTS gate).
        train = metrics["train"]
        train_experts = sum(r["experts_per_token"] for r in train) / len(train)
        flops = experts * 3 * 2 * m.d_model * config.moe.d_ff * m.num_layers
    return {
        "row": name,
        "label": label,
        "val_loss": summary["eval_losses"][-1][1],
        "experts_per_token": experts,
        "train_experts_per_token": train_experts,
        "expert_gflop_per_token": flops / 1e9,
        "null_fraction": last_eval.get("null_fraction"),
        "wall_s": wall,
        "seed": seed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {list(ROWS)}")
    parser.add_argument(
        "--update",
        action="store_true",
        help="rerun --rows only and keep the other rows of the last results (same --steps); "
        "rows are deterministic, so this is what a full run would give once the code changed "
        "for those rows alone",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="init, rng and data shuffle seed of every row; N != 0 writes "
        "routing_quality_seedN.{md,json}",
    )
    args = parser.parse_args()
    if args.seed < 0:
        parser.error(f"--seed: must be >= 0, got {args.seed}")
    stem = results_stem(args.seed)
    names = args.rows.split(",")
    unknown = sorted(set(names) - set(ROWS))
    if unknown:
        parser.error(f"--rows: unknown {unknown}; allowed: {list(ROWS)}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            results.append(run_row(name, args.steps, pathlib.Path(tmp), args.seed))
            r = results[-1]
            print(f"{r['label']:40s} val {r['val_loss']:.4f}  {r['wall_s']:.0f}s", flush=True)
    if args.update:
        last = RESULTS / f"{stem}.json"
        if not last.exists():
            parser.error(f"--update: no last results {last}; run without --update first")
        old = json.loads(last.read_text())
        fresh = {r["row"]: r for r in results}
        if any(r.get("steps", args.steps) != args.steps for r in old):
            parser.error("--update: the last results were run with other --steps")
        if any(r.get("seed", 0) != args.seed for r in old):
            parser.error("--update: the last results were run with another --seed")
        results = [fresh.pop(r["row"], r) for r in old] + list(fresh.values())
        for r in results:
            r["updated"] = r["row"] in set(names)
    for r in results:
        r["steps"] = args.steps
        r["seed"] = args.seed
    ref = next((r for r in results if r["row"] == "top2"), None)
    lines = [
        f"steps {args.steps} per row, seed {args.seed}, configs/tiny.py's model and data; "
        f"{platform.node()}",
        "",
        "| routing | val loss | experts/token | train experts/token | expert GFLOP/token "
        "| vs top-2 | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rel = r["expert_gflop_per_token"] / ref["expert_gflop_per_token"] if ref else None
        ratio = "-" if rel is None else f"{rel:.2f}x"
        per_tok = "-" if r["experts_per_token"] is None else f"{r['experts_per_token']:.2f}"
        k_train = r.get("train_experts_per_token")
        per_tok += " | " + ("-" if k_train is None else f"{k_train:.2f}")
        lines.append(
            f"| {r['label']} | {r['val_loss']:.4f} | {per_tok} | "
            f"{r['expert_gflop_per_token']:.5f} | {ratio} | {r['wall_s']:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    seed_flag = f" --seed {args.seed}" if args.seed else ""
    command = f"`python benchmarks/routing_quality.py --steps {args.steps}{seed_flag}`"
    if args.update:
        command += f", then `... --rows {args.rows} --update` after a change to those rows"
    elif args.rows != ",".join(ROWS):
        command = command[:-1] + f" --rows {args.rows}`"
    (RESULTS / f"{stem}.md").write_text(f"Command: {command}\n\n{table}\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
