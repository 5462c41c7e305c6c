r"""Mixtral 8x7B (Jiang et al., 2024): 32 layers, d_model 4096, 8 experts top-2 of width 14336.

Command (a TPU v5p-128 / 64 x H100 class job; pre-tokenized data with the Mixtral tokenizer):

    python -m moejax.train --config=configs/mixtral_8x7b.py --workdir=gs://BUCKET/mixtral \
        --config.data.path=/data/tokens.bin

46.7B parameters, 12.9B active per token. Expected: a from-scratch run tracks the Mixtral paper's
loss curve; it does NOT fit a CPU. To smoke-test the wiring on a laptop shrink it:
`--config.model.num_layers=2 --config.model.d_model=64 --config.model.num_heads=4
--config.model.num_kv_heads=2 --config.moe.d_ff=64 --config.model.vocab_size=256
--config.data.source=stdlib --config.train.batch_size=8 --config.train.seq_len=64
--config.train.steps=20 --config.mesh.fsdp=1 --config.mesh.expert=1 --config.model.max_len=64`.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # Decoder LM: fields of moejax.layers.ModelConfig (unlisted fields keep its defaults).
    config.model = ml_collections.ConfigDict()
    config.model.vocab_size = 32000  # Mixtral's SentencePiece vocabulary
    config.model.d_model = 4096  # residual width D
    config.model.num_layers = 32  # decoder layers, every one an MoE layer
    config.model.num_heads = 32  # query heads (head_dim 128)
    config.model.num_kv_heads = 8  # GQA: 4 query heads per key/value head
    config.model.d_ff = 14336  # dense FFN width (unused: every layer is MoE)
    config.model.max_len = 32768  # context length
    config.model.rope_theta = 1000000.0  # RoPE base
    config.model.norm_eps = 1e-05  # RMSNorm epsilon
    config.model.moe_every = 1  # every layer's FFN is an MoE block
    config.model.dtype = "bfloat16"  # compute dtype
    config.model.param_dtype = "float32"  # parameters (and AdamW moments) in float32
    config.model.remat = "full"  # recompute each layer in the backward pass (activation memory)
    config.model.scan_layers = True  # nn.scan over layers

    # MoE block: fields of moejax.layers.MoEConfig (unlisted fields keep its defaults).
    config.moe = ml_collections.ConfigDict()
    config.moe.num_experts = 8  # routed experts E
    config.moe.top_k = 2  # experts per token K
    config.moe.d_ff = 14336  # expert hidden width F
    config.moe.activation = "swiglu"  # w1/w3/w2 SwiGLU experts
    config.moe.score_func = "softmax"  # softmax over all 8 logits, then top-2
    config.moe.norm_topk_prob = True  # the two weights renormalised (Mixtral softmaxes the top-2)
    config.moe.dispatch = "dropless"  # no token dropped (megablocks-style grouped matmul)
    config.moe.load_balance_coef = 0.02  # HF Mixtral router_aux_loss_coef
    config.moe.router_z_coef = 0.001  # router z-loss weight
    config.moe.expert_parallel = "all_to_all"  # tokens sent to their experts' devices
    config.moe.gmm_backend = "auto"  # Triton on GPU, Mosaic on TPU

    # Optimizer: clip by global norm, then AdamW with linear warmup + cosine decay.
    config.opt = ml_collections.ConfigDict()
    config.opt.lr = 0.0003  # peak learning rate
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
    config.mesh.fsdp = 8  # parameter sharding (ZeRO-3)
    config.mesh.expert = 8  # expert parallelism (experts split over this axis)
    config.mesh.tensor = 1  # tensor parallelism
    config.mesh.rules = None  # logical axis rules; None = moejax.sharding.DEFAULT_RULES

    # Training loop.
    config.train = ml_collections.ConfigDict()
    config.train.steps = 250000  # optimizer steps
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
