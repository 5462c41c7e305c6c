r"""Top-p routing ("Harder Tasks Need More Experts: Dynamic Routing in MoE Models").

Command:

    python -m moejax.train --config=configs/top_p.py --workdir=runs/top_p

tiny.py's model with router="top_p": each token keeps its best experts until their cumulative
probability reaches p = 0.4 (the expert that crosses it is kept), at most max_k = 4, so
confident tokens use one expert and uncertain ones up to four. Shapes stay static ([T, 4] with
unused places marked "no expert", which cost no rows). Not trained to completion here yet:
`python benchmarks/routing_quality.py --rows top2,top_p` compares it with tiny.py's top-2.
"""

import ml_collections

from moejax.train import config_defaults as defaults


def get_config() -> ml_collections.ConfigDict:
    moe = defaults.moe_section()
    moe.router = "top_p"  # dynamic experts per token
    moe.top_p = 0.4  # cumulative probability a token's kept experts reach
    moe.max_k = 4  # static bound on experts per token
    config = defaults.base_config(defaults.model_section(), moe)
    config.train.keep_checkpoints = 2  # a laptop run: keep the workdir small
    return config
