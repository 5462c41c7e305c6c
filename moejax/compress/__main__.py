"""Command line: compress a training run's MoE layers into a new run directory.

    python -m moejax.compress --workdir=runs/tiny --out=runs/tiny_e4 --experts=4 --method=merge
    python -m moejax.compress --workdir=runs/tiny --out=runs/tiny_p4 --experts=4 \
        --method=prune --score=output_norm

Reads the latest checkpoint of --workdir (its config comes from the checkpoint), gathers routing
statistics (`moejax.compress.routing_stats`) on --calib_batches batches of the run's validation
split (or of its training split), merges (MC-SMoE) or prunes every MoE layer to --experts
experts, and writes --out as a run directory whose step-0 checkpoint holds the compressed
parameters with a fresh optimizer, plus `config.py` / `config.json` describing the smaller
model. Continue training (recovery fine-tuning) with

    python -m moejax.train --config=<out>/config.py --workdir=<out> --config.train.steps=100

and export with `moejax.hf.to_hf` as any moejax model. Prints the validation loss (the run's
own evaluation batches), parameter counts and sizes before and after. An invalid argument or
config stops with a one-line message naming it (exit code 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from moejax import sharding
from moejax.compress.merge import merge_experts
from moejax.compress.prune import PRUNE_SCORES, prune_experts
from moejax.compress.stats import routing_stats
from moejax.train import data as data_lib
from moejax.train.checkpoint import Checkpointer
from moejax.train.state import TrainState, count_params
from moejax.train.step import jit_eval_step
from moejax.train.trainer import validate_config
from moejax.train.warm_start import load_run, state_setup

METHODS = ("merge", "prune")
CALIB_SPLITS = ("val", "train")

_CONFIG_PY = '''"""The config of a run written by `python -m moejax.compress` (from {source}).

Loads config.json beside this file; any field can be overridden on the command line.
"""

import json
import pathlib

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    path = pathlib.Path(__file__).with_name("config.json")
    return ml_collections.ConfigDict(json.loads(path.read_text()))
'''


def evaluate(setup, state: TrainState, batches: list[jax.Array]) -> float:
    """Mean validation cross-entropy (nats per token) over the run's evaluation batches."""
    eval_fn = jit_eval_step(setup)
    with sharding.sharding_context(setup.mesh, setup.rules):
        losses = [float(jax.device_get(eval_fn(state, b))["ce_loss"]) for b in batches]
    return float(np.mean(losses))


def run_data(config, setup, calib_batches: int, calib_split: str = "val"):
    """A run's data as compression reads it: (corpus, the run's evaluation batches as global
    arrays, calib_batches calibration model inputs [B, L] from the `calib_split` split)."""
    t = config.train
    corpus = data_lib.load_corpus(
        config.data.to_dict(), seq_len=t.seq_len, vocab_size=setup.model_cfg.vocab_size
    )
    eval_set = [
        data_lib.global_batch(b, setup.batch_sharding)
        for b in data_lib.eval_batches(
            corpus,
            seq_len=t.seq_len,
            batch_size=t.batch_size,
            max_batches=t.eval_batches,
            sharding=setup.batch_sharding,
        )
    ]
    if calib_split == "val":
        source = data_lib.eval_batches(
            corpus, seq_len=t.seq_len, batch_size=t.batch_size, max_batches=calib_batches
        )
    else:
        source = data_lib.train_iterator(
            corpus, seq_len=t.seq_len, batch_size=t.batch_size, seed=config.data.seed
        )
    # Model inputs: the windows without their last token (the trainer's targets).
    calib = [
        np.asarray(data_lib.batch_tokens(b))[:, :-1]
        for _, b in zip(range(calib_batches), source, strict=False)
    ]
    return corpus, eval_set, calib


def compressed_state(config, mesh, variables):
    """(TrainState at step 0 with a fresh optimizer, StateSetup) of `config`'s model holding
    `variables` (a compressed model's params and moe_state)."""
    fresh, setup = state_setup(config, mesh)

    def put(tree, like):
        return jax.tree.map(
            lambda x, y: jax.device_put(np.asarray(x, y.dtype), y.sharding), tree, like
        )

    state = fresh.replace(
        params=put(variables["params"], fresh.params),
        moe_state=put(variables.get("moe_state", {}), fresh.moe_state),
    )
    return state, setup


