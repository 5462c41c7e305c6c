"""The ragged expert-parallel exchange (MoEExecution.ep_exchange="ragged").

XLA:CPU has no ragged-all-to-all, so on 8 fake CPU devices the one collective of the exchange
(`moejax.moe.parallel.ragged_all_to_all`) is replaced by `emulated_ragged_all_to_all`: the
documented semantics of `jax.lax.ragged_all_to_all` from all_gathers and gathers, itself checked
against a numpy model of that documentation. The real collective is checked where it exists:
the layer compiled deviceless for 8-chip TPU v5p and H100 targets (the `aot` extra).

Legend: T tokens, D model width, F expert hidden, E experts, K top-k, ep expert-axis size,
N slices (offsets/sizes per device), M receive-buffer rows.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moejax.layers.config import MoEConfig, MoEExecution
from moejax.moe import Routing, dropless_ffn, expert_parallel_ffn, parallel
from moejax.sharding import make_mesh

# Sizes, the skewed router bonus (expert 0 takes most of the traffic and overflows the fixed
# buffers) and the experts' weights are test_expert_parallel's.
from tests.test_expert_parallel import (
    BASE,
    SKEW,
    D,
    E,
    K,
    _assert_close,
    _inputs,
    _loss_and_grads,
    _params,
    _weights,
)

MESHES = {"exp8": dict(data=1, expert=8), "data2_exp4": dict(data=2, expert=4)}


def emulated_ragged_all_to_all(
    operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name
):
    """`jax.lax.ragged_all_to_all` inside shard_map, as its docstring defines it, in jnp.

    Slice i of source j goes to device i // (N / ep), rows operand_j[input_offsets_j[i] :
    + send_sizes_j[i]], written there at output_offsets_j[i]; a device's received slice l from
    source j has recv_sizes[j * N/ep + l] rows. Rows no slice writes keep `output`'s values.
    """
    n = jax.lax.axis_size(axis_name)
    per = input_offsets.shape[0] // n
    me = jax.lax.axis_index(axis_name)
    operands = jax.lax.all_gather(operand, axis_name)  # [ep, N_op, ...]
    starts, outs = (jax.lax.all_gather(v, axis_name) for v in (input_offsets, output_offsets))
    # The slices sent here, in the order (source j, slice l): the receive side's i = j*per + l.
    cols = me * per + jnp.arange(per)
    start_I, out_I = starts[:, cols].reshape(-1), outs[:, cols].reshape(-1)
    source_I = jnp.repeat(jnp.arange(n), per)
    r_M = jnp.arange(output.shape[0])
    inside_MxI = (r_M[:, None] >= out_I) & (r_M[:, None] < out_I + recv_sizes)
    which_M = jnp.argmax(inside_MxI, axis=1)
    row_M = jnp.clip(start_I[which_M] + r_M - out_I[which_M], 0, operand.shape[0] - 1)
    picked = operands[source_I[which_M], row_M]
    hit = inside_MxI.any(axis=1).reshape(-1, *([1] * (output.ndim - 1)))
    return jnp.where(hit, picked, output)


def _emulated(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes):
    return emulated_ragged_all_to_all(
        operand,
        output,
        input_offsets,
        send_sizes,
        output_offsets,
        recv_sizes,
        axis_name=parallel.EXPERT_AXIS,
    )


@pytest.fixture
def emulated(monkeypatch):
    """The ragged exchange on CPU: the emulated collective, CPU counted as able to run it.
    Yields the list of traced calls (so a test sees that the ragged path really ran)."""
    calls = []

    def traced(*args):
        calls.append(args[0].shape)
        return _emulated(*args)

    monkeypatch.setattr(parallel, "ragged_all_to_all", traced)
    monkeypatch.setattr(parallel, "RAGGED_PLATFORMS", (*parallel.RAGGED_PLATFORMS, "cpu"))
    return calls


def _numpy_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets):
    """The docstring's pseudocode over all devices: lists indexed by device."""
    n = len(operand)
    per = len(input_offsets[0]) // n
    result = [o.copy() for o in output]
    for src in range(n):
        for i in range(len(input_offsets[src])):
            a, size, b = input_offsets[src][i], send_sizes[src][i], output_offsets[src][i]
            result[i // per][b : b + size] = operand[src][a : a + size]
    return result


def _run_sharded(mesh, fn, *arrays):
    """fn on each expert shard; arrays [ep * ...] split over "expert" (replicated over data)."""
    spec = P("expert")
    sharded = jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * len(arrays), out_specs=spec)
    return np.asarray(jax.jit(sharded)(*arrays))


