"""The Router module: owns the router's parameters and state, routes through moejax.moe.routing.

One Flax module serves every router of the table `moejax.moe.routing.ROUTERS` (top-k, expert
choice, random, ...): it computes float32 logits x @ kernel (with train-time jitter), reads the
aux-loss-free expert bias from collection "moe_state", draws the router's rng stream when its
table row asks for one, and calls the table's routing function.

Legend: T tokens (batch * length, flattened), D model width, E experts, K_max places per token.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.layers.config import BIAS_UPDATES, MoEConfig
from moejax.layers.losses import expert_load
from moejax.moe.pipeline import block_capacity
from moejax.moe.routing import Routing, mask_routing, router_spec


def _router_logits(
    module: nn.Module,
    x_TxD: jax.Array,
    cfg: MoEConfig,
    deterministic: bool,
    kernel_init: Callable,
    param_dtype: Any,
) -> jax.Array:
    """float32 logits [T, E + m]: x @ kernel, then x @ null_kernel for the m null experts, with
    train-time multiplicative jitter on x."""
    if x_TxD.ndim != 2:
        raise ValueError(f"{type(module).__name__} expects x of shape [T, D], got {x_TxD.shape}")
    init = nn.with_logical_partitioning(kernel_init, ("embed", "unmodeled"))
    d_model = x_TxD.shape[-1]
    kernel_DxE = module.param("kernel", init, (d_model, cfg.num_experts), param_dtype)
    kernel_DxE = kernel_DxE.astype(jnp.float32)
    if cfg.num_null_experts:
        # A parameter of its own, so `kernel` keeps the HF shape [D, E] and null experts can be
        # added to a trained or imported model.
        null_DxM = module.param("null_kernel", init, (d_model, cfg.num_null_experts), param_dtype)
        kernel_DxE = jnp.concatenate([kernel_DxE, null_DxM.astype(jnp.float32)], axis=1)
    x_TxD = x_TxD.astype(jnp.float32)
    eps = cfg.jitter_eps
    if not deterministic and eps > 0:
        if not module.has_rng("jitter"):
            raise ValueError(
                f"{type(module).__name__}: jitter_eps={eps} with deterministic=False needs "
                "an rng stream 'jitter', e.g. apply(..., rngs={'jitter': key})"
            )
        noise_TxD = jax.random.uniform(
            module.make_rng("jitter"), x_TxD.shape, jnp.float32, 1.0 - eps, 1.0 + eps
        )
        x_TxD = x_TxD * noise_TxD
    # HIGHEST: TPUs/GPUs otherwise run float32 dots in bf16/tf32 passes, which defeats the point.
    return jnp.dot(x_TxD, kernel_DxE, precision=jax.lax.Precision.HIGHEST)


class Router(nn.Module):
    """The MoE block's router, for any cfg.router (softmax/sigmoid scores, group-limited top-k,
    expert bias, jitter, expert choice, random).

    Variables: params `kernel` [D, E] (logical axes "embed", "unmodeled"), and `null_kernel`
    [D, m] for cfg.num_null_experts = m > 0 (AdaMoE null experts); with
    cfg.use_expert_bias, `expert_bias` [E] float32 in collection "moe_state" (zeros at init,
    changed only by `update_expert_bias`); for token-choice routers, when collection "moe_stats"
    is mutable (and not at init), `expert_load` [E] float32 there: the fraction of this call's
    routed assignments per expert, which `update_expert_bias` reads.

    A router whose table row names an rng stream (router="random": "router") draws from it in
    training (deterministic=False) and from a fixed key, folded with the module path, in
    evaluation, so evaluation is repeatable. A row with an `eval_route` routes evaluation with
    it; a row with a `temperature` schedule (router="dts") keeps the temperature as
    `dts_tau` (float32 scalar) in collection "moe_state", which `set_router_temperature`
    advances.

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
    def __call__(
        self, x_TxD: jax.Array, *, deterministic: bool, valid_T: jax.Array | None = None
    ) -> Routing:
        """Routes each token.

        Args:
          x_TxD: tokens, any float dtype.
          deterministic: True disables jitter and random draws (eval) and selects the eval
            capacity factor (expert choice); False applies them (needs the rng streams).
          valid_T: bool [T], False for padding: routed nowhere (`mask_routing`), never chosen
            by an expert, left out of `expert_load`; None = every token.

        Returns:
          Routing with weights/indices [T, K_max] and probs/logits [T, E] (float32/int32).
        """
        cfg = self.cfg
        spec = router_spec(cfg.router)
        logits_TxE = _router_logits(
            self, x_TxD, cfg, deterministic, self.kernel_init, self.param_dtype
        )
        bias_E = None
        if cfg.use_expert_bias:
            bias_E = self.variable(
                "moe_state", "expert_bias", jnp.zeros, (cfg.num_experts,), jnp.float32
            ).value
        route, extra = spec.route, {}
        if spec.temperature is not None:
            tau = self.variable(
                "moe_state", "dts_tau", lambda: spec.temperature(cfg, 0).astype(jnp.float32)
            )
            extra["tau"] = tau.value
        if deterministic and spec.eval_route is not None:
            route, extra = spec.eval_route, {}
        key = None
        if spec.rng is not None and route is spec.route:
            key = self._router_key(spec.rng, deterministic)
        capacity = block_capacity(cfg, x_TxD.shape[0], train=not deterministic)
        if not spec.token_choice and valid_T is not None:
            extra["valid_T"] = valid_T
        out = route(logits_TxE, cfg, bias_E, key=key, capacity=capacity, **extra)
        out = mask_routing(out, valid_T)
        if (
            spec.token_choice
            and self.is_mutable_collection("moe_stats")
            and not self.is_initializing()
        ):
            load = self.variable(
                "moe_stats", "expert_load", jnp.zeros, (cfg.num_experts,), jnp.float32
            )
            load.value = expert_load(out.indices, cfg.num_experts)
        return out

    def _router_key(self, stream: str, deterministic: bool) -> jax.Array:
        if deterministic:
            return jax.random.fold_in(
                jax.random.key(0), zlib.crc32("/".join(self.scope.path).encode())
            )
        if not self.has_rng(stream):
            raise ValueError(
                f"Router: router={self.cfg.router!r} with deterministic=False needs an rng "
                f"stream {stream!r}, e.g. apply(..., rngs={{{stream!r}: key}})"
            )
        return self.make_rng(stream)


