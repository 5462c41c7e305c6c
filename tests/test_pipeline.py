"""The moejax.moe pipeline (plans, experts, combine) against a numpy loop over (token, choice)
and a jnp dense reference, including the sentinel "no expert".

The numpy reference decides which assignments an over-full expert keeps with its own loop, so
the capacity drop rules are checked independently of the sort-based implementation.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.layers.config import MoEConfig, MoEExecution
from moejax.moe import (
    ExpertWeights,
    Routing,
    capacity_plan,
    combine_rows,
    dropless_ffn,
    dropless_plan,
    gather_rows,
    routed_ffn,
)

T, D, F, E = 13, 6, 10, 4  # T * K = 26: not a multiple of the 8-row tile used below


def np_act(name, x):
    if name in ("swiglu", "silu"):
        return x / (1 + np.exp(-x))
    if name in ("geglu", "gelu"):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    return np.maximum(x, 0)


def np_expert(x_D, e, wg, wu, wo, activation):
    up = x_D @ wu[e]
    h = (
        np_act(activation, x_D @ wg[e]) * up
        if activation in ("swiglu", "geglu")
        else np_act(activation, up)
    )
    return h @ wo[e]


def np_keep(indices, weights, num_experts, capacity, policy):
    """[T, K] bool: assignments that fit in their expert's `capacity` slots."""
    num_tokens, top_k = indices.shape
    pairs = [(t, k) for t in range(num_tokens) for k in range(top_k)]
    if policy == "probs":
        pairs = sorted(pairs, key=lambda p: -weights[p])  # sorted() is stable: ties by position
    fill = np.zeros(num_experts, int)
    keep = np.zeros(indices.shape, bool)
    for t, k in pairs:
        e = indices[t, k]
        if fill[e] < capacity:
            keep[t, k] = True
            fill[e] += 1
    return keep


def np_token_choice(x, weights, indices, keep, wg, wu, wo, activation):
    y = np.zeros((x.shape[0], wo.shape[-1]))
    for t in range(x.shape[0]):
        for k in range(indices.shape[1]):
            if keep[t, k]:
                y[t] += weights[t, k] * np_expert(x[t], indices[t, k], wg, wu, wo, activation)
    return y


def jnp_token_choice(x, weights, indices, keep, wg, wu, wo, activation):
    """Dense-gather reference (differentiable): every (token, choice) with its own weight copy."""
    act = {"swiglu": jax.nn.silu, "relu": jax.nn.relu}[activation]
    up = jnp.einsum("td,tkdf->tkf", x, wu[indices])
    h = act(jnp.einsum("td,tkdf->tkf", x, wg[indices])) * up if activation == "swiglu" else act(up)
    out = jnp.einsum("tkf,tkfd->tkd", h, wo[indices])
    return jnp.einsum("tk,tkd->td", weights * keep, out)


def as_routing(weights, indices, num_experts=E):
    """A Routing from given weights and experts (the pipeline reads only these and the count)."""
    indices = jnp.asarray(indices, jnp.int32)
    zeros = jnp.zeros((indices.shape[0], num_experts), jnp.float32)
    count = (indices < num_experts).sum(axis=-1, dtype=jnp.int32)
    return Routing(jnp.asarray(weights, jnp.float32), indices, zeros, zeros, count)


def routing_case(name, rng, top_k):
    if name == "random":
        idx = np.stack([rng.permutation(E)[:top_k] for _ in range(T)])
    elif name == "empty_expert":  # expert 0 receives nothing
        idx = np.stack([1 + rng.permutation(E - 1)[:top_k] for _ in range(T)])
    elif name == "one_expert":  # top-1, every token to expert 2
        idx = np.full((T, top_k), 2)
    else:
        raise ValueError(name)
    w = rng.uniform(0.1, 1.0, size=idx.shape)
    return idx.astype(np.int32), w.astype(np.float32)


def make_weights(rng, activation="swiglu"):
    wg = rng.normal(size=(E, D, F)).astype(np.float32) / np.sqrt(D)
    wu = rng.normal(size=(E, D, F)).astype(np.float32) / np.sqrt(D)
    wo = rng.normal(size=(E, F, D)).astype(np.float32) / np.sqrt(F)
    return wg, wu, wo