def _random_layout(rng, n, per, n_op, m):
    """Valid arguments on n devices with per slices per destination: random sizes (zeros
    included), non-overlapping receive slices with gaps, send slices anywhere (overlap allowed)."""
    sizes = rng.integers(0, 4, size=(n, n, per))  # [source, destination, slice]
    out_off = np.zeros_like(sizes)
    for dst in range(n):
        pos = 0
        for src in range(n):
            for sl in range(per):
                pos += rng.integers(0, 2)  # gaps keep output's rows
                out_off[src, dst, sl] = pos
                pos += sizes[src, dst, sl]
        assert pos <= m
    in_off = rng.integers(0, n_op - sizes + 1)
    recv = sizes.transpose(1, 0, 2)  # [destination, source, slice]
    return [a.reshape(n, n * per).astype(np.int32) for a in (in_off, sizes, out_off, recv)]


@pytest.mark.parametrize("mesh_name, per", [("exp8", 1), ("exp8", 2), ("data2_exp4", 1)])
def test_emulation_matches_the_documented_semantics(mesh_name, per):
    mesh = make_mesh(**MESHES[mesh_name])
    n = mesh.shape["expert"]
    n_op, m = 12, 2 * n * per * 4
    rng = np.random.default_rng(per * 10 + n)
    in_off, sizes, out_off, recv = _random_layout(rng, n, per, n_op, m)
    operand = rng.normal(size=(n, n_op, 3)).astype(np.float32)
    output = rng.normal(size=(n, m, 3)).astype(np.float32)
    want = _numpy_ragged_all_to_all(operand, output, in_off, sizes, out_off)
    got = _run_sharded(
        mesh,
        lambda *a: emulated_ragged_all_to_all(*(v[0] for v in a), axis_name="expert")[None],
        *(jnp.asarray(v) for v in (operand, output, in_off, sizes, out_off, recv)),
    )
    assert sizes.sum() > 0 and (sizes == 0).any()
    np.testing.assert_array_equal(got, np.stack(want))


def test_emulation_reproduces_the_docstring_example():
    """The example in jax.lax.ragged_all_to_all's docstring (an axis of size 2), on a
    (data=4, expert=2) mesh: every data row runs it on its own pair of devices."""
    mesh = make_mesh(data=4, expert=2)
    operand = np.array([[1, 2, 2], [3, 4, 0]], np.float32)
    output = np.zeros((2, 4), np.float32)
    in_off = np.array([[0, 1], [0, 1]], np.int32)
    sizes = np.array([[1, 2], [1, 1]], np.int32)
    out_off = np.array([[0, 0], [1, 2]], np.int32)
    recv = np.array([[1, 1], [2, 1]], np.int32)
    got = _run_sharded(
        mesh,
        lambda *a: emulated_ragged_all_to_all(*(v[0] for v in a), axis_name="expert")[None],
        *(jnp.asarray(v) for v in (operand, output, in_off, sizes, out_off, recv)),
    )
    np.testing.assert_array_equal(got, [[1, 3, 0, 0], [2, 2, 4, 0]])


def _routing(t, seed=0, skewed=None):
    """Top-K routing of t tokens, the first `skewed` (default all) skewed towards expert 0."""
    skewed = t if skewed is None else skewed
    bonus_TxE = 2.0 * SKEW * (jnp.arange(t) < skewed)[:, None]
    logits = jax.random.normal(jax.random.key(seed), (t, E)) + bonus_TxE
    weights, indices = jax.lax.top_k(jax.nn.softmax(logits), K)
    count = jnp.full((t,), K, jnp.int32)
    return Routing(weights, indices.astype(jnp.int32), jax.nn.softmax(logits), logits, count)


def _cfg(exchange, **execution):
    ex = dataclasses.replace(
        BASE["execution"], expert_parallel="all_to_all", ep_exchange=exchange, **execution
    )
    return MoEConfig(**{**BASE, "execution": ex})


def _ep_loss_and_grads(cfg, mesh, x, routing, w):
    """sum(y^2) and its gradients w.r.t. x, the expert weights and the router weights."""

    def loss(x, w, gate):
        y, dropped = expert_parallel_ffn(x, routing._replace(weights=gate), w, cfg, capacity=1)
        return (y**2).sum(), (y, dropped)

    with jax.set_mesh(mesh):
        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
        return fn(x, w, routing.weights)


