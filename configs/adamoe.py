r"""AdaMoE ("Token-Adaptive Routing with Null Experts"): tiny.py's MoE plus 4 null experts.

Command:

    python -m moejax.train --config=configs/adamoe.py --workdir=runs/adamoe

The router scores 8 real + 4 null experts and each token takes its top 2 of those 12; a null
pick computes nothing (no grouped-matmul rows), so a token uses 0, 1 or 2 real experts and the
model learns where to spend them. The load-balance loss runs over all 12, which pushes the null
experts toward their share of the picks (4/12) and so sets the compute budget. The null router
weights are their own parameter (router/null_kernel [D, 4]), so a trained or imported top-2
model takes null experts for fine-tuning unchanged. Measured against tiny.py, same data and
seed, 300 steps (`python benchmarks/routing_quality.py --steps 300`): validation 1.6498
nats/byte at 1.45 real experts per token on the validation batches (28% fewer expert FLOPs;
1.41 in training, null picks 28% rather than the balanced 33%) vs top-2's 1.6334 at 2.00:
+0.016 nats, short of the goal of 0.01. The larger-k recipe of the paper did not close the gap
here (`... --rows adamoe_k3n8,adamoe_k4n12,adamoe_k4n16,adamoe_k4n20 --update`): top-3 + 8
null 1.6527 at 1.72, top-4 + 12 null 1.6216 at 1.97 (better than top-2, but only 1% fewer
FLOPs), top-4 + 16 null 1.6613 at 1.81, top-4 + 20 null 1.6551 at 1.69. configs/top_p05.py is
the adaptive router that meets it.
"""

import ml_collections

from moejax.train import config_defaults as defaults


def get_config() -> ml_collections.ConfigDict:
    moe = defaults.moe_section()
    moe.num_null_experts = 4  # null experts m: top-2 over 8 + 4 places
    config = defaults.base_config(defaults.model_section(), moe)
    config.train.keep_checkpoints = 2  # a laptop run: keep the workdir small
    return config
