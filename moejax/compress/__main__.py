"""Command line: compress a training run's MoE layers into a new run directory.

    python -m moejax.compress --workdir=runs/tiny --out=runs/tiny_e4 --experts=4 --method=merge
    python -m moejax.compress --workdir=runs/tiny --out=runs/tiny_p4 --experts=4 \
        --method=prune --score=output_norm
    python -m moejax.compress --workdir=runs/tiny --out=runs/tiny_q8 --bits=8
    python -m moejax.compress --workdir=runs/tiny --out=runs/tiny_p4q4 --experts=4 \
        --method=prune --bits=4 --group_size=32 --policy=mixed

Reads the latest checkpoint of --workdir (its config comes from the checkpoint), gathers routing
statistics (`moejax.compress.routing_stats`) on --calib_batches batches of the run's validation
split (or of its training split), then in stages:

  --experts=N --method=merge|prune   merges (MC-SMoE) or prunes every MoE layer to N experts;
      [--score=S]                    prune: the score kept experts are the top of (frequency,
                                     output_norm, similarity, random); merge: the centres'
                                     (frequency, MC-SMoE's, or output_norm);
  --bits=8|4 [--group_size=G] [--policy=uniform|mixed]
                                     quantizes the (compressed) routed experts
                                     (`moejax.compress.quantize_experts`: int8/int4 values, a
                                     float32 scale per channel or per G contraction rows;
                                     "mixed" keeps the --keep_fraction most used experts of
                                     each layer, by the routing statistics of the model being
                                     quantized, at 8 bits).

Either stage alone, or both (compress, then quantize). Writes --out as a run directory whose
step-0 checkpoint holds the result with a fresh optimizer, plus `config.py` / `config.json`
describing the new model (moe.num_experts, moe.expert_bits, moe.expert_group_size) and
`compress.json` (the table below, as data). Continue training (recovery fine-tuning) with

    python -m moejax.train --config=<out>/config.py --workdir=<out> --config.train.steps=100

(a quantized model trains with its integer expert values and their scales frozen, everything
else as usual: `moejax.train.state.frozen_params`), and export with `--config.train.export_hf`
or `moejax.hf.to_hf` as any moejax model (quantized experts are written dequantized). Prints a
table with one column per stage: experts, parameter counts and bytes, the routed experts'
bytes (`expert_nbytes`: 4-bit values at half a byte, plus the scales) and the validation loss
(the run's own evaluation batches). An invalid argument or config stops with a one-line
message naming it (exit code 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from moejax import sharding
from moejax.compress.merge import MERGE_CENTRES, merge_experts
from moejax.compress.prune import PRUNE_SCORES, prune_experts
from moejax.compress.quantize import QUANT_POLICIES, expert_nbytes, quantize_experts
from moejax.compress.stats import routing_stats
from moejax.layers.config import EXPERT_BITS
from moejax.train import data as data_lib
from moejax.train.checkpoint import Checkpointer
from moejax.train.state import TrainState, count_params
from moejax.train.step import jit_eval_step
from moejax.train.trainer import validate_config
from moejax.train.warm_start import load_run, state_setup

METHODS = ("merge", "prune")
CALIB_SPLITS = ("val", "train")

_CONFIG_PY = '''"""The config of a run written by `python -m moejax.compress` (from {source}).

