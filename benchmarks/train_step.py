"""CPU train step (fwd + bwd + AdamW) of moejax against transformers' Mixtral and Mistral.

    python benchmarks/train_step.py                 # the sizes below, 7 interleaved rounds
    python benchmarks/train_step.py --rounds 3      # quicker
    python benchmarks/train_step.py --skip_torch    # moejax rows only

Sizes: vocab 256, D 256, 4 layers, 4 heads (4 KV heads), L 256, batch 8, float32. Rows:
  MoE LM      8 experts of width 512, top-2 (moejax: configs/tiny.py's model at these sizes,
              dropless, gmm_backend="auto"; transformers: MixtralForCausalLM);
  dense 1024  a dense SwiGLU FFN of width 1024, the MoE's active FFN FLOPs
              (transformers: MistralForCausalLM);
  dense 16    FFN width 16: the attention, embedding and head part of the step.
Both libraries run one optimizer step per call: moejax's jitted train step (clip 1.0 + AdamW,
the state donated), torch's zero_grad / forward with labels / backward / clip_grad_norm_ /
AdamW.step on 2 threads (torch.set_num_threads(os.cpu_count())). Every round times each row
once, so machine load hits all rows alike; the table gives medians and the ratio
moejax / transformers, and the process's minor page faults per step (median, `getrusage`).
FLOP/s: the train step's model FLOPs (6 x active matmul params +
attention per token, the trainer's MFU count) over its median time, against the fastest of 5
jitted float32 2048^3 matmuls on this machine.
The script restarts itself with the glibc malloc tunables of `moejax.hostenv`, as the training
CLI does, so both libraries run with them; MOEJAX_HOST_MALLOC=0 measures glibc's defaults, and
the table's header says which ran.
Results: a table on stdout and benchmarks/results/train_step.{md,json}.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from moejax.hostenv import host_malloc_active, reexec_with_host_malloc  # noqa: E402

# Before jax and torch are imported: both libraries then run with the malloc tunables that
# `python -m moejax.train` uses (moejax.hostenv); MOEJAX_HOST_MALLOC=0 measures without them.
reexec_with_host_malloc()

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from moejax import sharding  # noqa: E402
from moejax.train import config_defaults as defaults  # noqa: E402
from moejax.train.state import count_params  # noqa: E402
from moejax.train.step import jit_train_step  # noqa: E402
from moejax.train.trainer import _flops_per_token  # noqa: E402
from moejax.train.warm_start import state_setup  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
V, D, LAYERS, HEADS, L, B, E, K, F_EXPERT = 256, 256, 4, 4, 256, 8, 8, 2, 512
ROWS = {
    "moe": "MoE LM (Mixtral-style)",
    "dense1024": "dense LM, FFN 1024",
    "dense16": "dense LM, FFN 16",
}


def moejax_config(row: str, overrides: dict):
    config = defaults.base_config(defaults.model_section(), defaults.moe_section())  # tiny.py
    config.model.update(
        vocab_size=V, d_model=D, num_layers=LAYERS, num_heads=HEADS, num_kv_heads=HEADS, max_len=L
    )
    config.moe.update(num_experts=E, top_k=K, d_ff=F_EXPERT)
    if row != "moe":
        config.model.d_ff = 1024 if row == "dense1024" else 16
        config.moe = None
    config.train.update(batch_size=B, seq_len=L)
    for key, value in overrides.items():
        *path, name = key.split(".")
        section = config
        for part in path:
            section = section[part]
        if section is not None:  # moe.* overrides do not apply to the dense rows
            section[name] = value
    return config


def moejax_step(row: str, overrides: dict):
    """(thunk running one train step, model FLOPs per step)."""
    config = moejax_config(row, overrides)
    mesh = sharding.make_mesh(data=1)
    state, setup = state_setup(config, mesh)
    model_cfg = setup.model_cfg
    step = jit_train_step(setup)
    tokens = jax.random.randint(jax.random.key(0), (B, L + 1), 0, V, dtype=jnp.int32)
    box = [state]

    def run():
        with sharding.sharding_context(mesh, None):
            box[0], metrics = step(box[0], tokens)
        jax.block_until_ready(metrics["loss"])

    _, active = count_params(state.params, model_cfg)
    return run, _flops_per_token(model_cfg, active, L) * B * L


def torch_step(row: str):
    import torch
    from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    common = dict(
        vocab_size=V,
        hidden_size=D,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=L,
        tie_word_embeddings=False,
    )
    if row == "moe":
        cfg = MixtralConfig(
            **common, intermediate_size=F_EXPERT, num_local_experts=E, num_experts_per_tok=K
        )
        model = MixtralForCausalLM(cfg)
    else:
        cfg = MistralConfig(**common, intermediate_size=1024 if row == "dense1024" else 16)
        model = MistralForCausalLM(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    tokens = torch.randint(0, V, (B, L + 1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:].contiguous()

    def run():
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return run


def matmul_rate(n: int = 2048) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--skip_torch", action="store_true")
    p.add_argument("--out", default=None, help="results prefix (default: results/train_step)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        help="a moejax override section.field=value (a Python literal), e.g. model.remat='full'",
    )
    args = p.parse_args()
    import ast

    overrides = {}
    for item in args.set:
        key, value = item.split("=", 1)
        overrides[key] = ast.literal_eval(value)
    rows = args.rows.split(",")
    cases, flops = {}, {}
    for row in rows:
        cases[("moejax", row)], flops[row] = moejax_step(row, overrides)
        if not args.skip_torch:
            import torch

            torch.set_num_threads(os.cpu_count())
            cases[("transformers", row)] = torch_step(row)
    for thunk in cases.values():  # compile, warm up
        thunk()
        thunk()
    samples = {name: [] for name in cases}
    faults = {name: [] for name in cases}  # minor page faults of the process during each step
    for _ in range(args.rounds):
        for name, thunk in cases.items():
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            thunk()
            samples[name].append(time.perf_counter() - t0)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    med = {name: float(np.median(s)) for name, s in samples.items()}
    med_faults = {name: float(np.median(f)) for name, f in faults.items()}
    rate = matmul_rate()
    results = []
    lines = [
        f"V{V} D{D} {LAYERS} layers {HEADS} heads L{L} B{B}, MoE {E}x{F_EXPERT} top-{K}; "
        f"median of {args.rounds} interleaved rounds; {platform.node()}, {os.cpu_count()} CPUs; "
        f"2048^3 float32 matmul {rate / 1e9:.0f} GFLOP/s; "
        f"malloc: {'moejax.hostenv tunables' if host_malloc_active() else 'glibc defaults'}"
        + (f"; moejax overrides {overrides}" if overrides else ""),
        "",
        "| model | moejax ms | transformers ms | moejax / transformers | moejax GFLOP/s | "
        "of matmul rate | page faults / step (moejax, transformers) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ours = med[("moejax", row)]
        theirs = med.get(("transformers", row))
        achieved = flops[row] / ours
        results.append(
            {
                "row": row,
                "moejax_ms": ours * 1e3,
                "transformers_ms": None if theirs is None else theirs * 1e3,
                "ratio": None if theirs is None else ours / theirs,
                "moejax_gflops": achieved / 1e9,
                "matmul_gflops": rate / 1e9,
                "samples": {k[0]: v for k, v in samples.items() if k[1] == row},
                "minor_faults": {k[0]: v for k, v in faults.items() if k[1] == row},
            }
        )
        t_s = "-" if theirs is None else f"{theirs * 1e3:.0f}"
        r_s = "-" if theirs is None else f"{ours / theirs:.2f}x"
        their_faults = med_faults.get(("transformers", row))
        f_s = f"{med_faults[('moejax', row)]:,.0f}, " + (
            "-" if their_faults is None else f"{their_faults:,.0f}"
        )
        lines.append(
            f"| {ROWS[row]} | {ours * 1e3:.0f} | {t_s} | {r_s} | {achieved / 1e9:.0f} | "
            f"{achieved / rate:.0%} | {f_s} |"
        )
    table = "\n".join(lines)
    print(table)
    opt_out = "MOEJAX_HOST_MALLOC=0 " if os.environ.get("MOEJAX_HOST_MALLOC") == "0" else ""
    cmd = f"{opt_out}python benchmarks/train_step.py" + "".join(f" --set {s}" for s in args.set)
    out = pathlib.Path(args.out) if args.out else RESULTS / "train_step"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(f"Command: `{cmd}`\n\n{table}\n")
    out.with_suffix(".json").write_text(json.dumps({"rows": results}, indent=1))


if __name__ == "__main__":
    main()
