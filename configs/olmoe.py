r"""OLMoE-1B-7B (Muennighoff et al., 2024): 16 layers, 64 experts top-8, QK-norm, dropless.

Command (accelerator job, pre-tokenized data with the OLMoE tokenizer):

    python -m moejax.train --config=configs/olmoe.py --workdir=gs://BUCKET/olmoe \
        --config.data.path=/data/tokens.bin

6.9B parameters, 1.3B active. Expected (not run here): the OLMoE paper's
loss curve on the same data mix. Does not fit a CPU; shrink it as in mixtral_8x7b.py's docstring.
"""

import ml_collections

from moejax.train import config_defaults as defaults


def get_config() -> ml_collections.ConfigDict:
    model = defaults.model_section()
    model.vocab_size = 50304  # OLMoE / GPT-NeoX vocabulary (padded)
    model.d_model = 2048  # residual width D
    model.num_layers = 16  # decoder layers, all MoE
    model.num_heads = 16  # query heads (head_dim 128)
    model.num_kv_heads = 16  # multi-head attention
    model.d_ff = 1024  # dense FFN width (unused: all MoE)
    model.max_len = 4096  # context length
    model.norm_eps = 1e-05  # OLMoE's RMSNorm epsilon
    model.qk_norm = "full"  # OLMoE normalises q and k over all heads' features

    moe = defaults.moe_section()
    moe.num_experts = 64  # routed experts E
    moe.top_k = 8  # experts per token K
    moe.d_ff = 1024  # expert hidden width F
    moe.norm_topk_prob = False  # OLMoE does not renormalise the top-8 weights
    moe.execution.expert_parallel = "all_to_all"  # tokens sent to their experts' devices

    config = defaults.at_scale(defaults.base_config(model, moe))
    config.opt.lr = 0.0004  # peak learning rate
    config.mesh.fsdp = 4  # parameter sharding (ZeRO-3)
    config.train.steps = 500000  # optimizer steps
    return config
