"""Autoregressive generation with the KV cache: greedy, or temperature + nucleus (top-p) sampling.

Legend: B batch, P prompt length, N new tokens, V vocabulary.

    tokens_BxT = generate(model_cfg, variables, prompt_BxP, max_new_tokens=32)            # greedy
    tokens_BxT = generate(model_cfg, variables, prompt_BxP, max_new_tokens=32,
                          temperature=0.8, top_p=0.95, rng=jax.random.key(0))            # sampled

One jitted program per (config, prompt shape, N, greedy-or-not): the prompt is prefilled in one
decode call that creates the cache, then a `lax.scan` runs the N - 1 remaining single-token
decode steps. Temperature and top_p are traced, so changing them does not recompile.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from moejax.layers.config import ModelConfig
from moejax.layers.transformer import Transformer

# Collections the forward pass reads; "cache" is rebuilt by the prefill and "moe_stats" is
# training bookkeeping.
_READ_COLLECTIONS = ("params", "moe_state")


def top_p_filter(logits_BxV: jax.Array, top_p: jax.Array) -> jax.Array:
    """Keep the smallest set of most likely tokens whose probability reaches top_p; -inf the rest.

    The most likely token is always kept, so a tiny top_p reduces sampling to greedy.

    Args:
      logits_BxV: float32 logits (already divided by the temperature).
      top_p: scalar in (0, 1].

    Returns:
      [B, V] logits with the tokens outside the nucleus set to -inf.
    """
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # Mass strictly before each sorted token: a token is in the nucleus iff the tokens ranked
    # above it have not yet reached top_p.
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    keep_BxV = mass_before_BxV < top_p
    keep_BxV = keep_BxV.at[:, 0].set(True)
    # Threshold = the smallest kept logit; ties with it are kept too.
    threshold_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_BxV >= threshold_Bx1, logits_BxV, -jnp.inf)


def _next_token(logits_BxV, rng, temperature, top_p, greedy: bool) -> jax.Array:
    if greedy:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    filtered = top_p_filter(logits_BxV / temperature, top_p)
    return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "greedy"))
def _generate(cfg, variables, prompt_BxP, rng, temperature, top_p, *, max_new_tokens, greedy):
    model = Transformer(cfg)
    b, p = prompt_BxP.shape

    def step(cache, tokens_BxL, rng):
        (logits_BxLxV, _), mutated = model.apply(
            {**variables, "cache": cache} if cache is not None else variables,
            tokens_BxL,
            decode=True,
            mutable=["cache"],
        )
        token_B = _next_token(logits_BxLxV[:, -1], rng, temperature, top_p, greedy)
        return mutated["cache"], token_B

    rngs = jax.random.split(rng, max_new_tokens)
    cache, first_B = step(None, prompt_BxP, rngs[0])

    def body(carry, rng):
        cache, token_B = carry
        cache, next_B = step(cache, token_B[:, None], rng)
        return (cache, next_B), next_B

    _, rest_NxB = jax.lax.scan(body, (cache, first_B), rngs[1:])
    new_BxN = jnp.concatenate([first_B[:, None], rest_NxB.T], axis=1)
    return jnp.concatenate([prompt_BxP.astype(jnp.int32), new_BxN], axis=1)


def generate(
    model_cfg: ModelConfig,
    variables: Mapping[str, Any],
    prompt_BxP: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    rng: jax.Array | None = None,
) -> jax.Array:
    """Continue each prompt by max_new_tokens tokens.

    Args:
      model_cfg: the model's config.
      variables: model variables with at least "params" (plus "moe_state" when the routers use
        an expert bias); any "cache"/"moe_stats" entries are ignored.
      prompt_BxP: int token ids, P >= 1; all prompts share the length P (no padding support).
      max_new_tokens: N >= 0 new tokens; P + N must be <= model_cfg.max_len (the cache length).
      temperature: 0 for greedy decoding (argmax); > 0 samples from softmax(logits / T).
      top_p: nucleus size in (0, 1] for sampling (1 = the full distribution).
      rng: PRNG key, required when temperature > 0.

    Returns:
      int32 [B, P + N]: the prompt followed by the generated tokens.
    """
    prompt_BxP = jnp.asarray(prompt_BxP)
    if prompt_BxP.ndim != 2 or not jnp.issubdtype(prompt_BxP.dtype, jnp.integer):
        raise ValueError(
            f"prompt_BxP must be a 2-D integer array, got shape {prompt_BxP.shape} "
            f"dtype {prompt_BxP.dtype}"
        )
    b, p = prompt_BxP.shape
    if b < 1 or p < 1:
        raise ValueError(f"prompt_BxP shape {prompt_BxP.shape} is invalid: needs B >= 1, P >= 1")
    if (
        not isinstance(max_new_tokens, int)
        or isinstance(max_new_tokens, bool)
        or max_new_tokens < 0
    ):
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: must be an integer >= 0")
    if p + max_new_tokens > model_cfg.max_len:
        raise ValueError(
            f"prompt length {p} + max_new_tokens {max_new_tokens} exceeds "
            f"ModelConfig.max_len={model_cfg.max_len} (the KV cache length)"
        )
    if not temperature >= 0.0:
        raise ValueError(f"temperature={temperature!r} is invalid: must be >= 0 (0 = greedy)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p!r} is invalid: must be in (0, 1]")
    greedy = temperature == 0.0
    if not greedy and rng is None:
        raise ValueError("rng is required when temperature > 0 (sampling)")
    if "params" not in variables:
        raise ValueError(f"variables must contain 'params'; got keys {sorted(variables)}")
    if max_new_tokens == 0:
        return prompt_BxP.astype(jnp.int32)
    if not isinstance(prompt_BxP, jax.core.Tracer):
        lo, hi = int(prompt_BxP.min()), int(prompt_BxP.max())
        if lo < 0 or hi >= model_cfg.vocab_size:
            # An out-of-range id would be silently clamped by the embedding gather.
            raise ValueError(
                f"prompt_BxP token ids must be in [0, vocab_size={model_cfg.vocab_size}), "
                f"got range [{lo}, {hi}]"
            )
    read = {k: v for k, v in variables.items() if k in _READ_COLLECTIONS}
    if rng is None:
        rng = jax.random.key(0)  # unused by greedy decoding; keeps one traced signature
    return _generate(
        model_cfg,
        read,
        prompt_BxP,
        rng,
        jnp.asarray(temperature if not greedy else 1.0, jnp.float32),
        jnp.asarray(top_p, jnp.float32),
        max_new_tokens=max_new_tokens,
        greedy=greedy,
    )
