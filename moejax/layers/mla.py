"""Multi-head latent attention (MLA, DeepSeek-V2/V3), HF `DeepseekV3Attention` semantics.

Legend: B batch, L query length, S key length (L, or max_len when decoding), D model width,
H heads, Q q_lora_rank, C kv_lora_rank, P qk_nope_head_dim (no-position part), R qk_rope_head_dim
(decoupled RoPE part), V v_head_dim.

Keys and values are expanded from a per-token latent of width C (plus one shared R-wide RoPE key),
so the decode cache holds C + R numbers per token instead of 2 * H * K. Queries may go through
their own low-rank latent (q_lora_rank) or a plain projection (q_lora_rank None).

Parameters (logical axes in brackets; the latent widths are "unmodeled", i.e. replicated):
  q/kernel [D, H, P+R] ("embed", "heads", "head_dim")                 when q_lora_rank is None
  q_a/kernel [D, Q] ("embed", "unmodeled"), q_a_norm/scale [Q],
  q_b/kernel [Q, H, P+R] ("unmodeled", "heads", "head_dim")           when q_lora_rank is set
  kv_a/kernel [D, C+R] ("embed", "unmodeled"), kv_a_norm/scale [C]
  kv_b/kernel [C, H, P+V] ("unmodeled", "heads", "head_dim")
  o/kernel [H, V, D] ("heads", "head_dim", "embed")
Cache (collection "cache", created by the first decode call): cached_latent [B, max_len, C]
(normed), cached_k_rope [B, max_len, R] (rotated), cache_index int32 scalar.

RoPE uses the rotate-half layout on the R features (`moejax.layers.common.apply_rope`);
`moejax.hf.from_hf` permutes checkpoints stored with DeepSeek's interleaved pairs
(`rope_interleave=True`) into it, which is exact because q and k get the same permutation.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.layers.attention import (
    OutProjection,
    _kernel_init,
    cache_segments,
    cache_slots,
    causal_attention,
)
from moejax.layers.common import RMSNorm, apply_rope
from moejax.layers.config import ModelConfig

# DeepSeek-V3 (reference code and HF) builds the two latent norms with the default eps 1e-6,
# not config.rms_norm_eps.
LATENT_NORM_EPS = 1e-6


class MLA(nn.Module):
    """Causal multi-head latent attention (no residual, no pre-norm: the decoder layer adds those).

    Attributes:
      cfg: model config (num_heads, q_lora_rank, kv_lora_rank, qk_nope_head_dim,
        qk_rope_head_dim, v_head_dim, rope_theta, max_len, dtypes).
      decode: read and extend the latent cache in collection "cache" (must be mutable); same
        contract as `moejax.layers.attention.Attention.decode`.
    """

    cfg: ModelConfig
    decode: bool = False

    def _kernel(self, name, shape, in_axis, out_axis, names) -> jax.Array:
        kernel = self.param(
            name, _kernel_init(in_axis, out_axis, names), shape, self.cfg.params_dtype
        )
        return kernel.astype(self.cfg.compute_dtype)

    @nn.compact
    def __call__(
        self,
        x_BxLxD: jax.Array,
        positions_BxL: jax.Array | None = None,
        segment_ids_BxL: jax.Array | None = None,
    ) -> jax.Array:
        """Self-attention over x.

        Args:
          x_BxLxD: layer input (already normed).
          positions_BxL: RoPE positions; None means the sequence slots (offset by cache_index
            when decoding).
          segment_ids_BxL: int segment of each token (see moejax.layers.attention); None = one
            segment. Decoding, they are cached with the latents.

        Returns:
          [B, L, D] in cfg.dtype.
        """
        cfg = self.cfg
        dtype, pdtype = cfg.compute_dtype, cfg.params_dtype
        b, length, d = x_BxLxD.shape
        h, p, r, v = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        c = cfg.kv_lora_rank
        if r < 2 or r % 2:
            raise ValueError(f"ModelConfig.qk_rope_head_dim={r} is invalid: must be even >= 2")
        if self.decode and length > cfg.max_len:
            raise ValueError(
                f"decode input length {length} exceeds ModelConfig.max_len={cfg.max_len}"
            )
        x = x_BxLxD.astype(dtype)
        heads_axes = ("heads", "head_dim")

        if cfg.q_lora_rank is None:
            w_q = self._kernel("q", (d, h, p + r), 0, (1, 2), ("embed", *heads_axes))
            q_BxLxHxK = jnp.einsum("bld,dhk->blhk", x, w_q)
        else:
            qr = cfg.q_lora_rank
            w_qa = self._kernel("q_a", (d, qr), 0, 1, ("embed", "unmodeled"))
            q_lat_BxLxQ = RMSNorm(LATENT_NORM_EPS, dtype, pdtype, name="q_a_norm")(x @ w_qa)
            w_qb = self._kernel("q_b", (qr, h, p + r), 0, (1, 2), ("unmodeled", *heads_axes))
            q_BxLxHxK = jnp.einsum("blq,qhk->blhk", q_lat_BxLxQ, w_qb)

        w_kva = self._kernel("kv_a", (d, c + r), 0, 1, ("embed", "unmodeled"))
        kv_BxLxCR = x @ w_kva
        latent_BxLxC = RMSNorm(LATENT_NORM_EPS, dtype, pdtype, name="kv_a_norm")(kv_BxLxCR[..., :c])
        k_rope_BxLx1xR = kv_BxLxCR[..., None, c:]

        index, start, q_slots_L, positions_BxL = cache_slots(
            self, self.decode, b, length, positions_BxL
        )
        q_rope_BxLxHxR = apply_rope(q_BxLxHxK[..., p:], positions_BxL, cfg.rope_theta)
        q_BxLxHxK = jnp.concatenate([q_BxLxHxK[..., :p], q_rope_BxLxHxR], axis=-1)
        k_rope_BxLx1xR = apply_rope(k_rope_BxLx1xR, positions_BxL, cfg.rope_theta)

        if self.decode:
            cached_lat = self.variable(
                "cache", "cached_latent", jnp.zeros, (b, cfg.max_len, c), dtype
            )
            cached_rope = self.variable(
                "cache", "cached_k_rope", jnp.zeros, (b, cfg.max_len, r), dtype
            )
            cached_lat.value = jax.lax.dynamic_update_slice(
                cached_lat.value, latent_BxLxC, (0, start, 0)
            )
            cached_rope.value = jax.lax.dynamic_update_slice(
                cached_rope.value, k_rope_BxLx1xR[:, :, 0], (0, start, 0)
            )
            q_segments_BxL, k_segments_BxS = cache_segments(self, segment_ids_BxL, b, length, start)
            index.value = start + length
            latent_BxSxC, k_rope_BxSx1xR = cached_lat.value, cached_rope.value[:, :, None]
            k_slots_S = jnp.arange(cfg.max_len, dtype=jnp.int32)
        else:
            latent_BxSxC, k_rope_BxSx1xR = latent_BxLxC, k_rope_BxLx1xR
            k_slots_S = q_slots_L
            q_segments_BxL = k_segments_BxS = segment_ids_BxL

        w_kvb = self._kernel("kv_b", (c, h, p + v), 0, (1, 2), ("unmodeled", *heads_axes))
        kv_BxSxHxPV = jnp.einsum("bsc,chk->bshk", latent_BxSxC, w_kvb)
        s = kv_BxSxHxPV.shape[1]
        k_BxSxHxK = jnp.concatenate(
            [kv_BxSxHxPV[..., :p], jnp.broadcast_to(k_rope_BxSx1xR, (b, s, h, r))], axis=-1
        )
        v_BxSxHxV = kv_BxSxHxPV[..., p:]
        q_BxLxHxK = nn.with_logical_constraint(q_BxLxHxK, ("batch", "length", *heads_axes))
        out_BxLxHxV = causal_attention(
            q_BxLxHxK,
            k_BxSxHxK,
            v_BxSxHxV,
            q_slots_L,
            k_slots_S,
            scale=(p + r) ** -0.5,
            q_segments_BxL=q_segments_BxL,
            k_segments_BxS=k_segments_BxS,
        )
        out_BxLxHxV = nn.with_logical_constraint(out_BxLxHxV, ("batch", "length", *heads_axes))
        y_BxLxD = OutProjection(d, dtype, pdtype, name="o")(out_BxLxHxV)
        return nn.with_logical_constraint(y_BxLxD, ("batch", "length", "embed"))
