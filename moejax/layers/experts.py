"""The routed experts of an MoE block: their weights and the choice of dispatch path.

Legend: T tokens, D model width, F expert hidden width, E experts, K choices per token,
C capacity.

Expert parallelism: when cfg.expert_parallel != "none", `Experts` hands its inputs to

    moejax.sharding.expert_parallel.expert_parallel_ffn(
        x_TxD, routing, wi_gate_ExDxF, wi_up_ExDxF, wo_ExFxD, cfg, *, capacity
    ) -> (y_TxD float32, dropped_fraction float32 scalar)

with x_TxD in the compute dtype, `routing` the router's RouterOutput (token choice) or
ExpertChoiceOutput, the three weights as global (logically sharded) arrays in the compute dtype
(wi_gate_ExDxF is None for non-gated activations), and `capacity` = cfg.capacity(T, train=not
deterministic), the per-expert slots for cfg.dispatch == "capacity" and expert choice. It must
return exactly what the local path below returns; inside its shard_map it can reuse
moejax.layers.dispatch (dropless_ffn, capacity_ffn, sort_by_expert, gather_rows,
grouped_expert_mlp, combine_rows), which are pure functions of arrays and cfg.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.layers import dispatch
from moejax.layers.config import MoEConfig
from moejax.layers.router import ExpertChoiceOutput, RouterOutput

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
    axes ("exp", "embed_moe", "mlp_moe") / ("exp", "mlp_moe", "embed_moe").

    Attributes:
      cfg: the MoE block config (num_experts, d_ff, activation, dispatch, capacity, backend).
      dtype: compute dtype; param_dtype: storage dtype of the weights.
      kernel_init: initializer of the three weights.
    """

    cfg: MoEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable = expert_kernel_init

    @nn.compact
    def __call__(
        self,
        x_TxD: jax.Array,
        routing: RouterOutput | ExpertChoiceOutput,
        *,
        deterministic: bool,
    ) -> tuple[jax.Array, jax.Array]:
        """Runs the routed tokens through their experts and combines them.

        Args:
          x_TxD: tokens.
          routing: RouterOutput (weights/indices [T, K]) or ExpertChoiceOutput ([E, C]).
          deterministic: selects the eval capacity factor (capacity dispatch).

        Returns:
          y_TxD: float32 weighted sum of each token's expert outputs (zeros if all dropped).
          dropped_fraction: float32 scalar, assignments (token choice) or tokens (expert choice)
            that no expert processed.
        """
        cfg = self.cfg
        num_tokens, d_model = x_TxD.shape
        e, f = cfg.num_experts, cfg.d_ff
        in_init = nn.with_logical_partitioning(self.kernel_init, IN_AXES)
        out_init = nn.with_logical_partitioning(self.kernel_init, OUT_AXES)
        wi_gate = None
        if cfg.gated:
            wi_gate = self.param("wi_gate", in_init, (e, d_model, f), self.param_dtype)
            wi_gate = wi_gate.astype(self.dtype)
        wi_up = self.param("wi_up", in_init, (e, d_model, f), self.param_dtype).astype(self.dtype)
        wo = self.param("wo", out_init, (e, f, d_model), self.param_dtype).astype(self.dtype)
        x_TxD = x_TxD.astype(self.dtype)
        capacity = cfg.capacity(num_tokens, train=not deterministic)

        if cfg.expert_parallel != "none":
            from moejax.sharding.expert_parallel import expert_parallel_ffn

            return expert_parallel_ffn(x_TxD, routing, wi_gate, wi_up, wo, cfg, capacity=capacity)

        def constrain(buf_ExCxD):
            return nn.with_logical_constraint(buf_ExCxD, BUFFER_AXES)

        if isinstance(routing, ExpertChoiceOutput):
            return dispatch.expert_choice_ffn(
                x_TxD,
                routing.weights,
                routing.token_indices,
                wi_gate,
                wi_up,
                wo,
                cfg,
                buffer_constraint=constrain,
            )
        if cfg.dispatch == "capacity":
            return dispatch.capacity_ffn(
                x_TxD,
                routing.weights,
                routing.indices,
                wi_gate,
                wi_up,
                wo,
                cfg,
                capacity=capacity,
                buffer_constraint=constrain,
            )
        y_TxD = dispatch.dropless_ffn(
            x_TxD, routing.weights, routing.indices, wi_gate, wi_up, wo, cfg
        )
        return y_TxD, jnp.zeros((), jnp.float32)
