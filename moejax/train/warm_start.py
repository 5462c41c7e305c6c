"""Starting a run from another run's checkpoint: as it is, or upcycled from dense to MoE.

    python -m moejax.train --config=configs/tiny.py --workdir=runs/up \
        --config.init.from_checkpoint=runs/dense --config.init.upcycle=copy

The `init` section of the config says where the parameters of a new run come from:

  from_checkpoint  a run directory (its workdir); its latest committed checkpoint (or
                   init.step) is read with the config it was saved with.
  upcycle          None: the parameters are taken as they are (this run's model must have the
                   same parameter tree and shapes, e.g. a fine-tune with another optimizer or
                   data); "copy", "partition" or "shared": the source must be dense and its FFNs
                   become this run's MoE blocks (`moejax.upcycle.upcycle`).
  upcycle_noise    relative noise on the upcycled experts (0 = exact copies).
  calibration_batches  validation batches of this run's data that group the hidden units for
                   "partition" / sliced "shared" (0 = a random grouping).

  hf_checkpoint    a local Hugging Face checkpoint directory (config.json + safetensors of a
                   family `moejax.hf` imports): its model replaces the config's model and moe
                   sections (`hf_model_config`; this run's dtype, remat, scan_layers and
                   moe.execution stay) and its weights are the initial parameters
                   (`moejax.hf.from_hf`). Exclusive with from_checkpoint.

Only the parameters (and for a plain start the moe_state, e.g. the expert bias) come from the
source: the optimizer state is fresh, the step is 0 and the schedule this run's own. A workdir
that already holds a checkpoint resumes from it as always, so a stopped warm-started run
continues exactly and never re-reads the source.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from moejax import sharding
from moejax.train.checkpoint import Checkpointer
from moejax.train.state import StateSetup, TrainState, abstract_state, create_train_state

UPCYCLE_METHODS = ("copy", "partition", "shared")


def validate_init(init: ml_collections.ConfigDict | None) -> None:
    """ValueError naming `config.init.<field>` for a bad value; None (no section) is valid."""
    if init is None:
        return
    if init.upcycle is not None and init.upcycle not in UPCYCLE_METHODS:
        raise ValueError(
            f"config.init.upcycle={init.upcycle!r} is invalid: allowed values are None, "
            f"{', '.join(map(repr, UPCYCLE_METHODS))}"
        )
    if init.upcycle is not None and not init.from_checkpoint:
        raise ValueError(
            f"config.init.upcycle={init.upcycle!r} needs config.init.from_checkpoint (the dense "
            "run to upcycle)"
        )
    hf = init.get("hf_checkpoint")
    if hf is not None:
        if init.from_checkpoint:
            raise ValueError(
                "config.init.hf_checkpoint and config.init.from_checkpoint are exclusive: set one"
            )
        if init.upcycle is not None:
            raise ValueError("config.init.upcycle does not apply to config.init.hf_checkpoint")
        if not (Path(hf).expanduser() / "config.json").is_file():
            raise ValueError(
                f"config.init.hf_checkpoint={hf!r} is invalid: must be a local directory "
                "holding config.json and *.safetensors (no downloads)"
            )
    if init.step is not None and (not isinstance(init.step, int) or init.step < 0):
        raise ValueError(f"config.init.step={init.step!r} is invalid: must be None or >= 0")
    noise = init.upcycle_noise
    if not (isinstance(noise, int | float) and noise >= 0):
        raise ValueError(f"config.init.upcycle_noise={noise!r} is invalid: must be a number >= 0")
    n = init.calibration_batches
    if not (isinstance(n, int) and n >= 0):
        raise ValueError(
            f"config.init.calibration_batches={n!r} is invalid: must be an integer >= 0"
        )


# Fields of this run's config that an imported HF model leaves as the run sets them: how it
# computes and is laid out, not what it is.
_RUN_MODEL_FIELDS = ("dtype", "remat", "scan_layers")


def hf_model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with its model and moe sections taken from config.init.hf_checkpoint's
    config.json (unchanged when that is not set). Reads the HF config only, no weights."""
    init = config.get("init")
    if init is None or not init.get("hf_checkpoint"):
        return config
    validate_init(init)
    from transformers import AutoConfig

    from moejax.hf.families import model_config_from_hf
    from moejax.train.config_defaults import config_section

    path = str(Path(init.hf_checkpoint).expanduser())
    hf_cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    imported = model_config_from_hf(hf_cfg, param_dtype=config.model.param_dtype)
    config = ml_collections.ConfigDict(config.to_dict())
    model = config_section(imported, exclude=("moe",))
    for name in _RUN_MODEL_FIELDS:
        model[name] = config.model[name]
    config.model = model
    if imported.moe is None:
        config.moe = None
    else:
        moe = config_section(imported.moe)
        if config.moe is not None:
            moe.execution = config.moe.execution
        config.moe = moe
    return config


