r"""Dense baseline for configs/tiny.py: same model, a dense SwiGLU FFN of the same ACTIVE size.

Command:

    python -m moejax.train --config=configs/dense_baseline.py --workdir=runs/dense_baseline

Every layer's FFN is a dense SwiGLU of width top_k * moe.d_ff = 2 * 128 = 256, so its parameters
and FLOPs per token equal the tiny MoE's active ones (minus the tiny router, 128 x 8 per layer).
Same data, optimizer, steps and batch as tiny.py. Measured (500 steps, same seed and
data): validation 1.421 nats/byte for this dense model vs 1.409 for tiny.py's MoE (which holds
4x the FFN parameters at the same active compute).
"""

import ml_collections
from moejax.configs import tiny


def get_config() -> ml_collections.ConfigDict:
    # Built from tiny.py itself so the two runs can never drift apart in anything but the FFN.
    config = tiny.get_config()
    # Dense FFN width = the MoE's active width: top_k experts of d_ff each (SwiGLU both).
    config.model.d_ff = config.moe.top_k * config.moe.d_ff  # 256
    config.model.dense_activation = config.moe.activation  # "swiglu"
    config.moe = None  # no MoE block: every layer uses the dense FFN
    return config
