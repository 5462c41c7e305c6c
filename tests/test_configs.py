"""Every configs/*.py loads and validates, and every model/MoE field is overridable from the CLI."""

import dataclasses
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from moejax.layers import ModelConfig, MoEConfig, MoEExecution, model_config_from_dict
from moejax.train.config_defaults import config_section
from moejax.train.trainer import validate_config

CONFIGS = sorted(
    p for p in (Path(__file__).parent.parent / "configs").glob("*.py") if p.name != "__init__.py"
)

# Per field, valid values; the override uses the first that differs from the config file's.
# Together (whichever is taken) they make a valid config for every file: 16 experts
# split over any expert axis of the configs, top_k 3 fits 2 groups of 8, head_dim is explicit,
# max_len exceeds every seq_len.
MODEL_VALUES = {
    "vocab_size": (300, 301),
    "d_model": (96, 160),
    "num_layers": (5, 6),
    "num_heads": (6, 12),
    "num_kv_heads": (3, 6),
    "head_dim": (16, 24),
    "d_ff": (200, 208),
    "dense_activation": ("gelu", "silu"),
    "max_len": (8192, 16384),
    "rope_theta": (5000.0, 6000.0),
    "norm_eps": (1e-4, 1e-3),
    "qk_norm": ("head", "full"),
    "qkv_bias": (True, False),
    "attention": ("mla", "gqa"),
    "q_lora_rank": (48, 64),
    "kv_lora_rank": (64, 96),
    "qk_nope_head_dim": (32, 48),
    "qk_rope_head_dim": (16, 8),
    "v_head_dim": (32, 48),
    "tie_embeddings": (True, False),
    "moe_every": (2, 3),
    "first_dense_layers": (2, 1),
    "dtype": ("float16", "bfloat16"),
    "param_dtype": ("bfloat16", "float16"),
    "remat": ("dots", "full"),
    "scan_layers": (False, True),
}
MOE_VALUES = {
    "num_experts": (16, 32),
    "top_k": (3, 4),
    "d_ff": (48, 96),
    "activation": ("geglu", "gelu"),
    "score_func": ("sigmoid", "softmax"),
    "norm_topk_prob": (False, True),
    "routed_scaling_factor": (1.5, 2.0),
    "n_groups": (2, 4),
    "topk_groups": (2, 1),
    "use_expert_bias": (True, False),
    "bias_update_rate": (5e-3, 2e-3),
    "bias_update": ("centered_sign", "proportional"),
    "bias_update_schedule": ("inv_sqrt", "constant"),
    "jitter_eps": (0.05, 0.02),
    "dispatch": ("capacity", "dropless"),
    "capacity_factor": (1.5, 1.75),
    "eval_capacity_factor": (3.0, 2.5),
    "min_capacity": (2, 3),
    "drop_policy": ("random", "probs"),
    "load_balance_type": ("sequence", "global"),
    "load_balance_coef": (0.03, 0.04),
    "router_z_coef": (0.002, 0.003),
    "router_entropy_coef": (0.01, 0.02),
    "top_p": (0.6, 0.7),
    "max_k": (5, 6),
    "dts_tau_start": (3.0, 1.5),
    "dts_tau_end": (0.2, 0.3),
    "dts_steps": (100, 200),
    "dts_threshold": (0.1, 0.02),
    "token_rounding": ("up", "down"),
    "rounding_tile": (8, 16),
    "rounding_extra": (3, 4),
    "expert_bits": (8, 4),
    "expert_group_size": (16, 32),
    "num_shared_experts": (2, 3),
    "shared_d_ff": (40, 48),
    "shared_expert_gate": (True, False),
}
EXECUTION_VALUES = {
    "gmm_backend": ("ragged_dot", "xla"),
    "gmm_tile": (64, 128),
    "gmm_interpret": (True, False),
    "expert_parallel": ("all_gather", "all_to_all"),
    "ep_capacity_factor": (3.0, 4.0),
    "ep_chunks": (2, 4),
    "ep_exchange": ("fixed", "ragged"),
}


# Fields that exclude some of MOE_VALUES (routers other than top-k reject the expert bias, groups
# and null experts; null experts reject groups): each is overridden on a command line of its own,
# with the fields it excludes at values it accepts; the others run as top-k with no null experts.
_ONE_GROUP = ("--config.moe.n_groups=1", "--config.moe.topk_groups=1")
EXCLUSIVE_VALUES = {
    "router": (
        ("top_p", "expert_choice"),
        (*_ONE_GROUP, "--config.moe.use_expert_bias=False", "--config.moe.num_null_experts=0"),
    ),
    "num_null_experts": ((2, 3), (*_ONE_GROUP, "--config.moe.router=topk")),
}
_NOT_EXCLUSIVE = ("--config.moe.router=topk", "--config.moe.num_null_experts=0")


