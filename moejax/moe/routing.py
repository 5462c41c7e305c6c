"""Routing: which experts process each token, and with what weight (stage 1 of the pipeline).

Every router is a pure function from float32 logits to a `Routing`, token-major with a static
bound K_max on the experts per token; an index >= E means "no expert" (a null expert's pick, or
a place the token does not use):

    route(logits_TxE, cfg, *, bias_E, key, capacity) -> Routing

and one row of `ROUTERS` says what else it needs (an rng stream, its K_max, whether it is token
choice, which configs it rejects). Adding a router is that function and that row; the plans,
the experts, the combine, the losses and expert parallelism read only the `Routing`.

All router math (logits, scores, top-k, weights) runs in float32 whatever the activation or
parameter dtype: bfloat16 logits have ~3 significant digits, enough to flip close top-k choices
between otherwise identical runs and to make the softmax of large logits coarse.

Legend: T tokens (batch * length, flattened), E experts, K experts per token (K_max: its static
bound), G expert groups, S experts per group (E // G), C per-expert capacity (expert choice).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp

if TYPE_CHECKING:  # moejax.layers.config imports this module (the router table)
    from moejax.layers.config import MoEConfig

# DeepSeek-V3 renormalises sigmoid top-k scores by their sum plus this epsilon.
_SIGMOID_NORM_EPS = 1e-20


class Routing(NamedTuple):
    """A routing decision, token-major.

    Attributes:
      weights: [T, K_max] float32 combine weights of the chosen experts (0 where no expert).
      indices: [T, K_max] int32 chosen places. An entry < E is a real expert; E + j is null
        expert j (AdaMoE, j < m = cfg.num_null_experts); E + m fills the places a token does not
        use. Every entry >= E means "no expert": no row, no compute, nothing combined. Token
        choice lists them best first.
      probs: [T, E + m] float32 unbiased scores after cfg.score_func (what the losses read).
      logits: [T, E + m] float32 router logits (the null experts' last).
      experts_per_token: [T] int32 real experts chosen for each token (entries < E).
      valid: [T] bool, False for the tokens that take no part (padding, see `mask_routing`):
        routed nowhere and left out of every loss and statistic; None = every token.
    """

    weights: jax.Array
    indices: jax.Array
    probs: jax.Array
    logits: jax.Array
    experts_per_token: jax.Array
    valid: jax.Array | None = None


def _routing(weights_TxK, indices_TxK, probs_TxE, logits_TxE, num_experts: int) -> Routing:
    indices_TxK = indices_TxK.astype(jnp.int32)
    count_T = (indices_TxK < num_experts).sum(axis=-1, dtype=jnp.int32)
    return Routing(weights_TxK, indices_TxK, probs_TxE, logits_TxE, count_T)


def mask_routing(routing: Routing, valid_T: jax.Array | None) -> Routing:
    """`routing` with the tokens where valid_T is False (padding) routed nowhere.

    Their places all hold the unused sentinel E + m with weight 0, so they compute nothing and
    take no capacity slot, and `valid` is recorded for the losses and statistics that average
    over tokens. valid_T None returns `routing` unchanged.
    """
    if valid_T is None:
        return routing
    valid_T = valid_T.astype(bool)
    keep_Tx1 = valid_T[:, None]
    unused = routing.probs.shape[-1]
    return Routing(
        jnp.where(keep_Tx1, routing.weights, 0.0),
        jnp.where(keep_Tx1, routing.indices, unused).astype(jnp.int32),
        routing.probs,
        routing.logits,
        jnp.where(valid_T, routing.experts_per_token, 0),
        valid_T,
    )


def token_mean(values_T: jax.Array, valid_T: jax.Array | None) -> jax.Array:
    """float32 mean of per-token values (any shape) over the valid tokens (valid_T: bool of the
    same shape; all tokens when None; 0 when none is valid)."""
    values_T = values_T.astype(jnp.float32)
    if valid_T is None:
        return values_T.mean()
    weight_T = valid_T.astype(jnp.float32)
    return (values_T * weight_T).sum() / jnp.maximum(weight_T.sum(), 1.0)


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


def _pick_top_k(sel_TxE, probs_TxE, logits_TxE, cfg: MoEConfig) -> Routing:
    """Token choice: the top_k places by selection score, weighted by their unbiased scores
    (renormalised over the real experts when cfg.norm_topk_prob, then scaled by
    cfg.routed_scaling_factor). A null-expert pick weighs 0."""
    _, indices_TxK = jax.lax.top_k(sel_TxE, cfg.top_k)
    nulls = cfg.num_null_experts > 0  # static: with m = 0 this is exactly plain top-k
    if nulls and cfg.norm_topk_prob and cfg.score_func == "softmax":
        # Renormalised over the real picks, softmax weights are a softmax over those picks'
        # logits alone; computed so, the null logits get no gradient from the weights (through
        # p_i / sum_j p_j they would get terms that cancel only up to rounding).
        real_TxK = indices_TxK < cfg.num_experts
        logit_TxK = jnp.where(real_TxK, jnp.take_along_axis(logits_TxE, indices_TxK, -1), 0.0)
        top_Tx1 = jnp.max(jnp.where(real_TxK, logit_TxK, -jnp.inf), axis=-1, keepdims=True)
        top_Tx1 = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top_Tx1), top_Tx1, 0.0))
        exp_TxK = jnp.where(real_TxK, jnp.exp(jnp.where(real_TxK, logit_TxK - top_Tx1, 0.0)), 0.0)
        total_Tx1 = exp_TxK.sum(axis=-1, keepdims=True)
        weights_TxK = exp_TxK / jnp.where(total_Tx1 > 0, total_Tx1, 1.0)
        weights_TxK = weights_TxK * cfg.routed_scaling_factor
        return _routing(weights_TxK, indices_TxK, probs_TxE, logits_TxE, cfg.num_experts)
    weights_TxK = jnp.take_along_axis(probs_TxE, indices_TxK, axis=-1)
    if nulls:
        weights_TxK = jnp.where(indices_TxK < cfg.num_experts, weights_TxK, 0.0)
    if cfg.norm_topk_prob:
        denom_Tx1 = weights_TxK.sum(axis=-1, keepdims=True)
        if cfg.score_func == "sigmoid":
            denom_Tx1 = denom_Tx1 + _SIGMOID_NORM_EPS
        if nulls:
            # A token whose picks are all null has nothing to renormalise: its weights stay 0.
            denom_Tx1 = jnp.where(denom_Tx1 > 0, denom_Tx1, 1.0)
        weights_TxK = weights_TxK / denom_Tx1
    weights_TxK = weights_TxK * cfg.routed_scaling_factor
    return _routing(weights_TxK, indices_TxK, probs_TxE, logits_TxE, cfg.num_experts)


def topk_route(
    logits_TxE: jax.Array,
    cfg: MoEConfig,
    expert_bias_E: jax.Array | None = None,
    *,
    key: jax.Array | None = None,
    capacity: int | None = None,
) -> Routing:
    """Token-choice top-k routing (softmax/sigmoid, group-limited, expert bias, null experts).

    With m = cfg.num_null_experts > 0 (AdaMoE, "Token-Adaptive Routing with Null Experts"), the
    scores and the top-k run over E + m places, the null experts' logits last; a null pick is
    index E + j, computes nothing and weighs 0, so a token spends between 0 and top_k experts.

    Args:
      logits_TxE: router logits [T, E + m] (cast to float32).
      cfg: score_func, top_k, n_groups/topk_groups, norm_topk_prob, routed_scaling_factor.
      expert_bias_E: optional aux-loss-free bias, added to the scores for selection only.
      key, capacity: unused (the router-table signature).

    Returns:
      Routing with K_max = top_k and no sentinel; the weights come from the unbiased scores.
    """
    del key, capacity
    logits_TxE = logits_TxE.astype(jnp.float32)
    probs_TxE = router_scores(logits_TxE, cfg.score_func)
    # Selection is discrete: no gradient flows through it, only through the gathered weights.
    sel_TxE = jax.lax.stop_gradient(probs_TxE)
    if expert_bias_E is not None:
        bias = expert_bias_E.astype(jnp.float32)
        sel_TxE = sel_TxE + jnp.pad(bias, (0, cfg.num_null_experts))  # null experts: no bias
    if cfg.n_groups > 1:
        keep_TxE = group_limited_mask(sel_TxE, cfg.n_groups, cfg.topk_groups)
        # -inf (not DeepSeek's 0.0) so that a kept expert pushed below 0 by its bias still ranks
        # above every masked one.
        sel_TxE = jnp.where(keep_TxE, sel_TxE, -jnp.inf)
    return _pick_top_k(sel_TxE, probs_TxE, logits_TxE, cfg)


def random_route(
    logits_TxE: jax.Array,
    cfg: MoEConfig,
    expert_bias_E: jax.Array | None = None,
    *,
    key: jax.Array | None,
    capacity: int | None = None,
) -> Routing:
    """Uniformly random token choice: each token takes top_k distinct experts at random.

    What MaxText and Megatron offer to benchmark expert parallelism under perfectly balanced
    load in expectation. The selection ignores the logits; the weights are still the router's
    scores at the chosen experts (renormalised as for top-k), so the router keeps learning and
    the losses keep their meaning.

    Args:
      logits_TxE: router logits (cast to float32).
      cfg: score_func, top_k, norm_topk_prob, routed_scaling_factor.
      expert_bias_E: unused (rejected by the table's validate).
      key: PRNG key of the draw; the Router module passes rng stream "router" in training and a
        fixed key in evaluation, so evaluation is repeatable.
      capacity: unused.

    Returns:
      Routing with K_max = top_k and no sentinel.
    """
    del expert_bias_E, capacity
    if key is None:
        raise ValueError("router='random' needs a PRNG key")
    logits_TxE = logits_TxE.astype(jnp.float32)
    probs_TxE = router_scores(logits_TxE, cfg.score_func)
    # top-k of iid uniforms is a uniformly random k-subset, in random order.
    draw_TxE = jax.random.uniform(key, logits_TxE.shape, jnp.float32)
    return _pick_top_k(draw_TxE, probs_TxE, logits_TxE, cfg)


def _kept_places(gate_TxE, indices_TxK, keep_TxK, probs_TxE, logits_TxE, cfg: MoEConfig) -> Routing:
    """Routing of a token-choice router that keeps a prefix of its ranked places (top-p, DTS):
    weights are gate_TxE at the kept places (renormalised over them when cfg.norm_topk_prob,
    times cfg.routed_scaling_factor); the other places hold E, weight 0."""
    gathered_TxK = jnp.take_along_axis(gate_TxE, indices_TxK, axis=-1)
    weights_TxK = jnp.where(keep_TxK, gathered_TxK, 0.0)
    if cfg.norm_topk_prob:
        weights_TxK = weights_TxK / weights_TxK.sum(axis=-1, keepdims=True)
    weights_TxK = weights_TxK * cfg.routed_scaling_factor
    indices_TxK = jnp.where(keep_TxK, indices_TxK, cfg.num_experts)
    return _routing(weights_TxK, indices_TxK, probs_TxE, logits_TxE, cfg.num_experts)


def top_p_route(
    logits_TxE: jax.Array,
    cfg: MoEConfig,
    expert_bias_E: jax.Array | None = None,
    *,
    key: jax.Array | None = None,
    capacity: int | None = None,
) -> Routing:
    """Top-p routing ("Harder Tasks Need More Experts: Dynamic Routing in MoE Models").

    Each token keeps the shortest prefix of its experts, sorted by score, whose cumulative
    (per-token normalised) score reaches cfg.top_p (the expert that crosses it is kept),
    truncated to cfg.max_k. Weights are the kept experts' scores, renormalised over them when
    cfg.norm_topk_prob, times cfg.routed_scaling_factor.

    Args:
      logits_TxE: router logits.
      cfg: score_func, top_p, max_k, norm_topk_prob, routed_scaling_factor.
      expert_bias_E, key, capacity: unused (the table rejects the bias).

    Returns:
      Routing with K_max = max_k; unused places hold E (no expert), weight 0.
    """
    del expert_bias_E, key, capacity
    logits_TxE = logits_TxE.astype(jnp.float32)
    probs_TxE = router_scores(logits_TxE, cfg.score_func)
    sel_TxE = jax.lax.stop_gradient(probs_TxE)
    top_TxK, indices_TxK = jax.lax.top_k(sel_TxE, cfg.max_k)
    # Sigmoid scores need not sum to 1: the threshold is on the per-token normalised scores.
    share_TxK = top_TxK / sel_TxE.sum(axis=-1, keepdims=True)
    before_TxK = jnp.cumsum(share_TxK, axis=-1) - share_TxK
    keep_TxK = before_TxK < cfg.top_p  # the first place always (0 < top_p)
    return _kept_places(probs_TxE, indices_TxK, keep_TxK, probs_TxE, logits_TxE, cfg)


def expert_choice_route(
    logits_TxE: jax.Array,
    cfg: MoEConfig,
    expert_bias_E: jax.Array | None = None,
    *,
    key: jax.Array | None = None,
    capacity: int | None,
    valid_T: jax.Array | None = None,
) -> Routing:
    """Expert-choice routing (Zhou et al. 2022): each expert takes its top-C tokens.

    Scores are cfg.score_func over the experts for each token (softmax in the paper); expert e
    takes the C tokens with the highest score for e (C = capacity, so cfg.top_k is the mean
    number of experts per token). Load is balanced by construction, but a token may be taken by
    several experts or by none.

    Expert choice ranks all T tokens of the batch against each other, so in a causal language
    model a token's routing depends on later tokens (and on the other sequences of the batch):
    training leaks future information and autoregressive decoding cannot reproduce it.

    Args:
      logits_TxE: router logits.
      cfg: score_func, routed_scaling_factor.
      expert_bias_E, key: unused.
      capacity: C, at most T.
      valid_T: bool [T], False for tokens no expert may take (padding): they rank below every
        valid token, so they fill a slot only when an expert has more slots than valid tokens
        (and the Router's `mask_routing` then empties it); None = all tokens.

    Returns:
      Routing with K_max = E: place e of token t holds e if expert e took t (weight: its score
      times routed_scaling_factor), else the sentinel E (weight 0).
    """
    del expert_bias_E, key
    num_tokens, num_experts = logits_TxE.shape
    logits_TxE = logits_TxE.astype(jnp.float32)
    probs_TxE = router_scores(logits_TxE, cfg.score_func)
    sel_TxE = jax.lax.stop_gradient(probs_TxE)
    if valid_T is not None:
        sel_TxE = jnp.where(valid_T[:, None], sel_TxE, -jnp.inf)
    _, token_ExC = jax.lax.top_k(sel_TxE.T, capacity)
    picked_TxE = jnp.zeros((num_tokens, num_experts), bool)
    picked_TxE = picked_TxE.at[token_ExC, jnp.arange(num_experts)[:, None]].set(True)
    experts_1xE = jnp.arange(num_experts, dtype=jnp.int32)[None, :]
    indices_TxE = jnp.where(picked_TxE, experts_1xE, num_experts)
    weights_TxE = jnp.where(picked_TxE, probs_TxE * cfg.routed_scaling_factor, 0.0)
    return _routing(weights_TxE, indices_TxE, probs_TxE, logits_TxE, num_experts)


def dts_route(
    logits_TxE: jax.Array,
    cfg: MoEConfig,
    expert_bias_E: jax.Array | None = None,
    *,
    key: jax.Array | None,
    capacity: int | None = None,
    tau: jax.Array,
) -> Routing:
    """EvoMoE's dense-to-sparse gate (DTS-Gate), the training route of router="dts".

    Gates are softmax((logits + Gumbel noise) / tau) over the E experts. A token keeps its
    cfg.max_k best gates, minus those below cfg.dts_threshold (its best gate always stays), so a
    large tau (near-uniform gates) computes max_k experts per token and a small one about one.
    Weights are the kept gates, renormalised over them when cfg.norm_topk_prob, times
    cfg.routed_scaling_factor; the gradient reaches the logits through the gates.
    Evaluation routes top-k on the logits instead (`dts_eval_route`).

    Args:
      logits_TxE: router logits.
      cfg: max_k, dts_threshold, norm_topk_prob, routed_scaling_factor.
      expert_bias_E, capacity: unused (the table rejects the bias).
      key: PRNG key of the Gumbel noise (rng stream "router").
      tau: float32 scalar temperature (`dts_tau` of the step, from collection "moe_state").

    Returns:
      Routing with K_max = max_k; unused places hold E, weight 0; probs are the noise-free,
      temperature-free softmax of the logits (what the losses read).
    """
    del expert_bias_E, capacity
    if key is None:
        raise ValueError("router='dts' needs a PRNG key in training")
    logits_TxE = logits_TxE.astype(jnp.float32)
    probs_TxE = router_scores(logits_TxE, "softmax")
    noise_TxE = jax.random.gumbel(key, logits_TxE.shape, jnp.float32)
    gates_TxE = jax.nn.softmax((logits_TxE + noise_TxE) / tau, axis=-1)
    top_TxK, indices_TxK = jax.lax.top_k(jax.lax.stop_gradient(gates_TxE), cfg.max_k)
    keep_TxK = (top_TxK >= cfg.dts_threshold).at[:, 0].set(True)
    return _kept_places(gates_TxE, indices_TxK, keep_TxK, probs_TxE, logits_TxE, cfg)


def dts_eval_route(
    logits_TxE: jax.Array,
    cfg: MoEConfig,
    expert_bias_E: jax.Array | None = None,
    *,
    key: jax.Array | None = None,
    capacity: int | None = None,
) -> Routing:
    """Evaluation and decoding of router="dts": top-`top_k` on the logits (no noise, no
    temperature), widened to K_max = max_k with sentinel places so both routes have one shape."""
    routing = topk_route(logits_TxE, cfg, expert_bias_E, key=key, capacity=capacity)
    pad = ((0, 0), (0, cfg.max_k - cfg.top_k))
    return _routing(
        jnp.pad(routing.weights, pad),
        jnp.pad(routing.indices, pad, constant_values=cfg.num_experts),
        routing.probs,
        routing.logits,
        cfg.num_experts,
    )


def dts_tau(cfg: MoEConfig, step: jax.Array | int) -> jax.Array:
    """The DTS temperature at optimizer step `step`: cosine from cfg.dts_tau_start to
    cfg.dts_tau_end over cfg.dts_steps steps, then constant (float32 scalar)."""
    frac = jnp.minimum(jnp.asarray(step, jnp.float32) / cfg.dts_steps, 1.0)
    start, end = cfg.dts_tau_start, cfg.dts_tau_end
    return (end + (start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))).astype(jnp.float32)


def _validate_dts(cfg: MoEConfig) -> None:
    _token_choice_only("dts")(cfg)
    _check_max_k(cfg)
    if cfg.score_func != "softmax":
        raise ValueError(
            f"MoEConfig.score_func={cfg.score_func!r} is not supported with router='dts' "
            "(its gate is a softmax); allowed value is 'softmax'"
        )
    if cfg.top_k > cfg.max_k:
        raise ValueError(
            f"MoEConfig.top_k={cfg.top_k} is invalid with router='dts': evaluation routes "
            f"top_k, which must be <= max_k={cfg.max_k}"
        )


def _token_choice_only(router: str) -> Callable[[MoEConfig], None]:
    """Rejects the features that only top-k token choice has (bias, groups, null experts)."""

    def validate(cfg: MoEConfig) -> None:
        if cfg.use_expert_bias:
            raise ValueError(
                f"MoEConfig.use_expert_bias=True is not supported with router={router!r} "
                "(it steers top-k selection); set use_expert_bias=False"
            )
        if cfg.n_groups > 1:
            raise ValueError(
                f"MoEConfig.n_groups={cfg.n_groups} is not supported with router={router!r}; "
                "allowed value is 1"
            )
        if cfg.num_null_experts:
            raise ValueError(
                f"MoEConfig.num_null_experts={cfg.num_null_experts} is not supported with "
                f"router={router!r} (null experts are top-k places); allowed value is 0"
            )

    return validate


def _validate_topk(cfg: MoEConfig) -> None:
    if cfg.num_null_experts and cfg.n_groups > 1:
        raise ValueError(
            f"MoEConfig.num_null_experts={cfg.num_null_experts} is not supported with "
            f"n_groups={cfg.n_groups} (null experts belong to no group); set n_groups=1"
        )


def _check_max_k(cfg: MoEConfig) -> None:
    if cfg.max_k > cfg.num_experts:
        raise ValueError(
            f"MoEConfig.max_k={cfg.max_k} is invalid: must be <= num_experts={cfg.num_experts}"
        )


def _validate_top_p(cfg: MoEConfig) -> None:
    _token_choice_only("top_p")(cfg)
    _check_max_k(cfg)


def _valid(cfg: MoEConfig) -> None:
    del cfg


@dataclasses.dataclass(frozen=True)
class RouterSpec:
    """One row of the router table.

    Attributes:
      route: the routing function (module docstring signature).
      max_k: K_max from the config (the static width of Routing.indices).
      token_choice: True: tokens choose (dispatch by cfg.dispatch, load-balance loss applies).
        False: experts choose, exactly `capacity` tokens each (per-expert buffers, nothing to
        drop, balanced by construction); `route` then also takes `valid_T` (the tokens an
        expert may choose). Token-choice routes route every token and padding is removed
        after (`mask_routing`).
      rng: the Flax rng stream the router draws from in training (None: deterministic).
      validate: raises ValueError for configs the router cannot serve (called by MoEConfig).
      eval_route: the routing function of evaluation and decoding (deterministic=True), with
        the same K_max; None: `route` serves both.
      temperature: schedule (cfg, step) -> tau of a router that anneals a temperature: the
        Router keeps it as `dts_tau` in collection "moe_state" (initialised at step 0) and
        passes `tau=` to `route` in training; the train step sets it for each step
        (`set_router_temperature`), so a resumed run continues the schedule exactly.
    """

    route: Callable[..., Routing]
    max_k: Callable[[MoEConfig], int]
    token_choice: bool = True
    rng: str | None = None
    validate: Callable[[MoEConfig], None] = _valid
    eval_route: Callable[..., Routing] | None = None
    temperature: Callable[[MoEConfig, jax.Array | int], jax.Array] | None = None


ROUTERS: dict[str, RouterSpec] = {
    "topk": RouterSpec(topk_route, max_k=lambda cfg: cfg.top_k, validate=_validate_topk),
    "top_p": RouterSpec(top_p_route, max_k=lambda cfg: cfg.max_k, validate=_validate_top_p),
    "expert_choice": RouterSpec(
        expert_choice_route,
        max_k=lambda cfg: cfg.num_experts,
        token_choice=False,
        validate=_token_choice_only("expert_choice"),
    ),
    "random": RouterSpec(
        random_route,
        max_k=lambda cfg: cfg.top_k,
        rng="router",
        validate=_token_choice_only("random"),
    ),
    "dts": RouterSpec(
        dts_route,
        max_k=lambda cfg: cfg.max_k,
        rng="router",
        validate=_validate_dts,
        eval_route=dts_eval_route,
        temperature=dts_tau,
    ),
}


def router_spec(name: str) -> RouterSpec:
    """The table row of router `name`; ValueError naming MoEConfig.router and the choices."""
    if name not in ROUTERS:
        raise ValueError(
            f"MoEConfig.router={name!r} is invalid: allowed values are "
            f"{', '.join(map(repr, ROUTERS))}"
        )
    return ROUTERS[name]
