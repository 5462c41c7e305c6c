"""Building blocks shared by the decoder layers: RMSNorm, rotary embeddings, token embedding.

Legend: B batch, L length, D model width, H heads, K head width, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last axis with a learned scale (param `scale` [D], "norm").

    The statistics and the scaling are computed in float32 whatever the input dtype (bf16 mean
    squares lose too many bits over wide rows); the result is cast to `dtype`.
    HF convention: y = x / sqrt(mean(x^2) + eps) * scale.
    """

    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.with_logical_partitioning(nn.initializers.ones, ("norm",))
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        inv_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * inv_rms * scale.astype(jnp.float32)).astype(self.dtype)


def rope_inv_freq(head_dim: int, theta: float) -> jax.Array:
    """Inverse frequencies [K/2]: theta^(-2i/K), i = 0..K/2-1 (HF `inv_freq`)."""
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim={head_dim} is invalid: must be an even integer >= 2")
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (theta**exponents)


def apply_rope(x_BxLxHxK: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding, HF "rotate-half" convention.

    Feature i is paired with feature i + K/2 (not with its neighbour, as in the original
    interleaved RoPE), which is what HF Llama/Mixtral/Qwen/OLMoE checkpoints were trained with:
    y = x * cos + rotate_half(x) * sin, rotate_half(x) = concat(-x[K/2:], x[:K/2]).

    Args:
      x_BxLxHxK: queries or keys.
      positions_BxL: integer (or float) position of every token.
      theta: RoPE base.

    Returns:
      [B, L, H, K] in x's dtype; the rotation itself is computed in float32 (bf16 angles are
      off by whole radians at positions in the thousands).
    """
    head_dim = x_BxLxHxK.shape[-1]
    inv_freq = rope_inv_freq(head_dim, theta)
    angles_BxLxK2 = positions_BxL.astype(jnp.float32)[..., None] * inv_freq
    angles_BxLx1xK = jnp.concatenate([angles_BxLxK2, angles_BxLxK2], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles_BxLx1xK), jnp.sin(angles_BxLx1xK)
    x = x_BxLxHxK.astype(jnp.float32)
    x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2 :]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos + rotated * sin).astype(x_BxLxHxK.dtype)


def embedding_init() -> Callable:
    """Normal init of a [V, D] table with std 1/sqrt(D): the table doubles as the output head
    when tied, where this keeps the initial logits at unit scale (as lecun_normal does for an
    untied [D, V] head).
    """
    return nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=1, out_axis=0)


class Embed(nn.Module):
    """Token embedding table `embedding` [V, D] ("vocab", "embed"); `attend` = tied output head."""

    vocab_size: int
    d_model: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        init = nn.with_logical_partitioning(embedding_init(), ("vocab", "embed"))
        self.embedding = self.param(
            "embedding", init, (self.vocab_size, self.d_model), self.param_dtype
        )

    def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
        """Token ids [B, L] -> embeddings [B, L, D] in `dtype`."""
        x_BxLxD = jnp.take(self.embedding, tokens_BxL, axis=0).astype(self.dtype)
        return nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))

    def attend(self, x_BxLxD: jax.Array) -> jax.Array:
        """Tied output head: x @ embedding.T -> logits [B, L, V] in float32."""
        table_VxD = self.embedding.astype(self.dtype)
        # One 2-D dot on the flattened tokens (XLA:CPU runs the [B, L, D] einsum at about half
        # speed); the reshapes are bitcasts.
        x_TxD = x_BxLxD.reshape(-1, x_BxLxD.shape[-1]).astype(self.dtype)
        logits_TxV = jax.lax.dot_general(x_TxD, table_VxD, (((1,), (1,)), ((), ())))
        return logits_TxV.reshape(*x_BxLxD.shape[:-1], -1).astype(jnp.float32)
