"""Every tuned kernel configuration compiles for the real targets, with no accelerator present.

Each row of `moejax.pallas.triton_gmm.TUNED_CONFIGS` is compiled by XLA's CUDA compiler (Triton
included) for an H100 (sm_90a) and a B200 (sm_100a), each row of
`moejax.pallas.mosaic_gmm.TUNED_CONFIGS` by libtpu's compiler (Mosaic included) for a v5e and a
v5p chip: gmm for the "gmm" rows, gmm with transpose_rhs for the transposed rows, tgmm for the
"tgmm" rows, through the public `moejax.pallas.gmm` / `tgmm` with the row's config. One module
per target holds all its kernels (one compile); a failure recompiles each row alone to name it.
Shapes are small but at least one tile of the largest config, so no tile is shrunk away.
The quantized kernels (int8 weights + scales, `moejax.pallas.QuantizedWeight`) compile the same
way, forward and transposed, for each way a scale group meets the tiles, and tokamax's Triton
ragged_dot (backend="tokamax", the tokamax extra) for H100 and B200.
Needs the `aot` extra (skipped with a reason without it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moejax import pallas
from moejax.compile import parse_target, topology

M, K, N, G = 1024, 1024, 1024, 4  # rows, contraction, output width, groups
_TRANSPOSED = ("gmm_transposed", "gmm_t")


def _dtype(key_dtype) -> jnp.dtype:
    # Triton keys carry the itemsize (2 or 4), Mosaic keys the dtype name.
    if isinstance(key_dtype, int):
        return jnp.dtype({2: jnp.bfloat16, 4: jnp.float32}[key_dtype])
    return jnp.dtype(key_dtype)


def _call(backend: str, key, config):
    kernel, key_dtype = key[0], key[1]
    dtype = _dtype(key_dtype)

    def run(lhs, rhs_or_grad, group_sizes):
        if kernel == "tgmm":
            return pallas.tgmm(
                lhs, rhs_or_grad, group_sizes, backend=backend, config=config, interpret=False
            )
        return pallas.gmm(
            lhs,
            rhs_or_grad,
            group_sizes,
            transpose_rhs=kernel in _TRANSPOSED,
            backend=backend,
            config=config,
            interpret=False,
        )

    second = (M, N) if kernel == "tgmm" else (G, K, N)
    return run, [(M, K), second, (G,)], [dtype, dtype, jnp.int32]


def _compile(target_name: str, backend: str, rows) -> str:
    """Compiles the rows' kernels in one module for the target; returns its optimized HLO."""
    device = topology(parse_target(target_name)).devices[0]
    replicated = NamedSharding(jax.sharding.Mesh(np.array([device]), ("x",)), P())
    calls = [_call(backend, key, config) for key, config in rows]

    def all_kernels(*args):
        outs, i = [], 0
        for run, shapes, _ in calls:
            outs.append(run(*args[i : i + len(shapes)]))
            i += len(shapes)
        return outs

    structs = [
        jax.ShapeDtypeStruct(s, d, sharding=replicated)
        for _, shapes, dtypes in calls
        for s, d in zip(shapes, dtypes, strict=True)
    ]
    return jax.jit(all_kernels).trace(*structs).lower().compile().as_text()


@pytest.mark.parametrize(
    "target, backend, module, plugin",
    [
        ("gpu-h100-1", "triton", "triton_gmm", "jax_cuda13_plugin"),
        ("gpu-b200-1", "triton", "triton_gmm", "jax_cuda13_plugin"),
        ("tpu-v5e-1", "mosaic", "mosaic_gmm", "libtpu"),
        ("tpu-v5p-2", "mosaic", "mosaic_gmm", "libtpu"),
    ],
)
def test_every_tuned_config_compiles(target, backend, module, plugin):
    pytest.importorskip(plugin, reason=f"needs the aot extra ({plugin})")
    import importlib

    table = importlib.import_module(f"moejax.pallas.{module}").TUNED_CONFIGS
    rows = sorted(table.items(), key=lambda kv: str(kv[0]))
    try:
        text = _compile(target, backend, rows)
    except Exception:  # noqa: BLE001 - find and name the rows that fail
        failing = []
        for key, config in rows:
            try:
                _compile(target, backend, [(key, config)])
            except Exception as e:  # noqa: BLE001
                failing.append(f"{key} {config}: {str(e).splitlines()[0][:300]}")
        pytest.fail(f"{target}: {len(failing)} of {len(rows)} configs fail:\n" + "\n".join(failing))
    custom_target = "tpu_custom_call" if backend == "mosaic" else "__gpu$xla.gpu.triton"
    # Every kernel survived into the compiled module (none folded away or left to XLA).
    assert text.count(f'custom_call_target="{custom_target}"') >= len(rows)


# (input dtype, scale group): groups smaller than the K tile (several scale rows per block),
# larger than it (one row per block) and per channel (None).
QUANTIZED_CASES = [(d, g) for d in (jnp.bfloat16, jnp.float32) for g in (32, 512, None)]


