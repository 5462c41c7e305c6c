r"""Expert-choice routing (Zhou et al., 2022): each expert takes its top-C tokens.

Command:

    python -m moejax.train --config=configs/expert_choice.py --workdir=runs/expert_choice

Byte-level on the embedded corpus, the tiny model's shape; capacity C = T * 2 / 8 * 1.0 per expert
(on average 2 experts per token, some tokens get none). No load-balance loss is needed: every
expert is full by construction. Note expert choice looks at all tokens of the batch, so it is
not causal across the sequence (fine for this training demo, not for autoregressive serving).
Expected (not measured here) on CPU: validation loss close to tiny.py's after 500
steps.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # Decoder LM: fields of moejax.layers.ModelConfig (unlisted fields keep its defaults).
    config.model = ml_collections.ConfigDict()
    config.model.vocab_size = 256  # byte-level
    config.model.d_model = 128  # residual width D
    config.model.num_layers = 4  # decoder layers
    config.model.num_heads = 4  # query heads
    config.model.num_kv_heads = 2  # GQA
    config.model.d_ff = 512  # dense FFN width (unused: all MoE)
    config.model.max_len = 256  # context length
    config.model.moe_every = 1  # every layer is MoE
    config.model.dtype = "float32"  # compute dtype
    config.model.param_dtype = "float32"  # parameter storage
    config.model.remat = "none"  # activation checkpointing
    config.model.scan_layers = True  # nn.scan over layers

    # MoE block: fields of moejax.layers.MoEConfig (unlisted fields keep its defaults).
    config.moe = ml_collections.ConfigDict()
    config.moe.num_experts = 8  # experts E
    config.moe.top_k = 2  # average experts per token (sets the capacity)
    config.moe.d_ff = 128  # expert hidden width F
    config.moe.activation = "swiglu"  # gated experts
    config.moe.router = "expert_choice"  # experts pick tokens
    config.moe.score_func = "softmax"  # token-to-expert affinities
    config.moe.capacity_factor = 1.0  # train: C = T * K / E * 1.0
    config.moe.eval_capacity_factor = 1.0  # evaluation capacity factor
    config.moe.load_balance_coef = 0.0  # balanced by construction
    config.moe.router_z_coef = 0.001  # router z-loss weight

    # Optimizer: clip by global norm, then AdamW with linear warmup + cosine decay.
    config.opt = ml_collections.ConfigDict()
    config.opt.lr = 0.003  # peak learning rate
    config.opt.warmup_steps = 50  # linear warmup (steps)
    config.opt.decay_steps = placeholder(int)  # cosine length in steps; None = train.steps
    config.opt.end_lr_ratio = 0.1  # final lr = lr * end_lr_ratio
    config.opt.b1 = 0.9  # Adam beta1
    config.opt.b2 = 0.95  # Adam beta2
    config.opt.eps = 1e-8  # Adam epsilon
    config.opt.weight_decay = 0.1  # decoupled weight decay (matrices only)
    config.opt.grad_clip = 1.0  # max global gradient norm; 0 disables clipping

    # Data: see moejax.train.data.
    config.data = ml_collections.ConfigDict()
    config.data.source = "stdlib"  # "stdlib" (embedded corpus), "text" or "tokens"
    config.data.path = placeholder(str)  # text file/dir ("text") or token file ("tokens")
    config.data.val_path = placeholder(str)  # optional separate validation token file ("tokens")
    config.data.val_fraction = 0.05  # share of files (or tail of one file) held out
    config.data.token_dtype = "uint16"  # dtype of raw (non-.npy) token files
    config.data.max_files = placeholder(int)  # read only the first N files (sorted); None = all
    config.data.seed = 0  # shuffle seed

    # Device mesh (moejax.sharding.make_mesh): axis sizes, -1 = all remaining devices.
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # data parallelism
    config.mesh.fsdp = 1  # parameter sharding (ZeRO-3)
    config.mesh.expert = 1  # expert parallelism (experts split over this axis)
    config.mesh.tensor = 1  # tensor parallelism
    config.mesh.rules = None  # logical axis rules; None = moejax.sharding.DEFAULT_RULES

    # Training loop.
    config.train = ml_collections.ConfigDict()
    config.train.steps = 500  # optimizer steps
    config.train.batch_size = 16  # global batch (sequences per step)
    config.train.seq_len = 128  # tokens per sequence
    config.train.microbatches = 1  # gradient accumulation slices per step
    config.train.seed = 0  # parameter init and per-step rng seed
    config.train.log_every = 25  # steps between metric records
    config.train.eval_every = 100  # steps between validation passes (and at the end)
    config.train.eval_batches = 16  # validation batches per pass
    config.train.checkpoint_every = 250  # steps between (async) checkpoints
    config.train.keep_checkpoints = 3  # committed checkpoints kept
    config.train.nonfinite = "skip"  # non-finite loss/grads: "skip" the update or "stop"
    config.train.sample_tokens = 0  # tokens generated at the end (0 disables)
    config.train.sample_prompt = "def "  # prompt of the final sample (byte-level data only)
    config.train.peak_flops = placeholder(
        float
    )  # per-device peak FLOP/s for MFU; None = rough table
    return config
