"""Expert parallelism on 8 fake CPU devices: same numbers as one device, real splits, collectives.

Legend: B batch, L length, T = B*L tokens, D model width, F expert hidden, E experts, K top-k.
"""

import dataclasses
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.layers.config import MoEConfig, MoEExecution
from moejax.layers.moe import MoE
from moejax.moe import (
    ExpertWeights,
    Routing,
    dropless_ffn,
    expert_parallel_ffn,
    parallel,
    send_buffer_rows,
)
from moejax.sharding import init_sharded, make_mesh, sharding_context

E, K, D, F, B, L = 8, 2, 8, 4, 8, 2
BASE = dict(num_experts=E, top_k=K, d_ff=F, min_capacity=1, execution=MoEExecution(gmm_tile=8))
# Router bonus per expert: expert 0 gets most of the traffic, 4-7 little (skewed routing).
SKEW = jnp.array([3.0, 2.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0])

MESHES = {
    "data8": dict(data=8),
    "fsdp8": dict(data=1, fsdp=8),
    "data2_exp4": dict(data=2, expert=4),
    "exp8": dict(data=1, expert=8),
    "fsdp2_exp2_ten2": dict(data=1, fsdp=2, expert=2, tensor=2),
}


def _inputs(batch=B, length=L):
    return jax.random.normal(jax.random.key(1), (batch, length, D)) + 1.0


def _params(cfg, x):
    """MoE params with a router kernel that skews the load towards the first experts."""
    variables = nn.meta.unbox(MoE(cfg, d_model=D).init(jax.random.key(0), x))
    params = variables["params"]
    kernel = params["router"]["kernel"]
    router = {**params["router"], "kernel": kernel + SKEW[: kernel.shape[1]] / D}
    return {**params, "router": router}


def _loss_and_grads(cfg, params, x, mesh=None):
    model = MoE(cfg, d_model=D)
    # Router state (router="dts": its temperature) as the single-device model initialises it.
    local = dataclasses.replace(cfg, execution=MoEExecution())
    state = nn.meta.unbox(MoE(local, d_model=D).init(jax.random.key(0), x)).get("moe_state")
    extra = {"moe_state": state} if state else {}

    def loss(p, x):
        y, aux = model.apply(
            {"params": p, **extra}, x, deterministic=False, rngs={"router": jax.random.key(7)}
        )
        return jnp.sum(y**2) + aux["aux_loss"], (y, aux)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    if mesh is None:
        return fn(params, x)
    with sharding_context(mesh):
        return fn(params, x)


def _assert_close(got, want, rtol=1e-5):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * max(1.0, np.abs(w).max()))


CASES = [(s, m, "dropless") for s in ("all_to_all", "all_gather") for m in MESHES]
CASES += [
    ("all_to_all", "fsdp2_exp2_ten2", "capacity"),
    ("all_gather", "exp8", "capacity"),
    ("all_to_all", "data2_exp4", "expert_choice"),
    # router="random" (issue: the router table's proof) through both dispatch kinds and both
    # exchanges: its draws must not depend on the mesh.
    ("all_to_all", "data2_exp4", "random"),
    ("all_gather", "exp8", "random"),
    ("all_to_all", "exp8", "random_capacity"),
    ("all_gather", "data2_exp4", "random_capacity"),
    # Token-adaptive routers: null experts (AdaMoE) and top-p, whose "no expert" places must
    # cost nothing and cross no device.
    ("all_to_all", "data2_exp4", "null"),
    ("all_gather", "fsdp2_exp2_ten2", "null"),
    ("all_to_all", "exp8", "top_p"),
    ("all_gather", "data2_exp4", "top_p"),
    # DeepSpeed's random token selection: the same draw decides the drops on every mesh.
    ("all_to_all", "data2_exp4", "random_drop"),
    # EvoMoE's dense-to-sparse gate (Gumbel draws) and SonicMoE's token rounding (its counts
    # are global: the same rows on every mesh).
    ("all_to_all", "data2_exp4", "dts"),
    ("all_gather", "exp8", "dts"),
    ("all_to_all", "exp8", "round_up"),
    ("all_gather", "data2_exp4", "round_down"),
]


def _with_ep(cfg: MoEConfig, strategy: str, **execution) -> MoEConfig:
    """`cfg` running expert-parallel with `strategy` (and other MoEExecution fields)."""
    ex = dataclasses.replace(cfg.execution, expert_parallel=strategy, **execution)
    return dataclasses.replace(cfg, execution=ex)


