"""Router balancing losses and metrics, all computed in float32.

Legend: B batch, L length, T tokens (any leading shape), E experts, K experts per token.

`load_balance_loss` is the Switch Transformer loss E * sum_e f_e * P_e (Fedus et al. 2021),
generalised to top-k: f_e is the fraction of the K * tokens assignments that went to expert e and
P_e the mean router probability of e. It equals 1 under perfect balance and E when every token
goes to one expert with probability 1. Only P_e carries a gradient (f_e comes from an argmax);
that is what pushes the router towards balance. With `per_sequence=True` it is computed per
sequence and averaged, which is DeepSeek-V3's sequence-wise balance loss (up to its coefficient).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.moe.routing import token_mean

# Guards the per-token normalisation of sigmoid scores, which need not sum to 1 (softmax rows
# already do, and the epsilon is far below float32 resolution there).
_NORM_EPS = 1e-20


def _check_num_experts(num_experts: int) -> None:
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise ValueError(f"num_experts={num_experts!r} is invalid: must be an integer >= 1")


def _normalise(probs_TxE: jax.Array) -> jax.Array:
    probs_TxE = probs_TxE.astype(jnp.float32)
    return probs_TxE / (probs_TxE.sum(axis=-1, keepdims=True) + _NORM_EPS)


def expert_load(indices_TxK: jax.Array, num_experts: int) -> jax.Array:
    """Fraction of the routed assignments that each expert received.

    Args:
      indices_TxK: int expert ids of any shape [..., K]; every entry in [0, E) is one
        assignment, the sentinel E ("no expert") is none.
      num_experts: E.

    Returns:
      [E] float32, sums to 1 (all zeros when there are no assignments).
    """
    _check_num_experts(num_experts)
    if not jnp.issubdtype(indices_TxK.dtype, jnp.integer):
        raise ValueError(f"indices must be an integer array, got dtype {indices_TxK.dtype}")
    counts_E = jax.nn.one_hot(indices_TxK.reshape(-1), num_experts, dtype=jnp.float32).sum(0)
    return counts_E / jnp.maximum(counts_E.sum(), 1.0)


def load_balance_loss(
    probs_BxLxE: jax.Array,
    indices_BxLxK: jax.Array,
    *,
    num_experts: int,
    per_sequence: bool,
    valid_BxL: jax.Array | None = None,
) -> jax.Array:
    """Switch load-balance loss E * sum_e f_e * P_e, over the batch or per sequence.

    Args:
      probs_BxLxE: router scores (softmax or sigmoid, unbiased); each token's row is normalised
        to sum to 1 before averaging, as DeepSeek-V3 does for sigmoid scores.
      indices_BxLxK: int experts selected for each token (entries >= num_experts: none).
      num_experts: E (must equal probs_BxLxE.shape[-1]).
      per_sequence: False: f and P over all B * L tokens. True: f and P per sequence, the loss
        averaged over B (DeepSeek's sequence-wise balance loss).
      valid_BxL: bool, False for padding: its assignments and probabilities are left out (the
        routing of padding holds no expert, see `moejax.moe.routing.mask_routing`), and with
        per_sequence a sequence of padding only is left out of the mean; None = all tokens.

    Returns:
      float32 scalar; gradient flows through probs only.
    """
    _check_num_experts(num_experts)
    if probs_BxLxE.ndim != 3 or indices_BxLxK.ndim != 3:
        raise ValueError(
            "load_balance_loss expects probs [B, L, E] and indices [B, L, K], got "
            f"probs {probs_BxLxE.shape} and indices {indices_BxLxK.shape}"
        )
    if probs_BxLxE.shape[:2] != indices_BxLxK.shape[:2] or probs_BxLxE.shape[2] != num_experts:
        raise ValueError(
            f"load_balance_loss: probs {probs_BxLxE.shape} and indices {indices_BxLxK.shape} "
            f"must share [B, L], and probs must end in num_experts={num_experts}"
        )
    if not jnp.issubdtype(indices_BxLxK.dtype, jnp.integer):
        raise ValueError(f"indices must be an integer array, got dtype {indices_BxLxK.dtype}")
    p_BxLxE = _normalise(probs_BxLxE)
    # Indices >= num_experts ("no expert": unused top-p places) are not assignments.
    counts_BxLxE = jax.nn.one_hot(indices_BxLxK, num_experts, dtype=jnp.float32).sum(axis=2)
    axes = (1,) if per_sequence else (0, 1)
    if valid_BxL is None:
        valid_BxL = jnp.ones(probs_BxLxE.shape[:2], bool)
    w_BxLx1 = valid_BxL.astype(jnp.float32)[..., None]
    counts_BxLxE = counts_BxLxE * w_BxLx1
    tokens_x1 = jnp.maximum(w_BxLx1.sum(axis=axes), 1.0)
    # f: fraction of assignments (counts over the valid tokens divided by their total: exactly K
    # per token for top-k); P: mean probability over the valid tokens.
    per_token_x1 = counts_BxLxE.sum(axis=-1).sum(axis=axes)[..., None]
    f_xE = counts_BxLxE.sum(axis=axes) / jnp.maximum(per_token_x1, 1e-9)
    p_xE = (p_BxLxE * w_BxLx1).sum(axis=axes) / tokens_x1
    loss_x = jnp.sum(f_xE * p_xE, axis=-1)
    if not per_sequence:
        return num_experts * loss_x
    has_B = valid_BxL.any(axis=1).astype(jnp.float32)
    return num_experts * jnp.sum(loss_x * has_B) / jnp.maximum(has_B.sum(), 1.0)


def router_z_loss(logits_TxE: jax.Array, valid_T: jax.Array | None = None) -> jax.Array:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2 (keeps logits small).

    Args:
      logits_TxE: router logits of any shape [..., E].
      valid_T: bool of the leading shape, False for padding (left out); None = all tokens.

    Returns:
      float32 scalar.
    """
    z_T = jax.nn.logsumexp(logits_TxE.astype(jnp.float32), axis=-1)
    return token_mean(jnp.square(z_T), valid_T)


def router_entropy(probs_TxE: jax.Array, valid_T: jax.Array | None = None) -> jax.Array:
    """Mean per-token entropy (nats) of the router distribution, rows normalised to sum to 1.

    A metric: log(E) for uniform routing, 0 for one-hot routing.

    Args:
      probs_TxE: router scores of any shape [..., E].
      valid_T: bool of the leading shape, False for padding (left out); None = all tokens.

    Returns:
      float32 scalar.
    """
    p_TxE = _normalise(probs_TxE)
    return token_mean(-jnp.sum(jax.scipy.special.xlogy(p_TxE, p_TxE), axis=-1), valid_T)
