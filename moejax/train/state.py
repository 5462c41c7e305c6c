"""Train state, optimizer and sharded state creation.

`TrainState` is a plain pytree (flax.struct dataclass): everything a run needs to continue
bit-for-bit after a restart lives in it (plus the data iterator state, kept by the checkpoint).
The aux-loss-free balancing bias (`moe_state`) sits beside the parameters, not among them: the
optimizer never sees it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from moejax import sharding
from moejax.layers import ModelConfig, Transformer


@struct.dataclass
class TrainState:
    """Everything that changes during training.

    Attributes:
      step: optimizer steps taken (int32 scalar), skipped non-finite steps included.
      params: model parameters (collection "params").
      opt_state: optax state of `make_optimizer`.
      moe_state: collection "moe_state" (router expert biases; {} without them).
      rng: raw PRNG key (uint32 [2]) for per-step randomness (router jitter).
      skipped: steps whose loss or gradients were non-finite and were not applied (int32).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    moe_state: Any
    rng: jax.Array
    skipped: jax.Array


def learning_rate_schedule(opt: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    """Linear warmup to opt.lr over opt.warmup_steps, then cosine to lr * end_lr_ratio.

    The schedule is read at count + 1 so that the first update already has a non-zero rate
    (lr / warmup_steps) instead of spending step 1 at lr = 0.
    """
    decay_steps = opt.get("decay_steps") or total_steps
    warmup = int(opt["warmup_steps"])
    base = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=float(opt["lr"]),
        warmup_steps=warmup,
        decay_steps=max(int(decay_steps), warmup + 1),
        end_value=float(opt["lr"]) * float(opt["end_lr_ratio"]),
    )
    return lambda count: base(count + 1)


def _decay_mask(params: Any) -> Any:
    # Weight decay on matrices only: norms' scales and biases stay undecayed (GPT-2/LLaMA).
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(opt: Mapping[str, Any], total_steps: int) -> optax.GradientTransformation:
    """Gradient clipping by global norm, then AdamW with warmup + cosine decay.

    Args:
      opt: the config's `opt` section (lr, warmup_steps, decay_steps, end_lr_ratio, b1, b2,
        eps, weight_decay, grad_clip).
      total_steps: the run's length (cosine decay length when opt.decay_steps is None).
    """
    chain = []
    if opt["grad_clip"]:
        chain.append(optax.clip_by_global_norm(float(opt["grad_clip"])))
    chain.append(
        optax.adamw(
            learning_rate=learning_rate_schedule(opt, total_steps),
            b1=float(opt["b1"]),
            b2=float(opt["b2"]),
            eps=float(opt["eps"]),
            weight_decay=float(opt["weight_decay"]),
            mask=_decay_mask,
        )
    )
    return optax.chain(*chain)


@dataclasses.dataclass(frozen=True)
class StateSetup:
    """What creating the state fixes: the model, the optimizer, the mesh and the layouts."""

    model_cfg: ModelConfig
    model: Transformer
    tx: optax.GradientTransformation
    mesh: jax.sharding.Mesh
    rules: Any
    state_shardings: TrainState
    batch_sharding: jax.sharding.NamedSharding


def _init_state(model: Transformer, tx, seq_len: int, rng: jax.Array) -> TrainState:
    params_rng, jitter_rng, state_rng = jax.random.split(rng, 3)
    tokens_BxL = jnp.zeros((1, seq_len), jnp.int32)
    variables = model.init(
        {"params": params_rng, "jitter": jitter_rng}, tokens_BxL, deterministic=True
    )
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        moe_state=variables.get("moe_state", {}),
        rng=state_rng,
        skipped=jnp.zeros((), jnp.int32),
    )


def create_train_state(
    model_cfg: ModelConfig,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    rules: Any,
    *,
    seq_len: int,
    seed: int,
) -> tuple[TrainState, StateSetup]:
    """Initialises the train state directly in its sharded layout.

    The Flax lm1b recipe: `jax.eval_shape` gives the abstract state with its logical axis
    names (params and the optimizer moments mirror them), `moejax.sharding.logical_shardings`
    maps those to NamedShardings, and `jax.jit(init, out_shardings=...)` materialises every
    array only as its shards.

    Args:
      model_cfg: the model.
      tx: the optimizer (`make_optimizer`).
      mesh: device mesh (`moejax.sharding.make_mesh`).
      rules: logical axis rules (None = DEFAULT_RULES).
      seq_len: example sequence length for init.
      seed: initialisation seed.

    Returns:
      (state, setup): the TrainState and the objects the step functions are built from.
    """
    _, setup = abstract_train_state(model_cfg, tx, mesh, rules, seq_len=seq_len)
    init = functools.partial(_init_state, setup.model, tx, seq_len)
    with sharding.sharding_context(mesh, rules):
        state = jax.jit(lambda r: sharding.unbox(init(r)), out_shardings=setup.state_shardings)(
            jax.random.PRNGKey(seed)
        )
    return state, setup


def abstract_train_state(
    model_cfg: ModelConfig,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    rules: Any,
    *,
    seq_len: int,
) -> tuple[TrainState, StateSetup]:
    """The train state as ShapeDtypeStructs with their shardings: nothing is materialised.

    What `create_train_state` initialises into, and what an ahead-of-time compile
    (`moejax.compile`) traces the train step with; the mesh may be of devices this process
    cannot run on (a deviceless TPU or GPU topology).

    Args:
      model_cfg, tx, mesh, rules, seq_len: as for `create_train_state`.

    Returns:
      (abstract_state, setup): every leaf a jax.ShapeDtypeStruct carrying its NamedSharding,
      and the StateSetup the step functions are built from.
    """
    model = Transformer(model_cfg)
    init = functools.partial(_init_state, model, tx, seq_len)
    with sharding.sharding_context(mesh, rules):
        boxed = jax.eval_shape(init, jax.ShapeDtypeStruct((2,), jnp.uint32))  # a raw PRNG key
        shardings = sharding.logical_shardings(boxed, mesh, rules)
    setup = StateSetup(
        model_cfg=model_cfg,
        model=model,
        tx=tx,
        mesh=mesh,
        rules=rules,
        state_shardings=shardings,
        batch_sharding=sharding.batch_sharding(mesh, rules),
    )
    return abstract_state(shardings, sharding.unbox(boxed)), setup


def abstract_state(state_shardings: TrainState, state: TrainState) -> TrainState:
    """ShapeDtypeStructs with shardings, the target a checkpoint is restored into."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_shardings
    )


def count_params(params: Any, model_cfg: ModelConfig) -> tuple[int, int]:
    """(total, active) parameter counts; active counts top_k of the routed experts per token.

    Routed-expert weights are the leaves under an `experts` module (names fixed by DESIGN.md).
    """
    total = active = 0
    moe = model_cfg.moe
    for path, leaf in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(params)):
        n = int(leaf.size)
        total += n
        names = [getattr(k, "key", str(k)) for k in path]
        if moe is not None and "experts" in names:
            active += n * moe.top_k // moe.num_experts
        else:
            active += n
    return total, active
