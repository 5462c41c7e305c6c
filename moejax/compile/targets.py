"""Compile targets: `tpu-v5e-N | tpu-v5p-N | tpu-v6e-N | gpu-h100-N | gpu-h200-N | gpu-b200-N`.

A target is a chip kind and a chip count N; `topology(target)` gives its devices without any
accelerator present (libtpu for TPU, the jax CUDA plugin for GPU: the `aot` extra).

TPU: peak bf16 FLOP/s, HBM bytes and bandwidth per chip are Google's published per-chip figures;
the topology name is the smallest slice shape with N chips in each generation's layout (v5e/v6e
2-D, v5p a 3-D torus).
GPU: everything comes from the shipped GpuTargetConfigProto (XLA's target_config/specs less
`collective_memory_granularity`, which jaxlib 0.10 rejects). Peak = 2 FLOP per FMA x
matrix-unit clock x units per SM x bf16 FMAs per clock (rate key 16 = BF16) x SMs, e.g. H100:
2 x 1.8295 GHz x 4 x 512 x 132 = 989 TFLOP/s. Hosts hold 8 GPUs each (N >= 8 must be a
multiple of 8).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from functools import cache
from pathlib import Path

_SPECS = Path(__file__).resolve().parent / "targets"

# kind -> (peak bf16 FLOP/s, HBM bytes, HBM bytes/s, topology dims)
_TPU = {
    "v5e": (197e12, 16 * 2**30, 819e9, 2),
    "v5p": (459e12, 95 * 2**30, 2765e9, 3),
    "v6e": (918e12, 32 * 2**30, 1640e9, 2),
}
_GPU_SPEC_FILES = {"h100": "h100_sxm.txtpb", "h200": "h200.txtpb", "b200": "b200.txtpb"}
_GPUS_PER_HOST = 8
TARGET_KINDS = tuple(f"tpu-{k}" for k in _TPU) + tuple(f"gpu-{k}" for k in _GPU_SPEC_FILES)


@dataclasses.dataclass(frozen=True)
class Target:
    """One compile target.

    Attributes:
      name: as given, e.g. "tpu-v5p-128".
      platform: "tpu" or "cuda".
      kind: "v5e", "v5p", "v6e", "h100", "h200" or "b200".
      num_devices: chips: N, except for v5p, whose name counts TensorCores (2 per chip, Cloud
        TPU naming): tpu-v5p-128 is 64 chips, v5p:4x4x4.
      peak_flops: dense bf16 FLOP/s per chip.
      hbm_bytes: device memory per chip.
      hbm_bandwidth: bytes/s per chip.
    """

    name: str
    platform: str
    kind: str
    num_devices: int
    peak_flops: float
    hbm_bytes: int
    hbm_bandwidth: float


def _tpu_topology_name(kind: str, n: int) -> str:
    dims = _TPU[kind][3]
    # Near-cube factorisation with power-of-two sides, smallest side first (v5p:2x2x1 style).
    k = int(math.log2(n))
    sides = [2 ** (k // dims + (i < k % dims)) for i in range(dims)]
    if dims == 3 and n < 8:
        sides = {1: [1, 1, 1], 2: [1, 2, 1], 4: [2, 2, 1]}[n]
    return f"{kind}:" + "x".join(str(s) for s in sorted(sides, reverse=dims == 3))


@cache
def gpu_spec(kind: str) -> str:
    """GpuTargetConfigProto text of a GPU kind."""
    return (_SPECS / _GPU_SPEC_FILES[kind]).read_text()


def _gpu_numbers(spec: str) -> tuple[float, int, float]:
    def field(name: str, text: str = spec) -> str:
        return re.search(rf"\b{name}: ([0-9.]+)", text).group(1)

    matrix = spec.split("matrix_unit_description", 1)[1]
    bf16 = re.search(r"key: 16\s+value \{([^}]*)\}", matrix).group(1)
    peak = (
        2
        * float(field("clock_rate_ghz", bf16))
        * 1e9
        * int(field("units_per_core", bf16))
        * int(field("ops_per_clock", bf16))
        * int(field("core_count"))
    )
    return peak, int(field("device_memory_size")), float(field("memory_bandwidth"))


def parse_target(name: str) -> Target:
    """Target from its name; ValueError naming the allowed forms on anything else."""
    allowed = f"allowed: {' | '.join(k + '-N' for k in TARGET_KINDS)}"
    m = re.fullmatch(r"(tpu|gpu)-([a-z0-9]+)-([0-9]+)", name or "")
    if not m or f"{m.group(1)}-{m.group(2)}" not in TARGET_KINDS:
        raise ValueError(f"--target={name!r} is invalid; {allowed}")
    family, kind, n = m.group(1), m.group(2), int(m.group(3))
    if family == "tpu":
        if n < 1 or n & (n - 1):
            raise ValueError(f"--target={name!r} is invalid: TPU chip counts are powers of two")
        peak, hbm, bw, _ = _TPU[kind]
        chips = max(1, n // 2) if kind == "v5p" else n
        return Target(name, "tpu", kind, chips, peak, hbm, bw)
    if n < 1 or (n > _GPUS_PER_HOST and n % _GPUS_PER_HOST):
        raise ValueError(
            f"--target={name!r} is invalid: GPU counts above {_GPUS_PER_HOST} fill hosts of "
            f"{_GPUS_PER_HOST}"
        )
    peak, hbm, bw = _gpu_numbers(gpu_spec(kind))
    return Target(name, "cuda", kind, n, peak, hbm, bw)


# jax Device.device_kind substrings -> target kinds; the first match wins ("TPU v5 lite" is a
# v5e, a plain "TPU v5" a v5p).
_DEVICE_KINDS = (
    ("TPU v5 lite", "tpu-v5e"),
    ("TPU v5e", "tpu-v5e"),
    ("TPU v5", "tpu-v5p"),
    ("TPU v6", "tpu-v6e"),
    ("H100", "gpu-h100"),
    ("H200", "gpu-h200"),
    ("B200", "gpu-b200"),
)


def target_of_device_kind(device_kind: str) -> Target | None:
    """The one-chip Target of a jax device kind ("TPU v5 lite", "NVIDIA H100 80GB HBM3"), or
    None for a kind this table does not know."""
    for needle, kind in _DEVICE_KINDS:
        if needle in device_kind:
            return parse_target(f"{kind}-1")
    return None


def topology(target: Target):
    """Devices of `target` with no accelerator present (needs the `aot` extra).

    On GPU the process must not validate a local CUDA install: run with JAX_PLATFORMS=cpu.
    """
    from jax.experimental import topologies

    if target.platform == "tpu":
        # libtpu takes a host-wide lock meant for processes that own the chips; a deviceless
        # compile owns none, so concurrent compiles (pytest -n, several CLIs) must not collide.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        name = _tpu_topology_name(target.kind, target.num_devices)
        options = {}
        if target.num_devices < 4:
            # Hosts hold 2x2(x1) chips; a smaller slice is a host of its own size.
            sides = tuple(int(s) for s in name.split(":")[1].split("x"))
            options["chips_per_host_bounds"] = sides + (1,) * (3 - len(sides))
        return topologies.get_topology_desc(platform="tpu", topology_name=name, **options)
    hosts = max(1, target.num_devices // _GPUS_PER_HOST)
    per_host = min(target.num_devices, _GPUS_PER_HOST)
    return topologies.get_topology_desc(
        platform="cuda",
        topology_name="",
        topology=f"1x{hosts}x{per_host}",
        target_config=gpu_spec(target.kind),
    )
