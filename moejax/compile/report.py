"""Will this config fit that target? The deviceless compile report.

`compile_report(config, "tpu-v5p-128")` builds the abstract train state (ShapeDtypeStructs with
their shardings, `moejax.train.state.abstract_train_state`) on a mesh of the target's devices
(`targets.topology`, no accelerator needed), traces the jitted train step
(`moejax.train.step.jit_train_step`) under the config's sharding rules, and compiles it with the
target's real compiler (libtpu, or XLA's CUDA compiler with Triton). Per device it reports:

- memory: parameters, optimizer state, expert weights (a part of the parameters), the batch,
  temporaries (activations kept for the backward pass, gradients, workspace) and the total,
  from the compiler's buffer assignment (`memory_analysis()`), against the device's memory;
- step time: a roofline, max(FLOPs / peak, HBM bytes / bandwidth), with the FLOPs and bytes
  read from the optimized HLO with while-loop trip counts applied (`moejax.compile.hlo`: XLA's
  own `cost_analysis()` counts a scanned layer stack once and its `optimal_seconds` can be
  negative); collectives are not in it (they may overlap compute). It is an estimate, not a
  measurement;
- the MFU that step time implies: the trainer's model FLOPs (6 x active params per token +
  attention) over (step time x peak x devices);
- collective bytes by kind, and the kernels used (gmm backend and the custom calls).
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax import sharding
from moejax.compile.hlo import COLLECTIVE_KINDS, HloStats, analyze_hlo
from moejax.compile.targets import Target, parse_target, topology
from moejax.layers import ModelConfig

_GIB = 2**30
# What gmm_backend="auto" compiles to on each platform of a target: its Pallas kernels.
_GMM_BACKEND = {"tpu": "mosaic", "cuda": "triton"}


@dataclasses.dataclass(frozen=True)
class Report:
    """The compile report of one config on one target (bytes and FLOPs per device).

    Attributes:
      target: the Target.
      mesh: mesh axis sizes, e.g. {"data": 1, "fsdp": 8, "expert": 8, "tensor": 1}; {} when
        the config's mesh needs another device count (then the state bytes are the lower bound
        of an even spread over the target's devices, and nothing is compiled).
      gmm_backend: the grouped-matmul backend compiled.
      param_bytes, opt_state_bytes, other_state_bytes: the train state's shards (other = step,
        rng, skipped counter, router biases).
      expert_bytes: the routed experts' share of param_bytes.
      batch_bytes: the token batch's shard.
      temp_bytes: the compiler's temporaries (activations, gradients, workspace); None when
        nothing was compiled (the state alone does not fit) or the compile ran out of memory.
      host_temp_bytes: temporaries in host memory (activations a remat policy offloads,
        ModelConfig.remat="moe_offload"); not part of total_bytes; None when not compiled.
      code_bytes: generated code; None when not compiled.
      total_bytes: peak per device: arguments + non-aliased outputs + temporaries + code; the
        state and batch alone when not compiled; what the compiler said it needed when it ran
        out of memory.
      device_bytes: the device's memory.
      fits: total_bytes <= device_bytes.
      shortfall: one line naming what does not fit; None when it fits.
      flops, hbm_bytes: per-step FLOPs (dots, convolutions, kernels) and HBM traffic, from the
        optimized HLO with trip counts applied (`moejax.compile.hlo`); 0 when not compiled.
      step_seconds: roofline step time, max(flops / peak, hbm_bytes / bandwidth).
      bound: "compute" or "memory", whichever term sets step_seconds.
      model_flops: the trainer's model FLOPs per step, all devices together.
      mfu: model_flops / (step_seconds x peak x devices).
      collective_bytes: kind -> bytes per step.
      kernels: custom-call target/name -> calls per step.
      compile_seconds: wall time of the compile (0 when skipped).
    """

    target: Target
    mesh: dict[str, int]
    gmm_backend: str
    param_bytes: int
    opt_state_bytes: int
    other_state_bytes: int
    expert_bytes: int
    batch_bytes: int
    temp_bytes: int | None
    host_temp_bytes: int | None
    code_bytes: int | None
    total_bytes: int
    device_bytes: int
    fits: bool
    shortfall: str | None
    flops: float
    hbm_bytes: float
    step_seconds: float
    bound: str
    model_flops: float
    mfu: float
    collective_bytes: dict[str, float]
    kernels: dict[str, int]
    compile_seconds: float


def for_target(model_cfg: ModelConfig, target: Target) -> ModelConfig:
    """The model as it runs on `target`: Pallas kernels compiled, never interpreted.

    On this (CPU) host gmm_backend="auto" would resolve to the XLA backend and Pallas to
    interpret mode, so "auto" becomes the target's kernels (Mosaic on TPU, Triton on GPU) and
    interpret mode is switched off; an explicitly chosen backend is kept.
    """
    if model_cfg.moe is None:
        return model_cfg
    ex = model_cfg.moe.execution
    backend = _GMM_BACKEND[target.platform] if ex.gmm_backend == "auto" else ex.gmm_backend
    execution = dataclasses.replace(ex, gmm_backend=backend, gmm_interpret=False)
    return dataclasses.replace(
        model_cfg, moe=dataclasses.replace(model_cfg.moe, execution=execution)
    )


_ALL_DATA = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "expert": 1, "tensor": 1})


def target_mesh(target: Target, mesh_cfg: Any) -> jax.sharding.Mesh:
    """The config's ("data", "fsdp", "expert", "tensor") mesh on the target's devices
    (`moejax.sharding.make_mesh`, which splits physical axes where it must, as a pod job
    would)."""
    return sharding.make_mesh(
        data=mesh_cfg.data,
        fsdp=mesh_cfg.fsdp,
        expert=mesh_cfg.expert,
        tensor=mesh_cfg.tensor,
        devices=topology(target).devices,
    )


def _shard_bytes(tree: Any) -> int:
    def one(x: jax.ShapeDtypeStruct) -> int:
        return int(np.prod(x.sharding.shard_shape(x.shape))) * jnp.dtype(x.dtype).itemsize

    return sum(one(x) for x in jax.tree.leaves(tree))


def _expert_bytes(params: Any) -> int:
    experts = [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
        if "experts" in [getattr(k, "key", None) for k in path]
    ]
    return _shard_bytes(experts)


# The TPU compiler's two out-of-memory messages: "... Used 20.5G of 15.75G hbm ..." and "...
# the total memory required for HLO temporaries (258.01G) exceeds available HBM (15.75G)".
_OOM_USED = re.compile(r"Used ([0-9.]+)([KMGT])i?B? of [0-9.]+[KMGT]i?B? hbm", re.IGNORECASE)
_OOM_TEMPS = re.compile(r"required for HLO temporaries \(([0-9.]+)([KMGT])")
_SCALE = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _oom_total(message: str, argument_bytes: int) -> int | None:
    """What the TPU compiler says a step needs when it runs out of HBM, or None if `message`
    is not that error."""
    if m := _OOM_USED.search(message):
        return int(float(m.group(1)) * _SCALE[m.group(2).upper()])
    if m := _OOM_TEMPS.search(message):
        return argument_bytes + int(float(m.group(1)) * _SCALE[m.group(2).upper()])
    return None


def compile_report(config: ml_collections.ConfigDict, target: str | Target) -> Report:
    """Compiles `config`'s train step for `target` without devices and reports per device.

    Args:
      config: a full train config (configs/<name>.py's get_config(), overrides applied).
      target: "tpu-v5p-128", "gpu-h100-8", ... (see `moejax.compile.targets`) or a Target.

    Returns:
      The Report. When the train state alone exceeds the device memory nothing is compiled;
      a compile that fails for lack of device memory gives fits=False too (temp_bytes None in
      both cases) rather than an error.

    Raises:
      ValueError: an invalid config field or target name, or a mesh the target's device count
        cannot fill when the state could fit with another mesh.
    """
    from moejax.train.state import abstract_train_state, count_params, make_optimizer
    from moejax.train.step import jit_train_step
    from moejax.train.trainer import _flops_per_token, validate_config

    target = parse_target(target) if isinstance(target, str) else target
    model_cfg = for_target(validate_config(config), target)
    t = config.train
    try:
        mesh, mesh_error = target_mesh(target, config.mesh), None
    except ValueError as e:
        # The config's mesh needs another device count. If even the state spread evenly over
        # the target's devices is too big, that is the answer; otherwise the mesh must change.
        mesh, mesh_error = target_mesh(target, _ALL_DATA), e
    rules = None if config.mesh.rules is None else sharding.validate_rules(config.mesh.rules)
    tx = make_optimizer(config.opt, t.steps)
    state, setup = abstract_train_state(model_cfg, tx, mesh, rules, seq_len=t.seq_len)
    batch = jax.ShapeDtypeStruct(
        (t.batch_size, t.seq_len + 1), jnp.int32, sharding=setup.batch_sharding
    )

    params = nn.meta.unbox(state.params)
    spread = 1 if mesh_error is None else target.num_devices  # replicated -> even shards
    param_bytes = -(-_shard_bytes(params) // spread)
    opt_bytes = -(-_shard_bytes(state.opt_state) // spread)
    other_bytes = _shard_bytes((state.step, state.moe_state, state.rng, state.skipped))
    batch_bytes = _shard_bytes(batch)
    argument_bytes = param_bytes + opt_bytes + other_bytes + batch_bytes
    if mesh_error is not None and argument_bytes <= target.hbm_bytes:
        raise ValueError(f"{mesh_error} (target {target.name})")
    _, active = count_params(params, model_cfg)
    model_flops = _flops_per_token(model_cfg, active, t.seq_len) * t.batch_size * t.seq_len
    device_bytes = target.hbm_bytes

    start = time.time()
    compiled, total = None, argument_bytes
    # When the train state alone exceeds the device, compiling (minutes at scale) can only add
    # temporaries to the answer.
    if mesh_error is None and argument_bytes <= device_bytes:
        with sharding.sharding_context(mesh, rules):
            lowered = jit_train_step(setup, t.microbatches).trace(state, batch).lower()
            try:
                compiled = lowered.compile()
            except Exception as e:  # noqa: BLE001 - only running out of memory becomes a report
                total = _oom_total(str(e), argument_bytes)
                if total is None:
                    raise
    compile_seconds = time.time() - start

    if compiled is None:
        stats = HloStats(0.0, 0.0, {}, {}, {}, 0)
        temp = code = host_temp = None
    else:
        stats = analyze_hlo(compiled.as_text())
        mem = compiled.memory_analysis()
        temp, code = int(mem.temp_size_in_bytes), int(mem.generated_code_size_in_bytes)
        host_temp = int(mem.host_temp_size_in_bytes)
        total = int(
            mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            - mem.alias_size_in_bytes
            + temp
            + code
        )
    fits = total <= device_bytes
    shortfall = None
    if not fits:
        what = "the train state alone" if total == argument_bytes else "a step"
        if mesh_error is not None:
            what += f" spread evenly over {target.num_devices} devices (any mesh)"
        shortfall = (
            f"{target.name}: {what} needs {total / _GIB:.1f} GiB per device, "
            f"{(total - device_bytes) / _GIB:.1f} GiB more than its {device_bytes / _GIB:.0f} GiB"
            f" (parameters {param_bytes / _GIB:.1f}, optimizer {opt_bytes / _GIB:.1f}"
            + ("" if temp is None else f", temporaries {temp / _GIB:.1f}")
            + " GiB)"
        )
    compute_s = stats.flops / target.peak_flops
    memory_s = stats.hbm_bytes / target.hbm_bandwidth
    step_s = max(compute_s, memory_s)
    mfu = model_flops / (step_s * target.peak_flops * target.num_devices) if step_s else 0.0
    return Report(
        target=target,
        mesh={} if mesh_error is not None else dict(mesh.shape),
        gmm_backend="none (dense)"
        if model_cfg.moe is None
        else model_cfg.moe.execution.gmm_backend,
        param_bytes=param_bytes,
        opt_state_bytes=opt_bytes,
        other_state_bytes=other_bytes,
        expert_bytes=-(-_expert_bytes(params) // spread),
        batch_bytes=batch_bytes,
        temp_bytes=temp,
        host_temp_bytes=host_temp,
        code_bytes=code,
        total_bytes=total,
        device_bytes=device_bytes,
        fits=fits,
        shortfall=shortfall,
        flops=stats.flops,
        hbm_bytes=stats.hbm_bytes,
        step_seconds=step_s,
        bound="compute" if compute_s >= memory_s else "memory",
        model_flops=model_flops,
        mfu=mfu,
        collective_bytes={
            k: stats.collective_bytes[k] for k in COLLECTIVE_KINDS if k in stats.collective_bytes
        },
        kernels=stats.custom_calls,
        compile_seconds=compile_seconds,
    )


def _bytes(n: int | None) -> str:
    if n is None:
        return "         -"
    return f"{n / _GIB:10.3f} GiB" if n >= _GIB else f"{n / 2**20:10.3f} MiB"


def format_report(report: Report) -> str:
    """The report as the table `python -m moejax.compile` prints."""
    r = report
    if r.mesh:
        mesh = " x ".join(f"{k}={v}" for k, v in r.mesh.items())
    else:
        mesh = f"the config's mesh does not fit {r.target.num_devices} devices: state spread evenly"
    compiled = r.temp_bytes is not None
    rows = [
        ("target", f"{r.target.name} ({r.target.num_devices} devices, {r.target.platform})"),
        ("mesh", mesh),
        ("gmm backend", r.gmm_backend),
        ("memory per device", ""),
        ("  parameters", _bytes(r.param_bytes)),
        ("    of which experts", _bytes(r.expert_bytes)),
        ("  optimizer state", _bytes(r.opt_state_bytes)),
        ("  other state", _bytes(r.other_state_bytes)),
        ("  batch", _bytes(r.batch_bytes)),
        ("  temporaries", _bytes(r.temp_bytes) + "  (activations, gradients, workspace)"),
        ("  generated code", _bytes(r.code_bytes)),
        *(
            [("  host temporaries", _bytes(r.host_temp_bytes) + "  (offloaded, not in the total)")]
            if r.host_temp_bytes
            else []
        ),
        ("  total", _bytes(r.total_bytes) + f"  of {r.device_bytes / _GIB:.1f} GiB"),
        ("fits", "yes" if r.fits else f"NO: {r.shortfall}"),
    ]
    if compiled:
        rows += [
            ("step time (estimate)", f"{r.step_seconds * 1e3:10.3f} ms  ({r.bound}-bound)"),
            ("  FLOPs per device", f"{r.flops:10.3e}"),
            ("  HBM bytes per device", f"{r.hbm_bytes:10.3e}"),
            ("  MFU implied", f"{r.mfu:10.1%}  (model FLOPs {r.model_flops:.3e} per step)"),
            ("collectives per device", ""),
        ]
        rows += [(f"  {k}", _bytes(v)) for k, v in r.collective_bytes.items()] or [("  none", "")]
        rows.append(("kernels (calls per step)", ""))
        rows += [(f"  {k}", f"{v:10d}") for k, v in sorted(r.kernels.items())] or [("  none", "")]
        rows.append(("compile time", f"{r.compile_seconds:.1f} s"))
    else:
        rows.append(("compiled", "no: the state alone does not fit, or the compiler ran out"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}".rstrip() for k, v in rows]
    if compiled:
        lines.append(
            "step time = max(FLOPs / peak, HBM bytes / bandwidth), both read from the optimized "
            "HLO with loop trip counts applied:\nan estimate from the compiler's view, not a "
            "measurement; collectives (which may overlap compute) are not in it."
        )
    return "\n".join(lines)
