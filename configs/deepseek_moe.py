r"""DeepSeek-V3-style MoE at small scale: fine-grained + shared experts, sigmoid routing,
group-limited top-k and aux-loss-free balancing (expert bias), first layer dense.

Command (one GPU/TPU host; runs on CPU too, slowly):

    python -m moejax.train --config=configs/deepseek_moe.py --workdir=runs/deepseek_moe

Byte-level on the embedded corpus. 64 routed experts of width 64 (top-6 out of 4 groups, 2 kept)
plus 1 shared expert, routed scaling 2.5, bias update rate 1e-3, no load-balance loss (a tiny
sequence-wise one, as in V3). Expected (not measured here): validation loss below the tiny
config's at equal steps,
with the per-layer expert load drifting toward uniform through the bias alone
(see expert_load.png).
"""

import ml_collections

from moejax.train import config_defaults as defaults


def get_config() -> ml_collections.ConfigDict:
    model = defaults.model_section()
    model.d_model = 256  # residual width D (twice tiny's)
    model.num_layers = 6  # decoder layers (first one dense)
    model.num_heads = 8  # query heads (head_dim 32)
    model.num_kv_heads = 8  # multi-head attention (V3 uses MLA: attention='mla' with moejax.hf)
    model.d_ff = 1024  # width of the dense first layer's FFN
    model.max_len = 512  # context length
    model.first_dense_layers = 1  # DeepSeek first_k_dense_replace

    moe = defaults.moe_section()
    moe.num_experts = 64  # fine-grained routed experts E
    moe.top_k = 6  # experts per token K
    moe.d_ff = 64  # expert hidden width F (fine-grained: small)
    moe.score_func = "sigmoid"  # V3: sigmoid affinities
    moe.routed_scaling_factor = 2.5  # V3 routed_scaling_factor
    moe.n_groups = 4  # expert groups for group-limited routing
    moe.topk_groups = 2  # groups a token may use
    moe.use_expert_bias = True  # aux-loss-free balancing bias (moe_state)
    moe.num_shared_experts = 1  # always-on shared expert
    moe.shared_d_ff = 256  # shared expert width
    moe.load_balance_type = "sequence"  # V3's complementary sequence-wise balance loss
    moe.load_balance_coef = 0.0001  # tiny: the bias does the balancing
    moe.router_z_coef = 0.0  # no z-loss

    config = defaults.base_config(model, moe)
    config.opt.lr = 0.002  # peak learning rate
    config.opt.warmup_steps = 100  # linear warmup (steps)
    config.train.steps = 2000  # optimizer steps
    config.train.batch_size = 32  # global batch (sequences per step)
    config.train.seq_len = 256  # tokens per sequence
    config.train.eval_every = 250  # steps between validation passes (and at the end)
    config.train.checkpoint_every = 500  # steps between (async) checkpoints
    return config
