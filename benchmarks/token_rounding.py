"""Tile-aware token rounding (SonicMoE) at fine-grained shapes: padded rows and CPU time.

    python benchmarks/token_rounding.py                    # B8 L512 D512 F256 E64 top-6, tile 128
    python benchmarks/token_rounding.py --repeats 3 --length 256    # quicker

Rows: the MoE layer in training mode (jitted value-and-grad w.r.t. every weight and the input),
gmm_backend="xla" with row tile --tile, with token_rounding = none / down / nearest / up
(rounding_tile = the gmm tile), for "uniform" and "skewed" routing (as in moe_layer.py: a
shared direction gives a few experts most tokens). Columns:
  rows/token      expert rows computed per token (what the grouped matmul is fed), the real
                  assignments after rounding;
  padded rows     share of the grouped matmul's rows that are tile padding: sum over experts of
                  ceil(n_e / tile) * tile - n_e, over the padded total;
  fwd+bwd ms      median wall time, rounds interleaved across the rows (shared machine);
  vs none         that time relative to no rounding, in the same rounds.
Results: a table on stdout and benchmarks/results/token_rounding.{md,json}.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from moe_layer import interleaved, make_inputs  # noqa: E402

from moejax.layers import MoE, MoEConfig, MoEExecution  # noqa: E402
from moejax.moe.rounding import round_token_counts  # noqa: E402
from moejax.moe.routing import topk_route  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
MODES = ("none", "down", "nearest", "up")


def _step(model):
    def loss(params, x, cot):
        y, _ = model.apply({"params": params}, x, deterministic=False)
        return jnp.vdot(y, cot)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _rows(cfg, x_TxD, kernel, tile):
    """(rows per token, padded share) of the grouped matmul fed by cfg's training routing."""
    routing = topk_route(jnp.asarray(x_TxD) @ jnp.asarray(kernel), cfg)
    if cfg.token_rounding != "none":
        routing = round_token_counts(routing, cfg)
    idx = np.asarray(routing.indices)
    counts = np.bincount(idx[idx < cfg.num_experts], minlength=cfg.num_experts)
    padded = (-(-counts // tile) * tile).sum()
    return counts.sum() / x_TxD.shape[0], 1.0 - counts.sum() / max(padded, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--d_model", type=int, default=512)
    p.add_argument("--d_ff", type=int, default=256)
    p.add_argument("--num_experts", type=int, default=64)
    p.add_argument("--top_k", type=int, default=6)
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    ex = MoEExecution(gmm_backend="xla", gmm_tile=args.tile)
    base = dict(num_experts=args.num_experts, top_k=args.top_k, d_ff=args.d_ff, execution=ex)
    cfgs = {m: MoEConfig(**base, token_rounding=m) for m in MODES}
    models = {m: MoE(c, d_model=args.d_model) for m, c in cfgs.items()}
    shape = (args.batch, args.length, args.d_model)
    rng = np.random.default_rng(0)
    cot = jnp.asarray(rng.normal(size=shape).astype(np.float32))
    params = nn.unbox(models["none"].init(jax.random.key(0), jnp.zeros(shape))["params"])
    steps = {m: _step(model) for m, model in models.items()}
    rows = []
    for routing in ("uniform", "skewed"):
        x, kernel = make_inputs(args, routing, rng)
        prm = {**params, "router": {"kernel": jnp.asarray(kernel)}}
        xj = jnp.asarray(x)
        cases = {
            m: (lambda f=f, a=prm, b=xj: jax.block_until_ready(f(a, b, cot)), None)
            for m, f in steps.items()
        }
        times = interleaved(cases, args.repeats)
        for m in MODES:
            per_token, padded = _rows(cfgs[m], x.reshape(-1, args.d_model), kernel, args.tile)
            rows.append(
                {
                    "routing": routing,
                    "token_rounding": m,
                    "rows_per_token": float(per_token),
                    "padded_fraction": float(padded),
                    "wall_ms": times[m][0] * 1e3,
                    "vs_none": times[m][0] / times["none"][0],
                }
            )
            r = rows[-1]
            print(
                f"{routing:8s} {m:8s} rows/token {per_token:.3f} padded {padded:.3f} "
                f"{r['wall_ms']:.0f} ms ({r['vs_none']:.2f}x)",
                flush=True,
            )
    lines = [
        f"B{args.batch} L{args.length} D{args.d_model} F{args.d_ff} E{args.num_experts} "
        f"top-{args.top_k}, gmm tile {args.tile} (xla), fwd+bwd in training, median of "
        f"{args.repeats} interleaved rounds; {platform.node()}, {os.cpu_count()} CPUs",
        "",
        "| routing | token_rounding | rows/token | padded rows | fwd+bwd ms | vs none |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['routing']} | {r['token_rounding']} | {r['rows_per_token']:.3f} | "
            f"{r['padded_fraction']:.1%} | {r['wall_ms']:.0f} | {r['vs_none']:.2f}x |"
        )
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "token_rounding.md").write_text(
        f"Command: `python benchmarks/token_rounding.py`\n\n{table}\n"
    )
    (RESULTS / "token_rounding.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