def _names(cls, *exclude):
    return [f.name for f in dataclasses.fields(cls) if f.name not in exclude]


def _load(path: Path, *overrides: str):
    """The config as `python -m moejax.train --config=path overrides...` parses it."""
    argv = ["moejax.train", f"--config={path}", *overrides]
    flag_values = flags.FlagValues()
    # config_flags defines a flag per overridden field from the command line it is given.
    holder = config_flags.DEFINE_config_file(
        "config", str(path), flag_values=flag_values, sys_argv=argv
    )
    flag_values(argv)
    return holder.value


def test_every_field_has_help_and_a_test_value():
    for cls in (ModelConfig, MoEConfig, MoEExecution):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
    # A new field fails here until the override test below covers it.
    assert list(MODEL_VALUES) == _names(ModelConfig, "moe")
    assert sorted([*MOE_VALUES, *EXCLUSIVE_VALUES]) == sorted(_names(MoEConfig, "execution"))
    assert list(EXECUTION_VALUES) == _names(MoEExecution)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_validates(path):
    config = _load(path)
    model_cfg = validate_config(config)  # what the trainer checks before anything runs
    assert isinstance(model_cfg, ModelConfig)
    # The sections hold every field of the dataclasses, and convert back without loss.
    assert sorted(config.model) == sorted(_names(ModelConfig, "moe"))
    section = config_section(model_cfg, exclude=("moe",)).to_dict()
    assert section == config.model.to_dict()
    if path.stem == "dense_baseline":
        assert config.moe is None and model_cfg.moe is None
        return
    assert sorted(config.moe) == sorted(_names(MoEConfig))
    assert sorted(config.moe.execution) == sorted(_names(MoEExecution))
    assert config_section(model_cfg.moe).to_dict() == config.moe.to_dict()
    assert model_config_from_dict(config.model.to_dict(), config.moe.to_dict()) == model_cfg


def _overrides(section, prefix, values):
    """(flags, expected values): every field of `section` set to a value it does not have."""
    args, want = [], {}
    for name, candidates in values.items():
        value = next((v for v in candidates if v != section[name]), candidates[0])
        args.append(f"--config.{prefix}.{name}={value}")
        want[name] = value
    return args, want


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_field_overridable_from_the_command_line(path):
    config = _load(path)
    args, want_model = _overrides(config.model, "model", MODEL_VALUES)
    if config.moe is not None:
        moe_args, want_moe = _overrides(config.moe, "moe", MOE_VALUES)
        ex_args, want_ex = _overrides(config.moe.execution, "moe.execution", EXECUTION_VALUES)
        args += [*moe_args, *ex_args, *_NOT_EXCLUSIVE]

    model_cfg = validate_config(_load(path, *args))

    got = {name: getattr(model_cfg, name) for name in want_model}
    assert got == want_model
    if config.moe is None:
        return
    assert {name: getattr(model_cfg.moe, name) for name in want_moe} == want_moe
    assert dataclasses.asdict(model_cfg.moe.execution) == want_ex
    # The overrides are typed as the fields are (placeholders included): no string leaks in.
    for cfg, want in ((model_cfg, want_model), (model_cfg.moe, want_moe)):
        for name, value in want.items():
            assert type(getattr(cfg, name)) is type(value), name

    for name, (candidates, compatible) in EXCLUSIVE_VALUES.items():
        value = next(v for v in candidates if v != config.moe[name])
        model_cfg = validate_config(_load(path, f"--config.moe.{name}={value}", *compatible))
        assert getattr(model_cfg.moe, name) == value


def test_execution_values_are_validated_with_one_line():
    with pytest.raises(ValueError) as e:
        MoEExecution(gmm_backend="fast")
    assert str(e.value) == (
        "MoEExecution.gmm_backend='fast' is invalid: allowed values are "
        "'auto', 'xla', 'triton', 'mosaic', 'ragged_dot', 'tokamax'"
    )
    for kwargs, message in (
        (dict(gmm_tile=0), "MoEExecution.gmm_tile=0 is invalid: must be an integer >= 1"),
        (dict(gmm_interpret=1), "MoEExecution.gmm_interpret=1 is invalid"),
        (dict(expert_parallel="ring"), "MoEExecution.expert_parallel='ring' is invalid"),
        (dict(ep_capacity_factor=0.0), "MoEExecution.ep_capacity_factor=0.0 is invalid"),
    ):
        with pytest.raises(ValueError, match=message):
            MoEExecution(**kwargs)
    with pytest.raises(ValueError, match="MoEConfig.execution='str' is invalid"):
        MoEConfig(execution="xla")
    with pytest.raises(ValueError, match="MoEExecution has no field"):
        model_config_from_dict({}, {"execution": {"gmm_backnd": "xla"}})