def _path_kwargs(path):
    kw = dict(BASE)
    if path == "capacity":
        kw.update(dispatch="capacity", capacity_factor=1.0)
    if path == "expert_choice":
        kw.update(router="expert_choice")
    if path.startswith("random"):
        kw.update(router="random")
    if path == "null":
        kw.update(num_null_experts=2)
    if path == "top_p":
        kw.update(router="top_p", top_p=0.5, max_k=3)
    if path == "random_drop":
        kw.update(dispatch="capacity", capacity_factor=0.5, drop_policy="random")
    if path == "dts":
        kw.update(router="dts", max_k=3, dts_tau_start=1.0)
    if path.startswith("round_"):
        kw.update(token_rounding=path.removeprefix("round_"), rounding_tile=8)
    if path == "random_capacity":
        kw.update(dispatch="capacity", capacity_factor=0.5)
    return kw


@functools.cache
def _single_device(path):
    """One-device reference (no mesh, expert_parallel="none"), shared by the mesh cases."""
    x = _inputs()
    cfg = MoEConfig(**_path_kwargs(path))
    params = _params(cfg, x)
    return x, params, _loss_and_grads(cfg, params, x)


@pytest.mark.parametrize("strategy, mesh_name, path", CASES)
def test_moe_matches_single_device(strategy, mesh_name, path):
    kw = _path_kwargs(path)
    x, params, ((loss0, (y0, aux0)), grads0) = _single_device(path)
    # A bound that always holds (ep_capacity_factor = ep): all_to_all must then be exact.
    ep_cfg = _with_ep(MoEConfig(**kw), strategy, ep_capacity_factor=8.0)
    (loss1, (y1, aux1)), grads1 = _loss_and_grads(ep_cfg, params, x, make_mesh(**MESHES[mesh_name]))
    if path in ("dropless", "capacity"):
        assert float(aux0["expert_load"].max()) > 2.0 / E  # the routing really is skewed
    if path in ("capacity", "random_capacity", "random_drop"):
        assert float(aux0["dropped_fraction"]) > 0.1  # and drops happen
    _assert_close(y1, y0)
    _assert_close(loss1, loss0)
    _assert_close(aux1, aux0)
    _assert_close(grads1, grads0)


def _routing(t, seed=0):
    logits = jax.random.normal(jax.random.key(seed), (t, E)) + 2.0 * SKEW
    weights, indices = jax.lax.top_k(jax.nn.softmax(logits), K)
    count = jnp.full((t,), K, jnp.int32)
    return Routing(weights, indices.astype(jnp.int32), jax.nn.softmax(logits), logits, count)


def _weights(seed=2):
    ks = jax.random.split(jax.random.key(seed), 3)
    return ExpertWeights(
        jax.random.normal(ks[0], (E, D, F)) * 0.3,
        jax.random.normal(ks[1], (E, D, F)) * 0.3,
        jax.random.normal(ks[2], (E, F, D)) * 0.3,
    )


def test_all_to_all_overflow_is_counted_and_exact():
    """With a tight bound, rows past S per (source, destination) are dropped and reported."""
    t, factor, ep = 32, 1.0, 8
    x = jax.random.normal(jax.random.key(3), (t, D))
    routing = _routing(t)
    w = _weights()
    cfg = _with_ep(MoEConfig(**BASE), "all_to_all", ep_capacity_factor=factor)
    with jax.set_mesh(make_mesh(data=1, expert=ep)):
        y, dropped = jax.jit(lambda x, r, w: expert_parallel_ffn(x, r, w, cfg, capacity=1))(
            x, routing, w
        )

    # numpy model: shard s holds tokens [s*T/ep, (s+1)*T/ep); it sends each destination (the
    # expert's owner, one expert per shard here) its first S assignments in (token, choice) order.
    idx = np.asarray(routing.indices)
    t_loc = t // ep
    s_rows = send_buffer_rows(t_loc * K, t_loc * K, ep, factor)
    kept = np.zeros((t, K), bool)
    for s in range(ep):
        used = np.zeros(ep, int)
        for tok in range(s * t_loc, (s + 1) * t_loc):
            for k in range(K):
                dest = idx[tok, k]
                kept[tok, k] = used[dest] < s_rows
                used[dest] += 1
    assert (~kept).sum() > 0  # the bound really is exceeded with this skew
    np.testing.assert_allclose(float(dropped), (~kept).sum() / (t * K), rtol=1e-6)
    want = dropless_ffn(x, routing.weights * kept, routing.indices, w, cfg)
    _assert_close(y, want)