def _grads_close(fn, ref_fn, args, tol):
    """Gradients of sum(sin(fn(*args))) w.r.t. every argument match the reference's."""

    def grads(f):
        loss = lambda *a: jnp.sum(jnp.sin(f(*a)))  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))(*args)

    for a, b in zip(grads(fn), grads(ref_fn), strict=True):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "case,top_k,backend,activation",
    [
        ("random", 2, "xla", "swiglu"),
        ("random", 2, "ragged_dot", "swiglu"),
        ("empty_expert", 2, "xla", "swiglu"),
        ("one_expert", 1, "xla", "swiglu"),
        ("random", E, "xla", "swiglu"),  # top_k == num_experts
        ("empty_expert", 2, "xla", "relu"),  # not gated: no wi_gate in the fused tile MLP
        ("random", 2, "ragged_dot", "relu"),
    ],
)
def test_dropless_matches_reference(case, top_k, backend, activation):
    rng = np.random.default_rng(hash((case, top_k)) % 2**32)
    idx, w = routing_case(case, rng, top_k)
    x = rng.normal(size=(T, D)).astype(np.float32)
    wg, wu, wo = make_weights(rng)
    cfg = MoEConfig(
        num_experts=E,
        top_k=top_k,
        d_ff=F,
        activation=activation,
        execution=MoEExecution(gmm_backend=backend, gmm_tile=8),
    )
    keep = np.ones(idx.shape, bool)
    expected = np_token_choice(x, w, idx, keep, wg, wu, wo, activation)
    args = (x, w, wg, wu, wo) if activation == "swiglu" else (x, w, wu, wo)

    def fn(x, w, *ws):
        gate = ws[0] if activation == "swiglu" else None
        return dropless_ffn(x, w, idx, ExpertWeights(gate, *ws[-2:]), cfg)

    y = jax.jit(fn)(*args)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, expected, atol=1e-5)

    def ref(x, w, *ws):
        return jnp_token_choice(x, w, idx, keep, ws[0], *ws[-2:], activation)

    _grads_close(fn, ref, args, 1e-4)


