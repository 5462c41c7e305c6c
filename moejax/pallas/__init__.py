"""moejax.pallas: grouped matmul ops (gmm, tgmm) with XLA, Triton and Mosaic backends, and the
fused expert MLP on the tile-padded layout (the XLA/CPU path of the dropless MoE layer). gmm's
rhs may be a QuantizedWeight (int8 values + scales), dequantized per tile."""

from moejax.pallas.backends import BACKENDS, resolve_backend
from moejax.pallas.expert_mlp import expert_mlp_padded
from moejax.pallas.ops import gmm, tgmm
from moejax.pallas.quantized import QuantizedWeight, dequantize
from moejax.pallas.xla_gmm import PaddedLayout, effective_tile, num_padded_tiles, padded_layout

__all__ = [
    "BACKENDS",
    "PaddedLayout",
    "QuantizedWeight",
    "dequantize",
    "effective_tile",
    "expert_mlp_padded",
    "gmm",
    "num_padded_tiles",
    "padded_layout",
    "resolve_backend",
    "tgmm",
]