@pytest.mark.parametrize("mesh_kw", [dict(data=1, expert=8), dict(data=2, expert=4)])
def test_all_to_all_worst_case_buffers_drop_nothing(mesh_kw):
    """ep_capacity_factor=None: the skewed routing that overflows the tight bound above (and
    the default 2.0) goes through exactly, forward and backward, with nothing dropped; in 2 or
    4 chunks (ep_chunks) too."""
    t = 32
    x = jax.random.normal(jax.random.key(3), (t, D))
    routing = _routing(t)
    w = _weights()
    local = MoEConfig(**BASE)
    want, want_grads = jax.value_and_grad(
        lambda x, w: (dropless_ffn(x, routing.weights, routing.indices, w, local) ** 2).sum(),
        argnums=(0, 1),
    )(x, w)
    for factor, chunks in ((2.0, 1), (None, 1), (None, 2), (None, 4)):
        cfg = _with_ep(local, "all_to_all", ep_capacity_factor=factor, ep_chunks=chunks)

        def loss(x, w, cfg=cfg):
            y, dropped = expert_parallel_ffn(x, routing, w, cfg, capacity=1)
            return (y**2).sum(), dropped

        with jax.set_mesh(make_mesh(**mesh_kw)):
            (got, dropped), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
                x, w
            )
        if factor is not None:
            assert float(dropped) > 0  # the default bound overflows with this skew
            continue
        assert float(dropped) == 0.0
        np.testing.assert_allclose(got, want, rtol=1e-5)
        jax.tree.map(lambda g, r: _assert_close(g, r), grads, want_grads)


def test_ep_chunks_split_the_exchange_into_independent_collectives():
    """ep_chunks=n: n times the all_to_alls of one chunk, each token buffer 1/n of the rows
    (CPU HLO: tuple all-to-alls of one [1, S, D] piece per destination)."""
    t = 64
    x = jax.random.normal(jax.random.key(3), (t, D))
    routing = _routing(t)
    w = _weights()
    exchanges, rows = {}, {}
    for chunks in (1, 2):
        cfg = _with_ep(MoEConfig(**BASE), "all_to_all", ep_capacity_factor=None, ep_chunks=chunks)
        with jax.set_mesh(make_mesh(data=1, expert=8)):
            fn = jax.jit(lambda x, r, w, cfg=cfg: expert_parallel_ffn(x, r, w, cfg, capacity=1)[0])
            text = fn.lower(x, routing, w).compile().as_text()
        first = re.findall(r"%all-to-all[.\d]* = \((\w+\[[\d,]+\])", text)
        exchanges[chunks] = len(first)
        token_rows = {int(m) for m in re.findall(rf"f32\[1,(\d+),{D}\]", " ".join(first))}
        (rows[chunks],) = token_rows
    assert exchanges[2] == 2 * exchanges[1] > 0
    assert rows[2] * 2 == rows[1]


def test_no_mesh_and_replicated_tokens_paths():
    """No mesh: the local path. 2 tokens on (data=2, expert=4): tokens not split on expert."""
    x = jax.random.normal(jax.random.key(4), (2, D))
    routing = _routing(2, seed=5)
    w = _weights()
    want = dropless_ffn(x, routing.weights, routing.indices, w, MoEConfig(**BASE))
    for strategy in ("all_to_all", "all_gather"):
        cfg = _with_ep(MoEConfig(**BASE), strategy)
        y, _ = expert_parallel_ffn(x, routing, w, cfg, capacity=1)
        _assert_close(y, want)
        with jax.set_mesh(make_mesh(data=2, expert=4)):
            fn = jax.jit(functools.partial(expert_parallel_ffn, cfg=cfg, capacity=1))
            y, dropped = fn(x, routing, w)
        _assert_close(y, want)
        assert float(dropped) == 0.0


@pytest.mark.parametrize("mesh_kw", [dict(data=4), dict(data=2, expert=2)], ids=["data4", "exp2"])
def test_kernel_backend_without_expert_parallel_runs_per_shard(mesh_kw):
    """expert_parallel="none" with a Pallas kernel backend on several devices runs per shard
    (layer_strategy -> "all_gather": GSPMD cannot partition the kernels' custom calls), and
    gives the one-device numbers; the XLA backend and one device stay with GSPMD.

    Mosaic in interpret mode, on 4 of the 8 devices: the TPU interpreter hangs with 8 devices
    on a 2-core machine, and Triton's interpreter does not support shard_map's varying axes."""
    mesh = make_mesh(**mesh_kw, devices=jax.devices()[:4])
    ex = MoEExecution(gmm_tile=8, gmm_backend="mosaic", gmm_interpret=True)
    cfg = dataclasses.replace(MoEConfig(**BASE), execution=ex)
    assert parallel.layer_strategy(cfg, mesh) == "all_gather"
    assert parallel.layer_strategy(cfg, make_mesh(data=1, devices=jax.devices()[:1])) == "none"
    assert parallel.layer_strategy(cfg) == "none"  # no mesh: one device
    xla = dataclasses.replace(cfg, execution=MoEExecution(gmm_backend="xla"))
    assert parallel.layer_strategy(xla, mesh) == "none"
    x, params, want = _single_device("dropless")
    _assert_close(_loss_and_grads(cfg, params, x, mesh), want)