@pytest.mark.parametrize(
    "mesh_name, chunks", [("exp8", (1,)), ("data2_exp4", (1, 2))], ids=["exp8", "data2_exp4"]
)
def test_ragged_equals_one_device(emulated, mesh_name, chunks):
    """ep_capacity_factor=None: the skewed routing that overflows the fixed buffers of the
    default bound (2.0) goes through the ragged exchange exactly, forward and backward, in one
    chunk and in 2 (ep_chunks), with nothing dropped."""
    t = 32
    mesh = make_mesh(**MESHES[mesh_name])
    x = jax.random.normal(jax.random.key(3), (t, D))
    routing, w = _routing(t), _weights()
    local = MoEConfig(**BASE)

    def ref_loss(x, w, gate):
        y = dropless_ffn(x, gate, routing.indices, w, local)
        return (y**2).sum(), y

    (want, y_want), want_grads = jax.value_and_grad(ref_loss, argnums=(0, 1, 2), has_aux=True)(
        x, w, routing.weights
    )
    with jax.set_mesh(mesh):
        fixed = jax.jit(lambda x: expert_parallel_ffn(x, routing, w, _cfg("fixed"), capacity=1))
        assert float(fixed(x)[1]) > 0  # today's fixed buffers overflow with this skew
    assert not emulated
    for n in chunks:
        cfg = _cfg("ragged", ep_capacity_factor=None, ep_chunks=n)
        (got, (y, dropped)), grads = _ep_loss_and_grads(cfg, mesh, x, routing, w)
        # The ragged path ran, once there and once back per chunk: A = T_chunk * K rows out,
        # R = ep * T_chunk * min(K, E_loc) rows back (the worst-case receive buffer).
        ep = mesh.shape["expert"]
        t_chunk = t // (ep * mesh.shape["data"] * n)
        there, back = (t_chunk * K, D), (ep * t_chunk * min(K, E // ep), D)
        assert emulated == [there, back] * n
        emulated.clear()
        assert float(dropped) == 0.0
        _assert_close(y, y_want)
        _assert_close(got, want)
        _assert_close(grads, want_grads)


def _ragged_kept(idx, data, ep, t_loc, num_rows):
    """numpy model of the ragged drop rule. Shard (g, j) of a (data, expert) mesh holds token
    block g * ep + j; within data group g, destination d keeps rows in source order (j), each
    source's rows sorted by expert, then token and choice, until num_rows are filled."""
    num_local = E // ep
    kept = np.zeros(idx.shape, bool)
    for g in range(data):
        for dst in range(ep):
            used = 0
            for src in range(g * ep, (g + 1) * ep):
                rows = [
                    (idx[tok, k], tok, k)
                    for tok in range(src * t_loc, (src + 1) * t_loc)
                    for k in range(K)
                    if idx[tok, k] // num_local == dst
                ]
                for _, tok, k in sorted(rows):
                    kept[tok, k] = used < num_rows
                    used += 1
    return kept


@pytest.mark.parametrize("mesh_name, factor", [("exp8", 2.0), ("data2_exp4", 1.0)])
def test_ragged_bound_drops_what_exceeds_a_destination_and_counts_it(emulated, mesh_name, factor):
    """With a factor, a destination's R = ep * S rows are shared by the sources: what exceeds
    them is dropped (numpy model), counted in the dropped fraction, and less than the fixed
    path drops (per source past S) when the sources' loads differ (only the first half of the
    tokens is skewed); the kept rows are computed exactly, forward and backward."""
    t = 64
    mesh = make_mesh(**MESHES[mesh_name])
    data, ep = mesh.shape["data"], mesh.shape["expert"]
    x = jax.random.normal(jax.random.key(3), (t, D))
    routing, w = _routing(t, skewed=t // 2), _weights()
    t_loc = t // (data * ep)
    num_rows = ep * parallel.send_buffer_rows(t_loc * K, t_loc * K, ep, factor)
    kept = _ragged_kept(np.asarray(routing.indices), data, ep, t_loc, num_rows)
    (_, (y, dropped)), grads = _ep_loss_and_grads(
        _cfg("ragged", ep_capacity_factor=factor), mesh, x, routing, w
    )
    assert emulated  # the ragged path ran
    (_, (_, fixed_dropped)), _ = _ep_loss_and_grads(
        _cfg("fixed", ep_capacity_factor=factor), mesh, x, routing, w
    )
    assert (~kept).sum() > 0  # the bound really is exceeded
    np.testing.assert_allclose(float(dropped), (~kept).sum() / (t * K), rtol=1e-6)
    assert float(dropped) < float(fixed_dropped)
    local = MoEConfig(**BASE)

    def ref_loss(x, w, gate):
        return (dropless_ffn(x, gate * kept, routing.indices, w, local) ** 2).sum()

    want_grads = jax.grad(ref_loss, argnums=(0, 1, 2))(x, w, routing.weights)
    _assert_close(y, dropless_ffn(x, routing.weights * kept, routing.indices, w, local))
    _assert_close(grads, want_grads)


def test_ragged_moe_layer_equals_one_device(emulated):
    """The MoE layer end to end (router, losses, aux) with the ragged exchange on fsdp=2 x
    expert=2 x tensor=2 (expert weights gathered over fsdp, F split over tensor): loss,
    output, aux and every gradient as on one device."""
    x = _inputs()
    cfg0 = MoEConfig(**BASE)
    params = _params(cfg0, x)
    want = _loss_and_grads(cfg0, params, x)
    mesh = make_mesh(fsdp=2, expert=2, tensor=2)
    got = _loss_and_grads(_cfg("ragged", ep_capacity_factor=None), params, x, mesh)
    assert emulated  # the ragged path ran
    assert float(want[0][1][1]["expert_load"].max()) > 2.0 / E  # skewed
    _assert_close(got, want)


def test_exchange_choice_and_errors():
    assert parallel.resolve_exchange("auto", "cpu") == "fixed"
    assert parallel.resolve_exchange("auto", "tpu") == "ragged"
    assert parallel.resolve_exchange("auto", "gpu") == "ragged"
    assert parallel.resolve_exchange("fixed", "gpu") == "fixed"
    assert parallel.mesh_platform(make_mesh(data=1, expert=8)) == "cpu"
    with pytest.raises(ValueError, match=r"ep_exchange='pairs' is invalid: allowed values are "):
        parallel.resolve_exchange("pairs", "tpu")
    with pytest.raises(ValueError, match=r"MoEExecution.ep_exchange.*'auto', 'fixed', 'ragged'"):
        MoEExecution(ep_exchange="pairs")
    # On CPU, "ragged" is refused before XLA:CPU could fail on an unknown opcode.
    x, routing, w, cfg = jnp.ones((16, D)), _routing(16), _weights(), _cfg("ragged")
    with jax.set_mesh(make_mesh(data=1, expert=8)):
        with pytest.raises(ValueError, match=r"ep_exchange='ragged' needs .* platform 'cpu'"):
            jax.jit(lambda x: expert_parallel_ffn(x, routing, w, cfg, capacity=1))(x)


def _collective_lines(text: str, op: str) -> list[str]:
    return [ln for ln in text.splitlines() if re.search(rf"\s{op}(-start)?\(", ln)]


def _ep_benchmark():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "ep.py"
    spec = importlib.util.spec_from_file_location("ep_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "target, module", [("tpu-v5p-16", "libtpu"), ("gpu-h100-8", "jax_cuda13_plugin")]
)
def test_deviceless_compile_uses_ragged_all_to_all(target, module):
    """The MoE layer's forward and backward compiled for 8 TPU v5p chips / 8 H100s
    (benchmarks/ep.py's deviceless_compile): with ep_exchange="auto" the real compiler gets
    ragged-all-to-all, forward and in the gradient, and no fixed-buffer all-to-all of the
    tokens, which ep_exchange="fixed" has."""
    pytest.importorskip(module, reason="needs the aot extra (libtpu, jax CUDA plugin)")
    from moejax.compile import hlo

    bench = _ep_benchmark()
    small = dict(experts=16, top_k=2, d_model=256, d_ff=256, tokens_per_device=128)
    ops, stats = {}, {}
    for exchange in ("auto", "fixed"):
        text = bench.deviceless_compile(target, exchange, None, **small).as_text()
        stats[exchange] = hlo.analyze_hlo(text)
        ops[exchange] = (
            _collective_lines(text, "ragged-all-to-all"),
            # Token buffers are bf16; the int ones are the fixed path's local expert ids, or
            # the offsets jax's ragged_all_to_all lowering exchanges.
            [ln for ln in _collective_lines(text, "all-to-all") if "bf16[" in ln],
        )
    ragged, tokens_a2a = ops["auto"]
    # There and back in the forward pass, and the transposes of both in the backward pass.
    assert len(ragged) >= 4, ragged
    assert not tokens_a2a, tokens_a2a[:2]
    assert ops["fixed"][1] and not ops["fixed"][0]
    # moejax.compile counts what a ragged-all-to-all can send: its data operand, A = T_loc * K
    # rows there (and their cotangents back), R = ep * T_loc * min(K, E_loc) rows on the way
    # back (worst-case receive buffer), bf16.
    a_rows, r_rows = 128 * 2, 8 * 128 * min(2, 16 // 8)
    want = 2 * (a_rows + r_rows) * 256 * 2
    assert stats["auto"].collective_bytes["ragged-all-to-all"] == want
    assert "ragged-all-to-all" not in stats["fixed"].collective_bytes
