"""Shared references and cases for the grouped-matmul tests (every backend is held to these).

Legend: M rows, K contraction, N output columns, G groups.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

CASES = {
    # name: (M, K, N, group_sizes)
    "random_with_empty": (61, 37, 29, [9, 0, 23, 0, 17]),
    "one_group_all_rows": (40, 24, 20, [0, 0, 40, 0]),
    "sum_below_rows": (50, 19, 33, [5, 20, 11]),
    "all_empty": (20, 16, 18, [0, 0, 0]),
}

# Every case in float32, the two with partial tiles everywhere also in bfloat16 (interpret mode
# compiles each product separately: this keeps the files' runtime small).
PRODUCT_PARAMS = [pytest.param(c, jnp.float32, id=f"{c}-f32") for c in CASES] + [
    pytest.param(c, jnp.bfloat16, id=f"{c}-bf16") for c in ("random_with_empty", "sum_below_rows")
]

TOLERANCE = {jnp.float32: dict(rtol=1e-5, atol=1e-4), jnp.bfloat16: dict(rtol=2e-2, atol=6e-2)}


def _offsets(group_sizes):
    return np.concatenate([[0], np.cumsum(np.asarray(group_sizes, np.int64))])


def np_gmm(lhs_MxK, rhs_GxKxN, group_sizes):
    """float64 reference: rows of group g times rhs[g]; rows past the groups are zero."""
    lhs, rhs = np.asarray(lhs_MxK, np.float64), np.asarray(rhs_GxKxN, np.float64)
    out = np.zeros((lhs.shape[0], rhs.shape[2]))
    off = _offsets(group_sizes)
    for g in range(rhs.shape[0]):
        out[off[g] : off[g + 1]] = lhs[off[g] : off[g + 1]] @ rhs[g]
    return out


def np_tgmm(lhs_MxK, grad_MxN, group_sizes):
    """float64 reference: out[g] = lhs[rows_g].T @ grad[rows_g]; empty groups are zero."""
    lhs, grad = np.asarray(lhs_MxK, np.float64), np.asarray(grad_MxN, np.float64)
    off = _offsets(group_sizes)
    out = np.zeros((len(group_sizes), lhs.shape[1], grad.shape[1]))
    for g in range(len(group_sizes)):
        out[g] = lhs[off[g] : off[g + 1]].T @ grad[off[g] : off[g + 1]]
    return out


def random_inputs(m, k, n, g, dtype, seed=0):
    """lhs [M, K], rhs [G, K, N], grad [M, N], standard normal, cast to `dtype`."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    lhs = jax.random.normal(k1, (m, k), jnp.float32).astype(dtype)
    rhs = jax.random.normal(k2, (g, k, n), jnp.float32).astype(dtype)
    grad = jax.random.normal(k3, (m, n), jnp.float32).astype(dtype)
    return lhs, rhs, grad


def assert_close(actual, expected, dtype):
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), np.asarray(expected, np.float64), **TOLERANCE[dtype]
    )
