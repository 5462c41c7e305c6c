"""Pure train and eval steps.

`train_step(state, batch) -> (state, metrics)` is a pure function of its inputs (the step's
randomness comes from `state.rng`), so it is jitted once with explicit shardings and donated
state, and a restarted run reproduces the uninterrupted one exactly.

Per step:
  loss = mean next-token cross-entropy (nats per token; per byte for byte-level data)
         + aux["aux_loss"] (already weighted by the MoE config's coefficients);
  gradients averaged over `microbatches` equal slices of the batch (gradient accumulation);
  clip + AdamW (the optimizer chain) on every parameter but the frozen ones
  (`moejax.train.state.frozen_params`: a quantized model's integer expert values and their
  scales), whose gradients are zeros and which stay as they are;
  the aux-loss-free expert bias moves toward balance from this step's observed expert load
  (`moejax.layers.router.update_expert_bias`), outside the optimizer;
  a non-finite loss or gradient leaves params, optimizer and bias untouched and counts the step
  in `state.skipped`.

Shape legend: B batch, L sequence length, V vocabulary, M microbatches, E experts,
N number of MoE layers.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from moejax.layers import ModelConfig, Transformer
from moejax.layers.router import set_router_temperature, update_expert_bias
from moejax.moe.routing import router_spec
from moejax.train.state import StateSetup, TrainState, frozen_params

# Aux scalars averaged into the metrics (the model's aux dict, see moejax.layers.Transformer).
_AUX_SCALARS = (
    "aux_loss",
    "load_balance_loss",
    "router_z_loss",
    "dropped_fraction",
    "router_entropy",
    "experts_per_token",
    "null_fraction",
)


BATCH_KEYS = ("tokens", "segment_ids", "loss_mask")


def cross_entropy(
    logits_BxLxV: jax.Array, targets_BxL: jax.Array, weights_BxL: jax.Array | None = None
) -> jax.Array:
    """Mean next-token cross-entropy in nats, computed in float32 whatever the compute dtype;
    with weights, the weighted mean (0 when every weight is 0)."""
    logits = logits_BxLxV.astype(jnp.float32)
    ce_BxL = optax.softmax_cross_entropy_with_integer_labels(logits, targets_BxL)
    if weights_BxL is None:
        return ce_BxL.mean()
    weights_BxL = weights_BxL.astype(jnp.float32)
    return (ce_BxL * weights_BxL).sum() / jnp.maximum(weights_BxL.sum(), 1.0)


def as_batch(batch: jax.Array | Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """A step's batch as a dict: an int array [B, L + 1] (one token stream, no padding) becomes
    {"tokens": it}; a mapping must hold "tokens" [B, L + 1] and may hold "segment_ids"
    [B, L + 1] (0 = padding, equal ids = one packed document) and "loss_mask" [B, L + 1]
    (1 where a token is a target the loss counts, e.g. a completion; 0 e.g. for prompts)."""
    if not isinstance(batch, Mapping):
        return {"tokens": batch}
    unknown = set(batch) - set(BATCH_KEYS)
    if "tokens" not in batch or unknown:
        raise ValueError(
            f"batch keys {sorted(batch)} are invalid: 'tokens' is required, allowed keys are "
            f"{BATCH_KEYS}"
        )
    shape = batch["tokens"].shape
    for k, v in batch.items():
        if v.shape != shape:
            raise ValueError(f"batch[{k!r}] has shape {v.shape}, batch['tokens'] has {shape}")
    return dict(batch)


def model_inputs(
    batch: Mapping[str, jax.Array],
) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array | None]:
    """(inputs [B, L], targets [B, L], input segment ids [B, L] or None, target weights [B, L]
    or None) of an `as_batch` dict. A target counts when it is in the same segment as its
    input (never across a packed document boundary, never padding) and its loss_mask is 1."""
    tokens_BxL1 = batch["tokens"]
    inputs_BxL, targets_BxL = tokens_BxL1[:, :-1], tokens_BxL1[:, 1:]
    segments_BxL1 = batch.get("segment_ids")
    mask_BxL1 = batch.get("loss_mask")
    if segments_BxL1 is None and mask_BxL1 is None:
        return inputs_BxL, targets_BxL, None, None
    weights_BxL = jnp.ones(targets_BxL.shape, bool)
    segments_BxL = None
    if segments_BxL1 is not None:
        segments_BxL = segments_BxL1[:, :-1]
        targets_seg_BxL = segments_BxL1[:, 1:]
        weights_BxL = (targets_seg_BxL == segments_BxL) & (targets_seg_BxL > 0)
    if mask_BxL1 is not None:
        weights_BxL = weights_BxL & (mask_BxL1[:, 1:] > 0)
    return inputs_BxL, targets_BxL, segments_BxL, weights_BxL


def _forward(
    model: Transformer,
    params: Any,
    moe_state: Any,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
) -> tuple[jax.Array, tuple[dict[str, jax.Array], Any]]:
    """Training loss of one (micro)batch and what the step needs besides its gradient."""
    inputs_BxL, targets_BxL, segments_BxL, weights_BxL = model_inputs(batch)
    variables = {"params": params}
    if moe_state:
        variables["moe_state"] = moe_state
    (logits_BxLxV, aux), mutated = model.apply(
        variables,
        inputs_BxL,
        deterministic=False,
        segment_ids=segments_BxL,
        mutable=["moe_stats"],
        # "jitter": router input noise; "router": the draws of random routers.
        rngs={"jitter": rng, "router": jax.random.fold_in(rng, 1)},
    )
    ce = cross_entropy(logits_BxLxV, targets_BxL, weights_BxL)
    loss = ce + aux["aux_loss"]
    metrics = {"loss": loss, "ce_loss": ce, **{k: aux[k] for k in _AUX_SCALARS if k in aux}}
    # [N, E] for N >= 1 MoE layers; dense models report an empty or scalar placeholder.
    if "expert_load" in aux and jnp.ndim(aux["expert_load"]) == 2 and aux["expert_load"].size:
        metrics["expert_load"] = aux["expert_load"]
        for k in ("experts_per_token_layers", "null_fraction_layers"):
            metrics[k] = aux[k]  # [N], logged per layer
    return loss, (metrics, mutated.get("moe_stats", {}))


def _value_and_grad(model: Transformer):
    """value_and_grad of `_forward` w.r.t. the params, with the frozen parameters' gradients
    zeros of their own dtype: integer leaves differentiate to float0 (`allow_int`), and a
    frozen scale's gradient must not count in the gradient norm or the clip."""
    grad_fn = jax.value_and_grad(functools.partial(_forward, model), has_aux=True, allow_int=True)

    def fn(params, *args):
        out, grads = grad_fn(params, *args)
        grads = jax.tree.map(
            lambda g, p, f: jnp.zeros_like(p) if f else g, grads, params, frozen_params(params)
        )
        return out, grads

    return fn


