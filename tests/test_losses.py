"""Balancing losses and router metrics against plain numpy references, forward and gradients.

Legend: B batch, L length, E experts, K experts per token.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from moejax.layers import expert_load, load_balance_loss, router_entropy, router_z_loss


def _routing(seed, b=3, n=10, e=6, k=2, score_func="softmax"):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((b, n, e)).astype(np.float32)
    if score_func == "softmax":
        probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    else:
        probs = 1.0 / (1.0 + np.exp(-logits))
    indices = np.argsort(-probs, axis=-1)[..., :k].astype(np.int32)
    return logits, probs.astype(np.float32), indices


def np_load_balance(probs, indices, num_experts, per_sequence):
    """Switch loss with explicit loops: E * sum_e f_e * P_e."""
    probs = np.asarray(probs, np.float64)
    probs = probs / probs.sum(-1, keepdims=True)

    def one(p_TxE, i_TxK):
        f = np.array([(i_TxK == e).sum() for e in range(num_experts)]) / i_TxK.size
        return num_experts * np.sum(f * p_TxE.mean(0))

    if per_sequence:
        return np.mean([one(probs[b], indices[b]) for b in range(len(probs))])
    return one(probs.reshape(-1, num_experts), indices.reshape(-1, indices.shape[-1]))


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("per_sequence", [False, True])
def test_load_balance_loss_matches_numpy(score_func, per_sequence):
    _, probs, indices = _routing(0, score_func=score_func)
    loss = load_balance_loss(
        jnp.asarray(probs), jnp.asarray(indices), num_experts=6, per_sequence=per_sequence
    )
    assert loss.dtype == jnp.float32 and loss.shape == ()
    np.testing.assert_allclose(loss, np_load_balance(probs, indices, 6, per_sequence), rtol=1e-5)


def test_per_sequence_differs_from_global_and_agrees_for_one_sequence():
    # Sequence 0 routes everything to expert 0, sequence 1 everything to expert 1: globally the
    # batch looks half balanced, per sequence each one is fully collapsed.
    probs = np.full((2, 4, 4), 0.01, np.float32)
    probs[0, :, 0] = probs[1, :, 1] = 0.97
    indices = np.zeros((2, 4, 1), np.int32)
    indices[1] = 1
    glob = load_balance_loss(probs, indices, num_experts=4, per_sequence=False)
    seq = load_balance_loss(probs, indices, num_experts=4, per_sequence=True)
    np.testing.assert_allclose(glob, np_load_balance(probs, indices, 4, False), rtol=1e-6)
    np.testing.assert_allclose(seq, np_load_balance(probs, indices, 4, True), rtol=1e-6)
    np.testing.assert_allclose(glob, 4 * 2 * 0.5 * 0.49, rtol=1e-5)
    np.testing.assert_allclose(seq, 4 * 0.97, rtol=1e-5)
    one = load_balance_loss(probs[:1], indices[:1], num_experts=4, per_sequence=True)
    np.testing.assert_allclose(
        one, load_balance_loss(probs[:1], indices[:1], num_experts=4, per_sequence=False)
    )


def test_load_balance_loss_perfect_balance_is_one():
    e = 4
    probs = np.full((2, 8, e), 1.0 / e, np.float32)
    indices = np.tile(np.array([[0, 1], [2, 3]], np.int32), (2, 4, 1))
    for per_sequence in (False, True):
        loss = load_balance_loss(probs, indices, num_experts=e, per_sequence=per_sequence)
        np.testing.assert_allclose(loss, 1.0, rtol=1e-6)


@pytest.mark.parametrize("per_sequence", [False, True])
def test_load_balance_loss_gradient(per_sequence):
    _, probs, indices = _routing(1, score_func="sigmoid")
    b, n, e = probs.shape
    k = indices.shape[-1]

    def loss(p):
        return load_balance_loss(p, jnp.asarray(indices), num_experts=e, per_sequence=per_sequence)

    def ref(p):
        # Plain jnp: f from counts (a constant), P from row-normalised probs.
        counts = (jnp.asarray(indices)[..., None] == jnp.arange(e)).sum(2).astype(jnp.float32)
        pn = p / p.sum(-1, keepdims=True)
        if per_sequence:
            f = counts.sum(1) / (n * k)
            return e * jnp.mean(jnp.sum(f * pn.mean(1), -1))
        f = counts.sum((0, 1)) / (b * n * k)
        return e * jnp.sum(f * pn.mean((0, 1)))

    p = jnp.asarray(probs)
    g = jax.grad(loss)(p)
    np.testing.assert_allclose(g, jax.grad(ref)(p), rtol=1e-5, atol=1e-7)
    assert np.abs(np.asarray(g)).max() > 0
    check_grads(jax.jit(loss), (p,), order=2, modes=("rev",), eps=1e-3, atol=1e-2, rtol=1e-2)


def test_load_balance_loss_gradient_through_softmax_lowers_overloaded_expert():
    # d loss / d logits through softmax: the expert with the largest f_e must lose probability.
    logits, _, indices = _routing(2, b=2, n=16, e=4, k=1)
    indices[:] = 0
    indices[:, :4] = 1

    def loss(lg):
        return load_balance_loss(
            jax.nn.softmax(lg), jnp.asarray(indices), num_experts=4, per_sequence=False
        )

    g = np.asarray(jax.grad(loss)(jnp.asarray(logits)))
    assert (g[..., 0].sum() > 0) and (g[..., 2].sum() < 0)


def test_load_balance_loss_bad_input():
    p = jnp.zeros((2, 3, 4))
    i = jnp.zeros((2, 3, 1), jnp.int32)
    with pytest.raises(ValueError, match=r"probs \[B, L, E\]"):
        load_balance_loss(p[0], i[0], num_experts=4, per_sequence=False)
    with pytest.raises(ValueError, match="num_experts=5"):
        load_balance_loss(p, i, num_experts=5, per_sequence=False)
    with pytest.raises(ValueError, match="num_experts"):
        load_balance_loss(p, i, num_experts=0, per_sequence=False)
    with pytest.raises(ValueError, match="integer"):
        load_balance_loss(p, i.astype(jnp.float32), num_experts=4, per_sequence=False)


def test_router_z_loss_matches_numpy_and_gradient():
    logits, _, _ = _routing(3, b=4, n=5, e=6)
    logits = 5.0 * logits  # large logits: logsumexp must not overflow
    lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    z = router_z_loss(jnp.asarray(logits))
    assert z.dtype == jnp.float32
    np.testing.assert_allclose(z, np.mean(lse**2), rtol=1e-5)
    # d/dlogits mean(lse^2) = 2 * lse * softmax / num_tokens
    soft = np.exp(logits - lse[..., None])
    g = jax.grad(router_z_loss)(jnp.asarray(logits))
    np.testing.assert_allclose(g, 2 * lse[..., None] * soft / lse.size, rtol=1e-4, atol=1e-7)
    # bf16 logits still give float32 math.
    zb = router_z_loss(jnp.asarray(logits, jnp.bfloat16))
    assert zb.dtype == jnp.float32
    check_grads(
        jax.jit(router_z_loss), (jnp.asarray(logits[0]),), order=2, modes=("rev",), eps=1e-2
    )
    np.testing.assert_allclose(router_z_loss(jnp.zeros((3, 4))), np.log(4) ** 2, rtol=1e-6)


def test_router_entropy():
    _, probs, _ = _routing(4, score_func="sigmoid")
    p = probs.astype(np.float64)
    p = p / p.sum(-1, keepdims=True)
    ref = np.mean(-(p * np.log(p)).sum(-1))
    np.testing.assert_allclose(router_entropy(jnp.asarray(probs)), ref, rtol=1e-5)
    np.testing.assert_allclose(router_entropy(jnp.full((5, 8), 0.125)), np.log(8), rtol=1e-6)
    one_hot = jax.nn.one_hot(jnp.array([0, 3, 2]), 4)
    np.testing.assert_allclose(router_entropy(one_hot), 0.0, atol=1e-7)
    g = jax.grad(router_entropy)(jnp.asarray(probs))
    assert np.isfinite(g).all()


def test_expert_load():
    rng = np.random.default_rng(5)
    indices = rng.integers(0, 7, (3, 11, 2)).astype(np.int32)
    indices[indices == 4] = 5  # expert 4 gets nothing
    load = expert_load(jnp.asarray(indices), 7)
    np.testing.assert_allclose(load, np.bincount(indices.ravel(), minlength=7) / indices.size)
    assert load[4] == 0.0 and load.dtype == jnp.float32
    np.testing.assert_allclose(load.sum(), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(expert_load(jnp.zeros((0, 2), jnp.int32), 3), np.zeros(3))
    with pytest.raises(ValueError, match="num_experts"):
        expert_load(jnp.asarray(indices), -1)