@pytest.mark.parametrize(
    "target, backend, plugin",
    [
        ("gpu-h100-1", "triton", "jax_cuda13_plugin"),
        ("tpu-v5e-1", "mosaic", "libtpu"),
        ("tpu-v5p-2", "mosaic", "libtpu"),
    ],
)
def test_quantized_kernels_compile(target, backend, plugin):
    pytest.importorskip(plugin, reason=f"needs the aot extra ({plugin})")
    device = topology(parse_target(target)).devices[0]
    replicated = NamedSharding(jax.sharding.Mesh(np.array([device]), ("x",)), P())

    def all_kernels(*args):
        outs, sizes = [], jnp.full((G,), M // G, jnp.int32)
        for i in range(0, len(args), 4):
            lhs, dy, values, scale = args[i : i + 4]
            w = pallas.QuantizedWeight(values, scale)
            for x, transpose in ((lhs, False), (dy, True)):
                outs.append(
                    pallas.gmm(
                        x, w, sizes, transpose_rhs=transpose, backend=backend, interpret=False
                    )
                )
        return outs

    structs = []
    for dtype, group in QUANTIZED_CASES:
        shapes = [((M, K), dtype), ((M, N), dtype), ((G, K, N), jnp.int8)]
        shapes.append(((G, K // (group or K), N), jnp.float32))
        structs += [jax.ShapeDtypeStruct(s, d, sharding=replicated) for s, d in shapes]
    text = jax.jit(all_kernels).trace(*structs).lower().compile().as_text()
    custom_target = "tpu_custom_call" if backend == "mosaic" else "__gpu$xla.gpu.triton"
    assert text.count(f'custom_call_target="{custom_target}"') >= 2 * len(QUANTIZED_CASES)
    assert "quantized" in text  # the kernels named *_quantized, not a dequantize + float kernel


@pytest.mark.parametrize("target", ["gpu-h100-1", "gpu-b200-1"])
def test_tokamax_triton_kernels_compile(target):
    """backend="tokamax" with tokamax's Triton ragged_dot compiles deviceless (its cross-compile
    option skips its device check): gmm, transposed gmm and tgmm are Triton custom calls."""
    pytest.importorskip("jax_cuda13_plugin", reason="needs the aot extra (jax CUDA plugin)")
    tokamax = pytest.importorskip("tokamax", reason="needs the tokamax extra")
    from moejax.pallas.tokamax_gmm import TokamaxConfig

    config = TokamaxConfig(implementation="triton")
    device = topology(parse_target(target)).devices[0]
    replicated = NamedSharding(jax.sharding.Mesh(np.array([device]), ("x",)), P())
    dt = jnp.bfloat16
    shapes = [((M, K), dt), ((G, K, N), dt), ((G, N, K), dt), ((M, N), dt), ((G,), jnp.int32)]
    structs = [jax.ShapeDtypeStruct(s, d, sharding=replicated) for s, d in shapes]

    def all_kernels(x, w, w_t, g, sizes):
        kw = dict(backend="tokamax", config=config)
        return (
            pallas.gmm(x, w, sizes, **kw),
            pallas.gmm(x, w_t, sizes, transpose_rhs=True, **kw),
            pallas.tgmm(x, g, sizes, **kw),
        )

    with tokamax.config.cross_compile(True):
        text = jax.jit(all_kernels).trace(*structs).lower().compile().as_text()
    assert text.count('custom_call_target="__gpu$xla.gpu.triton"') >= 3
    assert "ragged-dot" not in text  # tokamax's kernels, not XLA's ragged_dot


@pytest.mark.parametrize(
    "target, backend, plugin",
    [("gpu-h100-1", "triton", "jax_cuda13_plugin"), ("tpu-v5p-2", "mosaic", "libtpu")],
)
@pytest.mark.parametrize(
    "m, k, n, g", [(8192, 4096, 14336, 8), (8192, 2048, 1408, 64)], ids=["mixtral", "deepseek"]
)
def test_model_shapes_allocate_no_weight_copy(target, backend, plugin, m, k, n, g):
    """At Mixtral's and DeepSeek's expert shapes (bf16) gmm, transposed gmm and tgmm need no
    HBM temporaries beyond tile scratch: no per-call padded, transposed or cast weight copy
    (DeepSeek's N = 1408 once made the Mosaic gmm pad its weight: 409 MiB per call)."""
    pytest.importorskip(plugin, reason="needs the aot extra")
    device = topology(parse_target(target)).devices[0]
    replicated = NamedSharding(jax.sharding.Mesh(np.array([device]), ("x",)), P())
    dt = jnp.bfloat16
    shapes = [((m, k), dt), ((g, k, n), dt), ((m, n), dt), ((g,), jnp.int32)]
    structs = [jax.ShapeDtypeStruct(s, d, sharding=replicated) for s, d in shapes]

    def kernels(x, w, y, sizes):
        kw = dict(backend=backend, interpret=False)
        return (
            pallas.gmm(x, w, sizes, **kw),
            pallas.gmm(y, w, sizes, transpose_rhs=True, **kw),  # d_lhs: [M, N] x [G, K, N]
            pallas.tgmm(x, y, sizes, **kw),
        )

    compiled = jax.jit(kernels).trace(*structs).lower().compile()
    weight_bytes = g * k * n * 2
    assert compiled.memory_analysis().temp_size_in_bytes < min(4 * 2**20, weight_bytes // 64)
