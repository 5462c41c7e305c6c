"""Router statistics of a model on calibration batches: what pruning and merging decide from.

`routing_stats` runs the model's own forward pass (its routers, expert bias, groups, null experts,
dispatch) with a method interceptor on `moejax.layers.Experts`: each MoE block's call also writes
per-batch sums (`block_sums`) into the mutable collection "moe_stats" (at
`<layer>/moe/experts/routing_stats`, stacked like every collection under nn.scan). Only sums over
the batch's tokens leave the jitted step and are accumulated in float64 on the host, so no
per-token logits are ever kept across batches.

Statistics describe the routing decision (before capacity drops); expert outputs are computed for
every routed assignment on a dropless plan, whatever the block's dispatch.

Legend: T tokens (batch * length), D model width, E experts, K places per token, R plan rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax.layers.config import ModelConfig, MoEConfig
from moejax.layers.experts import Experts
from moejax.layers.transformer import Transformer, scan_to_unrolled
from moejax.moe import ExpertWeights, Routing, gather_rows, make_plan, run_experts
from moejax.moe.pipeline import dropless_tile

STATS_NAME = "routing_stats"  # variable name in "moe_stats" under <layer>/moe/experts
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class LayerStats:
    """Routing statistics of one MoE layer, as sums over the calibration tokens (float64).

    Attributes:
      layer: index of the decoder layer (0-based, counting dense layers).
      num_tokens: calibration tokens seen.
      counts_E: [E] routed assignments per expert (real experts; null picks not counted).
      coactivation_ExE: [E, E] tokens routed to both i and j; the diagonal is counts_E.
      logit_gram_ExE: [E, E] sum over tokens of logit_i * logit_j (router logits of the real
        experts, before any score function or bias).
      norm_sum_E: [E] sum of ||expert_e(x_t)||_2 over the assignments routed to e.
      weighted_norm_sum_E: [E] the same, each term times its combine weight (EASY-EP).
    """

    layer: int
    num_tokens: int
    counts_E: np.ndarray
    coactivation_ExE: np.ndarray
    logit_gram_ExE: np.ndarray
    norm_sum_E: np.ndarray
    weighted_norm_sum_E: np.ndarray

    @property
    def num_experts(self) -> int:
        return self.counts_E.shape[0]

    @property
    def frequency(self) -> np.ndarray:
        """[E] fraction of the routed assignments each expert received (sums to 1)."""
        return self.counts_E / max(self.counts_E.sum(), 1.0)

    @property
    def similarity(self) -> np.ndarray:
        """[E, E] cosine similarity of the experts' router-logit columns over the calibration
        tokens (MC-SMoE's router-logits similarity); 0 for an all-zero column."""
        norm_E = np.sqrt(np.maximum(np.diag(self.logit_gram_ExE), 0.0))
        denom = np.outer(norm_E, norm_E)
        return np.where(denom > 0, self.logit_gram_ExE / np.where(denom > 0, denom, 1.0), 0.0)

    @property
    def output_norm(self) -> np.ndarray:
        """[E] mean output norm of each expert over the assignments routed to it (0 if none)."""
        return self.norm_sum_E / np.maximum(self.counts_E, 1.0)

    @property
    def weighted_output_norm(self) -> np.ndarray:
        """[E] mean gate-weighted output norm over the assignments routed to each expert."""
        return self.weighted_norm_sum_E / np.maximum(self.counts_E, 1.0)


def block_sums(
    x_TxD: jax.Array, routing: Routing, experts: ExpertWeights, cfg: MoEConfig
) -> dict[str, jax.Array]:
    """One MoE block's statistics on one batch, as float32 sums over its T tokens.

    Args:
      x_TxD: the block's input tokens (what its experts see).
      routing: the block's routing of those tokens.
      experts: the block's expert weights, in x's dtype.
      cfg: the block config (num_experts, activation, execution).

    Returns:
      tokens [], counts [E], coactivation [E, E], logit_gram [E, E], norm_sum [E],
      weighted_norm_sum [E] (the fields of LayerStats, unnormalised).
    """
    e = cfg.num_experts
    indices_TxK = routing.indices
    # Any index >= E (null expert, unused place) is "no expert": one-hot class E, then cut.
    expert_TxK = jnp.minimum(indices_TxK, e)
    chosen_TxE = jax.nn.one_hot(expert_TxK, e + 1, dtype=jnp.float32).sum(axis=1)[:, :e]
    logits_TxE = routing.logits[:, :e].astype(jnp.float32)

    plan = make_plan("dropless", indices_TxK, e, tile_m=dropless_tile(cfg))
    out_RxD = run_experts(
        gather_rows(x_TxD, plan),
        experts,
        plan,
        activation=cfg.activation,
        backend=cfg.execution.gmm_backend,
        interpret=cfg.execution.gmm_interpret,
    )
    norm_R = jnp.linalg.norm(out_RxD.astype(jnp.float32), axis=-1)
    # Empty rows point at assignment T * K: the appended sentinel gives them expert E, weight 0.
    expert_R = jnp.append(expert_TxK.reshape(-1), e)[plan.assign_of_row_R]
    weight_R = jnp.append(routing.weights.reshape(-1), 0.0)[plan.assign_of_row_R]
    return {
        "tokens": jnp.asarray(x_TxD.shape[0], jnp.float32),
        "counts": chosen_TxE.sum(axis=0),
        "coactivation": jnp.dot(chosen_TxE.T, chosen_TxE, precision=_HIGHEST),
        "logit_gram": jnp.dot(logits_TxE.T, logits_TxE, precision=_HIGHEST),
        "norm_sum": jax.ops.segment_sum(norm_R, expert_R, num_segments=e + 1)[:e],
        "weighted_norm_sum": jax.ops.segment_sum(norm_R * weight_R, expert_R, e + 1)[:e],
    }


def _record_block_sums(next_fun, args, kwargs, context):
    """Method interceptor: an Experts call also writes block_sums into "moe_stats"."""
    module = context.module
    if (
        isinstance(module, Experts)
        and context.method_name == "__call__"
        and module.is_mutable_collection("moe_stats")
        and not module.is_initializing()
    ):
        x_TxD, routing = args[:2]
        dtype = module.dtype

        def weight(name: str) -> jax.Array:
            return module.get_variable("params", name).astype(dtype)

        experts = ExpertWeights(
            weight("wi_gate") if module.cfg.gated else None, weight("wi_up"), weight("wo")
        )
        sums = block_sums(x_TxD.astype(dtype), routing, experts, module.cfg)
        module.put_variable("moe_stats", STATS_NAME, sums)
    return next_fun(*args, **kwargs)


def moe_layer_indices(model_cfg: ModelConfig) -> list[int]:
    """Decoder-layer indices of the MoE layers, in order."""
    return [i for i in range(model_cfg.num_layers) if model_cfg.is_moe_layer(i)]


def _check_tokens(tokens: Any, vocab_size: int) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(
            f"batches: each batch must be a 2-D integer token array [B, L], got shape "
            f"{tokens.shape} dtype {tokens.dtype}"
        )
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"batches: token ids must be in [0, vocab_size={vocab_size})")
    return tokens.astype(np.int32)


