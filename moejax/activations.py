"""The MLP activation table, shared by the dense MLP (moejax.layers.mlp) and the experts.

A leaf module: both packages import it, it imports neither.

Checkpoint names (`jax.ad_checkpoint.checkpoint_name`, read by the remat policies of
`moejax.layers.transformer`): with `name_prefix="moe"`, `mlp_hidden` names the wi matmul outputs
"moe_mlpwi" (both branches of a gated type) and the activation's results "moe_act" (act(gate)
and, for gated types, act(gate) * up). Names are identities: they change no value.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.ad_checkpoint import checkpoint_name

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
    x: jax.Array,
    wi_gate: jax.Array | None,
    wi_up: jax.Array,
    activation: str,
    matmul=None,
    *,
    name_prefix: str | None = None,
) -> jax.Array:
    """act(x @ wi_gate) * (x @ wi_up) for gated types, act(x @ wi_up) otherwise.

    `matmul(x, w)` replaces `x @ w` (e.g. a grouped or batched matmul for experts).
    `name_prefix` (e.g. "moe"): name the wi outputs "<prefix>_mlpwi" and the activation's
    results "<prefix>_act" for remat policies (module docstring); None names nothing.
    """
    matmul = matmul or (lambda a, b: a @ b)
    act = activation_fn(activation)

    def name(x: jax.Array, what: str) -> jax.Array:
        return x if name_prefix is None else checkpoint_name(x, f"{name_prefix}_{what}")

    up = name(matmul(x, wi_up), "mlpwi")
    if activation in GATED:
        gate = name(matmul(x, wi_gate), "mlpwi")
        return name(name(act(gate), "act") * up, "act")
    return name(act(up), "act")
