r"""Tiny MoE language model on the Python standard library's sources: the CPU default.

Command (this is also what `python -m moejax.train` runs with no flags):

    python -m moejax.train --config=configs/tiny.py --workdir=runs/tiny

Expected (measured on the 2-core CPU): 500 steps in 2m23s wall with the machine nearly idle
(3m43s lightly shared, 11 min when loaded ~6x over by other jobs); validation cross-entropy
falls from ~5.5 nats/byte (uniform over 256 bytes) to 1.414 nats/byte (2.04 bits/byte; 1.409
before the CPU train-step changes); the per-layer expert load ends near uniform (0.105-0.156
per expert, balanced = 0.125). Losses are deterministic: the same numbers on every run. Any
field can be overridden, e.g. `--config.moe.num_experts=16 --config.train.steps=100`.
"""

import ml_collections

from moejax.train import config_defaults as defaults


def get_config() -> ml_collections.ConfigDict:
    # The reference config: the default sections as they are. Every model and MoE field is in
    # them, so any can be overridden (each field's meaning, units and default: the `help` of
    # moejax.layers.ModelConfig / MoEConfig / MoEExecution fields).
    config = defaults.base_config(defaults.model_section(), defaults.moe_section())
    config.train.keep_checkpoints = 2  # a laptop run: keep the workdir small
    return config
