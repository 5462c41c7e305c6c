"""Flax Linen modules: router, experts, MoE block, attention, decoder LM."""

from moejax.layers.config import (
    ModelConfig,
    MoEConfig,
    model_config_from_dict,
    moe_config_from_dict,
)
from moejax.layers.experts import Experts
from moejax.layers.losses import expert_load, load_balance_loss, router_entropy, router_z_loss
from moejax.layers.moe import MoE
from moejax.layers.router import (
    ExpertChoiceOutput,
    ExpertChoiceRouter,
    RouterOutput,
    TopKRouter,
    topk_route,
    update_expert_bias,
)
from moejax.layers.transformer import Transformer

__all__ = [
    "ModelConfig",
    "MoEConfig",
    "model_config_from_dict",
    "moe_config_from_dict",
    "ExpertChoiceOutput",
    "ExpertChoiceRouter",
    "RouterOutput",
    "TopKRouter",
    "topk_route",
    "update_expert_bias",
    "expert_load",
    "load_balance_loss",
    "router_entropy",
    "router_z_loss",
    "Transformer",
    "Experts",
    "MoE",
]
