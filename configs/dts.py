r"""EvoMoE's dense-to-sparse gate (router="dts") on tiny.py's model.

Command:

    python -m moejax.train --config=configs/dts.py --workdir=runs/dts

In training the gates are softmax((logits + Gumbel noise) / tau), tau falling from 2.0 to 0.1
along a cosine over the run's 500 steps (kept in collection "moe_state", so a resumed run
continues the schedule exactly); experts whose gate is below 0.05 are not computed, at most
max_k = 4 per token. So the run starts nearly dense and ends near top-1 (a 20-step smoke run of
this schedule logged 3.9 experts per token at step 1 and 1.3 at the end); evaluation and
decoding route top-2 on the logits. Measured (README, "Growing a model"): with experts of width
256, `python benchmarks/upcycling.py` gave validation 1.4046 nats/byte after 500 steps at 2.51
experts per token in training, against 1.3515 for top-2 from scratch at 2.00; at this config's
width 128, `python benchmarks/routing_quality.py --steps 300` gave 1.7054 against 1.6334 (300 of
the schedule's 500 steps). The gate does not pay off here.
"""

import ml_collections

from moejax.train import config_defaults as defaults


def get_config() -> ml_collections.ConfigDict:
    moe = defaults.moe_section()
    moe.router = "dts"  # Gumbel-softmax gate with a falling temperature
    moe.max_k = 4  # static bound on experts per token in training
    moe.dts_steps = 500  # the temperature schedule spans the whole run (train.steps)
    config = defaults.base_config(defaults.model_section(), moe)
    config.train.keep_checkpoints = 2  # a laptop run: keep the workdir small
    return config
