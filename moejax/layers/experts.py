"""The routed experts of an MoE block: their weights, run through the moejax.moe pipeline.

`Experts` owns the three expert weights and hands them, with the tokens and the router's
`Routing`, to `moejax.moe.routed_ffn` (plan -> run experts -> combine on one device or under
GSPMD) or, when cfg.execution.expert_parallel is set (or its Pallas kernels run on a mesh of
several devices, which GSPMD cannot partition: `moejax.moe.layer_strategy`), to
`moejax.moe.expert_parallel_ffn`, the same local pipeline inside shard_map.

Legend: T tokens, D model width, F expert hidden width, E experts, C capacity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.layers.config import MoEConfig
from moejax.moe import (
    ExpertWeights,
    Routing,
    block_capacity,
    dispatch_kind,
    expert_parallel_ffn,
    layer_strategy,
    routed_ffn,
)
from moejax.moe.experts import dequantize_weight
from moejax.pallas import QuantizedWeight

# fan-in scaling per expert: the expert axis is a batch axis, not part of the fan.
expert_kernel_init = nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,)
)

IN_AXES = ("exp", "embed_moe", "mlp_moe")
OUT_AXES = ("exp", "mlp_moe", "embed_moe")
BUFFER_AXES = ("exp", "capacity", "embed_moe")


class Experts(nn.Module):
    """E expert MLPs (SwiGLU/GeGLU/GELU/ReLU/SiLU) applied to routed tokens.

    Params: wi_gate [E, D, F] (gated activations only), wi_up [E, D, F], wo [E, F, D], logical
    axes ("exp", "embed_moe", "mlp_moe") / ("exp", "mlp_moe", "embed_moe"). With
    cfg.expert_bits (quantized experts) each is int8 with a float32 `<name>_scale` [E, G, N]
    beside it (G = contraction size / cfg.expert_group_size, N the output width).

    Attributes:
      cfg: the MoE block config (num_experts, d_ff, activation, dispatch, capacity, execution).
      dtype: compute dtype; param_dtype: storage dtype of the weights.
      kernel_init: initializer of the three weights.
    """

    cfg: MoEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable = expert_kernel_init

    def _weight(
        self, name: str, init, shape: tuple[int, int, int], axes
    ) -> jax.Array | QuantizedWeight:
        """One expert weight [E, K, N] in the compute dtype: a float parameter, or with
        cfg.expert_bits an int8 parameter `name` and its float32 `<name>_scale` [E, G, N]
        (moejax.compress.quantize_experts).

        The quantized pair is returned as a `QuantizedWeight` for the local pipeline, whose
        compact layout hands it to `moejax.pallas.gmm` (dequantized per tile, never as a whole
        float weight) and whose other layouts dequantize it (`moejax.moe.run_experts`); the
        shard_map strategies (`moejax.moe.layer_strategy`) take float weights, so it is
        dequantized here for them."""
        cfg = self.cfg
        if cfg.expert_bits is None:
            return self.param(name, init, shape, self.param_dtype).astype(self.dtype)
        e, k, n = shape
        group = cfg.expert_group_size or k
        if k % group:
            raise ValueError(
                f"MoEConfig.expert_group_size={cfg.expert_group_size} is invalid: must divide "
                f"the contraction size {k} of experts/{name}"
            )
        # A quantized model comes from quantize_experts; initialised from scratch it is zeros.
        zeros = nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)
        ones = nn.with_logical_partitioning(nn.initializers.ones_init(), axes)
        qvalue = self.param(name, zeros, shape, jnp.int8)
        scale = self.param(f"{name}_scale", ones, (e, k // group, n), jnp.float32)
        if layer_strategy(cfg) == "none":
            return QuantizedWeight(qvalue, scale)
        return dequantize_weight(qvalue, scale).astype(self.dtype)

    @nn.compact
    def __call__(
        self, x_TxD: jax.Array, routing: Routing, *, deterministic: bool
    ) -> tuple[jax.Array, jax.Array]:
        """Runs the routed tokens through their experts and combines them.

        Args:
          x_TxD: tokens.
          routing: the Router's decision.
          deterministic: selects the eval capacity factor (capacity dispatch, expert choice).

        Returns:
          y_TxD: float32 weighted sum of each token's expert outputs (zeros if all dropped).
          dropped_fraction: float32 scalar, routed assignments (token choice) or tokens (expert
            choice) that no expert processed.
        """
        cfg = self.cfg
        num_tokens, d_model = x_TxD.shape
        e, f = cfg.num_experts, cfg.d_ff
        in_init = nn.with_logical_partitioning(self.kernel_init, IN_AXES)
        out_init = nn.with_logical_partitioning(self.kernel_init, OUT_AXES)
        wi_gate = None
        if cfg.gated:
            wi_gate = self._weight("wi_gate", in_init, (e, d_model, f), IN_AXES)
        wi_up = self._weight("wi_up", in_init, (e, d_model, f), IN_AXES)
        wo = self._weight("wo", out_init, (e, f, d_model), OUT_AXES)
        experts = ExpertWeights(wi_gate, wi_up, wo)
        x_TxD = x_TxD.astype(self.dtype)
        capacity = block_capacity(cfg, num_tokens, train=not deterministic)
        key = None
        if cfg.drop_policy == "random" and dispatch_kind(cfg) == "capacity" and not deterministic:
            if not self.has_rng("router"):
                raise ValueError(
                    "Experts: drop_policy='random' with deterministic=False needs an rng stream "
                    "'router', e.g. apply(..., rngs={'router': key})"
                )
            key = self.make_rng("router")

        # "none" with Pallas kernels on several devices still runs per shard (layer_strategy).
        strategy = layer_strategy(cfg)
        if strategy != "none":
            return expert_parallel_ffn(
                x_TxD, routing, experts, cfg, capacity=capacity, key=key, strategy=strategy
            )

        def constrain(buf_ExCxD):
            return nn.with_logical_constraint(buf_ExCxD, BUFFER_AXES)

        return routed_ffn(
            x_TxD, routing, experts, cfg, capacity=capacity, buffer_constraint=constrain, key=key
        )
