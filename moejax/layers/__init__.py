"""Flax Linen modules: router, experts, MoE block, attention, decoder LM."""

from moejax.layers.config import (
    ModelConfig,
    MoEConfig,
    model_config_from_dict,
    moe_config_from_dict,
)

__all__ = ["ModelConfig", "MoEConfig", "model_config_from_dict", "moe_config_from_dict"]