def test_bad_expert_count():
    cfg = _with_ep(MoEConfig(num_experts=6, top_k=2, d_ff=F), "all_to_all")
    x = jnp.ones((8, D))
    logits = jnp.zeros((8, 6))
    routing = Routing(
        jnp.ones((8, 2)), jnp.zeros((8, 2), jnp.int32), logits, logits, jnp.full((8,), 2)
    )
    w = ExpertWeights(jnp.ones((6, D, F)), jnp.ones((6, D, F)), jnp.ones((6, F, D)))
    with jax.set_mesh(make_mesh(data=2, expert=4)):
        with pytest.raises(ValueError, match="num_experts=6"):
            expert_parallel_ffn(x, routing, w, cfg, capacity=4)


@pytest.mark.parametrize(
    "mesh_kw, want_shape",
    [(dict(data=2, expert=4), (E // 4, D, F)), (dict(fsdp=2, expert=2, tensor=2), (E // 2, 4, 2))],
)
def test_expert_weights_are_split(mesh_kw, want_shape):
    mesh = make_mesh(**mesh_kw)
    cfg = _with_ep(MoEConfig(**BASE), "all_to_all")
    x = _inputs()
    variables, _ = init_sharded(MoE(cfg, d_model=D).init, mesh, None, jax.random.key(0), x)
    wi_up = variables["params"]["experts"]["wi_up"]
    assert wi_up.shape == (E, D, F)
    assert len(wi_up.addressable_shards) == 8
    assert {s.data.shape for s in wi_up.addressable_shards} == {want_shape}
    # Devices along the expert axis hold different experts.
    expert_slices = {s.index[0].start for s in wi_up.addressable_shards}
    assert len(expert_slices) == mesh.shape["expert"]


def _expert_axis_groups(mesh) -> set[frozenset[int]]:
    ids = np.vectorize(lambda d: d.id)(mesh.devices)  # [data, fsdp, expert, tensor]
    groups = np.moveaxis(ids, 2, -1).reshape(-1, mesh.shape["expert"])
    return {frozenset(g.tolist()) for g in groups}


def _replica_groups(line: str) -> set[frozenset[int]] | None:
    """Device groups of a collective from its HLO line (explicit or iota form; else None)."""
    explicit = re.search(r"replica_groups=\{(\{[\d,\s]*\}(?:,\s*\{[\d,\s]*\})*)\}", line)
    if explicit:
        return {
            frozenset(int(i) for i in g.split(",") if i.strip())
            for g in re.findall(r"\{([\d,\s]*)\}", explicit.group(1))
        }
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](T\(([\d,]+)\))?", line)
    if not iota:
        return None
    n, size = int(iota.group(1)), int(iota.group(2))
    dims = [int(v) for v in iota.group(3).split(",")]
    ids = np.arange(np.prod(dims)).reshape(dims)
    if iota.group(5):
        ids = ids.transpose([int(v) for v in iota.group(5).split(",")])
    return {frozenset(g.tolist()) for g in ids.reshape(n, size)}


def _collective_lines(hlo: str, op: str) -> list[str]:
    return [ln for ln in hlo.splitlines() if re.search(rf"\s{op}(-start)?\(", ln)]


@pytest.mark.parametrize(
    "strategy, ops",
    [("all_to_all", ("all-to-all",)), ("all_gather", ("all-gather", "reduce-scatter"))],
)
def test_compiled_step_has_expert_axis_collectives(strategy, ops):
    mesh = make_mesh(data=2, expert=4)
    cfg = _with_ep(MoEConfig(**BASE), strategy)
    x = _inputs()
    params = _params(MoEConfig(**BASE), x)
    model = MoE(cfg, d_model=D)

    def loss(p, x):
        y, aux = model.apply({"params": p}, x)
        return jnp.sum(y**2) + aux["aux_loss"]

    with sharding_context(mesh):
        hlo = jax.jit(jax.grad(loss)).lower(params, x).compile().as_text()
    want_groups = _expert_axis_groups(mesh)
    for op in ops:
        lines = _collective_lines(hlo, op)
        assert lines, f"no {op} in the compiled step"
        # Device ids in the HLO are positions in the mesh's device list; the fake CPU devices
        # are numbered in that order.
        assert any(_replica_groups(ln) == want_groups for ln in lines), (op, lines[:2])
    if strategy == "all_to_all":
        # Tokens are not gathered over the expert axis.
        gathers = _collective_lines(hlo, "all-gather")
        assert not any(_replica_groups(ln) == want_groups for ln in gathers)