def bias_step(load_xE: jax.Array, rule: str = "sign") -> jax.Array:
    """The direction of one expert-bias update from the observed load [..., E].

    "sign" (DeepSeek-V3): sign(mean - load). "centered_sign": that minus its mean over experts,
    so the biases keep a zero sum and cannot drift together. "proportional":
    (mean - load) / mean, a step that shrinks as the load evens out (the aux-loss-free balancing
    theory paper's proportional rule).
    """
    load_xE = load_xE.astype(jnp.float32)
    mean_x1 = load_xE.mean(axis=-1, keepdims=True)
    if rule == "sign":
        return jnp.sign(mean_x1 - load_xE)
    if rule == "centered_sign":
        step = jnp.sign(mean_x1 - load_xE)
        return step - step.mean(axis=-1, keepdims=True)
    if rule == "proportional":
        return (mean_x1 - load_xE) / jnp.maximum(mean_x1, 1e-12)
    raise ValueError(
        f"MoEConfig.bias_update={rule!r} is invalid: allowed values are "
        f"{', '.join(map(repr, BIAS_UPDATES))}"
    )


def update_expert_bias(
    moe_state: Any, moe_stats: Any, rate: float | jax.Array, rule: str = "sign"
) -> Any:
    """Aux-loss-free balancing step: b += rate * bias_step(load, rule) (DeepSeek-V3: "sign").

    Pure and tree-wise: every `expert_bias` leaf of moe_state is updated from the `expert_load`
    leaf at the same path in moe_stats (the same module path, other leaf name). Leaves may be
    stacked, e.g. [layers, E] from nn.scan: the mean is over the last (expert) axis. Underloaded
    experts get a higher bias and so are selected more often; other leaves pass through.

    Args:
      moe_state: the "moe_state" collection (nested dicts / FrozenDicts).
      moe_stats: the "moe_stats" collection returned by apply(..., mutable=["moe_stats"]).
      rate: step size u (cfg.bias_update_rate, times the schedule's factor).
      rule: cfg.bias_update, one of BIAS_UPDATES.

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
                new[name] = (value + rate * bias_step(load, rule)).astype(value.dtype)
            else:
                new[name] = value
        return type(state)(new)

    return walk(moe_state, moe_stats, ())


def set_router_temperature(moe_state: Any, tau: jax.Array) -> Any:
    """Every `dts_tau` leaf of moe_state set to `tau` (stacked leaves, e.g. [layers] from
    nn.scan, filled); other leaves pass through. What the train step does each step for a
    router with a temperature schedule (`RouterSpec.temperature`)."""

    def fill(path, value):
        return jnp.full_like(value, tau) if path[-1].key == "dts_tau" else value

    return jax.tree_util.tree_map_with_path(fill, moe_state)
