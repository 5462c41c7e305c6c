"""Default config sections: what configs/*.py build their `get_config()` from.

The `model`, `moe` and `moe.execution` sections are derived from the dataclasses
`moejax.layers.ModelConfig`, `MoEConfig` and `MoEExecution`, the single source of those fields,
their library defaults and their meaning (each field's `metadata["help"]`): every field is in
every config file's section, so any can be overridden from the command line. The other sections
(opt, data, mesh, train) are defined and commented here, once.

Each section comes at the scale of configs/tiny.py (byte-level LM on the embedded corpus, CPU);
the few places where that differs from a library default are set below, saying why, and a config
file sets only what differs from these, saying why. Sections come back unlocked; fields that may
be None are typed placeholders, so command-line overrides such as `--config.opt.decay_steps=100`
or `--config.moe.shared_d_ff=256` still type-check.
"""

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections
from ml_collections.config_dict import placeholder

from moejax.layers import ModelConfig, MoEConfig


def _placeholder_type(annotation: Any) -> type:
    """`int` for `int | None`: the type a None-default field takes when overridden."""
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        raise TypeError(f"a None default needs an `X | None` annotation, got {annotation!r}")
    (kind,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    return kind


def config_section(obj: Any, *, exclude: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """A ConfigDict holding every field of the frozen dataclass instance `obj`, at its value.

    A field holding a dataclass becomes a nested section; a None field a typed placeholder.
    `moejax.layers.model_config_from_dict` is the inverse.

    Args:
      obj: e.g. `ModelConfig()` or `MoEConfig(num_experts=16)`.
      exclude: names of fields left out (ModelConfig's `moe` is a section of its own).

    Returns:
      An unlocked ConfigDict.
    """
    hints = typing.get_type_hints(type(obj))
    section = ml_collections.ConfigDict()
    for f in dataclasses.fields(obj):
        if f.name in exclude:
            continue
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            section[f.name] = config_section(value)
        elif value is None:
            section[f.name] = placeholder(_placeholder_type(hints[f.name]))
        else:
            section[f.name] = value
    return section


def model_section() -> ml_collections.ConfigDict:
    """Decoder LM: every moejax.layers.ModelConfig field (but `moe`, a section of its own)."""
    model = config_section(ModelConfig(), exclude=("moe",))
    model.max_len = 256  # tiny scale: RoPE table / KV cache for sampling (library default 512)
    return model


def moe_section() -> ml_collections.ConfigDict:
    """MoE block: every moejax.layers.MoEConfig field, with `execution` (MoEExecution) nested."""
    moe = config_section(MoEConfig())
    moe.d_ff = 128  # tiny scale: active FFN width K*F = 256 (library default 1024)
    return moe


def opt_section() -> ml_collections.ConfigDict:
    """Optimizer: clip by global norm, then AdamW with linear warmup + cosine decay."""
    opt = ml_collections.ConfigDict()
    opt.lr = 3e-3  # peak learning rate
    opt.warmup_steps = 50  # linear warmup from 0 (steps)
    opt.decay_steps = placeholder(int)  # cosine length in steps; None = train.steps
    opt.end_lr_ratio = 0.1  # final lr = lr * end_lr_ratio
    opt.b1 = 0.9  # Adam beta1
    opt.b2 = 0.95  # Adam beta2
    opt.eps = 1e-8  # Adam epsilon
    opt.weight_decay = 0.1  # decoupled weight decay (matrices only)
    opt.grad_clip = 1.0  # max global gradient norm; 0 disables clipping
    return opt


def data_section() -> ml_collections.ConfigDict:
    """Data: see moejax.train.data."""
    data = ml_collections.ConfigDict()
    data.source = "stdlib"  # "stdlib" (embedded corpus), "text", "tokens" or "jsonl"
    data.path = placeholder(str)  # text file/dir ("text"), token file ("tokens"), jsonl file/dir
    data.tokenizer = placeholder(str)  # "jsonl": a local HF tokenizer directory; None = bytes
    data.val_path = placeholder(str)  # optional separate validation token file ("tokens")
    data.val_fraction = 0.05  # share of files (or tail of a single file) held out
    data.token_dtype = "uint16"  # dtype of raw (non-.npy) token files
    data.max_files = placeholder(int)  # read only the first N files (sorted); None = all
    data.seed = 0  # shuffle seed
    return data


def mesh_section() -> ml_collections.ConfigDict:
    """Device mesh (moejax.sharding.make_mesh): axis sizes, -1 = all remaining devices."""
    mesh = ml_collections.ConfigDict()
    mesh.data = -1  # data parallelism
    mesh.fsdp = 1  # parameter sharding (ZeRO-3)
    mesh.expert = 1  # expert parallelism (experts split over this axis)
    mesh.tensor = 1  # tensor parallelism
    mesh.rules = None  # logical axis rules; None = moejax.sharding.DEFAULT_RULES
    return mesh


def train_section() -> ml_collections.ConfigDict:
    """Training loop."""
    train = ml_collections.ConfigDict()
    train.steps = 500  # optimizer steps
    train.batch_size = 16  # global batch (sequences per step)
    train.seq_len = 128  # tokens per sequence (bytes for byte-level data)
    train.microbatches = 1  # gradient accumulation slices per step
    train.seed = 0  # parameter init and per-step rng seed
    train.log_every = 25  # steps between metric records
    train.eval_every = 100  # steps between validation passes (and at the end)
    train.eval_batches = 16  # validation batches per pass (fixed windows)
    train.checkpoint_every = 250  # steps between (async) checkpoints
    train.keep_checkpoints = 3  # committed checkpoints kept
    train.nonfinite = "skip"  # non-finite loss/grads: "skip" the update or "stop"
    train.sample_tokens = 200  # tokens generated at the end (0 disables)
    train.sample_prompt = "def "  # prompt of the final sample (bytes, or data.tokenizer's)
    train.sample_temperature = 0.8  # sampling temperature of the final sample; 0 = greedy
    train.sample_top_p = 0.95  # nucleus of the final sample, in (0, 1]
    train.export_hf = placeholder(str)  # write the final model here as a HF checkpoint (to_hf)
    train.peak_flops = placeholder(float)  # per-device peak FLOP/s for MFU; None = rough table
    return train


def init_section() -> ml_collections.ConfigDict:
    """Where a new run's parameters come from (moejax.train.warm_start); a workdir holding a
    checkpoint always resumes from it instead."""
    init = ml_collections.ConfigDict()
    init.from_checkpoint = placeholder(str)  # a run directory to start from; None = random init
    init.hf_checkpoint = placeholder(str)  # a local HF checkpoint: its model and weights
    init.step = placeholder(int)  # that run's checkpoint step; None = its latest
    init.upcycle = placeholder(str)  # None (as is) or "copy"/"partition"/"shared" (dense -> MoE)
    init.upcycle_noise = 0.0  # relative Gaussian noise on the upcycled experts
    init.calibration_batches = 0  # validation batches grouping hidden units; 0 = random order
    return init


def base_config(
    model: ml_collections.ConfigDict, moe: ml_collections.ConfigDict | None
) -> ml_collections.ConfigDict:
    """A full config: the given model and moe sections plus the default opt/data/mesh/train.

    Args:
      model: from `model_section`.
      moe: from `moe_section`; None makes every layer's FFN dense.

    Returns:
      An unlocked ConfigDict with sections model, moe, opt, data, mesh, train, init.
    """
    config = ml_collections.ConfigDict()
    config.model = model
    config.moe = moe
    config.opt = opt_section()
    config.data = data_section()
    config.mesh = mesh_section()
    config.train = train_section()
    config.init = init_section()
    return config


def saved_config(values: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A saved config (a checkpoint's or a run's config.json, as a dict) as a ConfigDict whose
    None fields are typed placeholders again where `base_config`'s sections type them, so
    command-line overrides such as `--config.train.export_hf=DIR` work on it (JSON keeps the
    None, not the type). Every other value is kept as saved.
    """
    config = ml_collections.ConfigDict(dict(values))
    _retype(config, base_config(model_section(), moe_section()))
    return config


def _retype(config: ml_collections.ConfigDict, template: ml_collections.ConfigDict) -> None:
    for key in list(config.keys()):
        if key not in template:
            continue
        value, like = config[key], template[key]
        if isinstance(value, ml_collections.ConfigDict):
            if isinstance(like, ml_collections.ConfigDict):
                _retype(value, like)
        elif value is None and not isinstance(like, ml_collections.ConfigDict):
            kind = template.get_type(key)
            if kind is not type(None):
                config[key] = placeholder(kind)


def at_scale(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Turns a base_config into an accelerator pretraining job (the mixtral/olmoe settings).

    Args:
      config: from `base_config`; changed in place.

    Returns:
      `config`, reading pre-tokenized data with bf16 compute, remat and 8-way expert parallelism.
    """
    config.model.dtype = "bfloat16"  # bf16 compute; parameters and AdamW moments stay float32
    config.model.remat = "full"  # recompute each layer in the backward pass (activation memory)
    config.opt.warmup_steps = 2000  # linear warmup (steps)
    config.data.source = "tokens"  # pre-tokenized with the model's own tokenizer
    config.data.path = "/path/to/tokens.bin"  # set with --config.data.path
    config.data.val_fraction = 0.001  # the tail of a large token file is plenty to validate on
    config.mesh.expert = 8  # expert parallelism (experts split over this axis)
    config.train.batch_size = 1024  # global batch (sequences per step)
    config.train.seq_len = 4096  # tokens per sequence
    config.train.log_every = 10  # steps between metric records
    config.train.eval_every = 1000  # steps between validation passes (and at the end)
    config.train.eval_batches = 50  # validation batches per pass
    config.train.checkpoint_every = 1000  # steps between (async) checkpoints
    config.train.sample_tokens = 0  # no end-of-run sample (the prompt is byte-level)
    return config
