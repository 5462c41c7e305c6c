r"""Expert-choice routing (Zhou et al., 2022): each expert takes its top-C tokens.

Command:

    python -m moejax.train --config=configs/expert_choice.py --workdir=runs/expert_choice

Byte-level on the embedded corpus, the tiny model's shape; capacity C = T * 2 / 8 * 1.0 per expert
(on average 2 experts per token, some tokens get none). No load-balance loss is needed: every
expert is full by construction. Note expert choice looks at all tokens of the batch, so it is
not causal across the sequence (fine for this training demo, not for autoregressive serving).
Expected (not measured here) on CPU: validation loss close to tiny.py's after 500
steps.
"""

import ml_collections

from moejax.train import config_defaults as defaults


def get_config() -> ml_collections.ConfigDict:
    moe = defaults.moe_section()
    moe.router = "expert_choice"  # experts pick their top-C tokens
    moe.capacity_factor = 1.0  # C = T * K / E exactly: every expert full, none over-full
    moe.eval_capacity_factor = 1.0  # same capacity at evaluation
    moe.load_balance_coef = 0.0  # balanced by construction
    config = defaults.base_config(defaults.model_section(), moe)
    config.train.sample_tokens = 0  # no sample: expert choice is not causal across the sequence
    return config
