"""Dense feed-forward block (its activations come from moejax.activations, shared with the experts).

Legend: B batch, L length, D model width, F hidden width.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.activations import GATED, activation_fn, mlp_hidden

__all__ = ["GATED", "MLP", "activation_fn", "mlp_hidden"]


class MLP(nn.Module):
    """Position-wise MLP: x[..., D] -> [..., D]; parameters wi_gate [D, F], wi_up [D, F], wo [F, D].

    Used for the dense layers of the decoder and for the (fused) shared experts of an MoE block;
    wi_gate exists only for gated activations.
    """

    d_ff: int
    activation: str = "swiglu"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        d_model = x_BxLxD.shape[-1]
        init = nn.with_logical_partitioning(self.kernel_init, ("embed", "mlp"))
        init_out = nn.with_logical_partitioning(self.kernel_init, ("mlp", "embed"))
        wi_gate = None
        if self.activation in GATED:
            wi_gate = self.param("wi_gate", init, (d_model, self.d_ff), self.param_dtype)
            wi_gate = wi_gate.astype(self.dtype)
        wi_up = self.param("wi_up", init, (d_model, self.d_ff), self.param_dtype)
        wo = self.param("wo", init_out, (self.d_ff, d_model), self.param_dtype)
        # The matmuls run on the flattened tokens [T, D]: XLA:CPU runs the same dot on a 3-D
        # operand at about half speed (its backward contracts over two axes); on accelerators
        # the reshapes are free bitcasts.
        lead = x_BxLxD.shape[:-1]
        x_TxD = x_BxLxD.reshape(-1, d_model).astype(self.dtype)
        h_TxF = mlp_hidden(x_TxD, wi_gate, wi_up.astype(self.dtype), self.activation)
        if len(lead) == 2:
            # The constraint stays on the [B, L, F] view, so every rules table reads as before.
            h_BxLxF = h_TxF.reshape(*lead, self.d_ff)
            h_TxF = nn.with_logical_constraint(h_BxLxF, ("batch", "length", "mlp")).reshape(
                -1, self.d_ff
            )
        return (h_TxF @ wo.astype(self.dtype)).reshape(*lead, d_model)
