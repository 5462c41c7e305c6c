"""Autoregressive generation with the KV cache: greedy, or temperature + nucleus (top-p) sampling.

Legend: B batch, P (longest) prompt length, N new tokens, T = P + N, V vocabulary.

    tokens_BxT = generate(model_cfg, variables, prompt_BxP, max_new_tokens=32)            # greedy
    tokens_BxT = generate(model_cfg, variables, prompt_BxP, max_new_tokens=32,
                          temperature=0.8, top_p=0.95, rng=jax.random.key(0))            # sampled
    out = generate(model_cfg, variables, [ids_a, ids_b], max_new_tokens=32, eos_id=2)
    out.sequences()                                # each row's prompt + continuation, unpadded

One jitted program per (config, prompt shape, N, greedy-or-not): the prompt is prefilled in one
decode call that creates the cache, then a `lax.scan` runs the N - 1 remaining single-token
decode steps. Temperature, top_p and eos_id are traced, so changing them does not recompile.

Prompts of different lengths are left-padded to the longest one, so every row's next token sits
in the same cache slot. The pads get segment id 0 (the real tokens 1): the attention caches the
ids with the keys and a query only sees keys of its own segment, so no real token ever attends
to a pad, and the MoE layers route the pads to no expert. Each row's RoPE positions start at 0
at its first real token, which makes a padded row compute what the prompt alone would.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from moejax.layers.config import ModelConfig
from moejax.layers.transformer import Transformer

# Collections the forward pass reads; "cache" is rebuilt by the prefill and "moe_stats" is
# training bookkeeping.
_READ_COLLECTIONS = ("params", "moe_state")
# Stands for "no eos_id" inside the jitted loop: no sampled token id equals it.
_NO_EOS = -1


class Generation(NamedTuple):
    """What `generate` returns for a list of prompts, or whenever eos_id is given.

    Attributes:
      tokens_BxT: int32 [B, P + N]: row b is prompt b left-padded with pad_id to the longest
        prompt length P, then its N new tokens; from a row's first eos_id on, every new token is
        eos_id (the row stopped).
      prompt_lengths_B: int32 [B]: real prompt lengths; row b's prompt starts at column
        P - prompt_lengths_B[b].
      new_lengths_B: int32 [B]: new tokens up to and including the row's first eos_id; N for a
        row that never produced it (or when eos_id is None).
    """

    tokens_BxT: jax.Array
    prompt_lengths_B: jax.Array
    new_lengths_B: jax.Array

    def sequences(self) -> list[np.ndarray]:
        """Each row without its left padding and the fill after its eos (host numpy int32)."""
        tokens_BxT = np.asarray(self.tokens_BxT)
        prompt_lengths_B = np.asarray(self.prompt_lengths_B)
        new_lengths_B = np.asarray(self.new_lengths_B)
        p = int(prompt_lengths_B.max())  # the longest prompt is not padded
        return [
            tokens_BxT[b, p - prompt_lengths_B[b] : p + new_lengths_B[b]]
            for b in range(tokens_BxT.shape[0])
        ]


def left_pad(
    prompts: Sequence[Any], *, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-pads 1-D token sequences of different lengths into one batched prefill.

    Args:
      prompts: B >= 1 non-empty 1-D integer sequences (lists, numpy or jax arrays).
      pad_id: the token id put in the padding (never attended to; any id in the vocabulary).

    Returns:
      (tokens_BxP, segment_ids_BxP, positions_BxP), host int32 arrays with P the longest
      prompt's length: segment id 1 at real tokens and 0 at pads; positions = column minus the
      row's number of pads, clipped at 0 for the pads, so each row's RoPE positions start at 0
      at its first real token.
    """
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(
            f"prompts must be a 2-D integer array [B, P] or a non-empty list of 1-D integer "
            f"sequences, got {type(prompts).__name__} {prompts!r:.80}"
        )
    rows = []
    for i, prompt in enumerate(prompts):
        row = np.asarray(prompt)
        if row.ndim != 1 or row.size == 0 or not np.issubdtype(row.dtype, np.integer):
            raise ValueError(
                f"prompts[{i}] must be a non-empty 1-D integer sequence, got shape {row.shape} "
                f"dtype {row.dtype}"
            )
        rows.append(row)
    p = max(len(row) for row in rows)
    tokens_BxP = np.full((len(rows), p), pad_id, np.int32)
    for b, row in enumerate(rows):
        tokens_BxP[b, p - len(row) :] = row
    pads_Bx1 = np.asarray([[p - len(row)] for row in rows], np.int32)
    columns_1xP = np.arange(p, dtype=np.int32)[None, :]
    segment_ids_BxP = (columns_1xP >= pads_Bx1).astype(np.int32)
    positions_BxP = np.maximum(columns_1xP - pads_Bx1, 0).astype(np.int32)
    return tokens_BxP, segment_ids_BxP, positions_BxP


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
def _generate(
    cfg,
    variables,
    prompt_BxP,
    segment_ids_BxP,
    positions_BxP,
    rng,
    temperature,
    top_p,
    eos_id,
    *,
    max_new_tokens,
    greedy,
):
    """Returns (int32 [B, P + N] tokens, int32 [B] new lengths); eos_id = _NO_EOS never stops."""
    model = Transformer(cfg)
    b = prompt_BxP.shape[0]
    ones_Bx1 = jnp.ones((b, 1), jnp.int32)

    def step(cache, tokens_BxL, segment_ids_BxL, positions_BxL, rng):
        (logits_BxLxV, _), mutated = model.apply(
            {**variables, "cache": cache} if cache is not None else variables,
            tokens_BxL,
            decode=True,
            positions=positions_BxL,
            segment_ids=segment_ids_BxL,
            mutable=["cache"],
        )
        token_B = _next_token(logits_BxLxV[:, -1], rng, temperature, top_p, greedy)
        return mutated["cache"], token_B

    rngs = jax.random.split(rng, max_new_tokens)
    # Left padding puts every row's last prompt token in the last column.
    cache, first_B = step(None, prompt_BxP, segment_ids_BxP, positions_BxP, rngs[0])

    def body(carry, rng):
        cache, token_B, position_B, done_B = carry
        cache, next_B = step(cache, token_B[:, None], ones_Bx1, position_B[:, None], rng)
        # A stopped row keeps decoding (the scan is static) but its output is the eos fill.
        next_B = jnp.where(done_B, eos_id, next_B)
        return (cache, next_B, position_B + 1, done_B | (next_B == eos_id)), next_B

    carry = (cache, first_B, positions_BxP[:, -1] + 1, first_B == eos_id)
    _, rest_NxB = jax.lax.scan(body, carry, rngs[1:])
    new_BxN = jnp.concatenate([first_B[:, None], rest_NxB.T], axis=1)
    is_eos_BxN = new_BxN == eos_id
    new_lengths_B = jnp.where(
        is_eos_BxN.any(axis=1), jnp.argmax(is_eos_BxN, axis=1) + 1, max_new_tokens
    ).astype(jnp.int32)
    return jnp.concatenate([prompt_BxP.astype(jnp.int32), new_BxN], axis=1), new_lengths_B


