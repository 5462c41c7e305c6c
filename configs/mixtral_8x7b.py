r"""Mixtral 8x7B (Jiang et al., 2024): 32 layers, d_model 4096, 8 experts top-2 of width 14336.

Command (a TPU v5p-128 / 64 x H100 class job; pre-tokenized data with the Mixtral tokenizer):

    python -m moejax.train --config=configs/mixtral_8x7b.py --workdir=gs://BUCKET/mixtral \
        --config.data.path=/data/tokens.bin

46.7B parameters, 12.9B active per token. Fits a v5p-128 by the deviceless compile (89.2 of
95 GiB per chip with two microbatches; see README "Will it fit?"). Expected: a from-scratch run
tracks the Mixtral paper's loss curve; it does NOT fit a CPU. To smoke-test the wiring on a
laptop shrink it:
`--config.model.num_layers=2 --config.model.d_model=64 --config.model.num_heads=4
--config.model.num_kv_heads=2 --config.moe.d_ff=64 --config.model.vocab_size=256
--config.data.source=stdlib --config.train.batch_size=8 --config.train.seq_len=64
--config.train.steps=20 --config.mesh.fsdp=1 --config.mesh.expert=1 --config.model.max_len=64`.
"""

import ml_collections

from moejax.train import config_defaults as defaults


def get_config() -> ml_collections.ConfigDict:
    model = defaults.model_section()
    model.vocab_size = 32000  # Mixtral's SentencePiece vocabulary
    model.d_model = 4096  # residual width D
    model.num_layers = 32  # decoder layers, every one an MoE layer
    model.num_heads = 32  # query heads (head_dim 128)
    model.num_kv_heads = 8  # GQA: 4 query heads per key/value head
    model.d_ff = 14336  # dense FFN width (unused: every layer is MoE)
    model.max_len = 32768  # context length
    model.rope_theta = 1000000.0  # Mixtral's RoPE base
    model.norm_eps = 1e-05  # Mixtral's RMSNorm epsilon

    moe = defaults.moe_section()
    moe.d_ff = 14336  # expert hidden width F
    moe.load_balance_coef = 0.02  # HF Mixtral router_aux_loss_coef
    moe.execution.expert_parallel = "all_to_all"  # tokens sent to their experts' devices

    config = defaults.at_scale(defaults.base_config(model, moe))
    config.opt.lr = 0.0003  # peak learning rate
    config.mesh.fsdp = 8  # parameter sharding (ZeRO-3): 46.7B parameters
    config.train.steps = 250000  # optimizer steps
    # Two microbatches per step: the deviceless compile for tpu-v5p-128 (mesh fsdp 8 x expert 8)
    # needs 110.7 GiB per chip with one (over v5p's 95 GiB) and 89.2 GiB with two:
    # `python -m moejax.compile --config=configs/mixtral_8x7b.py --target=tpu-v5p-128`.
    config.train.microbatches = 2
    return config
