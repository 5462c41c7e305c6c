"""Grouped matmul benchmark: TFLOP/s of the three products of an MoE expert layer.

    python -m benchmarks.gmm                       # GPU shapes on a GPU, reduced ones on CPU
    python -m benchmarks.gmm --preset=gpu --repeats=20 --dtype=bfloat16

Products (rows grouped by expert, M rows in G groups, weight [G, K, N]):
  fwd    out = gmm(x, w)                 [M, K] x [G, K, N] -> [M, N]
  d_lhs  dx  = gmm(dy, w, transpose)     [M, N] x [G, K, N]^T -> [M, K]
  d_rhs  dw  = tgmm(x, dy)               [M, K]^T x [M, N] -> [G, K, N]
each 2*M*K*N FLOPs, compared with a dense matmul of the same FLOPs ([M, K] x [K, N]), with
`jax.lax.ragged_dot` (native autodiff for the two gradients), and with `tokamax.ragged_dot` when
tokamax imports. Group sizes are balanced (M / G each) or Zipf-skewed (p_g ~ 1 / (g + 1)^1.2).

GPU preset: Mixtral expert shapes (K=4096, N=14336, G=8) and DeepSeek fine-grained experts
(K=2048, N=1408, G=64), M=16384 rows; backends triton, ragged_dot, dense, tokamax.
CPU preset: the Pallas kernels only run in interpret mode on CPU, which says nothing about their
speed, so the Triton (and Mosaic) kernels are checked for correctness against ragged_dot at a tiny
size and only the XLA grouped path is timed, against ragged_dot and dense, at reduced shapes.

Timing: each function is jitted, run once to compile, then timed `--repeats` times with
block_until_ready; the median is reported. Results go to benchmarks/results/gmm_<platform>.json
and .md (the markdown table is also printed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from moejax.pallas import gmm, tgmm

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    m: int  # rows (tokens x top_k)
    k: int  # model width (contraction of the forward product)
    n: int  # expert hidden width
    g: int  # experts


GPU_SHAPES = (
    Shape("mixtral", 16384, 4096, 14336, 8),
    Shape("deepseek_fine", 16384, 2048, 1408, 64),
)
# Same G and aspect, widths divided by 8 (Mixtral) / 4 (DeepSeek) and M by 8: a 2-core CPU does
# these in about a second per product.
CPU_SHAPES = (
    Shape("mixtral/8", 2048, 512, 1792, 8),
    Shape("deepseek_fine/4", 2048, 512, 352, 64),
)
# Correctness-only size for the interpret-mode Pallas kernels.
INTERPRET_SHAPE = Shape("interpret_check", 96, 48, 40, 4)


def group_sizes_for(m: int, g: int, skew: str) -> np.ndarray:
    """Balanced (as equal as possible) or Zipf-skewed sizes summing to m."""
    if skew == "balanced":
        weights = np.ones(g)
    elif skew == "zipf":
        weights = 1.0 / np.arange(1, g + 1) ** 1.2
    else:
        raise ValueError(f"skew={skew!r} must be 'balanced' or 'zipf'")
    sizes = np.floor(m * weights / weights.sum()).astype(np.int64)
    sizes[0] += m - sizes.sum()
    return sizes.astype(np.int32)


def time_fn(fn: Callable, args: tuple, repeats: int) -> float:
    """Median wall time (s) of fn(*args) after one compiling call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def product_fns(backend: str) -> dict[str, Callable]:
    """Jitted fwd / d_lhs / d_rhs for one implementation; all take (x, w, dy, group_sizes)."""
    if backend == "dense":
        # Same FLOPs as each grouped product: one [M, K] x [K, N] matmul (expert 0's weight).
        def dense(x, w, dy, gs):
            del dy, gs
            return x @ w[0]

        return {p: jax.jit(dense) for p in ("fwd", "d_lhs", "d_rhs")}
    if backend in ("ragged_dot_autodiff", "tokamax"):
        if backend == "tokamax":
            import tokamax

            fwd = tokamax.ragged_dot
        else:
            fwd = jax.lax.ragged_dot

        def d_lhs(x, w, dy, gs):
            return jax.vjp(lambda x_: fwd(x_, w, gs), x)[1](dy)[0]

        def d_rhs(x, w, dy, gs):
            return jax.vjp(lambda w_: fwd(x, w_, gs), w)[1](dy)[0]

        return {
            "fwd": jax.jit(lambda x, w, dy, gs: fwd(x, w, gs)),
            "d_lhs": jax.jit(d_lhs),
            "d_rhs": jax.jit(d_rhs),
        }
    return {
        "fwd": jax.jit(lambda x, w, dy, gs: gmm(x, w, gs, backend=backend)),
        "d_lhs": jax.jit(lambda x, w, dy, gs: gmm(dy, w, gs, transpose_rhs=True, backend=backend)),
        "d_rhs": jax.jit(lambda x, w, dy, gs: tgmm(x, dy, gs, backend=backend)),
    }