def _nbytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def compress_run(
    workdir: str | Path,
    out: str | Path,
    *,
    experts: int,
    method: str,
    score: str = "frequency",
    calib_batches: int = 8,
    calib_split: str = "val",
    step: int | None = None,
) -> dict[str, Any]:
    """Compresses the run in `workdir` into a new run directory `out` (module docstring).

    Args:
      workdir: the source run directory (with checkpoints/).
      out: the new run directory; must not hold a checkpoint already.
      experts: experts per MoE layer after compression.
      method: "merge" (MC-SMoE, `merge_experts`) or "prune" (`prune_experts`).
      score: the pruning score (method="prune"): "frequency", "output_norm" or "similarity".
      calib_batches: batches (of train.batch_size sequences) the routing statistics see.
      calib_split: "val" (the run's validation split) or "train".
      step: the source checkpoint's step; None = the latest.

    Returns:
      Summary: steps, expert counts, parameter counts and bytes, validation losses before and
      after, and the paths written.

    Raises:
      ValueError naming the argument: an unknown method, score or split, a bad expert count
      (from the compress functions), a missing source checkpoint or an existing target one.
    """
    if method not in METHODS:
        raise ValueError(f"--method={method!r} is invalid: allowed values are {METHODS}")
    if method == "prune" and score not in PRUNE_SCORES:
        raise ValueError(f"--score={score!r} is invalid: allowed values are {PRUNE_SCORES}")
    if calib_split not in CALIB_SPLITS:
        raise ValueError(f"--calib_split={calib_split!r} is invalid: allowed {CALIB_SPLITS}")
    if not isinstance(calib_batches, int) or calib_batches < 1:
        raise ValueError(f"--calib_batches={calib_batches!r} is invalid: must be an integer >= 1")
    out = Path(out)
    if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        raise ValueError(f"--out={out}: already holds checkpoints; choose a new directory")

    # One process, every local device on the data axis: the parameters are replicated, so the
    # compression sees whole arrays whatever mesh the run trained on.
    mesh = sharding.make_mesh(data=-1)
    config, state, setup, src_step = load_run(workdir, mesh, step)
    model_cfg = setup.model_cfg
    t = config.train
    corpus, eval_set, calib = run_data(config, setup, calib_batches, calib_split)

    variables = {"params": state.params}
    if state.moe_state:
        variables["moe_state"] = state.moe_state
    variables = jax.device_get(variables)
    stats = routing_stats(model_cfg, variables, calib)
    if method == "merge":
        new_cfg, new_vars = merge_experts(model_cfg, variables, stats, experts)
    else:
        new_cfg, new_vars = prune_experts(model_cfg, variables, stats, experts, score=score)

    new_config = ml_collections.ConfigDict(config.to_dict())
    new_config.moe.num_experts = new_cfg.moe.num_experts
    if validate_config(new_config) != new_cfg:
        raise ValueError(
            "the compressed model is not described by the run's config with "
            f"moe.num_experts={new_cfg.moe.num_experts}; cannot write it as a run"
        )
    new_state, new_setup = compressed_state(new_config, mesh, new_vars)

    loss_before = evaluate(setup, state, eval_set)
    loss_after = evaluate(new_setup, new_state, eval_set)

    out.mkdir(parents=True, exist_ok=True)
    config_json = new_config.to_json_best_effort(indent=1)
    (out / "config.json").write_text(config_json + "\n")
    (out / "config.py").write_text(_CONFIG_PY.format(source=Path(workdir).absolute()))
    data_state = data_lib.train_iterator(
        corpus, seq_len=t.seq_len, batch_size=t.batch_size, seed=config.data.seed
    ).get_state()
    ckpt = Checkpointer(out / "checkpoints", every=1, keep=t.keep_checkpoints, async_save=False)
    try:
        ckpt.save(0, new_state, data_state, config_json, force=True)
        ckpt.wait()
    finally:
        ckpt.close()

    total_before, active_before = count_params(state.params, model_cfg)
    total_after, active_after = count_params(new_state.params, new_cfg)
    return {
        "source": str(Path(workdir).absolute()),
        "source_step": src_step,
        "out": str(out.absolute()),
        "method": method if method == "merge" else f"prune ({score})",
        "calibration": f"{len(calib)} {calib_split} batches of {t.batch_size}x{t.seq_len}",
        "experts": (model_cfg.moe.num_experts, new_cfg.moe.num_experts),
        "params_total": (total_before, total_after),
        "params_active": (active_before, active_after),
        "param_bytes": (_nbytes(state.params), _nbytes(new_state.params)),
        "val_loss": (loss_before, loss_after),
    }


def format_summary(s: dict[str, Any]) -> str:
    rows = [
        ("experts per MoE layer", "{}", s["experts"]),
        ("parameters (total)", "{:,}", s["params_total"]),
        ("parameters (active per token)", "{:,}", s["params_active"]),
        ("parameter bytes", "{:,}", s["param_bytes"]),
        ("validation loss (nats/token)", "{:.4f}", s["val_loss"]),
    ]
    lines = [
        f"{s['source']} step {s['source_step']} -> {s['out']} step 0",
        f"method {s['method']}; calibration on {s['calibration']}",
        "",
        "| | before | after |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {fmt.format(a)} | {fmt.format(b)} |" for name, fmt, (a, b) in rows]
    lines += [
        "",
        f"continue training: python -m moejax.train --config={s['out']}/config.py "
        f"--workdir={s['out']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m moejax.compress",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workdir", required=True, help="the run to compress (with checkpoints/)")
    p.add_argument("--out", required=True, help="the new run directory")
    p.add_argument("--experts", type=int, required=True, help="experts per MoE layer after")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--score", default="frequency", choices=PRUNE_SCORES, help="for prune")
    p.add_argument("--calib_batches", type=int, default=8, help="calibration batches")
    p.add_argument("--calib_split", default="val", choices=CALIB_SPLITS)
    p.add_argument("--step", type=int, default=None, help="source step (default: latest)")
    args = p.parse_args(argv)
    try:
        summary = compress_run(
            args.workdir,
            args.out,
            experts=args.experts,
            method=args.method,
            score=args.score,
            calib_batches=args.calib_batches,
            calib_split=args.calib_split,
            step=args.step,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
