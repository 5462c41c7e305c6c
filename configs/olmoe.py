r"""OLMoE-1B-7B (Muennighoff et al., 2024): 16 layers, 64 experts top-8, QK-norm, dropless.

Command (accelerator job, pre-tokenized data with the OLMoE tokenizer):

    python -m moejax.train --config=configs/olmoe.py --workdir=gs://BUCKET/olmoe \
        --config.data.path=/data/tokens.bin

6.9B parameters, 1.3B active. Expected (not run here): the OLMoE paper's
loss curve on the same data mix. Does not fit a CPU; shrink it as in mixtral_8x7b.py's docstring.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # Decoder LM: fields of moejax.layers.ModelConfig (unlisted fields keep its defaults).
    config.model = ml_collections.ConfigDict()
    config.model.vocab_size = 50304  # OLMoE / GPT-NeoX vocabulary (padded)
    config.model.d_model = 2048  # residual width D
    config.model.num_layers = 16  # decoder layers, all MoE
    config.model.num_heads = 16  # query heads (head_dim 128)
    config.model.num_kv_heads = 16  # multi-head attention
    config.model.d_ff = 1024  # dense FFN width (unused: all MoE)
    config.model.max_len = 4096  # context length
    config.model.rope_theta = 10000.0  # RoPE base
    config.model.norm_eps = 1e-05  # RMSNorm epsilon
    config.model.qk_norm = "full"  # OLMoE normalises q and k over all heads' features
    config.model.moe_every = 1  # every layer is MoE
    config.model.dtype = "bfloat16"  # compute dtype
    config.model.param_dtype = "float32"  # parameters in float32
    config.model.remat = "full"  # recompute layers in backward
    config.model.scan_layers = True  # nn.scan over layers

    # MoE block: fields of moejax.layers.MoEConfig (unlisted fields keep its defaults).
    config.moe = ml_collections.ConfigDict()
    config.moe.num_experts = 64  # routed experts E
    config.moe.top_k = 8  # experts per token K
    config.moe.d_ff = 1024  # expert hidden width F
    config.moe.activation = "swiglu"  # gated experts
    config.moe.score_func = "softmax"  # softmax router
    config.moe.norm_topk_prob = False  # OLMoE does not renormalise the top-8 weights
    config.moe.dispatch = "dropless"  # no token dropped
    config.moe.load_balance_coef = 0.01  # load-balance loss weight
    config.moe.router_z_coef = 0.001  # router z-loss weight
    config.moe.expert_parallel = "all_to_all"  # tokens sent to their experts' devices
    config.moe.gmm_backend = "auto"  # Triton on GPU, Mosaic on TPU

    # Optimizer: clip by global norm, then AdamW with linear warmup + cosine decay.
    config.opt = ml_collections.ConfigDict()
    config.opt.lr = 0.0004  # peak learning rate
    config.opt.warmup_steps = 2000  # linear warmup (steps)
    config.opt.decay_steps = placeholder(int)  # cosine length in steps; None = train.steps
    config.opt.end_lr_ratio = 0.1  # final lr = lr * end_lr_ratio
    config.opt.b1 = 0.9  # Adam beta1
    config.opt.b2 = 0.95  # Adam beta2
    config.opt.eps = 1e-8  # Adam epsilon
    config.opt.weight_decay = 0.1  # decoupled weight decay (matrices only)
    config.opt.grad_clip = 1.0  # max global gradient norm; 0 disables clipping

    # Data: see moejax.train.data.
    config.data = ml_collections.ConfigDict()
    config.data.source = "tokens"  # "stdlib" (embedded corpus), "text" or "tokens"
    config.data.path = "/path/to/tokens.bin"  # text file/dir ("text") or token file ("tokens")
    config.data.val_path = placeholder(str)  # optional separate validation token file ("tokens")
    config.data.val_fraction = 0.001  # share of files (or tail of one file) held out
    config.data.token_dtype = "uint16"  # dtype of raw (non-.npy) token files
    config.data.max_files = placeholder(int)  # read only the first N files (sorted); None = all
    config.data.seed = 0  # shuffle seed

    # Device mesh (moejax.sharding.make_mesh): axis sizes, -1 = all remaining devices.
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # data parallelism
    config.mesh.fsdp = 4  # parameter sharding (ZeRO-3)
    config.mesh.expert = 8  # expert parallelism (experts split over this axis)
    config.mesh.tensor = 1  # tensor parallelism
    config.mesh.rules = None  # logical axis rules; None = moejax.sharding.DEFAULT_RULES

    # Training loop.
    config.train = ml_collections.ConfigDict()
    config.train.steps = 500000  # optimizer steps
    config.train.batch_size = 1024  # global batch (sequences per step)
    config.train.seq_len = 4096  # tokens per sequence
    config.train.microbatches = 1  # gradient accumulation slices per step
    config.train.seed = 0  # parameter init and per-step rng seed
    config.train.log_every = 10  # steps between metric records
    config.train.eval_every = 1000  # steps between validation passes (and at the end)
    config.train.eval_batches = 50  # validation batches per pass
    config.train.checkpoint_every = 1000  # steps between (async) checkpoints
    config.train.keep_checkpoints = 3  # committed checkpoints kept
    config.train.nonfinite = "skip"  # non-finite loss/grads: "skip" the update or "stop"
    config.train.sample_tokens = 0  # tokens generated at the end (0 disables)
    config.train.sample_prompt = "def "  # prompt of the final sample (byte-level data only)
    config.train.peak_flops = placeholder(
        float
    )  # per-device peak FLOP/s for MFU; None = rough table
    return config
