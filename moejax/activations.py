"""The MLP activation table, shared by the dense MLP (moejax.layers.mlp) and the experts.

A leaf module: both packages import it, it imports neither.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

ACTIVATIONS = ("swiglu", "geglu", "gelu", "relu", "silu")
# Gated types compute act(x @ wi_gate) * (x @ wi_up); the others act(x @ wi_up).
GATED = ("swiglu", "geglu")


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
    """The elementwise nonlinearity of an MLP type (the gate's, for gated types)."""
    if name in ("swiglu", "silu"):
        return jax.nn.silu
    if name in ("geglu", "gelu"):
        # tanh approximation: what Mixtral-era GeGLU/GELU checkpoints (gelu_pytorch_tanh) use.
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "relu":
        return jax.nn.relu
    raise ValueError(f"activation={name!r} is invalid: allowed values are {ACTIVATIONS}")


def mlp_hidden(
    x: jax.Array, wi_gate: jax.Array | None, wi_up: jax.Array, activation: str, matmul=None
) -> jax.Array:
    """act(x @ wi_gate) * (x @ wi_up) for gated types, act(x @ wi_up) otherwise.

    `matmul(x, w)` replaces `x @ w` (e.g. a grouped or batched matmul for experts).
    """
    matmul = matmul or (lambda a, b: a @ b)
    act = activation_fn(activation)
    up = matmul(x, wi_up)
    if activation in GATED:
        return act(matmul(x, wi_gate)) * up
    return act(up)
