"""Grouped-query causal self-attention with RoPE, optional q/k norms and qkv bias, and a KV cache.

Legend: B batch, L query length, S key length (L, or max_len when decoding from the cache),
D model width, H query heads, N key/value heads (H = N * G), G query heads per kv head,
K head width.

Parameters of `Attention` (logical axis names in brackets):
  q/kernel [D, H, K] ("embed", "heads", "head_dim")      q/bias [H, K] when cfg.qkv_bias
  k/kernel [D, N, K] ("embed", "kv_heads", "head_dim")   k/bias [N, K] when cfg.qkv_bias
  v/kernel [D, N, K] ("embed", "kv_heads", "head_dim")   v/bias [N, K] when cfg.qkv_bias
  o/kernel [H, K, D] ("heads", "head_dim", "embed")
  q_norm/scale, k_norm/scale ("norm",): [K] for qk_norm="head", [H*K] / [N*K] for "full".
Cache (collection "cache", created by the first decode call): cached_key / cached_value
[B, max_len, N, K] in the compute dtype, cached_segment [B, max_len] int32 (each slot's segment
id: left padding of a batched prompt is 0 and never attended), cache_index int32 scalar (next
slot to write).

Segments: packed sequences carry segment ids [B, L] (0 = padding, 1, 2, ... the documents); a
query attends to the keys of its own segment only, causally. Without segment ids every position
is one segment.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.layers.common import RMSNorm, apply_rope
from moejax.layers.config import ModelConfig


def causal_mask(
    q_slots_L: jax.Array,
    k_slots_S: jax.Array,
    q_segments_BxL: jax.Array | None = None,
    k_segments_BxS: jax.Array | None = None,
) -> jax.Array:
    """Query at sequence slot i may see the key at slot j iff j <= i (and, with segment ids,
    both are in the same segment): [L, S] bool, or [B, L, S] with segments."""
    mask_LxS = k_slots_S[None, :] <= q_slots_L[:, None]
    if q_segments_BxL is None:
        return mask_LxS
    same_BxLxS = q_segments_BxL[:, :, None] == k_segments_BxS[:, None, :]
    return mask_LxS[None] & same_BxLxS


def segment_positions(segment_ids_BxL: jax.Array) -> jax.Array:
    """int32 [B, L] position of each token inside its segment (0 at each segment's first token):
    the RoPE positions of packed documents. A segment is a run of equal ids."""
    b, length = segment_ids_BxL.shape
    slots_BxL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    new_BxL = jnp.concatenate(
        [
            jnp.ones((b, 1), bool),
            segment_ids_BxL[:, 1:] != segment_ids_BxL[:, :-1],
        ],
        axis=1,
    )
    start_BxL = jax.lax.cummax(jnp.where(new_BxL, slots_BxL, 0), axis=1)
    return slots_BxL - start_BxL


def cache_slots(
    module: nn.Module, decode: bool, batch: int, length: int, positions_BxL: jax.Array | None
) -> tuple[nn.Variable | None, jax.Array, jax.Array, jax.Array]:
    """Sequence slots of a call's L new tokens, and their RoPE positions.

    Decoding, the tokens take cache slots cache_index .. cache_index + L - 1 (the module's
    "cache" collection must be mutable); otherwise slots 0 .. L - 1. Positions default to the
    slots. Shared by every attention variant that keeps a KV cache.

    Returns:
      (the cache_index variable or None, first slot int32 scalar, q_slots_L, positions_BxL).
    """
    if decode:
        if not module.is_mutable_collection("cache"):
            raise ValueError(
                "decode=True needs the 'cache' collection mutable: apply(..., mutable=['cache'])"
            )
        index = module.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        start = index.value
    else:
        index, start = None, jnp.zeros((), jnp.int32)
    q_slots_L = start + jnp.arange(length, dtype=jnp.int32)
    if positions_BxL is None:
        positions_BxL = jnp.broadcast_to(q_slots_L, (batch, length))
    return index, start, q_slots_L, positions_BxL


def cache_segments(
    module: nn.Module, segment_ids_BxL: jax.Array | None, batch: int, length: int, start
) -> tuple[jax.Array, jax.Array]:
    """Writes a decode call's segment ids (None: 1s) into the cache's `cached_segment`
    [B, max_len] at slots start .. start + L - 1: (query segments [B, L], key segments
    [B, max_len]). Unwritten slots hold 0 and are masked causally anyway."""
    max_len = module.cfg.max_len
    cached = module.variable("cache", "cached_segment", jnp.zeros, (batch, max_len), jnp.int32)
    if segment_ids_BxL is None:
        segment_ids_BxL = jnp.ones((batch, length), jnp.int32)
    segment_ids_BxL = segment_ids_BxL.astype(jnp.int32)
    cached.value = jax.lax.dynamic_update_slice(cached.value, segment_ids_BxL, (0, start))
    return segment_ids_BxL, cached.value


def dot_product_attention(
    q_BxLxHxK: jax.Array,
    k_BxSxNxK: jax.Array,
    v_BxSxNxK: jax.Array,
    mask_LxS: jax.Array,
    *,
    scale: float,
) -> jax.Array:
    """Softmax attention where each group of G = H / N query heads shares one kv head.

    Query head h reads kv head h // G (HF `repeat_kv` order). Scores and softmax are float32.

    Args:
      q_BxLxHxK, k_BxSxNxK, v_BxSxNxK: queries, keys, values (any float dtype).
      mask_LxS: True where attending is allowed: [L, S] (broadcast over batch and heads) or
        [B, L, S] (broadcast over heads).
      scale: multiplies the scores (1/sqrt(K) for standard attention).

    Returns:
      [B, L, H, K] in v's dtype.
    """
    b, length, h, k = q_BxLxHxK.shape
    n = k_BxSxNxK.shape[2]
    if h % n:
        raise ValueError(f"query heads H={h} must be a multiple of kv heads N={n}")
    q_BxLxNxGxK = q_BxLxHxK.reshape(b, length, n, h // n, k)
    scores_BxNxGxLxS = jnp.einsum(
        "blngk,bsnk->bngls", q_BxLxNxGxK, k_BxSxNxK, preferred_element_type=jnp.float32
    )
    scores_BxNxGxLxS = scores_BxNxGxLxS * scale
    if mask_LxS.ndim == 3:
        mask_LxS = mask_LxS[:, None, None]
    # A finite fill (not -inf) keeps fully masked rows NaN-free; every real row has >= 1 key.
    scores_BxNxGxLxS = jnp.where(mask_LxS, scores_BxNxGxLxS, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores_BxNxGxLxS, axis=-1).astype(v_BxSxNxK.dtype)
    out_BxLxNxGxK = jnp.einsum("bngls,bsnk->blngk", probs, v_BxSxNxK)
    return out_BxLxNxGxK.reshape(b, length, h, v_BxSxNxK.shape[-1])


# On CPU, causal self-attention without a cache runs in this many query blocks, block i attending to
# keys 0 .. (i + 1) * L / 4 only: 10/16 of the score matrix, the rest being exact zeros after
# the softmax. Measured on the 2-core CPU (B8 L256 H4 K64, fwd+bwd): 23 ms against 47 ms for
# the full matrix; 2 blocks gave 26 ms, 8 blocks 34 ms. Shorter sequences run unblocked.
QUERY_BLOCKS = 4
_MIN_BLOCKED_LENGTH = 128


def causal_attention(
    q_BxLxHxK: jax.Array,
    k_BxSxNxK: jax.Array,
    v_BxSxNxK: jax.Array,
    q_slots_L: jax.Array,
    k_slots_S: jax.Array,
    *,
    scale: float,
    q_segments_BxL: jax.Array | None = None,
    k_segments_BxS: jax.Array | None = None,
) -> jax.Array:
    """Causal `dot_product_attention` of queries at q_slots_L over keys at k_slots_S, within
    segments when segment ids are given (both or neither).

    On CPU, without a cache (L == S, the same slots) and for L >= 128 divisible by
    QUERY_BLOCKS, the queries run in QUERY_BLOCKS blocks, each over the keys up to its last
    slot: the keys it skips are masked for all of its queries, so each row's softmax and output
    are the same sums with fewer exact zeros. Otherwise (other platforms, decoding over a
    cache, short or odd lengths) it is one masked attention over all S keys.

    Returns:
      [B, L, H, K] in v's dtype.
    """
    length, keys = q_BxLxHxK.shape[1], k_BxSxNxK.shape[1]
    blocks = QUERY_BLOCKS
    segmented = q_segments_BxL is not None

    def mask(rows: slice, seen: slice) -> jax.Array:
        if not segmented:
            return causal_mask(q_slots_L[rows], k_slots_S[seen])
        return causal_mask(
            q_slots_L[rows], k_slots_S[seen], q_segments_BxL[:, rows], k_segments_BxS[:, seen]
        )

    everything = slice(None)
    if length != keys or length < _MIN_BLOCKED_LENGTH or length % blocks:
        return dot_product_attention(
            q_BxLxHxK, k_BxSxNxK, v_BxSxNxK, mask(everything, everything), scale=scale
        )
    size = length // blocks

    def blocked(q, k, v):
        outs = []
        for i in range(blocks):
            rows, seen = slice(i * size, (i + 1) * size), slice(0, (i + 1) * size)
            outs.append(
                dot_product_attention(
                    q[:, rows], k[:, seen], v[:, seen], mask(rows, seen), scale=scale
                )
            )
        return jnp.concatenate(outs, axis=1)

    def full(q, k, v):
        return dot_product_attention(q, k, v, mask(everything, everything), scale=scale)

    # Blocked on CPU only: compiled for TPU and GPU (deviceless too) the step keeps the one
    # attention, whose layout those compilers already handle without extra copies.
    return jax.lax.platform_dependent(q_BxLxHxK, k_BxSxNxK, v_BxSxNxK, cpu=blocked, default=full)


def _kernel_init(in_axis, out_axis, names: tuple[str, ...]):
    # lecun_normal with explicit fan axes: the default treats a 3-D kernel as a conv and would
    # count H (or D) into fan_in.
    init = nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis
    )
    return nn.with_logical_partitioning(init, names)


def flat_matmul(x_BxLxD: jax.Array, w_DxF: jax.Array, dtype) -> jax.Array:
    """x [..., D] @ w [D, F] -> [..., F] in `dtype`, as one 2-D dot on the flattened tokens.

    The same math as the einsum on [B, L, D], which XLA:CPU runs at about half the speed (its
    backward contracts the weight gradient over two axes); the reshapes are bitcasts, and the
    callers' sharding constraints stay on the 3-D/4-D views.
    """
    lead = x_BxLxD.shape[:-1]
    x_TxD = x_BxLxD.reshape(-1, x_BxLxD.shape[-1]).astype(dtype)
    return (x_TxD @ w_DxF.astype(dtype)).reshape(*lead, w_DxF.shape[-1])


class HeadProjection(nn.Module):
    """x [B, L, D] -> [B, L, heads, K]: param `kernel` [D, heads, K], optional `bias` [heads, K]."""

    heads: int
    head_dim: int
    heads_axis: str
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        shape = (x_BxLxD.shape[-1], self.heads, self.head_dim)
        init = _kernel_init(0, (1, 2), ("embed", self.heads_axis, "head_dim"))
        kernel = self.param("kernel", init, shape, self.param_dtype)
        y = flat_matmul(x_BxLxD, kernel.reshape(shape[0], -1), self.dtype).reshape(
            *x_BxLxD.shape[:-1], *shape[1:]
        )
        if self.use_bias:
            bias_init = nn.with_logical_partitioning(
                nn.initializers.zeros, (self.heads_axis, "head_dim")
            )
            bias = self.param("bias", bias_init, shape[1:], self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class OutProjection(nn.Module):
    """[B, L, H, K] -> [B, L, D]: param `kernel` [H, K, D]."""

    d_model: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxHxK: jax.Array) -> jax.Array:
        shape = (*x_BxLxHxK.shape[-2:], self.d_model)
        init = _kernel_init((0, 1), 2, ("heads", "head_dim", "embed"))
        kernel = self.param("kernel", init, shape, self.param_dtype)
        x_BxLxF = x_BxLxHxK.reshape(*x_BxLxHxK.shape[:-2], -1)
        return flat_matmul(x_BxLxF, kernel.reshape(-1, self.d_model), self.dtype)


class Attention(nn.Module):
    """Causal GQA self-attention (no residual, no pre-norm: the decoder layer adds those).

    Attributes:
      cfg: model config (heads, head_dim, rope_theta, qk_norm, qkv_bias, max_len, dtypes).
      decode: read and extend the KV cache in collection "cache" (which must be mutable). A call
        processes L >= 1 new tokens written at slots cache_index .. cache_index + L - 1; the
        first decode call creates a zeroed cache of length cfg.max_len, so prefill is simply a
        decode call on the prompt. Writing past max_len is not detected inside jit
        (dynamic_update_slice clamps): callers such as `moejax.generate` check lengths first.
    """

    cfg: ModelConfig
    decode: bool = False

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
          positions_BxL: RoPE positions; None means the sequence slots (arange(L), offset by
            cache_index when decoding). Only RoPE reads them: the causal mask always follows the
            sequence/cache order.
          segment_ids_BxL: int segment of each token (module docstring); None = one segment.
            Decoding, they are cached with the keys (None caches 1s).

        Returns:
          [B, L, D] in cfg.dtype.
        """
        cfg = self.cfg
        dtype, pdtype = cfg.compute_dtype, cfg.params_dtype
        b, length, d = x_BxLxD.shape
        h, n, k = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        if self.decode and length > cfg.max_len:
            raise ValueError(
                f"decode input length {length} exceeds ModelConfig.max_len={cfg.max_len}"
            )

        def proj(name, heads, axis):
            return HeadProjection(heads, k, axis, cfg.qkv_bias, dtype, pdtype, name=name)

        q_BxLxHxK = proj("q", h, "heads")(x_BxLxD)
        k_BxLxNxK = proj("k", n, "kv_heads")(x_BxLxD)
        v_BxLxNxK = proj("v", n, "kv_heads")(x_BxLxD)

        if cfg.qk_norm == "head":
            # Qwen3-MoE: one [K] scale shared by all heads, normalising each head separately.
            q_BxLxHxK = RMSNorm(cfg.norm_eps, dtype, pdtype, name="q_norm")(q_BxLxHxK)
            k_BxLxNxK = RMSNorm(cfg.norm_eps, dtype, pdtype, name="k_norm")(k_BxLxNxK)
        elif cfg.qk_norm == "full":
            # OLMoE: one norm over all heads' features, before the split into heads.
            q_flat = q_BxLxHxK.reshape(b, length, h * k)
            k_flat = k_BxLxNxK.reshape(b, length, n * k)
            q_BxLxHxK = RMSNorm(cfg.norm_eps, dtype, pdtype, name="q_norm")(q_flat).reshape(
                b, length, h, k
            )
            k_BxLxNxK = RMSNorm(cfg.norm_eps, dtype, pdtype, name="k_norm")(k_flat).reshape(
                b, length, n, k
            )

        index, start, q_slots_L, positions_BxL = cache_slots(
            self, self.decode, b, length, positions_BxL
        )
        q_BxLxHxK = apply_rope(q_BxLxHxK, positions_BxL, cfg.rope_theta)
        k_BxLxNxK = apply_rope(k_BxLxNxK, positions_BxL, cfg.rope_theta)
        q_BxLxHxK = nn.with_logical_constraint(q_BxLxHxK, ("batch", "length", "heads", "head_dim"))

        if self.decode:
            cache_shape = (b, cfg.max_len, n, k)
            cached_k = self.variable("cache", "cached_key", jnp.zeros, cache_shape, dtype)
            cached_v = self.variable("cache", "cached_value", jnp.zeros, cache_shape, dtype)
            slot = (0, start, 0, 0)
            cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k_BxLxNxK, slot)
            cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v_BxLxNxK, slot)
            q_segments_BxL, k_segments_BxS = cache_segments(self, segment_ids_BxL, b, length, start)
            index.value = start + length
            k_BxSxNxK, v_BxSxNxK = cached_k.value, cached_v.value
            # Slots past the write position are zeros and fall outside the causal mask.
            k_slots_S = jnp.arange(cfg.max_len, dtype=jnp.int32)
        else:
            k_BxSxNxK, v_BxSxNxK = k_BxLxNxK, v_BxLxNxK
            k_slots_S = q_slots_L
            q_segments_BxL = k_segments_BxS = segment_ids_BxL
        out_BxLxHxK = causal_attention(
            q_BxLxHxK,
            k_BxSxNxK,
            v_BxSxNxK,
            q_slots_L,
            k_slots_S,
            scale=k**-0.5,
            q_segments_BxL=q_segments_BxL,
            k_segments_BxS=k_segments_BxS,
        )
        out_BxLxHxK = nn.with_logical_constraint(
            out_BxLxHxK, ("batch", "length", "heads", "head_dim")
        )
        y_BxLxD = OutProjection(d, dtype, pdtype, name="o")(out_BxLxHxK)
        return nn.with_logical_constraint(y_BxLxD, ("batch", "length", "embed"))
