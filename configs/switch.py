r"""Switch Transformer-style routing (Fedus et al., 2021): top-1, capacity factor 1.25, jitter.

Command:

    python -m moejax.train --config=configs/switch.py --workdir=runs/switch

Byte-level on the embedded corpus; the tiny model's shape with 8 experts of width 256, top-1
capacity dispatch (tokens over an expert's capacity are dropped, by position), multiplicative
router jitter 1e-2 and the switch load-balance loss (coef 1e-2). Expected (not measured
here) on CPU: validation loss near tiny.py's after 500 steps, dropped_fraction a few percent
early, falling as the load balances.
"""

import ml_collections

from moejax.train import config_defaults as defaults


def get_config() -> ml_collections.ConfigDict:
    model = defaults.model_section()
    model.num_kv_heads = 4  # multi-head attention, as in T5/Switch
    model.dense_activation = "relu"  # T5-style (Switch used moe_every=2 with dense ReLU layers)

    moe = defaults.moe_section()
    moe.top_k = 1  # switch routing: one expert per token
    moe.d_ff = 256  # wider experts: top-1 keeps the tiny model's active FFN width (256)
    moe.activation = "relu"  # T5/Switch experts are ReLU MLPs
    moe.norm_topk_prob = False  # top-1 weight is the raw probability (gradient to the router)
    moe.jitter_eps = 0.01  # multiplicative input jitter in [0.99, 1.01], training only
    moe.dispatch = "capacity"  # per-expert buffers; over-full experts drop by position
    moe.router_z_coef = 0.0  # Switch had no z-loss (ST-MoE added it)
    return defaults.base_config(model, moe)