def routing_stats(
    model_cfg: ModelConfig, variables: Mapping[str, Any], batches: Iterable[Any]
) -> tuple[LayerStats, ...]:
    """Routing statistics of every MoE layer over calibration batches (evaluation mode).

    Args:
      model_cfg: the model's config (scan_layers True or False, any first_dense_layers /
        moe_every).
      variables: the model's variables ("params", and "moe_state" when it has an expert bias);
        boxed (LogicallyPartitioned) leaves are unboxed. Other collections are ignored.
      batches: iterable of int token arrays [B, L] (model inputs; shapes may differ between
        batches, each new shape compiles once).

    Returns:
      One LayerStats per MoE layer, in layer order.
    """
    moe_layers = moe_layer_indices(model_cfg)
    if not moe_layers:
        raise ValueError("model_cfg.moe: routing_stats needs a model with at least one MoE layer")
    variables = nn.meta.unbox(variables)
    variables = {k: v for k, v in variables.items() if k in ("params", "moe_state")}
    model = Transformer(model_cfg)

    @jax.jit
    def batch_sums(variables, tokens_BxL):
        with nn.intercept_methods(_record_block_sums):
            _, mutated = model.apply(
                variables, tokens_BxL, deterministic=True, mutable=["moe_stats"]
            )
        tree = mutated["moe_stats"]
        if model_cfg.scan_layers:
            tree = scan_to_unrolled(model_cfg, tree)
        return [tree[f"layers_{i}"]["moe"]["experts"][STATS_NAME] for i in moe_layers]

    totals = None
    for tokens in batches:
        sums = jax.device_get(batch_sums(variables, _check_tokens(tokens, model_cfg.vocab_size)))
        sums = [{k: np.asarray(v, np.float64) for k, v in layer.items()} for layer in sums]
        if totals is None:
            totals = sums
        else:
            totals = [{k: t[k] + s[k] for k in t} for t, s in zip(totals, sums, strict=True)]
    if totals is None:
        raise ValueError("batches: routing_stats needs at least one calibration batch")
    return tuple(
        LayerStats(
            layer=i,
            num_tokens=int(t["tokens"]),
            counts_E=t["counts"],
            coactivation_ExE=t["coactivation"],
            logit_gram_ExE=t["logit_gram"],
            norm_sum_E=t["norm_sum"],
            weighted_norm_sum_E=t["weighted_norm_sum"],
        )
        for i, t in zip(moe_layers, totals, strict=True)
    )