def hf_start(config: ml_collections.ConfigDict, state: TrainState, setup: StateSetup) -> TrainState:
    """`state` with its parameters (and moe_state) from config.init.hf_checkpoint's weights and
    a fresh optimizer state; the model must be `hf_model_config(config)`'s."""
    from moejax.hf import from_hf

    path = str(Path(config.init.hf_checkpoint).expanduser())
    _, variables = from_hf(
        path, param_dtype=setup.model_cfg.param_dtype, scan_layers=setup.model_cfg.scan_layers
    )
    _check_same_tree(variables["params"], state.params, "parameters", "hf_checkpoint")
    return _fresh_state(state, setup, variables)


def state_setup(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    """A freshly initialised TrainState and its StateSetup for `config` on `mesh`."""
    from moejax.train.state import make_optimizer
    from moejax.train.trainer import validate_config

    model_cfg = validate_config(config)
    t = config.train
    rules = None if config.mesh.rules is None else sharding.validate_rules(config.mesh.rules)
    tx = make_optimizer(config.opt, t.steps)
    return create_train_state(model_cfg, tx, mesh, rules, seq_len=t.seq_len, seed=t.seed)


def load_run(
    workdir: str | Path,
    mesh: jax.sharding.Mesh,
    step: int | None = None,
    *,
    field: str = "--workdir",
):
    """The config, TrainState, StateSetup and step of a run's checkpoint (default: the latest).

    Args:
      workdir: the run directory (holding checkpoints/).
      mesh: the mesh to restore onto (any: the checkpoint is resharded).
      step: the checkpoint step; None = the latest committed one.
      field: how errors name the directory (a flag or config field).

    Raises:
      ValueError: no such run or no committed checkpoint, naming `field`.
    """
    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        raise ValueError(f"{field}={workdir}: no checkpoints directory {directory}")
    ckpt = Checkpointer(directory, every=1, keep=1 << 30, async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None or step not in ckpt.all_steps():
            what = "no committed checkpoint" if step is None else f"no checkpoint of step {step}"
            raise ValueError(f"{field}={workdir}: {what} in {directory}")
        # The config is read first: it says what shapes to restore the state into.
        config = ml_collections.ConfigDict(ckpt.restore_config(step))
        state, setup = state_setup(config, mesh)
        restored = ckpt.restore(abstract_state(setup.state_shardings, state), step)
    finally:
        ckpt.close()
    return config, restored[0], setup, step


def _paths(tree: Any) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_leaves_with_path(nn.meta.unbox(tree))
    return {jax.tree_util.keystr(p): tuple(x.shape) for p, x in leaves}


def _check_same_tree(got: Any, want: Any, what: str, field: str = "from_checkpoint") -> None:
    got, want = _paths(got), _paths(want)
    if got == want:
        return
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    shapes = sorted(k for k in set(got) & set(want) if got[k] != want[k])
    detail = []
    if missing:
        detail.append(f"missing {missing[:3]}")
    if extra:
        detail.append(f"not in this model {extra[:3]}")
    if shapes:
        detail.append(", ".join(f"{k} {got[k]} vs {want[k]}" for k in shapes[:3]))
    raise ValueError(
        f"config.init.{field}: the source {what} do not fit this run's model "
        f"({'; '.join(detail)}); set config.init.upcycle to convert a dense model"
    )


def _upcycled(config, src_setup, src_state, setup: StateSetup, calibration) -> dict:
    from moejax.upcycle import upcycle

    init = config.init
    dense_cfg, model_cfg = src_setup.model_cfg, setup.model_cfg
    if dense_cfg.moe is not None:
        raise ValueError(
            f"config.init.upcycle={init.upcycle!r}: the source run {init.from_checkpoint} is "
            "an MoE model; upcycling starts from a dense one (config moe=None)"
        )
    if model_cfg.moe is None:
        raise ValueError(
            f"config.init.upcycle={init.upcycle!r}: this run's model is dense (config moe=None); "
            "upcycling needs an MoE target"
        )
    new_cfg, variables = upcycle(
        dense_cfg,
        {"params": jax.device_get(src_state.params)},
        model_cfg.moe,
        method=init.upcycle,
        key=jax.random.PRNGKey(config.train.seed),
        noise=float(init.upcycle_noise),
        calibration=calibration,
        first_dense_layers=model_cfg.first_dense_layers,
        moe_every=model_cfg.moe_every,
        scan_layers=model_cfg.scan_layers,
    )
    # The dense FFN's fields describe no layer of a model whose every layer is MoE.
    unused = ()
    if all(model_cfg.is_moe_layer(i) for i in range(model_cfg.num_layers)):
        unused = ("d_ff", "dense_activation")
    differ = [
        f.name
        for f in dataclasses.fields(model_cfg)
        if f.name not in unused and getattr(new_cfg, f.name) != getattr(model_cfg, f.name)
    ]
    if differ:
        raise ValueError(
            f"config.init.from_checkpoint: the dense source's model differs from this run's in "
            f"config.model fields {differ}; upcycling keeps everything but the FFNs"
        )
    return variables


def warm_start(
    config: ml_collections.ConfigDict,
    state: TrainState,
    setup: StateSetup,
    *,
    calibration: list[np.ndarray] | None = None,
) -> TrainState:
    """`state` (freshly initialised for `config`) with its parameters from config.init.

    Args:
      config: the run's config; config.init.from_checkpoint must be set.
      state: this run's initial TrainState (step 0).
      setup: its StateSetup (mesh, shardings, optimizer).
      calibration: model-input token batches [B, L] for the "partition"/"shared" grouping.

    Returns:
      A TrainState at step 0 with the source's (or upcycled) parameters, in this run's
      shardings, and a fresh optimizer state.

    Raises:
      ValueError naming the config.init field: a missing source, a source that does not fit.
    """
    init = config.init
    _, src_state, src_setup, _ = load_run(
        init.from_checkpoint, setup.mesh, init.step, field="config.init.from_checkpoint"
    )
    if init.upcycle is None:
        _check_same_tree(src_state.params, state.params, "parameters")
        variables = {"params": src_state.params}
        if _paths(src_state.moe_state) == _paths(state.moe_state):
            variables["moe_state"] = src_state.moe_state
    else:
        variables = _upcycled(config, src_setup, src_state, setup, calibration)
    return _fresh_state(state, setup, variables)


def _fresh_state(state: TrainState, setup: StateSetup, variables: dict) -> TrainState:
    """`state` with `variables` as its parameters (and moe_state), in its shardings and dtypes,
    and the optimizer state initialised for them."""

    def put(tree, like):
        return jax.tree.map(
            lambda x, y: jax.device_put(np.asarray(jax.device_get(x), y.dtype), y.sharding),
            tree,
            like,
        )

    params = put(variables["params"], state.params)
    moe_state = put(variables.get("moe_state", state.moe_state), state.moe_state)
    with sharding.sharding_context(setup.mesh, setup.rules):
        opt_state = jax.jit(setup.tx.init, out_shardings=setup.state_shardings.opt_state)(params)
    return state.replace(params=params, moe_state=moe_state, opt_state=opt_state)
