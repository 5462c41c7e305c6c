"""Train state, optimizer and sharded state creation.

`TrainState` is a plain pytree (flax.struct dataclass): everything a run needs to continue
bit-for-bit after a restart lives in it (plus the data iterator state, kept by the checkpoint).
The aux-loss-free balancing bias (`moe_state`) sits beside the parameters, not among them: the
optimizer never sees it. Frozen parameters (`frozen_params`: a quantized model's integer expert
values and their scales) stay among them but the optimizer leaves them as they are and keeps no
state for them.
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


def _dict_keys(path: tuple) -> tuple[str, ...]:
    # The parameter names along a path; flax's metadata boxes add non-dict keys (".value").
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def frozen_params(params: Any) -> Any:
    """Bool tree over `params` (boxed or not): True for what training leaves as it is.

    Integer parameters cannot take a gradient step: they are quantized expert values
    (`moejax.compress.quantize_experts`, int8 `<name>` with a float32 `<name>_scale` beside
    it). Both the values and their scales are frozen, so the quantization grid stays the one
    the model was calibrated with; every other parameter trains.
    """
    leaves = jax.tree_util.tree_leaves_with_path(params)
    ints = {_dict_keys(p) for p, x in leaves if jnp.issubdtype(x.dtype, jnp.integer)}

    def frozen(path, x) -> bool:
        del x
        names = _dict_keys(path)
        if names in ints or not names or not names[-1].endswith("_scale"):
            return names in ints
        return (*names[:-1], names[-1].removesuffix("_scale")) in ints

    return jax.tree_util.tree_map_with_path(frozen, params)


def _is_masked_box(x: Any) -> bool:
    return isinstance(x, nn.meta.AxisMetadata) and isinstance(x.unbox(), optax.MaskedNode)


def with_frozen_params(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` on the trainable parameters; `frozen_params` get zero updates and no state.

    With frozen parameters the state is `optax.partition`'s: `tx`'s state over the trainable
    leaves only (optax.MaskedNode at the frozen ones) and an empty `set_to_zero` state. The
    labels come from the params (update needs them, as AdamW does), not from the updates.
    Without frozen parameters this is `tx` itself: the same state, so checkpoints of float
    models restore as before.
    """

    def partitioned(params):
        frozen = frozen_params(params)
        if not any(jax.tree.leaves(frozen)):
            return None
        labels = jax.tree.map(lambda f: "frozen" if f else "train", frozen)
        return optax.partition({"train": tx, "frozen": optax.set_to_zero()}, labels)

    def init(params):
        split = partitioned(params)
        if split is None:
            return tx.init(params)
        # Masking keeps flax's axis-metadata boxes of boxed params around the MaskedNodes; a
        # box around nothing has nothing to shard (moejax.sharding.logical_shardings).
        return jax.tree.map(
            lambda x: x.unbox() if _is_masked_box(x) else x,
            split.init(params),
            is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
        )

    def update(updates, state, params=None):
        if params is None:
            if isinstance(state, optax.PartitionState):
                raise ValueError("params is required: the frozen parameters are found from them")
            return tx.update(updates, state)
        split = partitioned(params)
        return (tx if split is None else split).update(updates, state, params)

    return optax.GradientTransformation(init, update)


def make_optimizer(opt: Mapping[str, Any], total_steps: int) -> optax.GradientTransformation:
    """Gradient clipping by global norm, then AdamW with warmup + cosine decay, on every
    parameter but the frozen ones (`frozen_params`, `with_frozen_params`).

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
    return with_frozen_params(optax.chain(*chain))


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
