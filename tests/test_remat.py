"""MoE-aware rematerialisation: the checkpoint names of the MoE pipeline and the remat policies
of ModelConfig.remat that save, recompute or offload them (moejax.layers.transformer).

Each policy must give the loss and gradients of remat="none" in every expert layout, and save
exactly the residuals it promises; the residual checks read `print_saved_residuals`, so they
fail when a name is removed from the pipeline.

Legend: B batch, L length, T = B*L tokens, D model width, F expert hidden width, E experts,
K top-k, R dispatched rows.
"""

import collections
import functools
import re

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from moejax.layers import ModelConfig, MoEConfig, Transformer
from moejax.layers.config import REMAT_POLICIES, MoEExecution
from moejax.layers.moe import MoE
from moejax.layers.transformer import remat_policy
from moejax.sharding import make_mesh, sharding_context

B, L, D, F, E, K = 2, 8, 32, 16, 4, 2
# compact: sorted rows and a grouped matmul per MLP matmul; padded: the fused per-tile scan
# (what "auto" runs on CPU); buffers: capacity dispatch, [E, C, D] buffers and einsums.
LAYOUTS = {
    "compact": dict(execution=MoEExecution(gmm_backend="ragged_dot")),
    "padded": dict(execution=MoEExecution(gmm_backend="xla", gmm_tile=8)),
    "buffers": dict(dispatch="capacity"),
}
MOE_POLICIES = ("moe_recompute_act", "moe_save_mlp", "moe_save_dispatch", "moe_offload")
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(B, L)), jnp.int32)


def _cfg(layout: str, remat: str, *, scan_layers: bool = True):
    """One MoE layer (scanned: the path training takes; unrolled: residuals readable by name)."""
    moe = MoEConfig(num_experts=E, top_k=K, d_ff=F, **LAYOUTS[layout])
    return ModelConfig(
        vocab_size=64, d_model=D, num_layers=1, num_heads=4, num_kv_heads=2, d_ff=48,
        max_len=16, moe=moe, remat=remat, scan_layers=scan_layers,
    )  # fmt: skip


@functools.cache
def _variables(layout: str, scan_layers: bool, *, abstract: bool = False):
    """The model's variables; abstract: their ShapeDtypeStructs (enough to trace, no compile)."""
    cfg = _cfg(layout, "none", scan_layers=scan_layers)
    init = jax.eval_shape if abstract else lambda f, *a: jax.jit(f)(*a)
    return nn.meta.unbox(init(Transformer(cfg).init, jax.random.key(0), TOKENS))


def _loss_fn(cfg):
    """A loss touching every logit and the MoE aux loss (router gradients are compared too)."""
    cot = jax.random.normal(jax.random.key(1), (B, L, cfg.vocab_size))

    def loss(variables):
        logits, aux = Transformer(cfg).apply(variables, TOKENS)
        return jnp.sum(logits * cot) + aux["aux_loss"]

    return loss


@functools.cache
def _loss_and_grads(layout: str, remat: str):
    cfg = _cfg(layout, remat)
    return jax.jit(jax.value_and_grad(_loss_fn(cfg)))(_variables(layout, True))


def _assert_trees_close(got, want, rtol=1e-5, atol=1e-6):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("remat", MOE_POLICIES)
def test_policy_gives_the_loss_and_gradients_of_no_remat(layout, remat):
    val, grads = _loss_and_grads(layout, "none")
    rval, rgrads = _loss_and_grads(layout, remat)
    # Recomputation may fuse differently: equal up to float32 rounding.
    np.testing.assert_allclose(rval, val, rtol=1e-6)
    _assert_trees_close(rgrads, grads)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def _saved(layout: str, remat: str, capsys) -> list[str]:
    """The residuals the unrolled model saves for its backward pass, one line each."""
    cfg = _cfg(layout, remat, scan_layers=False)
    capsys.readouterr()
    print_saved_residuals(_loss_fn(cfg), _variables(layout, False, abstract=True))
    return capsys.readouterr().out.strip().splitlines()


def _named(lines: list[str]) -> collections.Counter:
    return collections.Counter(m.group(1) for x in lines if (m := re.search(r"named '(\w+)'", x)))


def _shape(line: str) -> str:
    return re.match(r"\w+(?:<\w+>)?(\[[0-9,]*\])", line).group(1)