Loads config.json beside this file; any field can be overridden on the command line (None
fields are typed again: moejax.train.config_defaults.saved_config).
"""

import json
import pathlib

import ml_collections

from moejax.train.config_defaults import saved_config


def get_config() -> ml_collections.ConfigDict:
    path = pathlib.Path(__file__).with_name("config.json")
    return saved_config(json.loads(path.read_text()))
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


def _check_args(experts, method, score, bits, group_size, policy, keep_fraction) -> None:
    """ValueError naming the flag for a bad value or combination (before any work)."""
    if bits is None:
        for flag, value, default in (
            ("--group_size", group_size, None),
            ("--policy", policy, "uniform"),
            ("--keep_fraction", keep_fraction, 0.25),
        ):
            if value != default:
                raise ValueError(f"{flag}={value!r} needs --bits (8 or 4): it sets how to quantize")
    if experts is None and bits is None:
        raise ValueError(
            "--experts or --bits is required: --experts=N --method=merge|prune compresses, "
            f"--bits={'|'.join(map(str, EXPERT_BITS))} quantizes, both do one then the other"
        )
    if experts is not None and method is None:
        raise ValueError(f"--experts={experts} needs --method: allowed values are {METHODS}")
    if experts is None and method is not None:
        raise ValueError(f"--method={method!r} needs --experts=N (experts per MoE layer after)")
    if method is not None and method not in METHODS:
        raise ValueError(f"--method={method!r} is invalid: allowed values are {METHODS}")
    if method == "prune" and score not in PRUNE_SCORES:
        raise ValueError(f"--score={score!r} is invalid: allowed values are {PRUNE_SCORES}")
    if method == "merge" and score not in MERGE_CENTRES:
        raise ValueError(
            f"--score={score!r} is invalid with --method=merge (it picks the centres): allowed "
            f"values are {MERGE_CENTRES}"
        )
    if bits is None:
        return
    if bits not in EXPERT_BITS:
        raise ValueError(f"--bits={bits!r} is invalid: allowed values are {EXPERT_BITS}")
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"--group_size={group_size!r} is invalid: must be an integer >= 1")
    if policy not in QUANT_POLICIES:
        raise ValueError(f"--policy={policy!r} is invalid: allowed values are {QUANT_POLICIES}")
    if policy == "mixed" and bits == 8:
        raise ValueError(
            "--policy='mixed' keeps the most used experts at 8 bits and the rest at --bits: "
            "it needs --bits=4"
        )
    if not (isinstance(keep_fraction, int | float) and 0.0 <= keep_fraction <= 1.0):
        raise ValueError(f"--keep_fraction={keep_fraction!r} is invalid: must be in [0, 1]")


def _check_source(workdir, model_cfg, group_size) -> None:
    """ValueError naming the flag: a source these stages cannot take."""
    moe = model_cfg.moe
    if moe is None:
        raise ValueError(f"--workdir={workdir}: the run's model is dense (config moe=None)")
    if moe.expert_bits is not None:
        raise ValueError(
            f"--workdir={workdir}: the run's experts are already quantized "
            f"(moe.expert_bits={moe.expert_bits}); compress a run with float experts"
        )
    if group_size is not None and (model_cfg.d_model % group_size or moe.d_ff % group_size):
        raise ValueError(
            f"--group_size={group_size} is invalid: must divide the experts' contraction sizes "
            f"model.d_model={model_cfg.d_model} and moe.d_ff={moe.d_ff}"
        )


def _stage(name: str, model_cfg, state: TrainState, variables, loss: float) -> dict[str, Any]:
    """One column of the table: what the model is after a stage."""
    total, active = count_params(state.params, model_cfg)
    return {
        "stage": name,
        "experts": model_cfg.moe.num_experts,
        "params_total": total,
        "params_active": active,
        "param_bytes": _nbytes(state.params),
        "expert_bytes": expert_nbytes(model_cfg, variables),
        "val_loss": loss,
    }


def _quant_name(bits: int, group_size: int | None, policy: str, keep_fraction: float) -> str:
    scales = "per channel" if group_size is None else f"groups of {group_size}"
    if policy == "mixed":
        return f"int{bits}, {keep_fraction:.0%} most used at int8, {scales}"
    return f"int{bits}, {scales}"


def compress_run(
    workdir: str | Path,
    out: str | Path,
    *,
    experts: int | None = None,
    method: str | None = None,
    score: str = "frequency",
    bits: int | None = None,
    group_size: int | None = None,
    policy: str = "uniform",
    keep_fraction: float = 0.25,
    calib_batches: int = 8,
    calib_split: str = "val",
    step: int | None = None,
) -> dict[str, Any]:
    """Compresses and/or quantizes the run in `workdir` into a new run directory `out`
    (module docstring).

    Args:
      workdir: the source run directory (with checkpoints/); its experts must be float.
      out: the new run directory; must not hold a checkpoint already.
      experts: experts per MoE layer after merging/pruning; None = no such stage.
      method: "merge" (MC-SMoE, `merge_experts`) or "prune" (`prune_experts`); with experts.
      score: the pruning score (method="prune"): "frequency", "output_norm" or "similarity";
        with method="merge" the score the centres are the top of: "frequency" (MC-SMoE) or
        "output_norm".
      bits: quantize the experts to 8 or 4 bits (`quantize_experts`) after the merge/prune
        stage, if any; None = no quantization.
      group_size: quantization: contraction rows per scale (dividing d_model and moe.d_ff);
        None = one scale per output channel.
      policy: quantization: "uniform", or "mixed" (bits=4, the most used experts at 8 bits,
        by routing statistics of the model being quantized).
      keep_fraction: policy="mixed": the share of each layer's experts kept at 8 bits.
      calib_batches: batches (of train.batch_size sequences) the routing statistics see.
      calib_split: "val" (the run's validation split) or "train".
      step: the source checkpoint's step; None = the latest.

    Returns:
      Summary: "stages", one dict per table column (stage name, experts, parameter counts and
      bytes, expert bytes, validation loss), the same figures as (before, after the last
      stage) tuples, and the paths written.

    Raises:
      ValueError naming the argument (as its flag): an unknown method, score, split, bit width
      or policy, a bad combination (--method without --experts, --group_size without --bits,
      ...), a bad expert count or group size, a quantized or dense source, a missing source
      checkpoint or an existing target one.
    """
    _check_args(experts, method, score, bits, group_size, policy, keep_fraction)
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
    _check_source(workdir, model_cfg, group_size)
    t = config.train
    corpus, eval_set, calib = run_data(config, setup, calib_batches, calib_split)

    variables = {"params": state.params}
    if state.moe_state:
        variables["moe_state"] = state.moe_state
    variables = jax.device_get(variables)
    stages = [_stage("before", model_cfg, state, variables, evaluate(setup, state, eval_set))]
    new_config = ml_collections.ConfigDict(config.to_dict())
    new_cfg, new_vars, new_state = model_cfg, variables, state
    stats = None
    methods = []

    def as_run(cfg, variables, what: str):
        """(TrainState, StateSetup) of new_config's model holding `variables` (that model's)."""
        if validate_config(new_config) != cfg:
            raise ValueError(
                f"the {what} model is not described by the run's config with moe.num_experts="
                f"{cfg.moe.num_experts}, moe.expert_bits={cfg.moe.expert_bits}; cannot write it "
                "as a run"
            )
        return compressed_state(new_config, mesh, variables)

    if experts is not None:
        stats = routing_stats(new_cfg, new_vars, calib)
        if method == "merge":
            new_cfg, new_vars = merge_experts(new_cfg, new_vars, stats, experts, centres=score)
            name = "merge" if score == "frequency" else f"merge ({score} centres)"
        else:
            new_cfg, new_vars = prune_experts(new_cfg, new_vars, stats, experts, score=score)
            name = f"prune ({score})"
        new_config.moe.num_experts = new_cfg.moe.num_experts
        new_state, new_setup = as_run(new_cfg, new_vars, "compressed")
        loss = evaluate(new_setup, new_state, eval_set)
        stages.append(_stage(name, new_cfg, new_state, new_vars, loss))
        methods.append(name)
        stats = None  # the statistics of the experts that are no longer there
    if bits is not None:
        if policy == "mixed":
            stats = routing_stats(new_cfg, new_vars, calib)
        new_cfg, new_vars = quantize_experts(
            new_cfg, new_vars, bits, group_size, policy, stats=stats, keep_fraction=keep_fraction
        )
        name = _quant_name(bits, group_size, policy, keep_fraction)
        new_config.moe.expert_bits = bits
        new_config.moe.expert_group_size = group_size
        new_state, new_setup = as_run(new_cfg, new_vars, "quantized")
        loss = evaluate(new_setup, new_state, eval_set)
        stages.append(_stage(name, new_cfg, new_state, new_vars, loss))
        methods.append(name)

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

    summary = {
        "source": str(Path(workdir).absolute()),
        "source_step": src_step,
        "out": str(out.absolute()),
        "method": ", then ".join(methods),
        "calibration": f"{len(calib)} {calib_split} batches of {t.batch_size}x{t.seq_len}",
        "stages": stages,
    }
    for key in ("experts", "params_total", "params_active", "param_bytes", "expert_bytes"):
        summary[key] = (stages[0][key], stages[-1][key])
    summary["val_loss"] = (stages[0]["val_loss"], stages[-1]["val_loss"])
    (out / "compress.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


_ROWS = (
    ("experts per MoE layer", "{}", "experts"),
    ("parameters (total)", "{:,}", "params_total"),
    ("parameters (active per token)", "{:,}", "params_active"),
    ("parameter bytes (as stored)", "{:,}", "param_bytes"),
    ("routed expert bytes", "{:,}", "expert_bytes"),
    ("validation loss (nats/token)", "{:.4f}", "val_loss"),
)


def format_summary(s: dict[str, Any]) -> str:
    stages = s["stages"]
    lines = [
        f"{s['source']} step {s['source_step']} -> {s['out']} step 0",
        f"{s['method']}; calibration on {s['calibration']}",
        "",
        "| | "
        + " | ".join(
            st["stage"] if i == 0 else f"after {st['stage']}" for i, st in enumerate(stages)
        )
        + " |",
        "|---" * (len(stages) + 1) + "|",
    ]
    for name, fmt, key in _ROWS:
        lines.append(f"| {name} | " + " | ".join(fmt.format(st[key]) for st in stages) + " |")
    lines += [
        "",
        f"continue training: python -m moejax.train --config={s['out']}/config.py "
        f"--workdir={s['out']}",
    ]
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # One line naming the flag, exit code 2, as every other invalid argument here.
        self.exit(2, f"error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    p = _Parser(
        prog="python -m moejax.compress",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workdir", required=True, help="the run to compress (with checkpoints/)")
    p.add_argument("--out", required=True, help="the new run directory")
    p.add_argument("--experts", type=int, default=None, help="experts per MoE layer after")
    p.add_argument("--method", default=None, choices=METHODS, help="with --experts")
    p.add_argument(
        "--score",
        default="frequency",
        choices=PRUNE_SCORES,
        help="prune: the score kept experts are the top of; merge: the centres' (frequency or "
        "output_norm)",
    )
    p.add_argument("--bits", type=int, default=None, choices=EXPERT_BITS, help="quantize experts")
    p.add_argument("--group_size", type=int, default=None, help="rows per scale (--bits)")
    p.add_argument("--policy", default="uniform", choices=QUANT_POLICIES, help="for --bits")
    p.add_argument("--keep_fraction", type=float, default=0.25, help="--policy=mixed: at int8")
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
            bits=args.bits,
            group_size=args.group_size,
            policy=args.policy,
            keep_fraction=args.keep_fraction,
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
