"""moejax.pallas: grouped matmul ops (gmm, tgmm) with XLA, Triton and Mosaic backends."""

from moejax.pallas.ops import BACKENDS, gmm, tgmm

__all__ = ["BACKENDS", "gmm", "tgmm"]