def _check_token_id(name: str, value, vocab_size: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is invalid: must be an integer token id")
    if not 0 <= value < vocab_size:
        raise ValueError(f"{name}={value} is invalid: must be in [0, vocab_size={vocab_size})")


def generate(
    model_cfg: ModelConfig,
    variables: Mapping[str, Any],
    prompts: jax.Array | Sequence[Any],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    rng: jax.Array | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
) -> jax.Array | Generation:
    """Continue each prompt by max_new_tokens tokens.

    Args:
      model_cfg: the model's config.
      variables: model variables with at least "params" (plus "moe_state" when the routers use
        an expert bias); any "cache"/"moe_stats" entries are ignored.
      prompts: either an int array [B, P] of B prompts sharing the length P >= 1, or a list of B
        non-empty 1-D int sequences of any lengths, left-padded to the longest (`left_pad`).
      max_new_tokens: N >= 0 new tokens; P + N must be <= model_cfg.max_len (the cache length),
        P being the longest prompt.
      temperature: 0 for greedy decoding (argmax); > 0 samples from softmax(logits / T).
      top_p: nucleus size in (0, 1] for sampling (1 = the full distribution).
      rng: PRNG key, required when temperature > 0.
      eos_id: end-of-sequence token id, or None: a row that produced it stops, and all its
        later tokens are eos_id. The loop itself always runs N steps.
      pad_id: the token id of the left padding of a list of prompts (never attended to).

    Returns:
      For an array of prompts and eos_id None: int32 [B, P + N], the prompt followed by the
      generated tokens. Otherwise a `Generation`: the left-padded tokens [B, P + N] with each
      row's prompt and new lengths (`Generation.sequences()` cuts the rows out).
    """
    batched = isinstance(prompts, (list, tuple))
    if batched:
        prompt_np, segment_ids_BxP, positions_BxP = left_pad(prompts, pad_id=pad_id)
        prompt_BxP = jnp.asarray(prompt_np)
        prompt_lengths_B = segment_ids_BxP.sum(axis=1, dtype=np.int32)
    else:
        prompt_BxP = jnp.asarray(prompts)
        if prompt_BxP.ndim != 2 or not jnp.issubdtype(prompt_BxP.dtype, jnp.integer):
            raise ValueError(
                f"prompts must be a 2-D integer array [B, P] (or a list of 1-D sequences), got "
                f"shape {prompt_BxP.shape} dtype {prompt_BxP.dtype}"
            )
        if prompt_BxP.shape[0] < 1 or prompt_BxP.shape[1] < 1:
            raise ValueError(f"prompts shape {prompt_BxP.shape} is invalid: needs B >= 1, P >= 1")
        b, p = prompt_BxP.shape
        segment_ids_BxP = np.ones((b, p), np.int32)
        positions_BxP = np.broadcast_to(np.arange(p, dtype=np.int32), (b, p))
        prompt_lengths_B = np.full((b,), p, np.int32)
    p = prompt_BxP.shape[1]
    if (
        not isinstance(max_new_tokens, int)
        or isinstance(max_new_tokens, bool)
        or max_new_tokens < 0
    ):
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: must be an integer >= 0")
    if p + max_new_tokens > model_cfg.max_len:
        raise ValueError(
            f"prompt length {p} (the longest prompt) + max_new_tokens {max_new_tokens} exceeds "
            f"ModelConfig.max_len={model_cfg.max_len} (the KV cache length)"
        )
    if not temperature >= 0.0:
        raise ValueError(f"temperature={temperature!r} is invalid: must be >= 0 (0 = greedy)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p!r} is invalid: must be in (0, 1]")
    greedy = temperature == 0.0
    if not greedy and rng is None:
        raise ValueError("rng is required when temperature > 0 (sampling)")
    if eos_id is not None:
        _check_token_id("eos_id", eos_id, model_cfg.vocab_size)
    if batched:
        _check_token_id("pad_id", pad_id, model_cfg.vocab_size)
    if "params" not in variables:
        raise ValueError(f"variables must contain 'params'; got keys {sorted(variables)}")
    if not isinstance(prompt_BxP, jax.core.Tracer):
        lo, hi = int(prompt_BxP.min()), int(prompt_BxP.max())  # pad_id is checked above
        if lo < 0 or hi >= model_cfg.vocab_size:
            # An out-of-range id would be silently clamped by the embedding gather.
            raise ValueError(
                f"prompts token ids must be in [0, vocab_size={model_cfg.vocab_size}), "
                f"got range [{lo}, {hi}]"
            )
    as_generation = batched or eos_id is not None
    if max_new_tokens == 0:
        tokens_BxP = prompt_BxP.astype(jnp.int32)
        if not as_generation:
            return tokens_BxP
        zeros_B = jnp.zeros(prompt_lengths_B.shape, jnp.int32)
        return Generation(tokens_BxP, jnp.asarray(prompt_lengths_B), zeros_B)
    read = {k: v for k, v in variables.items() if k in _READ_COLLECTIONS}
    if rng is None:
        rng = jax.random.key(0)  # unused by greedy decoding; keeps one traced signature
    tokens_BxT, new_lengths_B = _generate(
        model_cfg,
        read,
        prompt_BxP,
        jnp.asarray(segment_ids_BxP),
        jnp.asarray(positions_BxP),
        rng,
        jnp.asarray(temperature if not greedy else 1.0, jnp.float32),
        jnp.asarray(top_p, jnp.float32),
        jnp.asarray(_NO_EOS if eos_id is None else eos_id, jnp.int32),
        max_new_tokens=max_new_tokens,
        greedy=greedy,
    )
    if not as_generation:
        return tokens_BxT
    return Generation(tokens_BxT, jnp.asarray(prompt_lengths_B), new_lengths_B)
