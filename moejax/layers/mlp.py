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
        x = x_BxLxD.astype(self.dtype)
        h_BxLxF = mlp_hidden(x, wi_gate, wi_up.astype(self.dtype), self.activation)
        h_BxLxF = nn.with_logical_constraint(h_BxLxF, ("batch", "length", "mlp"))
        return h_BxLxF @ wo.astype(self.dtype)
