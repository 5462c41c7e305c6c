"""Routers: which experts process each token, and with what weight.

Legend: T tokens (batch * length, flattened), D model width, E experts, K experts per token,
G expert groups, S experts per group (E // G), C per-expert capacity (expert choice).

All router math (logits, scores, top-k, weights) runs in float32 whatever the activation or
parameter dtype: bfloat16 logits have ~3 significant digits, enough to flip close top-k choices
between otherwise identical runs and to make the softmax of large logits coarse.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.layers.config import MoEConfig
from moejax.layers.losses import expert_load

# DeepSeek-V3 renormalises sigmoid top-k scores by their sum plus this epsilon.
_SIGMOID_NORM_EPS = 1e-20


class RouterOutput(NamedTuple):
    """Token-choice routing decision.

    Attributes:
      weights: [T, K] float32 weights that multiply the selected experts' outputs
        (renormalised if cfg.norm_topk_prob, then times cfg.routed_scaling_factor).
      indices: [T, K] int32 selected experts (chosen with the expert bias, if any), best first.
      probs: [T, E] float32 unbiased scores after cfg.score_func.
      logits: [T, E] float32 router logits x @ kernel.
    """

    weights: jax.Array
    indices: jax.Array
    probs: jax.Array
    logits: jax.Array


class ExpertChoiceOutput(NamedTuple):
    """Expert-choice routing decision.

    Attributes:
      weights: [E, C] float32 score of each selected token for that expert (times
        cfg.routed_scaling_factor).
      token_indices: [E, C] int32 tokens each expert takes, best first.
      probs: [T, E] float32 scores after cfg.score_func.
      logits: [T, E] float32 router logits.
    """

    weights: jax.Array
    token_indices: jax.Array
    probs: jax.Array
    logits: jax.Array


def router_scores(logits_TxE: jax.Array, score_func: str) -> jax.Array:
    """float32 scores from router logits: softmax over experts or elementwise sigmoid."""
    logits_TxE = logits_TxE.astype(jnp.float32)
    if score_func == "softmax":
        return jax.nn.softmax(logits_TxE, axis=-1)
    if score_func == "sigmoid":
        return jax.nn.sigmoid(logits_TxE)
    raise ValueError(
        f"score_func={score_func!r} is invalid: allowed values are 'softmax', 'sigmoid'"
    )


def group_limited_mask(sel_TxE: jax.Array, n_groups: int, topk_groups: int) -> jax.Array:
    """DeepSeek-V3 group limit: bool [T, E], True for experts in each token's kept groups.

    Experts form n_groups contiguous groups of S = E // n_groups. A group's score is the sum of
    its two best selection scores (its only score when S == 1); the topk_groups best groups are
    kept. Limiting each token to a few groups bounds how many devices it is sent to when groups
    map to devices.
    """
    num_tokens, num_experts = sel_TxE.shape
    per_group = num_experts // n_groups
    sel_TxGxS = sel_TxE.reshape(num_tokens, n_groups, per_group)
    group_scores_TxG = jax.lax.top_k(sel_TxGxS, min(2, per_group))[0].sum(axis=-1)
    _, kept_TxG = jax.lax.top_k(group_scores_TxG, topk_groups)
    keep_TxG = jax.nn.one_hot(kept_TxG, n_groups, dtype=jnp.int32).sum(axis=1) > 0
    return jnp.repeat(keep_TxG, per_group, axis=1)


def topk_route(
    logits_TxE: jax.Array, cfg: MoEConfig, expert_bias_E: jax.Array | None = None
) -> RouterOutput:
    """Token-choice top-k routing from logits (the pure core of TopKRouter).

    Args:
      logits_TxE: router logits (cast to float32).
      cfg: score_func, top_k, n_groups/topk_groups, norm_topk_prob, routed_scaling_factor.
      expert_bias_E: optional aux-loss-free bias, added to the scores for selection only.

    Returns:
      RouterOutput; the weights come from the unbiased scores.
    """
    logits_TxE = logits_TxE.astype(jnp.float32)
    probs_TxE = router_scores(logits_TxE, cfg.score_func)
    # Selection is discrete: no gradient flows through it, only through the gathered weights.
    sel_TxE = jax.lax.stop_gradient(probs_TxE)
    if expert_bias_E is not None:
        sel_TxE = sel_TxE + expert_bias_E.astype(jnp.float32)
    if cfg.n_groups > 1:
        keep_TxE = group_limited_mask(sel_TxE, cfg.n_groups, cfg.topk_groups)
        # -inf (not DeepSeek's 0.0) so that a kept expert pushed below 0 by its bias still ranks
        # above every masked one.
        sel_TxE = jnp.where(keep_TxE, sel_TxE, -jnp.inf)
    _, indices_TxK = jax.lax.top_k(sel_TxE, cfg.top_k)
    weights_TxK = jnp.take_along_axis(probs_TxE, indices_TxK, axis=-1)
    if cfg.norm_topk_prob:
        denom_Tx1 = weights_TxK.sum(axis=-1, keepdims=True)
        if cfg.score_func == "sigmoid":
            denom_Tx1 = denom_Tx1 + _SIGMOID_NORM_EPS
        weights_TxK = weights_TxK / denom_Tx1
    weights_TxK = weights_TxK * cfg.routed_scaling_factor
    return RouterOutput(weights_TxK, indices_TxK.astype(jnp.int32), probs_TxE, logits_TxE)


def _router_logits(
    module: nn.Module,
    x_TxD: jax.Array,
    num_experts: int,
    jitter_eps: float,
    deterministic: bool,
    kernel_init: Callable,
    param_dtype: Any,
) -> jax.Array:
    """Shared by both routers: float32 logits x @ kernel, with train-time multiplicative jitter."""
    if x_TxD.ndim != 2:
        raise ValueError(f"{type(module).__name__} expects x of shape [T, D], got {x_TxD.shape}")
    init = nn.with_logical_partitioning(kernel_init, ("embed", "unmodeled"))
    kernel_DxE = module.param("kernel", init, (x_TxD.shape[-1], num_experts), param_dtype)
    x_TxD = x_TxD.astype(jnp.float32)
    if not deterministic and jitter_eps > 0:
        if not module.has_rng("jitter"):
            raise ValueError(
                f"{type(module).__name__}: jitter_eps={jitter_eps} with deterministic=False needs "
                "an rng stream 'jitter', e.g. apply(..., rngs={'jitter': key})"
            )
        noise_TxD = jax.random.uniform(
            module.make_rng("jitter"), x_TxD.shape, jnp.float32, 1.0 - jitter_eps, 1.0 + jitter_eps
        )
        x_TxD = x_TxD * noise_TxD
    # HIGHEST: TPUs/GPUs otherwise run float32 dots in bf16/tf32 passes, which defeats the point.
    return jnp.dot(x_TxD, kernel_DxE.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


class TopKRouter(nn.Module):
    """Token-choice top-k router (softmax/sigmoid, group-limited, expert bias, jitter).

    Variables: params `kernel` [D, E] (logical axes "embed", "unmodeled"); with
    cfg.use_expert_bias, `expert_bias` [E] float32 in collection "moe_state" (zeros at init,
    changed only by `update_expert_bias`); when collection "moe_stats" is mutable (and not at
    init), `expert_load` [E] float32 there: the fraction of this call's T * K assignments per
    expert, which `update_expert_bias` reads.

    Attributes:
      cfg: the MoE block config.
      dtype: activation dtype of the enclosing block; the router itself always computes in float32.
      param_dtype: storage dtype of `kernel`.
      kernel_init: initializer of `kernel`.
    """

    cfg: MoEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x_TxD: jax.Array, *, deterministic: bool) -> RouterOutput:
        """Routes each token to cfg.top_k experts.

        Args:
          x_TxD: tokens, any float dtype.
          deterministic: True disables jitter (eval); False applies it (needs rng "jitter").

        Returns:
          RouterOutput with weights/indices [T, K] and probs/logits [T, E], all float32/int32.
        """
        cfg = self.cfg
        logits_TxE = _router_logits(
            self,
            x_TxD,
            cfg.num_experts,
            cfg.jitter_eps,
            deterministic,
            self.kernel_init,
            self.param_dtype,
        )
        bias_E = None
        if cfg.use_expert_bias:
            bias_E = self.variable(
                "moe_state", "expert_bias", jnp.zeros, (cfg.num_experts,), jnp.float32
            ).value
        out = topk_route(logits_TxE, cfg, bias_E)
        if self.is_mutable_collection("moe_stats") and not self.is_initializing():
            load = self.variable(
                "moe_stats", "expert_load", jnp.zeros, (cfg.num_experts,), jnp.float32
            )
            load.value = expert_load(out.indices, cfg.num_experts)
        return out


class ExpertChoiceRouter(nn.Module):
    """Expert-choice router (Zhou et al. 2022): each expert takes its top-C tokens.

    Scores are cfg.score_func over the experts for each token (softmax in the paper); expert e
    takes the C tokens with the highest score for e, with C = cfg.capacity(T, train=not
    deterministic) (so cfg.top_k is the mean number of experts per token), capped at T. Load is
    balanced by construction, but a token may be taken by several experts or by none.

    Expert choice ranks all T tokens of the batch against each other, so in a causal language
    model a token's routing depends on later tokens (and on the other sequences of the batch):
    training leaks future information and autoregressive decoding cannot reproduce it.

    Variables: params `kernel` [D, E] (logical axes "embed", "unmodeled"). The expert bias and
    group limit are token-choice features and are rejected; cfg.norm_topk_prob does not apply.

    Attributes:
      cfg: the MoE block config.
      dtype: activation dtype of the enclosing block; the router itself always computes in float32.
      param_dtype: storage dtype of `kernel`.
      kernel_init: initializer of `kernel`.
    """

    cfg: MoEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x_TxD: jax.Array, *, deterministic: bool) -> ExpertChoiceOutput:
        """Lets every expert pick its tokens.

        Args:
          x_TxD: tokens, any float dtype.
          deterministic: selects the eval capacity factor and disables jitter.

        Returns:
          ExpertChoiceOutput with weights/token_indices [E, C] and probs/logits [T, E].
        """
        cfg = self.cfg
        if cfg.use_expert_bias:
            raise ValueError(
                "MoEConfig.use_expert_bias=True is not supported with router='expert_choice' "
                "(expert choice is balanced by construction); set use_expert_bias=False"
            )
        if cfg.n_groups > 1:
            raise ValueError(
                f"MoEConfig.n_groups={cfg.n_groups} is not supported with "
                "router='expert_choice'; allowed value is 1"
            )
        logits_TxE = _router_logits(
            self,
            x_TxD,
            cfg.num_experts,
            cfg.jitter_eps,
            deterministic,
            self.kernel_init,
            self.param_dtype,
        )
        num_tokens = x_TxD.shape[0]
        capacity = min(cfg.capacity(num_tokens, train=not deterministic), num_tokens)
        probs_TxE = router_scores(logits_TxE, cfg.score_func)
        weights_ExC, token_indices_ExC = jax.lax.top_k(probs_TxE.T, capacity)
        weights_ExC = weights_ExC * cfg.routed_scaling_factor
        return ExpertChoiceOutput(
            weights_ExC, token_indices_ExC.astype(jnp.int32), probs_TxE, logits_TxE
        )


def update_expert_bias(moe_state: Any, moe_stats: Any, rate: float | jax.Array) -> Any:
    """Aux-loss-free balancing step (DeepSeek-V3): b += rate * sign(mean(load) - load).

    Pure and tree-wise: every `expert_bias` leaf of moe_state is updated from the `expert_load`
    leaf at the same path in moe_stats (the same module path, other leaf name). Leaves may be
    stacked, e.g. [layers, E] from nn.scan: the mean is over the last (expert) axis. Underloaded
    experts get a higher bias and so are selected more often; other leaves pass through.

    Args:
      moe_state: the "moe_state" collection (nested dicts / FrozenDicts).
      moe_stats: the "moe_stats" collection returned by apply(..., mutable=["moe_stats"]).
      rate: step size u (cfg.bias_update_rate).

    Returns:
      A new moe_state of the same structure.
    """

    def walk(state: Mapping, stats: Any, path: tuple[str, ...]) -> Mapping:
        if not isinstance(stats, Mapping):
            raise ValueError(
                f"update_expert_bias: moe_stats has no entry at {'/'.join(path) or '<root>'} "
                "(was the forward run with mutable=['moe_stats']?)"
            )
        new = {}
        for name, value in state.items():
            if isinstance(value, Mapping):
                new[name] = walk(value, stats.get(name), (*path, name))
            elif name == "expert_bias":
                load = stats.get("expert_load")
                where = "/".join((*path, "expert_load"))
                if load is None:
                    raise ValueError(
                        f"update_expert_bias: moe_stats has no {where} "
                        "(was the forward run with mutable=['moe_stats']?)"
                    )
                if load.shape != value.shape:
                    raise ValueError(
                        f"update_expert_bias: {where} has shape {load.shape}, "
                        f"expert_bias has {value.shape}"
                    )
                load = load.astype(jnp.float32)
                step = jnp.sign(load.mean(axis=-1, keepdims=True) - load)
                new[name] = (value + rate * step).astype(value.dtype)
            else:
                new[name] = value
        return type(state)(new)

    return walk(moe_state, moe_stats, ())
