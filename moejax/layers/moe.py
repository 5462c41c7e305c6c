"""The MoE feed-forward block: router, routed experts, optional shared experts, aux metrics.

Legend: B batch, L length, T = B * L tokens, D model width, E experts, K choices per token.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.layers import losses
from moejax.layers.config import MoEConfig
from moejax.layers.experts import Experts
from moejax.layers.mlp import MLP
from moejax.layers.router import Router
from moejax.moe.rounding import round_token_counts
from moejax.moe.routing import router_spec, token_mean


class MoE(nn.Module):
    """Mixture-of-Experts FFN: x [B, L, D] -> (y [B, L, D], aux).

    Submodules: `router` (Router, any cfg.router of moejax.moe.routing.ROUTERS), `experts`
    (wi_gate/wi_up/wo [E, ...]), `shared` (an MLP of width cfg.shared_hidden, when
    cfg.num_shared_experts > 0) and `shared_gate` (Dense(1, no bias), Qwen2-MoE:
    y += sigmoid(x @ w) * shared(x), when cfg.shared_expert_gate).

    aux (all float32):
      load_balance_loss: switch loss E * sum_e f_e P_e, raw (unweighted); global or per
        sequence (cfg.load_balance_type). 0 when experts choose (balanced by construction).
      router_z_loss: mean logsumexp(logits)^2, raw.
      aux_loss: cfg.load_balance_coef * load_balance_loss + cfg.router_z_coef * router_z_loss
        + cfg.router_entropy_coef * router_entropy, what the train step adds to the loss.
      expert_load: [E] fraction of the routed assignments each expert received (before drops).
      dropped_fraction: assignments (token choice) or tokens (expert choice) no expert processed.
      router_entropy: mean per-token entropy of the router scores (nats).
      experts_per_token: mean number of real experts chosen per token.
      null_fraction: fraction of the routing places that picked a null expert.

    Attributes:
      cfg: the MoE block config.
      d_model: D.
      dtype: compute dtype (router math is float32 regardless; the combine is float32).
      param_dtype: storage dtype of all parameters.
    """

    cfg: MoEConfig
    d_model: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x_BxLxD: jax.Array,
        *,
        deterministic: bool = True,
        valid_BxL: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Applies the block.

        Args:
          x_BxLxD: input activations, last axis d_model.
          deterministic: eval mode (no router jitter, eval capacity factor).
          valid_BxL: bool, False at padded positions: routed to no expert (no compute, no
            capacity slot, no routed output; shared experts still apply) and left out of every
            aux term and statistic; None = all positions.

        Returns:
          y_BxLxD in `dtype` and the aux dict described on the class.
        """
        cfg = self.cfg
        if x_BxLxD.ndim != 3 or x_BxLxD.shape[-1] != self.d_model:
            raise ValueError(
                f"MoE expects x of shape [B, L, d_model={self.d_model}], got {x_BxLxD.shape}"
            )
        b, length, d = x_BxLxD.shape
        x_TxD = nn.with_logical_constraint(x_BxLxD.reshape(b * length, d), ("tokens", "embed_moe"))
        valid_T = None if valid_BxL is None else valid_BxL.reshape(b * length).astype(bool)
        routing = Router(cfg, self.dtype, self.param_dtype, name="router")(
            x_TxD, deterministic=deterministic, valid_T=valid_T
        )
        # Token rounding (SonicMoE) changes what the experts compute in training, not what the
        # router chose: the balancing losses and statistics below read `routing`.
        dispatched = routing
        if cfg.token_rounding != "none" and not deterministic:
            dispatched = round_token_counts(routing, cfg)
        experts = Experts(cfg, self.dtype, self.param_dtype, name="experts")
        y_TxD, dropped_fraction = experts(x_TxD, dispatched, deterministic=deterministic)
        y_TxD = nn.with_logical_constraint(y_TxD, ("tokens", "embed_moe"))
        y_BxLxD = y_TxD.reshape(b, length, d)

        if cfg.num_shared_experts > 0:
            shared = MLP(
                cfg.shared_hidden,
                cfg.activation,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="shared",
            )(x_BxLxD)
            shared = shared.astype(jnp.float32)
            if cfg.shared_expert_gate:
                gate = nn.Dense(
                    1,
                    use_bias=False,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    kernel_init=nn.with_logical_partitioning(
                        nn.initializers.lecun_normal(), ("embed", "unmodeled")
                    ),
                    name="shared_gate",
                )(x_BxLxD.astype(self.dtype))
                shared = jax.nn.sigmoid(gate.astype(jnp.float32)) * shared
            y_BxLxD = y_BxLxD + shared
        y_BxLxD = nn.with_logical_constraint(
            y_BxLxD.astype(self.dtype), ("batch", "length", "embed")
        )

        e = cfg.num_experts
        places = routing.probs.shape[-1]  # E + null experts
        if not router_spec(cfg.router).token_choice:
            lb = jnp.zeros((), jnp.float32)
            # Every expert fills its C slots: the load is uniform by construction.
            load_E = jnp.full((e,), 1.0 / e, jnp.float32)
        else:
            k = routing.indices.shape[-1]
            # Over E + m: null experts take part in the balance (AdaMoE), unused places do not.
            lb = losses.load_balance_loss(
                routing.probs.reshape(b, length, places),
                routing.indices.reshape(b, length, k),
                num_experts=places,
                per_sequence=cfg.load_balance_type == "sequence",
                valid_BxL=None if valid_T is None else valid_T.reshape(b, length),
            )
            load_E = losses.expert_load(routing.indices, e)
        z = losses.router_z_loss(routing.logits, valid_T)
        entropy = losses.router_entropy(routing.probs, valid_T)
        nulls_T = ((routing.indices >= e) & (routing.indices < places)).mean(
            axis=-1, dtype=jnp.float32
        )
        aux = {
            "load_balance_loss": lb,
            "router_z_loss": z,
            "aux_loss": (
                cfg.load_balance_coef * lb
                + cfg.router_z_coef * z
                + cfg.router_entropy_coef * entropy
            ),
            "expert_load": load_E,
            "dropped_fraction": jnp.asarray(dropped_fraction, jnp.float32),
            "router_entropy": entropy,
            "experts_per_token": token_mean(dispatched.experts_per_token, valid_T),
            "null_fraction": token_mean(nulls_T, valid_T),
        }
        return y_BxLxD, aux