# What each policy keeps of the MoE block, by layout: the padded scan's hidden activations carry
# no name (moejax.moe.experts), so there only the rows going in and out can be kept.
_MLP = {"moe_dispatch": 1, "moe_mlpwi": 2, "moe_mlpwo": 1}  # 2 wi outputs: gate and up
_KEPT = {
    "moe_recompute_act": _MLP,
    "moe_save_mlp": _MLP,
    "moe_save_dispatch": {"moe_dispatch": 1},
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_saved_residuals_are_what_each_policy_says(layout, capsys):
    def kept(remat):
        want = _KEPT[remat]
        return {k: v for k, v in want.items() if layout != "padded" or k != "moe_mlpwi"}

    # No remat: the activation outputs are among the residuals (what moe_recompute_act drops).
    if layout != "padded":
        assert _named(_saved(layout, "none", capsys))["moe_act"] == 2
    for remat in ("moe_recompute_act", "moe_save_mlp", "moe_save_dispatch"):
        lines = _saved(layout, remat, capsys)
        assert _named(lines) == kept(remat), (remat, lines)
        dots = [x for x in lines if "output of dot_general" in x]
        # moe_recompute_act also keeps every matmul output (attention, router, head) as "dots".
        assert bool(dots) == (remat == "moe_recompute_act"), (remat, lines)
    # Offload: moe_save_mlp's tensors, moved to host memory, and nothing named left on device.
    offload = _saved(layout, "moe_offload", capsys)
    on_host = [x for x in offload if "<host>" in x]
    mlp = [x for x in _saved(layout, "moe_save_mlp", capsys) if "named 'moe_" in x]
    assert sorted(map(_shape, on_host)) == sorted(map(_shape, mlp)) and on_host
    assert not _named(offload)
    # Full remat: no MoE tensor is kept.
    assert not _named(_saved(layout, "full", capsys))


def _names_in(jaxpr) -> collections.Counter:
    """checkpoint_name names in a jaxpr, sub-jaxprs (scan, remat, shard_map, custom_vjp)
    included."""
    found = collections.Counter()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "name":
            found[eqn.params["name"]] += 1
        for sub in _sub_jaxprs(eqn.params.values()):
            found += _names_in(sub)
    return found


def _sub_jaxprs(values):
    for v in values:
        if isinstance(v, jax.extend.core.ClosedJaxpr):
            yield v.jaxpr
        elif isinstance(v, jax.extend.core.Jaxpr):
            yield v
        elif isinstance(v, tuple | list):
            yield from _sub_jaxprs(v)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_names_its_tensors(layout):
    cfg = MoEConfig(num_experts=E, top_k=K, d_ff=F, **LAYOUTS[layout])
    x = jax.ShapeDtypeStruct((B, L, D), jnp.float32)
    variables = nn.meta.unbox(jax.eval_shape(MoE(cfg, D).init, jax.random.key(1), x))
    names = _names_in(jax.make_jaxpr(MoE(cfg, D).apply)(variables, x).jaxpr)
    want = {"moe_dispatch": 1, "moe_mlpwo": 1, "moe_combine": 1}
    if layout != "padded":
        # gate, up; act(gate) and act(gate) * up.
        want |= {"moe_mlpwi": 2, "moe_act": 2}
    assert names == want


@pytest.mark.parametrize("strategy", ["all_to_all", "all_gather"])
def test_expert_parallel_policy_matches_and_saves_the_named_rows(strategy, capsys):
    execution = MoEExecution(gmm_backend="ragged_dot", expert_parallel=strategy)
    cfg = MoEConfig(num_experts=8, top_k=K, d_ff=F, execution=execution)
    x = jax.random.normal(jax.random.key(0), (8, L, D))
    mesh = make_mesh(data=2, expert=4)
    with sharding_context(mesh):
        variables = nn.meta.unbox(jax.jit(MoE(cfg, D).init)(jax.random.key(1), x))

        def loss(v, x):
            y, aux = MoE(cfg, D).apply(v, x)
            return jnp.sum(y**2) + aux["aux_loss"]

        saving = jax.checkpoint(loss, policy=remat_policy("moe_save_mlp"))
        want = jax.jit(jax.value_and_grad(loss))(variables, x)
        got = jax.jit(jax.value_and_grad(saving))(variables, x)
        for remat in ("moe_save_mlp", "moe_offload"):
            capsys.readouterr()
            print_saved_residuals(jax.checkpoint(loss, policy=remat_policy(remat)), variables, x)
            lines = capsys.readouterr().out.splitlines()
            # The named rows come out of the shard_map (a shard's received rows, their wi
            # outputs, the expert outputs); nothing else inside it is kept.
            rows = [x for x in lines if "output of shard_map" in x]
            assert [_shape(x).split(",")[-1] for x in rows] == [f"{D}]", f"{F}]", f"{F}]", f"{D}]"]
            assert all(("<host>" in x) == (remat == "moe_offload") for x in rows)
    _assert_trees_close(got, want)


def test_every_remat_choice_has_a_policy_and_bad_names_list_the_choices():
    for name in REMAT_POLICIES[1:]:
        policy = remat_policy(name)
        assert name == "full" or callable(policy)
    with pytest.raises(ValueError, match="remat='moe_everything' is invalid") as err:
        _cfg("compact", "moe_everything")
    for name in REMAT_POLICIES:
        assert repr(name) in str(err.value)
    with pytest.raises(ValueError, match="'moe_offload'"):
        remat_policy("none")


def test_offload_compiles_for_tpu_deviceless():
    """moe_offload's transfers compile for a TPU target with the real compiler (no device):
    the offloaded rows get host buffers (memory space S(5)); moe_save_mlp, which keeps the same
    tensors on the device, gets none."""
    pytest.importorskip("libtpu", reason="needs the aot extra (libtpu)")
    from moejax.compile.targets import parse_target, topology

    mesh = jax.sharding.Mesh(topology(parse_target("tpu-v5e-1")).devices[:1], ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    cfg = MoEConfig(num_experts=E, top_k=K, d_ff=F, dispatch="capacity")
    x = jnp.zeros((B, L, D))
    abstract = jax.eval_shape(lambda: nn.meta.unbox(MoE(cfg, D).init(jax.random.key(1), x)))
    args = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), (abstract, x)
    )

    def loss(v, x):
        return jnp.sum(MoE(cfg, D).apply(v, x)[0] ** 2)

    def compiled(remat):
        grad = jax.jit(jax.grad(jax.checkpoint(loss, policy=remat_policy(remat))))
        return grad.trace(*args).lower().compile()

    offload, save = compiled("moe_offload"), compiled("moe_save_mlp")
    assert offload.memory_analysis().host_temp_size_in_bytes > 0
    assert "S(5)" in offload.as_text()
    assert save.memory_analysis().host_temp_size_in_bytes == 0
    assert "S(5)" not in save.as_text()