def test_dropless_plan_layouts():
    rng = np.random.default_rng(1)
    idx, _ = routing_case("empty_expert", rng, 2)
    for tile_m in (None, 8):
        plan = dropless_plan(jnp.asarray(idx), E, tile_m=tile_m)
        tok, assign = np.asarray(plan.token_of_row_R), np.asarray(plan.assign_of_row_R)
        rows = np.asarray(plan.row_of_assign_TxK)
        np.testing.assert_array_equal(
            np.asarray(plan.group_sizes_E), np.bincount(idx.ravel(), minlength=E)
        )
        # Every assignment has a row holding its own token, and rows are grouped by expert.
        np.testing.assert_array_equal(assign[rows.ravel()], np.arange(T * 2))
        np.testing.assert_array_equal(tok[rows], np.repeat(np.arange(T)[:, None], 2, 1))
        experts_in_order = idx.ravel()[assign[assign < T * 2]]
        assert np.all(np.diff(experts_in_order) >= 0)
        if tile_m is not None:
            assert plan.layout == "padded" and tok.shape[0] % tile_m == 0
            # Each tile holds one expert's rows only.
            tiles = np.asarray(plan.tile_group)
            for r in np.flatnonzero(assign < T * 2):
                assert tiles[r // tile_m] == idx.ravel()[assign[r]]


@pytest.mark.parametrize("policy", ["position", "probs"])
@pytest.mark.parametrize("capacity", [1, 3])
def test_capacity_matches_reference(policy, capacity):
    rng = np.random.default_rng(capacity)
    top_k = 2
    idx, w = routing_case("random", rng, top_k)
    # Make expert 1 heavily oversubscribed so that its drop order matters.
    idx[: T // 2, 0] = 1
    idx[: T // 2, 1] = np.where(idx[: T // 2, 1] == 1, 3, idx[: T // 2, 1])
    x = rng.normal(size=(T, D)).astype(np.float32)
    wg, wu, wo = make_weights(rng)
    cfg = MoEConfig(num_experts=E, top_k=top_k, d_ff=F, dispatch="capacity", drop_policy=policy)

    def fn(x, w, wg, wu, wo):
        experts = ExpertWeights(wg, wu, wo)
        return routed_ffn(x, as_routing(w, idx), experts, cfg, capacity=capacity)

    y, dropped = jax.jit(fn)(x, w, wg, wu, wo)
    keep = np_keep(idx, w, E, capacity, policy)
    np.testing.assert_allclose(y, np_token_choice(x, w, idx, keep, wg, wu, wo, "swiglu"), atol=1e-5)
    np.testing.assert_allclose(dropped, 1 - keep.mean(), rtol=1e-6)
    # A token whose every choice was dropped gets exactly zero from the routed experts.
    all_dropped = ~keep.any(axis=1)
    if capacity == 1:
        assert all_dropped.any()
    assert np.all(np.asarray(y)[all_dropped] == 0)

    def ref(x, w, wg, wu, wo):
        return jnp_token_choice(x, w, idx, keep, wg, wu, wo, "swiglu")

    _grads_close(lambda *a: fn(*a)[0], ref, (x, w, wg, wu, wo), 1e-4)


def test_capacity_probs_keeps_heaviest():
    # Four tokens all to expert 0, capacity 2: "probs" keeps the two largest weights.
    idx = np.zeros((4, 1), np.int32)
    w = np.array([[0.1], [0.9], [0.5], [0.7]], np.float32)
    idx, w = jnp.asarray(idx), jnp.asarray(w)
    plan = capacity_plan(idx, 2, weights_TxK=w, capacity=2, drop_policy="probs")
    np.testing.assert_array_equal(np.asarray(plan.row_of_assign_TxK).ravel(), [4, 0, 4, 1])
    plan = capacity_plan(idx, 2, weights_TxK=w, capacity=2, drop_policy="position")
    np.testing.assert_array_equal(np.asarray(plan.row_of_assign_TxK).ravel(), [0, 1, 4, 4])
    with pytest.raises(ValueError, match="drop_policy"):
        capacity_plan(idx, 2, weights_TxK=w, capacity=2, drop_policy="random")


def test_expert_choice_matches_reference():
    rng = np.random.default_rng(7)
    capacity = 5
    # Each expert picks `capacity` distinct tokens; token 0 is picked by nobody.
    tok = np.stack([1 + rng.permutation(T - 1)[:capacity] for _ in range(E)]).astype(np.int32)
    w_ec = rng.uniform(0.1, 1.0, size=(E, capacity)).astype(np.float32)
    x = rng.normal(size=(T, D)).astype(np.float32)
    wg, wu, wo = make_weights(rng)
    cfg = MoEConfig(num_experts=E, top_k=2, d_ff=F, activation="relu", router="expert_choice")
    # The token-major Routing an expert-choice router gives: place e of token t is e if expert e
    # took t, else the sentinel E.
    picked = np.zeros((T, E), bool)
    picked[tok, np.arange(E)[:, None]] = True
    idx = np.where(picked, np.arange(E)[None, :], E)

    def fn(x, w_ec, wu, wo):
        w_TxE = jnp.zeros((T, E)).at[tok, jnp.arange(E)[:, None]].set(w_ec)
        experts = ExpertWeights(None, wu, wo)
        return routed_ffn(x, as_routing(w_TxE, idx), experts, cfg, capacity=capacity)

    y, unpicked = jax.jit(fn)(x, w_ec, wu, wo)
    y_ref = np.zeros((T, D))
    for e in range(E):
        for c in range(capacity):
            y_ref[tok[e, c]] += w_ec[e, c] * np_expert(x[tok[e, c]], e, wg, wu, wo, "relu")
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    np.testing.assert_allclose(unpicked, 1 - len(np.unique(tok)) / T, rtol=1e-6)

    def ref(x, w_ec, wu, wo):
        h = jax.nn.relu(jnp.einsum("ecd,edf->ecf", x[tok], wu))
        out = jnp.einsum("ecf,efd->ecd", h, wo) * w_ec[..., None]
        return jnp.zeros((T, D)).at[tok.ravel()].add(out.reshape(-1, D))

    _grads_close(lambda *a: fn(*a)[0], ref, (x, w_ec, wu, wo), 1e-4)


def test_gather_and_combine_vjps_match_autodiff():
    """The gather-only custom VJPs equal autodiff of the plain gathers (which scatter-add)."""
    rng = np.random.default_rng(5)
    idx, w = routing_case("random", rng, 2)
    plan = capacity_plan(
        jnp.asarray(idx), E, weights_TxK=jnp.asarray(w), capacity=4, drop_policy="position"
    )
    x = rng.normal(size=(T, D)).astype(np.float32)
    rows = rng.normal(size=(E * 4, D)).astype(np.float32)

    def plain_gather(x):
        return jnp.concatenate([x, jnp.zeros((1, D))])[plan.token_of_row_R]

    def plain_combine(rows, w):
        picked = jnp.concatenate([rows, jnp.zeros((1, D))])[plan.row_of_assign_TxK]
        return jnp.einsum("tk,tkd->td", w, picked)

    _grads_close(lambda x: gather_rows(x, plan), plain_gather, (x,), 1e-6)
    _grads_close(lambda r, w: combine_rows(r, w, plan), plain_combine, (rows, w), 1e-6)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
@pytest.mark.parametrize("backend", ["xla", "ragged_dot"])
def test_sentinel_places_compute_nothing(dispatch, backend):
    """Places holding the sentinel E get no row and add nothing; a token with only sentinels
    gets exactly zero. Equal to routing without those places (their weight set to 0)."""
    rng = np.random.default_rng(11)
    idx, w = routing_case("random", rng, 3)
    none = rng.random(idx.shape) < 0.4
    none[0] = True  # token 0: no expert at all
    idx_s = np.where(none, E, idx).astype(np.int32)
    x = rng.normal(size=(T, D)).astype(np.float32)
    experts = ExpertWeights(*map(jnp.asarray, make_weights(rng)))
    cfg = MoEConfig(
        num_experts=E,
        top_k=3,
        d_ff=F,
        dispatch=dispatch,
        capacity_factor=1.0,
        execution=MoEExecution(gmm_backend=backend, gmm_tile=8),
    )
    capacity = 4
    y, dropped = routed_ffn(x, as_routing(w, idx_s), experts, cfg, capacity=capacity)
    keep = ~none
    if dispatch == "capacity":
        # The sentinels take no slot: the real places compete for the slots alone.
        keep = np.where(none, False, True)
        fill = np.zeros(E, int)
        for t in range(T):
            for k in range(3):
                if keep[t, k]:
                    keep[t, k] = fill[idx[t, k]] < capacity
                    fill[idx[t, k]] += 1
    want = np_token_choice(x, w, idx, keep, *map(np.asarray, experts), "swiglu")
    np.testing.assert_allclose(y, want, atol=1e-5)
    assert np.all(np.asarray(y)[0] == 0)
    np.testing.assert_allclose(dropped, 1 - keep.sum() / (~none).sum(), rtol=1e-6)
    plan = dropless_plan(jnp.asarray(idx_s), E, tile_m=8 if backend == "xla" else None)
    assert int(plan.group_sizes_E.sum()) == (~none).sum()
    assert np.all(np.asarray(plan.row_of_assign_TxK)[none] == plan.token_of_row_R.shape[0])

    def fn(x, w):
        return routed_ffn(x, as_routing(w, idx_s), experts, cfg, capacity=capacity)[0]

    def ref(x, w):
        return jnp_token_choice(x, w, idx, keep, *experts, "swiglu")

    _grads_close(fn, ref, (x, w), 1e-4)


def test_random_drop_policy_keeps_a_uniform_random_subset():
    """drop_policy="random": an over-full expert keeps exactly C of its assignments, a different
    subset per key, each assignment equally likely; without a key (evaluation) position order."""
    num_tokens, capacity = 8, 2
    idx = jnp.zeros((num_tokens, 1), jnp.int32)  # all to expert 0
    w = jnp.ones((num_tokens, 1))
    kept = []
    for seed in range(400):
        plan = capacity_plan(
            idx, 2, weights_TxK=w, capacity=capacity, drop_policy="random",
            key=jax.random.key(seed),
        )  # fmt: skip
        rows = np.asarray(plan.row_of_assign_TxK).ravel()
        assert (rows < 2 * capacity).sum() == capacity
        kept.append(rows < 2 * capacity)
    freq = np.mean(kept, axis=0)
    np.testing.assert_allclose(freq, capacity / num_tokens, atol=0.08)  # 400 draws: sd ~ 0.02
    assert len({tuple(k) for k in kept}) > 10
    with pytest.raises(ValueError, match="PRNG key"):
        capacity_plan(idx, 2, weights_TxK=w, capacity=capacity, drop_policy="random")
    cfg = MoEConfig(num_experts=2, top_k=1, d_ff=F, dispatch="capacity", drop_policy="random")
    x = np.random.default_rng(0).normal(size=(num_tokens, D)).astype(np.float32)
    experts = ExpertWeights(*map(jnp.asarray, make_weights(np.random.default_rng(1))))
    experts = ExpertWeights(*(a[:2] for a in experts))
    routing = as_routing(w, idx, num_experts=2)
    y_eval, _ = routed_ffn(x, routing, experts, cfg, capacity=capacity)
    position = dataclasses.replace(cfg, drop_policy="position")
    np.testing.assert_array_equal(y_eval, routed_ffn(x, routing, experts, position, capacity=2)[0])
