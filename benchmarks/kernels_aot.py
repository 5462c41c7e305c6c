r"""What the real compilers make of every tuned gmm kernel config, with no accelerator present.

    python benchmarks/kernels_aot.py               # writes benchmarks/results/kernels_aot.md
    python benchmarks/kernels_aot.py --quantized   # rewrites only its "Quantized" section
    python benchmarks/kernels_aot.py --tokamax     # rewrites only its "tokamax" section
    python benchmarks/kernels_aot.py --model_shapes  # only "Model shapes" (Mixtral, DeepSeek)

Needs the `aot` extra (libtpu, the jax CUDA plugin) and, for registers and spills, `ptxas` from
a CUDA toolkit on PATH (the column says "-" without it). Per row of
`moejax.pallas.triton_gmm.TUNED_CONFIGS`, for H100 (sm_90a) and B200 (sm_100a): the kernel's
PTX from XLA's dump, `ptxas -v` registers / spill bytes, the shared memory its software
pipeline needs (num_stages x the lhs and rhs tiles: Triton allocates it dynamically, so ptxas
does not see it), and whether the PTX uses wgmma, TMA (cp.async.bulk.tensor) or tcgen05. Per
row of `moejax.pallas.mosaic_gmm.TUNED_CONFIGS`, for v5e and v5p: the kernel's scoped VMEM and
the module's temporaries. Both: XLA's cost-model time of the kernel against a dense matmul of
the same FLOPs (`optimal_seconds`; XLA's estimate, not a measurement, and "n/a" when it
is negative or absent). The "Quantized" section compiles the quantized gmm kernels (int8
weights + float32 scales, `moejax.pallas.QuantizedWeight`, forward and transposed, bf16 inputs,
groups of 128 rows and per channel) beside the float kernel of the same tuned config, on H100
and v5e: registers and spills on GPU, scoped VMEM on TPU, and on both the module's HBM
temporaries (a full-size float copy of the weight would show there). The "tokamax" section
compiles tokamax's Triton ragged_dot (`backend="tokamax"`) beside our Triton kernels on H100
and B200 (registers, spills, instructions, temporaries).
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from moejax import pallas  # noqa: E402
from moejax.compile import parse_target, topology  # noqa: E402

M, K, N, G = 4096, 2048, 2048, 8  # rows, contraction, output width, groups
OUT = Path(__file__).resolve().parent / "results" / "kernels_aot.md"
_TRANSPOSED = ("gmm_transposed", "gmm_t")
_GPUS = (("gpu-h100-1", "sm_90a"), ("gpu-b200-1", "sm_100a"))
# (column name, PTX needle) of the matrix instructions a Triton kernel's PTX may use.
_INSTRUCTIONS = (
    ("wgmma", "wgmma"),
    ("TMA", "cp.async.bulk.tensor"),
    ("tcgen05", "tcgen05"),
    ("mma.sync", "mma.sync"),
)
_TPUS = ("tpu-v5e-1", "tpu-v5p-2")


def _dtype(key_dtype):
    if isinstance(key_dtype, int):  # Triton keys: itemsize
        return jnp.dtype({2: jnp.bfloat16, 4: jnp.float32}[key_dtype])
    return jnp.dtype(key_dtype)


def _structs(target: str, shapes, dtypes):
    device = topology(parse_target(target)).devices[0]
    sharding = NamedSharding(jax.sharding.Mesh(np.array([device]), ("x",)), P())
    return [
        jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in zip(shapes, dtypes, strict=True)
    ]


def _kernel_fn(backend: str, kernel: str, config):
    if kernel == "tgmm":
        return lambda a, b, g: pallas.tgmm(a, b, g, backend=backend, config=config, interpret=False)
    return lambda a, b, g: pallas.gmm(
        a, b, g, transpose_rhs=kernel in _TRANSPOSED, backend=backend, config=config,
        interpret=False,
    )  # fmt: skip


def _compile(fn, structs, dump_dir: str | None = None):
    options = {"xla_dump_to": dump_dir} if dump_dir else None
    start = time.time()
    with jax.default_matmul_precision("default"):
        compiled = jax.jit(fn).trace(*structs).lower().compile(compiler_options=options)
    return compiled, time.time() - start


def _optimal_seconds(compiled) -> float | None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    value = (cost or {}).get("optimal_seconds")
    return value if value is not None and value > 0 else None


def _shapes(kernel: str):
    second = (M, N) if kernel == "tgmm" else ((G, N, K) if kernel in _TRANSPOSED else (G, K, N))
    return [(M, K), second, (G,)]


def _dense(target: str, kernel: str, dtype) -> float | None:
    # The same 2 M K N FLOPs as one dense matmul.
    if kernel == "tgmm":
        fn, shapes = (lambda a, b: a.T @ b), [(M, K), (M, N)]
    else:
        fn, shapes = (lambda a, b: a @ b), [(M, K), (K, N)]
    compiled, _ = _compile(fn, _structs(target, shapes, [dtype, dtype]))
    return _optimal_seconds(compiled)


def _ptxas(ptx: Path, arch: str) -> tuple[str, str]:
    if not shutil.which("ptxas"):
        return "-", "-"
    out = subprocess.run(
        ["ptxas", f"-arch={arch}", "-v", str(ptx), "-o", os.devnull],
        capture_output=True, text=True, check=False,
    ).stderr  # fmt: skip
    regs = re.search(r"Used (\d+) registers", out)
    spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", out)
    return (regs.group(1) if regs else "?"), ("/".join(spills) if spills else "?")


def _kernel_ptx(dump_dir: str, kernel: str) -> Path | None:
    for ptx in sorted(Path(dump_dir).glob("*.ptx")):
        if re.search(rf"\.entry {re.escape(kernel)}\b", ptx.read_text()):
            return ptx
    return None


def _fmt_time(t: float | None) -> str:
    return "n/a" if t is None else f"{t * 1e6:.1f} us"


def triton_rows() -> list[str]:
    table = importlib.import_module("moejax.pallas.triton_gmm").TUNED_CONFIGS
    rows = []
    for target, arch in _GPUS:
        for key, cfg in sorted(table.items(), key=lambda kv: str(kv[0])):
            kernel, dtype = key[0], _dtype(key[1])
            structs = _structs(target, _shapes(kernel), [dtype, dtype, jnp.int32])
            with tempfile.TemporaryDirectory() as dump:
                try:
                    compiled, secs = _compile(_kernel_fn("triton", kernel, cfg), structs, dump)
                except Exception as e:  # noqa: BLE001 - a failing config is a row, not a crash
                    rows.append(
                        f"| {target} | {key} | {cfg} | FAILS: {str(e).splitlines()[0][:120]} |"
                    )
                    continue
                ptx = _kernel_ptx(dump, kernel)
                text = ptx.read_text() if ptx else ""
                regs, spills = _ptxas(ptx, arch) if ptx else ("?", "?")
            bm, bk, bn = cfg.block_m, cfg.block_k, cfg.block_n
            if kernel == "tgmm":  # tiles of lhs [bm(rows), bk] and grad [bm, bn]
                smem = cfg.num_stages * (bm * bk + bm * bn) * dtype.itemsize
            else:
                smem = cfg.num_stages * (bm * bk + bk * bn) * dtype.itemsize
            uses = [name for name, needle in _INSTRUCTIONS if needle in text]
            rows.append(
                f"| {target} | {key} | {bm}x{bk}x{bn} w{cfg.num_warps} s{cfg.num_stages} | "
                f"{regs} | {spills} | {smem // 1024} KiB | {', '.join(uses) or '-'} | "
                f"{_fmt_time(_optimal_seconds(compiled))} | "
                f"{_fmt_time(_dense(target, kernel, dtype))} | {secs:.1f} s |"
            )
    return rows


def mosaic_rows() -> list[str]:
    table = importlib.import_module("moejax.pallas.mosaic_gmm").TUNED_CONFIGS
    rows = []
    for target in _TPUS:
        for key, cfg in sorted(table.items(), key=lambda kv: str(kv[0])):
            kernel, dtype = key[0], _dtype(key[1])
            structs = _structs(target, _shapes(kernel), [dtype, dtype, jnp.int32])
            try:
                compiled, secs = _compile(_kernel_fn("mosaic", kernel, cfg), structs)
            except Exception as e:  # noqa: BLE001
                rows.append(f"| {target} | {key} | {cfg} | FAILS: {str(e).splitlines()[0][:120]} |")
                continue
            text = compiled.as_text()
            vmem = [
                int(v)
                for v in re.findall(r'"used_scoped_memory_configs":\[\{[^]]*?"size":"(\d+)"', text)
            ]
            temp = compiled.memory_analysis().temp_size_in_bytes
            out_bytes = compiled.memory_analysis().output_size_in_bytes
            rows.append(
                f"| {target} | {key} | {cfg.tm}x{cfg.tk}x{cfg.tn} | "
                f"{max(vmem) // 1024 if vmem else '-'} KiB | {temp / 2**20:.1f} MiB | "
                f"{out_bytes / 2**20:.1f} MiB | {_fmt_time(_optimal_seconds(compiled))} | "
                f"{_fmt_time(_dense(target, kernel, dtype))} | {secs:.1f} s |"
            )
    return rows


# Quantized kernels: (label, scale group rows or None = per channel); dtype of the inputs.
_QUANT_SCALES = (("float", 0), ("int8, group 128", 128), ("int8, per channel", None))
_QUANT_DTYPE = jnp.dtype(jnp.bfloat16)


def _quant_fn(backend: str, transpose: bool, quantized: bool):
    def fn(lhs, w, group_sizes, *scale):
        rhs = pallas.QuantizedWeight(w, scale[0]) if quantized else w
        return pallas.gmm(
            lhs, rhs, group_sizes, transpose_rhs=transpose, backend=backend, interpret=False
        )

    return fn


def _quant_structs(target: str, transpose: bool, group):
    # The stored weight is [G, K, N] in both products; transposed, lhs is [M, N] (d_lhs).
    lhs = (M, N) if transpose else (M, K)
    shapes, dtypes = [lhs, (G, K, N), (G,)], [_QUANT_DTYPE, _QUANT_DTYPE, jnp.int32]
    if group != 0:
        dtypes[1] = jnp.int8
        shapes.append((G, K // (group or K), N))
        dtypes.append(jnp.float32)
    return _structs(target, shapes, dtypes)


def quantized_rows() -> tuple[list[str], list[str]]:
    """(Triton rows, Mosaic rows) of the quantized kernels and their float twins."""
    triton, mosaic = [], []
    for kernel, transpose in (("gmm", False), ("gmm_transposed", True)):
        for label, group in _QUANT_SCALES:
            quantized = group != 0
            fn_t = _quant_fn("triton", transpose, quantized)
            target, arch = _GPUS[0]
            name = f"{kernel}_quantized" if quantized else kernel
            with tempfile.TemporaryDirectory() as dump:
                try:
                    compiled, secs = _compile(fn_t, _quant_structs(target, transpose, group), dump)
                    ptx = _kernel_ptx(dump, name)
                    regs, spills = _ptxas(ptx, arch) if ptx else ("?", "?")
                    temp = compiled.memory_analysis().temp_size_in_bytes
                    triton.append(
                        f"| {target} | {kernel} | {label} | {regs} | {spills} | "
                        f"{temp / 2**20:.2f} MiB | {_fmt_time(_optimal_seconds(compiled))} | "
                        f"{secs:.1f} s |"
                    )
                except Exception as e:  # noqa: BLE001
                    triton.append(f"| {target} | {kernel} | {label} | FAILS: {str(e)[:120]} |")
            target = _TPUS[0]
            try:
                fn_m = _quant_fn("mosaic", transpose, quantized)
                compiled, secs = _compile(fn_m, _quant_structs(target, transpose, group))
                text = compiled.as_text()
                vmem = [
                    int(v)
                    for v in re.findall(
                        r'"used_scoped_memory_configs":\[\{[^]]*?"size":"(\d+)"', text
                    )
                ]
                temp = compiled.memory_analysis().temp_size_in_bytes
                mosaic.append(
                    f"| {target} | {kernel} | {label} | "
                    f"{max(vmem) // 1024 if vmem else '-'} KiB | {temp / 2**20:.2f} MiB | "
                    f"{_fmt_time(_optimal_seconds(compiled))} | {secs:.1f} s |"
                )
            except Exception as e:  # noqa: BLE001
                mosaic.append(f"| {target} | {kernel} | {label} | FAILS: {str(e)[:120]} |")
    return triton, mosaic


def quantized_section() -> list[str]:
    triton, mosaic = quantized_rows()
    return [
        "## Quantized weights",
        "",
        f"`moejax.pallas.gmm` with a `QuantizedWeight` rhs (int8 values [G, K, N], float32 "
        f"scales) against the float kernel, {_QUANT_DTYPE.name} inputs, the same shapes and "
        "tuned configs (for the Triton kernel the K block, transposed the N block, shrunk to "
        "divide the scale group). Temporaries: the module's HBM temporaries (a dequantized "
        "copy of the [G, K, N] weight would be "
        f"{G * K * N * _QUANT_DTYPE.itemsize / 2**20:.0f} MiB).",
        "",
        "| target | kernel | weight | registers | spills | temporaries | kernel time | compile |",
        "|---|---|---|---|---|---|---|---|",
        *triton,
        "",
        "| target | kernel | weight | VMEM | temporaries | kernel time | compile |",
        "|---|---|---|---|---|---|---|",
        *mosaic,
        "",
    ]


def _largest_kernel_ptx(dump_dir: str) -> Path | None:
    # tokamax's Triton kernel is named "_unknown_" in the dump; beside it XLA's own small
    # fusions (group-size bookkeeping) have PTX too. The matmul kernel is the largest.
    ptxs = [p for p in Path(dump_dir).glob("*.ptx") if ".entry " in p.read_text()]
    return max(ptxs, key=lambda p: p.stat().st_size, default=None)


def tokamax_rows() -> list[str]:
    """Our Triton kernels (tuned default config) beside tokamax's Triton ragged_dot, same
    shapes, bf16, per GPU target and kernel."""
    import tokamax  # noqa: PLC0415 (the tokamax extra)

    from moejax.pallas.tokamax_gmm import TokamaxConfig  # noqa: PLC0415

    rows = []
    for target, arch in _GPUS:
        for kernel in ("gmm", "gmm_transposed", "tgmm"):
            structs = _structs(target, _shapes(kernel), [jnp.bfloat16, jnp.bfloat16, jnp.int32])
            for backend, config in (("triton", None), ("tokamax", TokamaxConfig("triton"))):
                with tempfile.TemporaryDirectory() as dump, tokamax.config.cross_compile(True):
                    try:
                        compiled, secs = _compile(
                            _kernel_fn(backend, kernel, config), structs, dump
                        )
                    except Exception as e:  # noqa: BLE001 - a failure is a row, not a crash
                        line = str(e).splitlines()[0][:120]
                        rows.append(f"| {target} | {kernel} | {backend} | FAILS: {line} |")
                        continue
                    ptx = _kernel_ptx(dump, kernel) if backend == "triton" else None
                    ptx = ptx or _largest_kernel_ptx(dump)
                    text = ptx.read_text() if ptx else ""
                    regs, spills = _ptxas(ptx, arch) if ptx else ("?", "?")
                uses = [name for name, needle in _INSTRUCTIONS if needle in text]
                temp = compiled.memory_analysis().temp_size_in_bytes
                rows.append(
                    f"| {target} | {kernel} | {backend} | {regs} | {spills} | "
                    f"{', '.join(uses) or '-'} | {temp / 2**20:.2f} MiB | {secs:.1f} s |"
                )
    return rows


def tokamax_section() -> list[str]:
    return [
        "## tokamax",
        "",
        f'`backend="tokamax"` (tokamax\'s Triton `ragged_dot`, '
        '`TokamaxConfig(implementation="triton")`, compiled with `tokamax.config.cross_compile`) '
        f"beside our Triton kernels at their tuned default config; bfloat16, M={M}, K={K}, "
        f"N={N}, G={G}. Temporaries: the module's HBM temporaries beside its output. tokamax's "
        "Mosaic TPU kernel checks for a TPU device at trace time (`supported_on`), so it "
        "cannot be compiled deviceless from a CPU host.",
        "",
        "| target | kernel | backend | registers | spills | instructions | temporaries | compile |",
        "|---|---|---|---|---|---|---|---|",
        *tokamax_rows(),
        "",
    ]


# (name, M rows, K, N, G): a layer's routed rows and expert shapes, bf16.
_MODEL_SHAPES = (
    ("Mixtral 8x7B", 8192, 4096, 14336, 8),
    ("DeepSeek fine-grained", 8192, 2048, 1408, 64),
)


def model_shape_rows() -> list[str]:
    """Per model shape, target and kernel (gmm: [M,K] x [G,K,N]; its transposed form, d_lhs:
    [M,N] x [G,K,N] stored, contracted over N; tgmm: [M,K]^T x [M,N] per group): the module's
    HBM temporaries beside its output (a per-call weight copy would show there)."""
    rows = []
    for name, m, k, n, g in _MODEL_SHAPES:
        calls = (
            ("gmm", [(m, k), (g, k, n), (g,)], m * n),
            ("gmm_transposed", [(m, n), (g, k, n), (g,)], m * k),  # stored [G, K, N], over N
            ("tgmm", [(m, k), (m, n), (g,)], g * k * n),
        )
        for target, backend in ((_GPUS[0][0], "triton"), (_TPUS[1], "mosaic")):
            for kernel, shapes, out_elems in calls:
                structs = _structs(target, shapes, [jnp.bfloat16, jnp.bfloat16, jnp.int32])
                out_bytes = out_elems * 2
                try:
                    compiled, secs = _compile(_kernel_fn(backend, kernel, None), structs)
                except Exception as e:  # noqa: BLE001 - a failure is a row, not a crash
                    line = str(e).splitlines()[0][:120]
                    rows.append(f"| {name} | {target} | {kernel} | FAILS: {line} |")
                    continue
                temp = compiled.memory_analysis().temp_size_in_bytes
                rows.append(
                    f"| {name} | {target} | {kernel} | {m}x{k}x{n}, G={g} | "
                    f"{out_bytes / 2**20:.1f} MiB | {temp / 2**20:.2f} MiB | {secs:.1f} s |"
                )
    return rows


def model_shapes_section() -> list[str]:
    return [
        "## Model shapes",
        "",
        "The three kernels at a layer's real shapes (bf16, tuned default configs): HBM "
        "temporaries against the output. A per-call copy of the weights (padding, transposing "
        "or casting them) would show as temporaries of the weight's size (Mixtral: 896 MiB, "
        "DeepSeek: 352 MiB per expert weight).",
        "",
        "| model | target | kernel | M x K x N | output | temporaries | compile |",
        "|---|---|---|---|---|---|---|",
        *model_shape_rows(),
        "",
    ]


def _rewrite_section(title: str, section: list[str]) -> None:
    """Replaces (or appends) the `## {title}` section of the existing report."""
    text = OUT.read_text() if OUT.exists() else ""
    head, _, rest = text.partition(f"## {title}")
    tail = rest.partition("\n## ")[2]
    parts = [head.rstrip("\n"), "\n".join(section).rstrip("\n")]
    if tail:
        parts.append("## " + tail.rstrip("\n"))
    OUT.write_text("\n\n".join(p for p in parts if p) + "\n")
    print(f"wrote {OUT}")


def main() -> None:
    if "--quantized" in sys.argv[1:]:
        _rewrite_section("Quantized weights", quantized_section())
        return
    if "--tokamax" in sys.argv[1:]:
        _rewrite_section("tokamax", tokamax_section())
        return
    if "--model_shapes" in sys.argv[1:]:
        _rewrite_section("Model shapes", model_shapes_section())
        return
    lines = [
        "# Tuned gmm kernels on the real compilers (deviceless)",
        "",
        f"Written by `python benchmarks/kernels_aot.py` (jax {jax.__version__}). Shapes: "
        f"M={M} rows, K={K}, N={N}, G={G} groups. Times are XLA's cost model "
        '(`optimal_seconds`), not measurements; "dense" is one matmul of the same FLOPs.',
        "",
        "## Triton (GPU)",
        "",
        "Shared memory: num_stages x (lhs + rhs tiles), the pipeline's need (Triton allocates "
        "it dynamically; ptxas reports static shared memory only). Spills: stores/loads bytes.",
        "",
        "| target | kernel | blocks m x k x n, warps, stages | registers | spills | shared mem "
        "| instructions | kernel time | dense time | compile |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *triton_rows(),
        "",
        "## Mosaic (TPU)",
        "",
        "VMEM: the kernel's scoped VMEM; temporaries: the module's HBM temporaries beside its "
        "output (0 = no per-call weight copies).",
        "",
        "| target | kernel | tiles tm x tk x tn | VMEM | temporaries | output | kernel time "
        "| dense time | compile |",
        "|---|---|---|---|---|---|---|---|---|",
        *mosaic_rows(),
        "",
        *quantized_section(),
        *tokamax_section(),
        *model_shapes_section(),
    ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
