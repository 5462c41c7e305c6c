"""Device mesh construction and multi-process start-up.

The mesh always has the four axes ("data", "fsdp", "expert", "tensor"), in that order, so
logical-axis rules and partition specs can name any of them whatever the sizes (a size-1 axis
shards nothing). Axis types are `Auto`: the layers rely on GSPMD propagating shardings from the
parameters and from `nn.with_logical_constraint`, and the expert-parallel path enters
`jax.shard_map` explicitly.

Multi-process runs (TPU pod slices, multi-node GPU clusters) call `initialize_distributed()`
first; every helper here then works on `jax.devices()`, the global device list, and nothing
assumes a single process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils

MESH_AXES = ("data", "fsdp", "expert", "tensor")

log = logging.getLogger(__name__)


def mesh_shape(
    num_devices: int, *, data: int = -1, fsdp: int = 1, expert: int = 1, tensor: int = 1
) -> dict[str, int]:
    """Resolves the axis sizes for `num_devices` devices.

    Args:
      num_devices: total devices the mesh spans.
      data, fsdp, expert, tensor: axis sizes; at most one may be -1, meaning "all devices the
        other axes leave".

    Returns:
      {"data": ..., "fsdp": ..., "expert": ..., "tensor": ...} with product `num_devices`.
    """
    sizes = {"data": data, "fsdp": fsdp, "expert": expert, "tensor": tensor}
    for name, size in sizes.items():
        if not isinstance(size, int | np.integer) or isinstance(size, bool):
            raise ValueError(f"mesh axis {name}={size!r} must be an integer >= 1 or -1")
        if size == 0 or size < -1:
            raise ValueError(f"mesh axis {name}={size} must be >= 1, or -1 for the remainder")
    rest = [name for name, size in sizes.items() if size == -1]
    if len(rest) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {', '.join(rest)}")
    fixed = int(np.prod([s for s in sizes.values() if s != -1]))
    if rest:
        if num_devices % fixed:
            raise ValueError(
                f"mesh axis {rest[0]}=-1 cannot fill {num_devices} devices: the other axes "
                f"({_describe(sizes)}) multiply to {fixed}, which does not divide {num_devices}"
            )
        sizes[rest[0]] = num_devices // fixed
    elif fixed != num_devices:
        wrong = [n for n, s in sizes.items() if s > 1] or ["data"]
        raise ValueError(
            f"mesh axes {_describe(sizes)} multiply to {fixed} but there are {num_devices} "
            f"devices; change {', '.join(wrong)} or set one axis to -1"
        )
    return {name: int(size) for name, size in sizes.items()}


def _describe(sizes: dict[str, int]) -> str:
    return ", ".join(f"{n}={s}" for n, s in sizes.items())


def make_mesh(
    data: int = -1,
    fsdp: int = 1,
    expert: int = 1,
    tensor: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> jax.sharding.Mesh:
    """A ("data", "fsdp", "expert", "tensor") mesh with Auto axis types.

    Devices are ordered by `jax.make_mesh`; where it cannot place an axis without splitting a
    physical axis of the topology (fsdp=8 x expert=8 on a v5p 4x4x4 torus), by
    `mesh_utils.create_device_mesh(..., allow_split_physical_axes=True)`.

    Args:
      data, fsdp, expert, tensor: axis sizes (-1 = the remaining devices, at most one axis).
      devices: devices to use; default all of `jax.devices()` (all processes).

    Returns:
      jax.sharding.Mesh of shape (data, fsdp, expert, tensor).

    Raises:
      ValueError: sizes that do not multiply to the device count (names the axis).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(len(devices), data=data, fsdp=fsdp, expert=expert, tensor=tensor)
    shape = tuple(sizes[a] for a in MESH_AXES)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    # jax.make_mesh orders devices for the physical topology (ICI rings on TPU, NVLink islands
    # on GPU) so that the innermost axes, expert and tensor, get the fastest links.
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    except NotImplementedError:
        # Each logical axis must be a product of whole physical axes there: an 8-way axis has
        # no place on v5p's 4x4x4 torus. Splitting a physical axis (4 = 2 x 2, one half to each
        # of two logical axes) places it, as a pod job must, at the cost of rings that span
        # part of an axis.
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return jax.sharding.Mesh(grid, MESH_AXES, axis_types=auto)


# Environment variables that mean "this process is one of several": SLURM, Open MPI, the
# variables jax.distributed reads itself, and TPU pod metadata (Cloud TPU VMs).
_MULTIPROCESS_ENV = (
    "JAX_COORDINATOR_ADDRESS",
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_HOSTNAMES",
    "MEGASCALE_COORDINATOR_ADDRESS",
)


def _looks_multiprocess() -> bool:
    # Explicit switch, for clusters the variables below do not reveal (e.g. Cloud TPU VMs,
    # where jax.distributed finds the other hosts through the metadata server).
    forced = os.environ.get("MOEJAX_DISTRIBUTED")
    if forced is not None:
        return forced.strip().lower() in ("1", "true", "yes")
    for var in _MULTIPROCESS_ENV:
        value = os.environ.get(var)
        if not value:
            continue
        if var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
            if int(value) > 1:
                return True
        elif var == "TPU_WORKER_HOSTNAMES":
            if len(value.split(",")) > 1:
                return True
        else:
            return True
    return False


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    force: bool = False,
) -> bool:
    """Calls `jax.distributed.initialize()` when the run spans several processes.

    Must run before anything touches the devices. A single-process run (no cluster environment
    and no explicit arguments) is left alone, so scripts can call it unconditionally.
    MOEJAX_DISTRIBUTED=1 forces initialisation (=0 forbids it) whatever the environment says.
    jax.distributed auto-detects Cloud TPU pods, SLURM and Open MPI; the explicit arguments
    (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID) cover anything else.

    Args:
      coordinator_address: "host:port" of process 0; None = environment / auto-detection.
      num_processes: processes in the run; None = environment / auto-detection.
      process_id: this process's rank; None = environment / auto-detection.
      force: initialise even when no multi-process environment is detected.

    Returns:
      True when jax.distributed was initialised by this call, False when it was a no-op.
    """
    explicit = coordinator_address is not None or (num_processes or 1) > 1
    if not (force or explicit or _looks_multiprocess()):
        log.info("single process run: jax.distributed not initialised")
        return False
    if jax.distributed.is_initialized():
        return False
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    kwargs = {}
    if coordinator_address is not None:
        kwargs["coordinator_address"] = coordinator_address
    if num_processes is not None:
        kwargs["num_processes"] = num_processes
    if process_id is not None:
        kwargs["process_id"] = process_id
    jax.distributed.initialize(**kwargs)
    log.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True
