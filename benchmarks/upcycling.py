"""Growing a model on the embedded corpus: sparse upcycling and the dense-to-sparse gate.

    python benchmarks/upcycling.py                 # 500 steps in all per row
    python benchmarks/upcycling.py --steps 100     # quicker, noisier

Rows (one process, one after the other; configs/dense_baseline.py's model, data and optimizer;
MoE rows have 8 experts of the dense FFN's width 256, top-2, so an upcycled expert is an exact
copy of the dense FFN):
  dense           the dense model, `steps` steps;
  moe scratch     the MoE from a random init, `steps` steps;
  upcycled copy   the dense run's checkpoint at steps/2, copy-upcycled
                  (`--config.init.from_checkpoint=<dense run> --config.init.step=<steps/2>
                  --config.init.upcycle=copy`), then steps/2 more steps with a fresh optimizer
                  and schedule (data.seed=1: other windows than the dense run's first half);
  dts scratch     the MoE with router="dts" (EvoMoE's dense-to-sparse gate: Gumbel softmax,
                  tau 2 -> 0.1 over the run, threshold 0.05, at most 4 experts; eval top-2).
Columns: validation loss (nats/byte) at the end; experts per token in training (the mean of the
logged steps); training FLOPs (6 x active matmul parameters + attention, per token, summed over
every step of the row, the dense half included for the upcycled row); wall time.
Results: a table on stdout and benchmarks/results/upcycling.{md,json}.
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
from moejax.train.trainer import _flops_per_token, train_and_evaluate, validate_config  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"


def _dense():
    return dense_baseline.get_config()


def _moe(**moe):
    config = tiny.get_config()
    config.moe.d_ff = _dense().model.d_ff  # experts as wide as the dense FFN (copy upcycling)
    for k, v in moe.items():
        setattr(config.moe, k, v)
    return config


def _train(config, steps: int, workdir: pathlib.Path, *, checkpoint_every=None) -> dict:
    config.train.steps = steps
    config.train.eval_every = steps
    config.train.checkpoint_every = checkpoint_every or steps
    config.train.log_every = max(1, steps // 20)
    config.train.sample_tokens = 0
    t0 = time.time()
    summary = train_and_evaluate(config, str(workdir), progress=False)
    wall = time.time() - t0
    model_cfg = validate_config(config)
    records = read_metrics(workdir)["train"]
    seq, batch = config.train.seq_len, config.train.batch_size
    total, active = summary["params_total"], summary["params_active"]
    if model_cfg.moe is None:
        k_train = None
        per_token = _flops_per_token(model_cfg, active, seq)
    else:
        moe = model_cfg.moe
        k_train = sum(r["experts_per_token"] for r in records) / len(records)
        experts = (total - active) * moe.num_experts / (moe.num_experts - moe.top_k)
        active_k = active + experts * (k_train - moe.top_k) / moe.num_experts
        per_token = _flops_per_token(model_cfg, active_k, seq)
    return {
        "val_loss": summary["final_eval_loss"],
        "experts_per_token": k_train,
        "train_flops": per_token * seq * batch * steps,
        "params_total": total,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args()
    steps, half = args.steps, args.steps // 2
    rows = []

    def add(name, label, r):
        rows.append({"row": name, "label": label, **r})
        print(f"{label:52s} val {r['val_loss']:.4f}  {r['wall_s']:.0f}s", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        dense = _train(_dense(), steps, tmp / "dense", checkpoint_every=half)
        add("dense", f"dense FFN 256, {steps} steps", dense)
        add(
            "moe",
            f"MoE 8x256 top-2 from scratch, {steps} steps",
            _train(_moe(), steps, tmp / "moe"),
        )
        up = _moe()
        up.init.from_checkpoint = str(tmp / "dense")
        up.init.step = half
        up.init.upcycle = "copy"
        up.data.seed = 1
        r = _train(up, steps - half, tmp / "up")
        r["train_flops"] += dense["train_flops"] * half / steps  # the dense half it started from
        add("upcycled", f"dense {half} steps -> copy-upcycled, {steps - half} steps", r)
        dts = _moe(router="dts", max_k=4, dts_steps=steps)
        add("dts", f"DTS gate from scratch, {steps} steps", _train(dts, steps, tmp / "dts"))

    ref = next(r for r in rows if r["row"] == "moe")
    lines = [
        f"configs/dense_baseline.py's model and data, {steps} steps per row; {platform.node()}",
        "",
        "| run | val loss | experts/token (train) | training TFLOPs | vs MoE scratch | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        k = "-" if r["experts_per_token"] is None else f"{r['experts_per_token']:.2f}"
        lines.append(
            f"| {r['label']} | {r['val_loss']:.4f} | {k} | {r['train_flops'] / 1e12:.2f} | "
            f"{r['train_flops'] / ref['train_flops']:.2f}x | {r['wall_s']:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    command = "python benchmarks/upcycling.py" + (f" --steps {steps}" if steps != 500 else "")
    (RESULTS / "upcycling.md").write_text(f"Command: `{command}`\n\n{table}\n")
    (RESULTS / "upcycling.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
