"""Running the experts on a plan's rows (stage 3 of the pipeline), by the plan's layout.

One function, `run_experts`, takes the [R, D] rows a `DispatchPlan` gathered and returns each
row through its expert's MLP; the grouped matmuls go through `moejax.pallas` only:

- "compact": rows sorted by expert -> `moejax.pallas.gmm` for each of the MLP's matmuls;
- "padded": each expert's rows start on a row tile -> `moejax.pallas.expert_mlp_padded`, one
  loop over the experts' row tiles running each tile's whole MLP (the CPU path);
- "buffers": [E, C, D] per-expert buffers -> one batched einsum per matmul.

The compact and buffers layouts name the wi outputs "moe_mlpwi" and the activation "moe_act"
(`mlp_hidden(..., name_prefix="moe")`) for the remat policies; the padded layout cannot: its
hidden activations live inside the fused tile loop, whose custom VJP keeps the pre-activations as
its own residuals, so a policy sees only the rows going in and out (named by the caller,
`moejax.moe.pipeline.apply_plan`).

Legend: R rows, D model width, F expert hidden width, E experts, C capacity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moejax import pallas
from moejax.activations import GATED, activation_fn, mlp_hidden
from moejax.moe.plans import DispatchPlan


def dequantize_weight(qvalue_ExKxN: jax.Array, scale_ExGxN: jax.Array) -> jax.Array:
    """float32 [E, K, N] of a quantized expert weight: qvalue * scale, each scale covering
    K / G consecutive rows of the contraction axis K (G = 1: per output channel)."""
    return pallas.dequantize(pallas.QuantizedWeight(qvalue_ExKxN, scale_ExGxN), jnp.float32)


def _dequantized(w: jax.Array | pallas.QuantizedWeight | None, dtype) -> jax.Array | None:
    """A layout that cannot take quantized weights gets the whole float weight in `dtype`."""
    return w.dequantize(dtype) if isinstance(w, pallas.QuantizedWeight) else w


class ExpertWeights(NamedTuple):
    """The routed experts' weights, in the compute dtype (or local shards of them).

    Each may instead be a `moejax.pallas.QuantizedWeight` (int8 values, float32 scales over the
    contraction axis): the compact layout hands it to `moejax.pallas.gmm`, which dequantizes
    per tile; the padded and buffers layouts dequantize it in full to the rows' dtype first.

    Attributes:
      wi_gate: [E, D, F] gate branch, None for non-gated activations.
      wi_up: [E, D, F].
      wo: [E, F, D].
    """

    wi_gate: jax.Array | pallas.QuantizedWeight | None
    wi_up: jax.Array | pallas.QuantizedWeight
    wo: jax.Array | pallas.QuantizedWeight


def run_experts(
    rows_RxD: jax.Array,
    weights: ExpertWeights,
    plan: DispatchPlan,
    *,
    activation: str,
    backend: str = "auto",
    interpret: bool | None = None,
    buffer_constraint: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """Each row through its expert's MLP.

    Args:
      rows_RxD: rows from `gather_rows(x, plan)`.
      weights: the experts' weights, in rows' dtype (or quantized, `ExpertWeights`).
      plan: the DispatchPlan (its layout picks the kernel, module docstring).
      activation: MLP type (moejax.activations).
      backend, interpret: `moejax.pallas.gmm` backend and interpret mode ("compact" layout).
      buffer_constraint: optional function applied to the [E, C, D] buffers ("buffers" layout),
        e.g. a logical sharding constraint.

    Returns:
      [R, D] expert outputs; empty rows are zero.
    """
    if plan.layout != "compact":
        weights = ExpertWeights(*(_dequantized(w, rows_RxD.dtype) for w in weights))
    if plan.layout == "padded":
        return pallas.expert_mlp_padded(
            rows_RxD,
            weights.wi_gate,
            weights.wi_up,
            weights.wo,
            plan.tile_group,
            plan.num_used_tiles,
            act=activation_fn(activation),
            gated=activation in GATED,
            tile_m=plan.tile_m,
        )
    if plan.layout == "buffers":
        x_ExCxD = rows_RxD.reshape(plan.num_experts, plan.capacity, -1)
        if buffer_constraint is not None:
            x_ExCxD = buffer_constraint(x_ExCxD)

        def batched(lhs, rhs):
            return jnp.einsum("ecd,edf->ecf", lhs, rhs)

        h_ExCxF = mlp_hidden(
            x_ExCxD, weights.wi_gate, weights.wi_up, activation, batched, name_prefix="moe"
        )
        out_ExCxD = batched(h_ExCxF, weights.wo)
        if buffer_constraint is not None:
            out_ExCxD = buffer_constraint(out_ExCxD)
        return out_ExCxD.reshape(rows_RxD.shape)

    def grouped(lhs, rhs):
        return pallas.gmm(
            lhs, rhs, plan.group_sizes_E, backend=backend, config=None, interpret=interpret
        )

    h_RxF = mlp_hidden(
        rows_RxD, weights.wi_gate, weights.wi_up, activation, grouped, name_prefix="moe"
    )
    return grouped(h_RxF, weights.wo)
