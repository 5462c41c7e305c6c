"""Triton grouped-matmul kernels: interpret-mode numerics on CPU and CUDA lowering of every tuned
config (cross-lowering needs no GPU: it stops at the Triton IR embedded in the custom call).

Legend: M rows, K contraction width, N output width, G groups.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gmm_reference import (
    CASES,
    PRODUCT_PARAMS,
    assert_close,
    np_gmm,
    np_tgmm,
    random_inputs,
)
from jax._src.interpreters import mlir
from jax._src.lib import triton
from jax._src.lib.mlir import ir

from moejax.pallas import gmm, metadata, tgmm
from moejax.pallas import triton_gmm as tg

# Small blocks so that the small test shapes still span several tiles in every dimension, with
# partial tiles at the edges (M, K, N below are not multiples of 16).
SMALL = tg.TritonConfig(block_m=16, block_k=16, block_n=16, num_warps=4, num_stages=2)


@pytest.mark.parametrize("case,dtype", PRODUCT_PARAMS)
def test_three_products_match_numpy_and_ragged_dot(case, dtype):
    m, k, n, sizes = CASES[case]
    lhs, rhs, grad = random_inputs(m, k, n, len(sizes), dtype)
    gs = jnp.asarray(sizes, jnp.int32)
    common = dict(backend="triton", config=SMALL, interpret=True)

    out = gmm(lhs, rhs, gs, **common)
    assert out.shape == (m, n) and out.dtype == dtype
    assert_close(out, np_gmm(lhs, rhs, sizes), dtype)
    assert_close(out, jax.lax.ragged_dot(lhs, rhs, gs), dtype)
    # ragged_dot semantics: rows past the groups are exactly zero, not just small.
    assert not np.asarray(out[sum(sizes) :], np.float32).any()

    out_t = gmm(lhs, jnp.swapaxes(rhs, 1, 2), gs, transpose_rhs=True, **common)
    assert_close(out_t, np_gmm(lhs, rhs, sizes), dtype)
    assert not np.asarray(out_t[sum(sizes) :], np.float32).any()

    d_rhs = tgmm(lhs, grad, gs, **common)
    assert d_rhs.shape == (len(sizes), k, n) and d_rhs.dtype == dtype
    assert_close(d_rhs, np_tgmm(lhs, grad, sizes), dtype)
    assert_close(d_rhs, tgmm(lhs, grad, gs, backend="ragged_dot"), dtype)
    for g, size in enumerate(sizes):
        if size == 0:
            assert not np.asarray(d_rhs[g], np.float32).any()


def test_grad_matches_oracle_and_numpy():
    m, k, n, sizes = CASES["random_with_empty"]
    lhs, rhs, grad = random_inputs(m, k, n, len(sizes), jnp.float32, seed=1)
    gs = jnp.asarray(sizes, jnp.int32)

    def loss(fn):
        return lambda x, w: jnp.sum(fn(x, w) * grad)

    ours = jax.grad(
        loss(lambda x, w: gmm(x, w, gs, backend="triton", config=SMALL, interpret=True)),
        argnums=(0, 1),
    )(lhs, rhs)
    oracle = jax.grad(loss(lambda x, w: jax.lax.ragged_dot(x, w, gs)), argnums=(0, 1))(lhs, rhs)
    rhs_t = np.swapaxes(np.asarray(rhs, np.float64), 1, 2)
    np_d_lhs = np_gmm(grad, rhs_t, sizes)
    np_d_rhs = np_tgmm(lhs, grad, sizes)
    for got, want, ref in zip(ours, oracle, (np_d_lhs, np_d_rhs), strict=True):
        assert_close(got, want, jnp.float32)
        assert_close(got, ref, jnp.float32)


def test_grad_transposed_rhs():
    m, k, n, sizes = CASES["sum_below_rows"]
    lhs, rhs, grad = random_inputs(m, k, n, len(sizes), jnp.float32, seed=2)
    rhs_GxNxK = jnp.swapaxes(rhs, 1, 2)
    gs = jnp.asarray(sizes, jnp.int32)
    d_lhs, d_rhs = jax.grad(
        lambda x, w: jnp.sum(
            gmm(x, w, gs, transpose_rhs=True, backend="triton", config=SMALL, interpret=True) * grad
        ),
        argnums=(0, 1),
    )(lhs, rhs_GxNxK)
    assert_close(d_lhs, np_gmm(grad, np.swapaxes(np.asarray(rhs), 1, 2), sizes), jnp.float32)
    assert_close(d_rhs, np.swapaxes(np_tgmm(lhs, grad, sizes), 1, 2), jnp.float32)


def test_bf16_inputs_f32_output_and_table_config():
    m, k, n, sizes = CASES["random_with_empty"]
    lhs, rhs, grad = random_inputs(m, k, n, len(sizes), jnp.bfloat16, seed=3)
    gs = jnp.asarray(sizes, jnp.int32)
    # config=None: the tuned-table entry, shrunk to this small problem.
    out = gmm(lhs, rhs, gs, preferred_element_type=jnp.float32, backend="triton", interpret=True)
    assert out.dtype == jnp.float32
    # f32 output of bf16 products accumulated in f32: only summation order differs.
    np.testing.assert_allclose(out, np_gmm(lhs, rhs, sizes), rtol=1e-4, atol=1e-4)
    d_rhs = tgmm(
        lhs, grad, gs, preferred_element_type=jnp.float32, backend="triton", interpret=True
    )
    np.testing.assert_allclose(d_rhs, np_tgmm(lhs, grad, sizes), rtol=1e-4, atol=1e-4)


def test_traced_group_sizes_under_jit():
    m, k, n, sizes = CASES["random_with_empty"]
    lhs, rhs, _ = random_inputs(m, k, n, len(sizes), jnp.float32, seed=4)
    fn = jax.jit(lambda x, w, gs: gmm(x, w, gs, backend="triton", config=SMALL, interpret=True))
    for perm in (sizes, sizes[::-1]):
        assert_close(
            fn(lhs, rhs, jnp.asarray(perm, jnp.int32)), np_gmm(lhs, rhs, perm), jnp.float32
        )


@pytest.mark.parametrize(
    "sizes,m,bm",
    [([9, 0, 23, 0, 17], 61, 16), ([0, 0, 40, 0], 40, 16), ([1, 1, 1, 1], 64, 32), ([0], 5, 16)],
)
def test_work_list_covers_every_row_once(sizes, m, bm):
    # The kernel's packing of the shared metadata: row ranges, K steps only for real groups.
    work = np.asarray(tg.work_list(jnp.asarray(sizes, jnp.int32), m, bm, num_k_steps=3))
    assert work.shape == (5, metadata.num_work_items(m, len(sizes) + 1, bm))
    assert work.shape[1] == -(-m // bm) + len(sizes)
    written = np.zeros(m, int)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    for group, tile, start, end, k_steps in work.T:
        rows = np.arange(tile * bm, tile * bm + bm)
        rows = rows[(rows >= start) & (rows < end)]
        written[rows] += 1
        assert 0 <= group < len(sizes)
        if len(rows):
            if start >= bounds[-1]:  # the tail: zeros, no K steps
                assert k_steps == 0
            else:
                assert k_steps == 3 and start == bounds[group] and end == bounds[group + 1]
        else:  # idle items: empty row range, nothing to run
            assert start == end == 0 and k_steps == 0
    np.testing.assert_array_equal(written, 1)


def _lower_for_cuda(kernel, cfg, dtype, m=512, k=256, n=384, g=4):
    x = jax.ShapeDtypeStruct((m, k), dtype)
    gs = jax.ShapeDtypeStruct((g,), jnp.int32)
    common = dict(backend="triton", config=cfg, interpret=False)
    if kernel == "gmm":
        fn = lambda x, w, gs: gmm(x, w, gs, **common)
        w = jax.ShapeDtypeStruct((g, k, n), dtype)
    elif kernel == "gmm_transposed":
        fn = lambda x, w, gs: gmm(x, w, gs, transpose_rhs=True, **common)
        w = jax.ShapeDtypeStruct((g, n, k), dtype)
    else:
        fn = lambda x, w, gs: tgmm(x, w, gs, **common)
        w = jax.ShapeDtypeStruct((m, n), dtype)
    return jax.jit(fn).trace(x, w, gs).lower(lowering_platforms=("cuda",))


def _triton_modules(lowered) -> list[str]:
    """The Triton IR embedded in each Triton custom call, parsed back and verified.

    jaxlib 0.10 stops CUDA lowering at a `__gpu$xla.gpu.triton` custom call carrying the Triton
    module as bytecode; XLA's GPU compiler turns it into PTX, which needs a CUDA build. Parsing
    and verifying the module checks what can be checked without one (op and type constraints).
    """
    modules = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for child in block.operations:
                    if child.operation.name == "stablehlo.custom_call":
                        config = ir.DictAttr(child.operation.attributes["mhlo.backend_config"])
                        with mlir.make_ir_context() as ctx:
                            triton.dialect.register_dialect(ctx)
                            module = ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes)
                            assert module.operation.verify()
                            modules.append(str(module))
                    walk(child.operation)

    walk(lowered.compiler_ir().operation)
    return modules


@pytest.mark.parametrize("key", list(tg.TUNED_CONFIGS), ids=lambda k: "-".join(map(str, k)))
def test_tuned_config_lowers_for_cuda(key):
    kernel, itemsize, _ = key
    cfg = tg.TUNED_CONFIGS[key]
    dtype = jnp.bfloat16 if itemsize == 2 else jnp.float32
    lowered = _lower_for_cuda(kernel, cfg, dtype)
    text = lowered.as_text()
    assert "__gpu$xla.gpu.triton" in text
    [triton_ir] = _triton_modules(lowered)
    # One pipelinable loop (scf.for, not scf.while) around one tensor-core dot.
    assert triton_ir.count("tt.dot") == 1 and triton_ir.count("scf.for") == 1
    assert "scf.while" not in triton_ir
    # The transposed operand (rhs[g] for d_lhs, the lhs tile for tgmm) is fed through tt.trans.
    assert ("tt.trans" in triton_ir) == (kernel != "gmm")
    assert f"num_warps = {cfg.num_warps}" in text and f"num_stages = {cfg.num_stages}" in text
    assert cfg.shared_memory_bytes(kernel, itemsize) <= tg.MAX_SHARED_MEMORY_BYTES


def test_table_covers_every_kernel_dtype_and_shape_class():
    assert set(tg.TUNED_CONFIGS) == {
        (kernel, itemsize, cls)
        for kernel in tg.KERNELS
        for itemsize in (2, 4)
        for cls in tg.SHAPE_CLASSES
    }


def test_lowering_rejects_non_power_of_two_block():
    # TritonConfig refuses such a block; forcing one past validation shows that the CUDA
    # lowering test above would catch it.
    cfg = tg.TritonConfig(32, 32, 32)
    object.__setattr__(cfg, "block_n", 48)
    with pytest.raises(ValueError, match="power of 2"):
        _lower_for_cuda("gmm", cfg, jnp.float32, m=64, k=64, n=64, g=2)


@pytest.mark.parametrize(
    "field,value", [("block_m", 48), ("block_k", 8), ("block_n", 0), ("num_warps", 3)]
)
def test_config_validation(field, value):
    kwargs = dataclasses.asdict(tg.TritonConfig())
    kwargs[field] = value
    with pytest.raises(ValueError, match=field):
        tg.TritonConfig(**kwargs)


def test_wrong_config_type_rejected():
    lhs, rhs, _ = random_inputs(16, 16, 16, 2, jnp.float32)
    with pytest.raises(ValueError, match="config for the triton backend must be a TritonConfig"):
        gmm(lhs, rhs, jnp.array([8, 8], jnp.int32), backend="triton", config=128, interpret=True)


def test_default_config_shape_classes_and_shrinking():
    assert tg.shape_class(4096, 2048, 1408, 64) == "few_rows"
    assert tg.shape_class(65536, 4096, 14336, 8) == "wide"
    assert tg.shape_class(65536, 512, 1024, 8) == "narrow"
    cfg = tg.default_config("gmm", 65536, 4096, 14336, 8, jnp.bfloat16)
    assert cfg == tg.TUNED_CONFIGS[("gmm", 2, "wide")]
    small = tg.default_config("gmm", 40, 20, 33, 8, jnp.float32)
    assert (small.block_m, small.block_k, small.block_n) == (32, 32, 64)