def make_inputs(shape: Shape, dtype, skew: str, seed: int = 0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k1, (shape.m, shape.k), jnp.float32).astype(dtype)
    w = (jax.random.normal(k2, (shape.g, shape.k, shape.n), jnp.float32) / shape.k**0.5).astype(
        dtype
    )
    dy = jax.random.normal(k3, (shape.m, shape.n), jnp.float32).astype(dtype)
    gs = jnp.asarray(group_sizes_for(shape.m, shape.g, skew))
    return x, w, dy, gs


def check_interpret_kernels(dtype) -> list[dict]:
    """Pallas kernels in interpret mode vs ragged_dot at a tiny size: correctness, not speed."""
    backends = ["triton"]
    try:
        from moejax.pallas import mosaic_gmm  # noqa: F401

        backends.append("mosaic")
    except ImportError:
        pass
    rows = []
    for skew in ("balanced", "zipf"):
        x, w, dy, gs = make_inputs(INTERPRET_SHAPE, dtype, skew)
        oracle = product_fns("ragged_dot")
        for backend in backends:
            kw = dict(backend=backend, interpret=True)
            outs = {
                "fwd": gmm(x, w, gs, **kw),
                "d_lhs": gmm(dy, w, gs, transpose_rhs=True, **kw),
                "d_rhs": tgmm(x, dy, gs, **kw),
            }
            for product, out in outs.items():
                got = np.asarray(out, np.float32)
                want = np.asarray(oracle[product](x, w, dy, gs), np.float32)
                err = float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))
                rows.append(
                    dict(
                        backend=backend, skew=skew, product=product, max_rel_err=err, ok=err < 2e-2
                    )
                )
    return rows


