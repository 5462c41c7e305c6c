"""Mesh construction, logical rules, sharded init and batch helpers on 8 fake CPU devices."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moejax.sharding import (
    DEFAULT_RULES,
    batch_sharding,
    global_batch,
    init_sharded,
    initialize_distributed,
    logical_shardings,
    make_mesh,
    sharding_context,
    validate_rules,
)


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        ({}, (8, 1, 1, 1)),
        ({"fsdp": 8, "data": 1}, (1, 8, 1, 1)),
        ({"expert": 4}, (2, 1, 4, 1)),
        ({"data": 2, "expert": -1}, (2, 1, 4, 1)),
        ({"fsdp": 2, "expert": 2, "tensor": 2, "data": -1}, (1, 2, 2, 2)),
    ],
)
def test_make_mesh_shapes(kwargs, shape):
    mesh = make_mesh(**kwargs)
    assert mesh.axis_names == ("data", "fsdp", "expert", "tensor")
    assert tuple(mesh.shape.values()) == shape
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"data": 3}, "data"),
        ({"expert": 3}, "expert=-1 cannot|data=-1 cannot"),
        ({"data": -1, "tensor": -1}, "only one mesh axis"),
        ({"fsdp": 0}, "fsdp"),
        ({"data": 2, "expert": 2}, "expert"),
    ],
)
def test_make_mesh_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_mesh(**kwargs)


def test_make_mesh_device_subset():
    mesh = make_mesh(data=2, expert=2, devices=jax.devices()[:4])
    assert mesh.devices.size == 4


def test_make_mesh_splits_physical_axes_where_it_must():
    """fsdp=8 x expert=8 on v5p's 4x4x4 torus (64 chips, deviceless): no 8-way axis is a product
    of whole physical axes, so jax.make_mesh fails and make_mesh splits one."""
    pytest.importorskip("libtpu", reason="needs the aot extra (libtpu)")
    from moejax.compile.targets import parse_target, topology

    devices = topology(parse_target("tpu-v5p-128")).devices
    assert len(devices) == 64
    with pytest.raises(NotImplementedError):
        jax.make_mesh((1, 8, 8, 1), ("data", "fsdp", "expert", "tensor"), devices=devices)
    mesh = make_mesh(data=1, fsdp=8, expert=8, devices=devices)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "expert": 8, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert {d.id for d in mesh.devices.flat} == {d.id for d in devices}
    # Each expert group is a compact block of the torus (a 2x4 or 4x2 plane), not a scatter.
    for group in mesh.devices[0, :, :, 0]:
        coords = np.array([d.coords for d in group])
        assert sorted(len(set(c)) for c in coords.T) == [1, 2, 4], coords
    # Where jax.make_mesh can place the axes, its device order is kept.
    want = jax.make_mesh((4, 16, 1, 1), ("data", "fsdp", "expert", "tensor"), devices=devices)
    got = make_mesh(data=4, fsdp=16, devices=devices)
    assert [d.id for d in got.devices.flat] == [d.id for d in want.devices.flat]


def test_validate_rules():
    assert validate_rules(DEFAULT_RULES) == DEFAULT_RULES
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        validate_rules((("embed", "model"),))
    with pytest.raises(ValueError, match="pair"):
        validate_rules((("embed",),))


class _Toy(nn.Module):
    """Parameters with the plan's logical names, plus an activation constraint."""

    @nn.compact
    def __call__(self, x_BxLxD):
        init = nn.initializers.normal(1.0)
        emb = self.param("emb", nn.with_logical_partitioning(init, ("vocab", "embed")), (16, 8))
        w_ExDxF = self.param(
            "wi", nn.with_logical_partitioning(init, ("exp", "embed_moe", "mlp_moe")), (8, 8, 4)
        )
        kv = self.param(
            "kv", nn.with_logical_partitioning(init, ("embed", "kv_heads", "head_dim")), (8, 3, 2)
        )
        self.variable("moe_state", "bias", jnp.zeros, (8,))
        h_BxLxD = nn.with_logical_constraint(x_BxLxD @ emb.T @ emb, ("batch", "length", "embed"))
        return jnp.einsum("bld,edf->blef", h_BxLxD, w_ExDxF).sum() + kv.sum()


def test_logical_shardings_and_init_sharded():
    mesh = make_mesh(data=1, fsdp=2, expert=2, tensor=2)
    x = jnp.ones((4, 3, 8))
    model = _Toy()
    init_fn = functools.partial(model.init)
    abstract = jax.eval_shape(init_fn, jax.random.key(0), x)
    shardings = logical_shardings(abstract, mesh, DEFAULT_RULES)
    assert shardings["params"]["emb"].spec == P("tensor", "fsdp")
    assert shardings["params"]["wi"].spec == P("expert", "fsdp", "tensor")
    # 3 kv heads do not divide tensor=2: that dim falls back to replicated.
    assert shardings["params"]["kv"].spec == P("fsdp", None, None)
    assert shardings["moe_state"]["bias"].spec == P()

    variables, out_shardings = init_sharded(init_fn, mesh, None, jax.random.key(0), x)
    reference = nn.meta.unbox(model.init(jax.random.key(0), x))
    for got, want, sh in zip(
        jax.tree.leaves(variables),
        jax.tree.leaves(reference),
        jax.tree.leaves(out_shardings),
        strict=True,
    ):
        assert got.sharding.is_equivalent_to(sh, got.ndim)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    wi = variables["params"]["wi"]
    assert {s.data.shape for s in wi.addressable_shards} == {(4, 4, 2)}


def test_activation_constraint_in_context():
    mesh = make_mesh(data=2, fsdp=2, expert=2)
    x = jnp.ones((8, 3, 8))
    variables, _ = init_sharded(_Toy().init, mesh, None, jax.random.key(0), x)

    def hidden(x_BxLxD):
        return nn.with_logical_constraint(x_BxLxD * 2.0, ("batch", "length", "embed"))

    with sharding_context(mesh):
        y = jax.jit(hidden)(x)
        out = jax.jit(_Toy().apply)(variables, x)
    # batch takes data, fsdp and expert; embed's fsdp is then taken, so embed is replicated.
    want = jax.sharding.NamedSharding(mesh, P(("data", "fsdp", "expert"), None, None))
    assert y.sharding.is_equivalent_to(want, 3)
    np.testing.assert_allclose(out, _Toy().apply(variables, x), rtol=1e-5)


def test_batch_helpers():
    mesh = make_mesh(data=2, expert=4)
    assert batch_sharding(mesh).spec == P(("data", "fsdp", "expert"), None)
    tokens = np.arange(8 * 5).reshape(8, 5)
    batch = global_batch({"tokens": tokens}, mesh)
    assert batch["tokens"].shape == (8 * jax.process_count(), 5)
    assert {s.data.shape for s in batch["tokens"].addressable_shards} == {(1, 5)}
    np.testing.assert_array_equal(np.asarray(batch["tokens"]), tokens)


def test_initialize_distributed_single_process(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
    monkeypatch.delenv("MEGASCALE_COORDINATOR_ADDRESS", raising=False)
    monkeypatch.delenv("MOEJAX_DISTRIBUTED", raising=False)
    assert initialize_distributed() is False
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert initialize_distributed() is False
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("MOEJAX_DISTRIBUTED", "0")  # explicit opt-out wins over detection
    assert initialize_distributed() is False
