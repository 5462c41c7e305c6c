"""moejax.compress: shrink an MoE model with what its routers know.

    stats = routing_stats(model_cfg, variables, batches)         # per MoE layer, sums only
    model_cfg, variables = prune_experts(model_cfg, variables, stats, N, score="frequency")
    model_cfg, variables = merge_experts(model_cfg, variables, stats, N)   # MC-SMoE
    model_cfg, variables = quantize_experts(model_cfg, variables, 8)        # int8 experts (qwix)

Pure functions over a model's config and variables (scanned or unrolled layers, trained here or
imported with moejax.hf.from_hf); each returns a new (model_cfg, variables) with N experts per
MoE layer (quantize_experts: the same experts, stored as int8/int4 values and scales).

On a training run's checkpoint, `python -m moejax.compress --workdir=DIR --out=DIR2` does the
same in stages (`--experts=N --method=merge|prune`, then `--bits=8|4 [--group_size=G]
[--policy=uniform|mixed]`, either or both) and writes DIR2 as a run that `python -m
moejax.train` evaluates, trains on (a quantized model with its integer expert values and their
scales frozen: `moejax.train.state.frozen_params`) and exports (`moejax.hf.to_hf` writes
quantized experts dequantized); see moejax/compress/__main__.py.
"""

from moejax.compress.merge import (
    expert_groups,
    match_hidden_units,
    merge_experts,
    permute_hidden_units,
)
from moejax.compress.prune import PRUNE_SCORES, kept_experts, prune_experts
from moejax.compress.quantize import (
    QUANT_POLICIES,
    dequantize_experts,
    expert_nbytes,
    quantize_experts,
)
from moejax.compress.stats import LayerStats, block_sums, routing_stats

__all__ = [
    "PRUNE_SCORES",
    "QUANT_POLICIES",
    "dequantize_experts",
    "expert_nbytes",
    "quantize_experts",
    "LayerStats",
    "block_sums",
    "expert_groups",
    "kept_experts",
    "match_hidden_units",
    "merge_experts",
    "permute_hidden_units",
    "prune_experts",
    "routing_stats",
]