@dataclasses.dataclass(frozen=True)
class BiasUpdate:
    """The aux-loss-free expert-bias update of a model: rate, rule and step-size schedule."""

    rate: float
    rule: str = "sign"
    schedule: str = "constant"

    def rate_at(self, step: jax.Array) -> jax.Array:
        """Step size of the update made by optimizer step `step` (0-based)."""
        if self.schedule == "inv_sqrt":
            return self.rate / jnp.sqrt(step.astype(jnp.float32) + 1.0)
        return jnp.asarray(self.rate, jnp.float32)


def bias_update_rate(model_cfg: ModelConfig) -> BiasUpdate | None:
    """The expert-bias update, or None when the model has no aux-loss-free bias."""
    moe = model_cfg.moe
    if moe is None or not moe.use_expert_bias:
        return None
    return BiasUpdate(moe.bias_update_rate, moe.bias_update, moe.bias_update_schedule)


def temperature_schedule(model_cfg: ModelConfig):
    """step -> router temperature of a model whose router anneals one (router="dts"), else
    None."""
    moe = model_cfg.moe
    if moe is None or router_spec(moe.router).temperature is None:
        return None
    return functools.partial(router_spec(moe.router).temperature, moe)


def train_step(
    state: TrainState,
    tokens_BxL1: jax.Array | Mapping[str, jax.Array],
    *,
    model: Transformer,
    tx: optax.GradientTransformation,
    microbatches: int = 1,
    bias_rate: BiasUpdate | None = None,
    temperature: Any = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a batch of token windows.

    Args:
      state: the TrainState.
      tokens_BxL1: int32 [B, L + 1]; inputs are [:, :-1], targets [:, 1:]. Or a dict with
        segment ids and a loss mask (`as_batch`): attention stays inside segments, padding
        is left out of the loss and of every router statistic, and the cross-entropy is the
        mean over the counted targets.
      tx: the optimizer.
      microbatches: M; B must be divisible by M. Gradients, metrics and expert loads are the
        mean over the M equal slices, which equals the full-batch value for every term that is
        a mean over tokens (cross-entropy, z-loss, load); the switch load-balance loss is a
        product of batch means, so with M > 1 it is computed per microbatch.
      bias_rate: the aux-loss-free expert-bias update (`bias_update_rate`: rate, rule,
        schedule); None leaves `moe_state` as it is.
      temperature: `temperature_schedule(model_cfg)`: the router temperature in `moe_state`
        is set to its value at the new step count (skipped steps count too), so the schedule
        lives in the checkpointed state.

    Returns:
      (new_state, metrics): metrics are float32 scalars (loss, ce_loss, aux terms, grad_norm,
      skipped) plus `expert_load` [N, E] for MoE models with `skipped` 1.0 when this step's
      update was not applied.
    """
    batch_dict = as_batch(tokens_BxL1)
    batch = batch_dict["tokens"].shape[0]
    if batch % microbatches:
        raise ValueError(
            f"train.microbatches={microbatches} is invalid: must divide the batch size {batch}"
        )
    rng, step_rng = jax.random.split(state.rng)
    grad_fn = _value_and_grad(model)

    if microbatches == 1:
        (_, (metrics, moe_stats)), grads = grad_fn(
            state.params, state.moe_state, batch_dict, step_rng
        )
    else:
        tokens_MxBxL1 = jax.tree.map(
            lambda a: a.reshape(microbatches, batch // microbatches, -1), batch_dict
        )
        rngs_M = jax.random.split(step_rng, microbatches)

        def one(carry, xs):
            mb_tokens, mb_rng = xs
            (_, (m, stats)), g = grad_fn(state.params, state.moe_state, mb_tokens, mb_rng)
            # Running sums in float32; divided by M after the scan.
            carry = jax.tree.map(lambda c, x: c + x.astype(jnp.float32), carry, (g, m, stats))
            return carry, None

        zeros = jax.eval_shape(
            lambda: grad_fn(
                state.params,
                state.moe_state,
                jax.tree.map(lambda a: a[0], tokens_MxBxL1),
                rngs_M[0],
            )
        )
        (_, (m_shape, stats_shape)), g_shape = zeros
        init = jax.tree.map(
            lambda s: jnp.zeros(s.shape, jnp.float32), (g_shape, m_shape, stats_shape)
        )
        sums, _ = jax.lax.scan(one, init, (tokens_MxBxL1, rngs_M))
        grads, metrics, moe_stats = jax.tree.map(lambda s: s / microbatches, sums)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    new_moe_state = state.moe_state
    if bias_rate is not None and state.moe_state:
        new_moe_state = update_expert_bias(
            state.moe_state, moe_stats, bias_rate.rate_at(state.step), bias_rate.rule
        )

    def keep_if_finite(new, old):
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    new_moe_state = keep_if_finite(new_moe_state, state.moe_state)
    if temperature is not None:
        new_moe_state = set_router_temperature(new_moe_state, temperature(state.step + 1))
    new_state = TrainState(
        step=state.step + 1,
        params=keep_if_finite(new_params, state.params),
        opt_state=keep_if_finite(new_opt_state, state.opt_state),
        moe_state=new_moe_state,
        rng=rng,
        skipped=state.skipped + (~finite).astype(jnp.int32),
    )
    metrics = {k: v.astype(jnp.float32) for k, v in metrics.items()}
    metrics["grad_norm"] = grad_norm.astype(jnp.float32)
    metrics["skipped"] = (~finite).astype(jnp.float32)
    return new_state, metrics


def eval_step(
    state: TrainState, tokens_BxL1: jax.Array | Mapping[str, jax.Array], *, model: Transformer
) -> dict:
    """Deterministic loss of a batch (an array or an `as_batch` dict): cross-entropy (nats per
    counted target token) and the aux terms."""
    inputs_BxL, targets_BxL, segments_BxL, weights_BxL = model_inputs(as_batch(tokens_BxL1))
    variables = {"params": state.params}
    if state.moe_state:
        variables["moe_state"] = state.moe_state
    logits_BxLxV, aux = model.apply(
        variables, inputs_BxL, deterministic=True, segment_ids=segments_BxL
    )
    metrics = {"ce_loss": cross_entropy(logits_BxLxV, targets_BxL, weights_BxL)}
    metrics.update({k: aux[k].astype(jnp.float32) for k in _AUX_SCALARS if k in aux})
    return metrics


def jit_train_step(setup: StateSetup, microbatches: int = 1):
    """train_step jitted once: explicit in/out shardings, the state donated (updated in place)."""
    fn = functools.partial(
        train_step,
        model=setup.model,
        tx=setup.tx,
        microbatches=microbatches,
        bias_rate=bias_update_rate(setup.model_cfg),
        temperature=temperature_schedule(setup.model_cfg),
    )
    replicated = jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec())
    return jax.jit(
        fn,
        in_shardings=(setup.state_shardings, setup.batch_sharding),
        out_shardings=(setup.state_shardings, replicated),
        donate_argnums=(0,),
    )


def jit_eval_step(setup: StateSetup):
    """eval_step jitted with the state's shardings (not donated: training continues from it)."""
    fn = functools.partial(eval_step, model=setup.model)
    replicated = jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec())
    return jax.jit(
        fn,
        in_shardings=(setup.state_shardings, setup.batch_sharding),
        out_shardings=replicated,
    )
