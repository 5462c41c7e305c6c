"""Flax Linen modules: router, experts, MoE block, attention, decoder LM."""

from moejax.layers.config import (
    ModelConfig,
    MoEConfig,
    MoEExecution,
    model_config_from_dict,
    moe_config_from_dict,
)
from moejax.layers.experts import Experts
from moejax.layers.losses import expert_load, load_balance_loss, router_entropy, router_z_loss
from moejax.layers.moe import MoE
from moejax.layers.router import Router, update_expert_bias
from moejax.layers.transformer import Transformer

__all__ = [
    "ModelConfig",
    "MoEConfig",
    "MoEExecution",
    "model_config_from_dict",
    "moe_config_from_dict",
    "Router",
    "update_expert_bias",
    "expert_load",
    "load_balance_loss",
    "router_entropy",
    "router_z_loss",
    "Transformer",
    "Experts",
    "MoE",
]