def run(args) -> dict:
    on_gpu = jax.default_backend() in ("gpu", "cuda", "rocm")
    preset = args.preset if args.preset != "auto" else ("gpu" if on_gpu else "cpu")
    # bf16 is what GPUs train in; XLA:CPU has no fast bf16 matmul, so the CPU default is f32.
    dtype = jnp.dtype(args.dtype or ("bfloat16" if preset == "gpu" else "float32"))
    shapes = GPU_SHAPES if preset == "gpu" else CPU_SHAPES
    if preset == "gpu":
        backends = ["triton", "ragged_dot", "ragged_dot_autodiff", "dense"]
    else:
        backends = ["xla", "ragged_dot", "ragged_dot_autodiff", "dense"]
    try:
        import tokamax  # noqa: F401

        backends.append("tokamax")
    except ImportError:
        pass

    results = []
    for shape in shapes:
        for skew in ("balanced", "zipf"):
            inputs = make_inputs(shape, dtype, skew)
            flops = 2.0 * shape.m * shape.k * shape.n
            for backend in backends:
                for product, fn in product_fns(backend).items():
                    seconds = time_fn(fn, inputs, args.repeats)
                    results.append(
                        dict(
                            shape=shape.name,
                            m=shape.m,
                            k=shape.k,
                            n=shape.n,
                            g=shape.g,
                            skew=skew,
                            group_sizes=np.asarray(inputs[3]).tolist(),
                            backend=backend,
                            product=product,
                            seconds=seconds,
                            tflops=flops / seconds / 1e12,
                        )
                    )
                    print(
                        f"{shape.name:>16} {skew:>8} {backend:>20} {product:>6} "
                        f"{seconds * 1e3:9.2f} ms {flops / seconds / 1e12:8.3f} TFLOP/s",
                        file=sys.stderr,
                    )
    checks = [] if preset == "gpu" else check_interpret_kernels(dtype)
    return dict(
        platform=jax.default_backend(),
        device=str(jax.devices()[0].device_kind),
        host=platform.node(),
        # The CPU numbers are only comparable between runs at a similar load (shared machines).
        load_average_1min=os.getloadavg()[0],
        jax=jax.__version__,
        preset=preset,
        dtype=str(dtype),
        repeats=args.repeats,
        note=(
            "GPU run: Triton kernels compiled and timed."
            if preset == "gpu"
            else "CPU run: Pallas (Triton/Mosaic) kernels only in interpret mode, checked for "
            "correctness, NOT timed; GPU/TPU kernel speed is unmeasured here. Timed: XLA "
            "grouped path vs ragged_dot vs dense at reduced shapes."
        ),
        results=results,
        interpret_checks=checks,
    )


def to_markdown(report: dict) -> str:
    lines = [
        f"# gmm benchmark ({report['platform']}, {report['device']}, {report['dtype']}, "
        f"jax {report['jax']}, median of {report['repeats']})",
        "",
        f"Host load average (1 min) at the end of the run: {report['load_average_1min']:.1f}.",
        "",
        report["note"],
        "",
        "| shape | M,K,N,G | skew | backend | product | ms | TFLOP/s | vs dense |",
        "|---|---|---|---|---|---|---|---|",
    ]
    dense = {
        (r["shape"], r["skew"], r["product"]): r["seconds"]
        for r in report["results"]
        if r["backend"] == "dense"
    }
    for r in report["results"]:
        ratio = dense[(r["shape"], r["skew"], r["product"])] / r["seconds"]
        lines.append(
            f"| {r['shape']} | {r['m']},{r['k']},{r['n']},{r['g']} | {r['skew']} | "
            f"{r['backend']} | {r['product']} | {r['seconds'] * 1e3:.2f} | {r['tflops']:.3f} | "
            f"{ratio:.2f}x |"
        )
    if report["interpret_checks"]:
        lines += [
            "",
            "Interpret-mode correctness vs ragged_dot "
            f"(M,K,N,G = {INTERPRET_SHAPE.m},{INTERPRET_SHAPE.k},{INTERPRET_SHAPE.n},"
            f"{INTERPRET_SHAPE.g}):",
            "",
            "| backend | skew | product | max rel err | ok |",
            "|---|---|---|---|---|",
        ]
        for c in report["interpret_checks"]:
            lines.append(
                f"| {c['backend']} | {c['skew']} | {c['product']} | {c['max_rel_err']:.2e} | "
                f"{c['ok']} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=("auto", "gpu", "cpu"), default="auto")
    parser.add_argument(
        "--dtype", default=None, choices=("bfloat16", "float32"), help="default: bf16 GPU, f32 CPU"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=RESULTS_DIR, help="directory for the json/md results")
    args = parser.parse_args(argv)
    report = run(args)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"gmm_{report['platform']}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    markdown = to_markdown(report)
    with open(stem + ".md", "w") as f:
        f.write(markdown)
    print(markdown)
    print(f"wrote {stem}.json and {stem}.md")
    checks_ok = all(c["ok"] for c in report["interpret_checks"])
    return 0 if checks_ok else 1


if __name__ == "__main__":
    sys.exit(main())
