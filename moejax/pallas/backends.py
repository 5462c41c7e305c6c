"""The grouped-matmul backends: one table, and the one place where "auto" is resolved.

A backend is a row of `BACKEND_TABLE` (its name, the platforms "auto" picks it on, the module of
its kernels) and that module's `GMM_KERNELS` record (gmm, tgmm, config type, tuned table).
Modules are imported when a backend is first used, so that the Triton and Mosaic lowerings are
only needed where those backends run. Adding a backend is a module with a `GMM_KERNELS` and one
row here.

Every backend's `gmm` and `tgmm` take the same arguments as `moejax.pallas.gmm` / `tgmm`, with
a resolved `interpret` (bool; backends without kernels to interpret ignore it) and `config`
either None (the backend's tuned table / default) or an instance of its `config_type`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class GmmKernels:
    """What a backend module provides (its module-level `GMM_KERNELS`).

    Attributes:
      gmm: (lhs [M, K], rhs [G, K, N] or [G, N, K], group_sizes [G], *, transpose_rhs,
        preferred_element_type, config, interpret) -> [M, N].
      tgmm: (lhs [M, K], grad [M, N], group_sizes [G], *, num_groups, preferred_element_type,
        config, interpret) -> [G, K, N].
      config_type: the type `config=` must have; None for a backend without tiling.
      tuned_configs: the table the default config comes from (key -> config_type instance);
        None when the config type's defaults are the only tiling.
    """

    gmm: Callable[..., jax.Array]
    tgmm: Callable[..., jax.Array]
    config_type: type | None
    tuned_configs: Mapping[Any, Any] | None


@dataclasses.dataclass(frozen=True)
class GmmBackend:
    """A row of the backend table.

    Attributes:
      name: the `backend=` string.
      module: the module defining `GMM_KERNELS`, imported on first use.
      platforms: `jax.default_backend()` values on which "auto" picks this backend.
    """

    name: str
    module: str
    platforms: tuple[str, ...] = ()

    def kernels(self) -> GmmKernels:
        return importlib.import_module(self.module).GMM_KERNELS


BACKEND_TABLE: dict[str, GmmBackend] = {
    b.name: b
    for b in (
        # Loops over each group's padded row tiles: only the real FLOPs on CPU, where
        # ragged_dot computes all groups.
        GmmBackend("xla", "moejax.pallas.xla_gmm", ("cpu",)),
        GmmBackend("triton", "moejax.pallas.triton_gmm", ("gpu", "cuda", "rocm")),
        GmmBackend("mosaic", "moejax.pallas.mosaic_gmm", ("tpu",)),
        # The oracle every other backend must match; "auto" never picks it.
        GmmBackend("ragged_dot", "moejax.pallas.ragged_gmm"),
        # tokamax's ragged_dot kernels (optional dependency); "auto" never picks it.
        GmmBackend("tokamax", "moejax.pallas.tokamax_gmm"),
    )
}
BACKENDS = ("auto", *BACKEND_TABLE)
# Plain XLA lowers on every platform: "auto" falls back to it where no row claims the platform.
_FALLBACK = "xla"


def resolve_backend(name: str) -> str:
    """The concrete backend for `name`: "auto" -> triton on GPU, mosaic on TPU, xla elsewhere.

    Args:
      name: one of `BACKENDS`.

    Returns:
      `name` itself unless it is "auto".
    """
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is not one of {BACKENDS}")
    if name != "auto":
        return name
    platform = jax.default_backend()
    for backend in BACKEND_TABLE.values():
        if platform in backend.platforms:
            return backend.name
    return _FALLBACK
