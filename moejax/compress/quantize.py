"""Quantized routed experts: int8 / int4 weights with per-channel or per-group scales (qwix).

    new_cfg, new_vars = quantize_experts(model_cfg, variables, bits=8)
    new_cfg, new_vars = quantize_experts(model_cfg, variables, bits=4, group_size=32)
    new_cfg, new_vars = quantize_experts(model_cfg, variables, bits=4, policy="mixed", stats=stats)

Each routed expert weight [E, K, N] (wi_gate, wi_up [E, D, F]; wo [E, F, D]; K the contraction
axis) is quantized symmetrically with qwix (`qwix.quantize`, absmax calibration): one float32
scale per expert, output channel and group of `group_size` contraction rows (None: the whole
contraction axis, i.e. per channel). The values are stored as int8 (int4 values lie in
[-8, 7]) under the weight's name, the scales as `<name>_scale` [E, K / group, N]; the model
config gets moe.expert_bits / moe.expert_group_size, and `moejax.layers.Experts` dequantizes
them before the grouped matmul. Router, shared experts, attention and embeddings stay as they
are.

Policy "mixed" (QuantMoE-Bench's observation that a few heavily used experts carry most of the
error): in each layer the `keep_fraction` most used experts (by calibration-token count,
`routing_stats`) are quantized to 8 bits and the others to `bits`.

`expert_nbytes` counts the experts' storage at their logical width (4-bit values as half a byte)
plus the scales; `dequantize_experts` turns a quantized model back into a float one (for
`moejax.hf.to_hf`, or to fine-tune).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moejax.compress.layers import check_stats, edit_moe_layers
from moejax.compress.stats import LayerStats
from moejax.layers.config import EXPERT_BITS, ModelConfig
from moejax.moe.experts import dequantize_weight

EXPERT_WEIGHTS = ("wi_gate", "wi_up", "wo")
QUANT_POLICIES = ("uniform", "mixed")


def _qwix_quantize(w_ExKxN: np.ndarray, bits: int, group: int) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values [E, K, N], float32 scales [E, K / group, N]) of one weight via qwix."""
    import qwix  # noqa: PLC0415 (optional dependency: the `quant` extra)

    qtype = jnp.int8 if bits == 8 else jnp.int4
    e, k, n = w_ExKxN.shape
    q = qwix.quantize(
        jnp.asarray(w_ExKxN, jnp.float32),
        qtype,
        channelwise_axes=(0, 2),
        tiled_axes={1: group},
        scale_dtype=jnp.float32,
    )
    values = np.array(jnp.asarray(q.qvalue).astype(jnp.int8))
    scale = np.array(q.scale, np.float32).reshape(e, k // group, n)
    return values, scale


def _layer_bits(stats: LayerStats | None, e: int, bits: int, policy: str, keep: float):
    """[E] bits of each expert of one layer."""
    bits_E = np.full(e, bits)
    if policy == "mixed":
        n_high = int(round(keep * e))
        top = np.argsort(-stats.counts_E, kind="stable")[:n_high]
        bits_E[top] = 8
    return bits_E


def quantize_experts(
    model_cfg: ModelConfig,
    variables: Mapping[str, Any],
    bits: int = 8,
    group_size: int | None = None,
    policy: str = "uniform",
    *,
    stats: Sequence[LayerStats] | None = None,
    keep_fraction: float = 0.25,
) -> tuple[ModelConfig, dict[str, Any]]:
    """Quantizes every MoE layer's routed experts (module docstring).

    Args:
      model_cfg: the model's config (float experts).
      variables: its variables, either layout.
      bits: 8 or 4.
      group_size: contraction rows per scale (must divide D and F); None = per channel.
      policy: "uniform" (every expert at `bits`) or "mixed" (the most used at 8 bits).
      stats: `routing_stats(...)`, required by policy="mixed".
      keep_fraction: policy="mixed": the share of each layer's experts kept at 8 bits.

    Returns:
      (model_cfg with moe.expert_bits / expert_group_size, variables with int8 expert weights
      and their `<name>_scale` leaves).

    Raises:
      ValueError naming the argument: a dense model, already quantized experts, bits or policy
      not allowed, a group size not dividing the contraction axes, "mixed" without stats.
    """
    moe = model_cfg.moe
    if moe is None:
        raise ValueError("model_cfg.moe: the model has no MoE layer to quantize")
    if moe.expert_bits is not None:
        raise ValueError(f"model_cfg.moe.expert_bits={moe.expert_bits}: already quantized")
    if bits not in EXPERT_BITS:
        raise ValueError(f"bits={bits!r} is invalid: allowed values are {EXPERT_BITS}")
    if policy not in QUANT_POLICIES:
        raise ValueError(f"policy={policy!r} is invalid: allowed values are {QUANT_POLICIES}")
    if policy == "mixed":
        if stats is None:
            raise ValueError("policy='mixed' needs stats (from routing_stats)")
        check_stats(model_cfg, stats)
        if not 0.0 <= keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction={keep_fraction!r} is invalid: must be in [0, 1]")
    for size, what in ((model_cfg.d_model, "d_model"), (moe.d_ff, "moe.d_ff")):
        if group_size is not None and (group_size < 1 or size % group_size):
            raise ValueError(
                f"group_size={group_size!r} is invalid: must be an integer >= 1 dividing "
                f"{what}={size}"
            )
    new_cfg = dataclasses.replace(
        model_cfg,
        moe=dataclasses.replace(moe, expert_bits=bits, expert_group_size=group_size),
    )
    by_layer = {s.layer: s for s in stats} if stats is not None else {}

    def edit(layer: int, collection: str, block: dict) -> dict:
        if collection != "params" or "experts" not in block:
            return block
        experts = dict(block["experts"])
        e = moe.num_experts
        bits_E = _layer_bits(by_layer.get(layer), e, bits, policy, keep_fraction)
        for name in EXPERT_WEIGHTS:
            if name not in experts:
                continue
            w = np.asarray(jax.device_get(experts[name]), np.float32)
            group = group_size or w.shape[1]
            values, scale = _qwix_quantize(w, int(bits_E.min()), group)
            if (bits_E == 8).any() and (bits_E != 8).any():
                high_values, high_scale = _qwix_quantize(w, 8, group)
                high = bits_E == 8
                values[high], scale[high] = high_values[high], high_scale[high]
            experts[name] = jnp.asarray(values)
            experts[f"{name}_scale"] = jnp.asarray(scale)
        experts["expert_bits"] = jnp.asarray(bits_E, jnp.int8)
        return {**block, "experts": experts}

    new_vars = edit_moe_layers(model_cfg, variables, edit)
    return new_cfg, _split_bits(new_vars)


def _split_bits(variables: dict) -> dict:
    """Moves the per-expert bit widths (bookkeeping for `expert_nbytes`) out of "params" into
    collection "quant_bits", so the params tree is exactly what `Experts` declares."""

    def pop(tree):
        out, popped = {}, {}
        for k, v in tree.items():
            if isinstance(v, Mapping):
                o, p = pop(v)
                out[k] = o
                if p:
                    popped[k] = p
            elif k == "expert_bits":
                popped[k] = v
            else:
                out[k] = v
        return out, popped

    params, bits = pop(variables["params"])
    return {**variables, "params": params, "quant_bits": bits}


def expert_nbytes(model_cfg: ModelConfig, variables: Mapping[str, Any]) -> int:
    """Bytes of every MoE layer's routed expert weights: parameter bytes for float experts;
    for quantized ones each value at its expert's logical width (8 or 4 bits, from
    "quant_bits", else moe.expert_bits) plus the float32 scales.

    `quantize_experts` also returns collection "quant_bits" (each expert's width, [E] int8 per
    MoE layer): bookkeeping for this count, which the model ignores."""
    moe = model_cfg.moe
    total = 0
    bits_by_layer: dict[int, np.ndarray] = {}
    if "quant_bits" in variables:

        def read_bits(layer, collection, block):
            bits_by_layer[layer] = np.asarray(block["experts"]["expert_bits"])
            return block

        edit_moe_layers(model_cfg, {"quant_bits": variables["quant_bits"]}, read_bits)

    def count(layer, collection, block):
        nonlocal total
        if collection != "params" or "experts" not in block:
            return block
        for name, leaf in block["experts"].items():
            leaf = np.asarray(jax.device_get(leaf))
            if moe.expert_bits is None or name.endswith("_scale"):
                total += leaf.size * leaf.dtype.itemsize
                continue
            bits_E = bits_by_layer.get(layer, np.full(leaf.shape[0], moe.expert_bits))
            total += sum(leaf[0].size * int(b) // 8 for b in bits_E)
        return block

    edit_moe_layers(model_cfg, {"params": variables["params"]}, count)
    return total


def dequantize_experts(
    model_cfg: ModelConfig, variables: Mapping[str, Any], param_dtype: str = "float32"
) -> tuple[ModelConfig, dict[str, Any]]:
    """The float model of a quantized one (the experts' dequantized weights)."""
    moe = model_cfg.moe
    if moe is None or moe.expert_bits is None:
        raise ValueError("model_cfg.moe.expert_bits is None: the experts are not quantized")
    dtype = jnp.dtype(param_dtype)

    def edit(layer, collection, block):
        del layer
        if collection != "params" or "experts" not in block:
            return block
        experts = dict(block["experts"])
        for name in EXPERT_WEIGHTS:
            if name in experts:
                scale = experts.pop(f"{name}_scale")
                experts[name] = dequantize_weight(jnp.asarray(experts[name]), scale).astype(dtype)
        return {**block, "experts": experts}

    variables = {k: v for k, v in variables.items() if k != "quant_bits"}
    new_cfg = dataclasses.replace(
        model_cfg, moe=dataclasses.replace(moe, expert_bits=None, expert_group_size=None)
    )
    return new_cfg, edit_moe_layers(model_cfg, variables, edit)
