r"""AdaMoE ("Token-Adaptive Routing with Null Experts"): tiny.py's MoE plus 4 null experts.

Command:

    python -m moejax.train --config=configs/adamoe.py --workdir=runs/adamoe

The router scores 8 real + 4 null experts and each token takes its top 2 of those 12; a null
pick computes nothing (no grouped-matmul rows), so a token uses 0, 1 or 2 real experts and the
model learns where to spend them. The load-balance loss runs over all 12, which pushes the null
experts toward their share of the picks (4/12) and so sets the compute budget. The null router
weights are their own parameter (router/null_kernel [D, 4]), so a trained or imported top-2
model takes null experts for fine-tuning unchanged. Measured against tiny.py, same data, 300
steps (`python benchmarks/routing_quality.py --steps 300`): validation 1.6514 nats/byte at
1.45 real experts per token (27% fewer expert FLOPs) vs top-2's 1.6320 at 2.0.
"""

import ml_collections

from moejax.train import config_defaults as defaults


def get_config() -> ml_collections.ConfigDict:
    moe = defaults.moe_section()
    moe.num_null_experts = 4  # null experts m: top-2 over 8 + 4 places
    config = defaults.base_config(defaults.model_section(), moe)
    config.train.keep_checkpoints = 2  # a laptop run: keep the workdir small
    return config
