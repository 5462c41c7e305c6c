"""moejax.layers.dispatch against a numpy loop over (token, choice) and a jnp dense reference.

The numpy reference decides which assignments an over-full expert keeps with its own loop, so
the capacity drop rules are checked independently of the sort-based implementation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.layers import dispatch
from moejax.layers.config import MoEConfig

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
        num_experts=E, top_k=top_k, d_ff=F, gmm_backend=backend, gmm_tile=8, activation=activation
    )
    keep = np.ones(idx.shape, bool)
    expected = np_token_choice(x, w, idx, keep, wg, wu, wo, activation)
    args = (x, w, wg, wu, wo) if activation == "swiglu" else (x, w, wu, wo)

    def fn(x, w, *ws):
        gate = ws[0] if activation == "swiglu" else None
        return dispatch.dropless_ffn(x, w, idx, gate, *ws[-2:], cfg)

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
        plan = dispatch.dropless_plan(jnp.asarray(idx), E, tile_m=tile_m)
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
            assert plan.padded and tok.shape[0] % tile_m == 0
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
        return dispatch.capacity_ffn(x, w, idx, wg, wu, wo, cfg, capacity=capacity)

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
    plan = dispatch.capacity_plan(jnp.asarray(idx), jnp.asarray(w), 2, 2, "probs")
    np.testing.assert_array_equal(np.asarray(plan.row_of_assign_TxK).ravel(), [4, 0, 4, 1])
    plan = dispatch.capacity_plan(jnp.asarray(idx), jnp.asarray(w), 2, 2, "position")
    np.testing.assert_array_equal(np.asarray(plan.row_of_assign_TxK).ravel(), [0, 1, 4, 4])
    with pytest.raises(ValueError, match="drop_policy"):
        dispatch.capacity_plan(jnp.asarray(idx), jnp.asarray(w), 2, 2, "random")


def test_expert_choice_matches_reference():
    rng = np.random.default_rng(7)
    capacity = 5
    # Each expert picks `capacity` distinct tokens; token 0 is picked by nobody.
    tok = np.stack([1 + rng.permutation(T - 1)[:capacity] for _ in range(E)]).astype(np.int32)
    w_ec = rng.uniform(0.1, 1.0, size=(E, capacity)).astype(np.float32)
    x = rng.normal(size=(T, D)).astype(np.float32)
    wg, wu, wo = make_weights(rng)
    cfg = MoEConfig(num_experts=E, top_k=2, d_ff=F, activation="relu")

    def fn(x, w_ec, wu, wo):
        return dispatch.expert_choice_ffn(x, w_ec, tok, None, wu, wo, cfg)

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
    plan = dispatch.capacity_plan(jnp.asarray(idx), jnp.asarray(w), E, 4, "position")
    x = rng.normal(size=(T, D)).astype(np.float32)
    rows = rng.normal(size=(E * 4, D)).astype(np.float32)

    def plain_gather(x):
        return jnp.concatenate([x, jnp.zeros((1, D))])[plan.token_of_row_R]

    def plain_combine(rows, w):
        picked = jnp.concatenate([rows, jnp.zeros((1, D))])[plan.row_of_assign_TxK]
        return jnp.einsum("tk,tkd->td", w, picked)

    _grads_close(lambda x: dispatch.gather_rows(x, plan), plain_gather, (x,), 1e-6)
    _grads_close(lambda r, w: dispatch.combine_rows(r, w, plan), plain_combine, (rows, w), 1e-6)
