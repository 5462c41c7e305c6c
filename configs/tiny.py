r"""Tiny MoE language model on the Python standard library's sources: the CPU default.

Command (this is also what `python -m moejax.train` runs with no flags):

    python -m moejax.train --config=configs/tiny.py --workdir=runs/tiny

Expected (measured on the 2-core CPU): 500 steps in 2m23s wall with the machine nearly idle
(3m43s lightly shared, 11 min when loaded ~6x over by other jobs); validation cross-entropy
falls from ~5.5 nats/byte (uniform over 256 bytes) to 1.409 nats/byte (2.03 bits/byte); the
per-layer expert load ends near uniform (0.105-0.156 per expert, balanced = 0.125). Losses
are deterministic: the same numbers on every run. Any field can be overridden, e.g.
`--config.moe.num_experts=16 --config.train.steps=100`.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # Decoder LM: fields of moejax.layers.ModelConfig (unlisted fields keep its defaults).
    config.model = ml_collections.ConfigDict()
    config.model.vocab_size = 256  # byte-level: every byte is a token
    config.model.d_model = 128  # residual width D
    config.model.num_layers = 4  # decoder layers (all MoE: moe_every=1)
    config.model.num_heads = 4  # query heads; head_dim = d_model // num_heads = 32
    config.model.num_kv_heads = 2  # GQA: 2 query heads share each key/value head
    config.model.d_ff = 512  # dense FFN width (only used by dense layers; none here)
    config.model.max_len = 256  # longest sequence (RoPE table / KV cache for sampling)
    config.model.moe_every = 1  # every layer's FFN is an MoE block
    config.model.first_dense_layers = 0  # no leading dense layers
    config.model.head_dim = placeholder(int)  # per-head width; None = d_model // num_heads
    config.model.dense_activation = "swiglu"  # dense FFN type (dense layers only)
    config.model.rope_theta = 10000.0  # RoPE base
    config.model.norm_eps = 1e-6  # RMSNorm epsilon
    config.model.qk_norm = "none"  # RMSNorm on q/k: "none", "head", "full"
    config.model.qkv_bias = False  # bias on the q/k/v projections
    config.model.tie_embeddings = False  # separate output projection
    config.model.dtype = "float32"  # compute dtype ("bfloat16" for bf16 compute)
    config.model.param_dtype = "float32"  # parameter storage dtype (keep float32)
    config.model.remat = "none"  # activation checkpointing: "none", "full", "dots"
    config.model.scan_layers = True  # nn.scan over layers: compile time flat in depth

    # MoE block: fields of moejax.layers.MoEConfig (None here would make a dense model).
    config.moe = ml_collections.ConfigDict()
    config.moe.num_experts = 8  # routed experts E
    config.moe.top_k = 2  # experts per token K
    config.moe.d_ff = 128  # hidden width F of each expert (active FFN width K*F = 256)
    config.moe.activation = "swiglu"  # gated expert MLP
    config.moe.router = "topk"  # "topk" (token choice) or "expert_choice"
    config.moe.score_func = "softmax"  # router scores: "softmax" or "sigmoid"
    config.moe.norm_topk_prob = True  # selected weights renormalised to sum to 1
    config.moe.routed_scaling_factor = 1.0  # multiplies the routed weights
    config.moe.n_groups = 1  # expert groups for group-limited top-k (1 = off)
    config.moe.topk_groups = 1  # groups kept per token
    config.moe.use_expert_bias = False  # aux-loss-free balancing bias (moe_state)
    config.moe.bias_update_rate = 1e-3  # bias step u: b += u * sign(mean_load - load)
    config.moe.jitter_eps = 0.0  # multiplicative router input jitter (train only)
    config.moe.dispatch = "dropless"  # "dropless" (sort + grouped matmul) or "capacity"
    config.moe.capacity_factor = 1.25  # capacity dispatch: train capacity factor
    config.moe.eval_capacity_factor = 2.0  # capacity dispatch: eval capacity factor
    config.moe.min_capacity = 4  # capacity dispatch: minimum slots per expert
    config.moe.drop_policy = "position"  # over-full expert keeps: "position" or "probs"
    config.moe.load_balance_type = "global"  # switch loss over the batch or per "sequence"
    config.moe.load_balance_coef = 1e-2  # switch load-balance loss weight
    config.moe.router_z_coef = 1e-3  # router z-loss weight
    config.moe.num_shared_experts = 0  # always-on shared experts
    config.moe.shared_d_ff = placeholder(int)  # shared expert width; None = num_shared * d_ff
    config.moe.shared_expert_gate = False  # sigmoid gate on the shared output (Qwen2-MoE)
    config.moe.expert_parallel = "none"  # "none", "all_to_all", "all_gather" (expert mesh axis)
    config.moe.ep_capacity_factor = 2.0  # all_to_all send-buffer bound (x balanced load)
    config.moe.gmm_backend = "auto"  # grouped matmul backend ("xla" on CPU)
    config.moe.gmm_tile = 256  # row tile of the CPU grouped matmul

    # Optimizer: clip by global norm, then AdamW with linear warmup + cosine decay.
    config.opt = ml_collections.ConfigDict()
    config.opt.lr = 3e-3  # peak learning rate
    config.opt.warmup_steps = 50  # linear warmup from 0 (steps)
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
    config.data.val_fraction = 0.05  # share of files (or tail of a single file) held out
    config.data.token_dtype = "uint16"  # dtype of raw (non-.npy) token files
    config.data.max_files = placeholder(int)  # read only the first N files (sorted); None = all
    config.data.seed = 0  # shuffle seed

    # Device mesh (moejax.sharding.make_mesh): axis sizes, -1 = all remaining devices.
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # data parallelism
    config.mesh.fsdp = 1  # parameter sharding (ZeRO-3)
    config.mesh.expert = 1  # expert parallelism
    config.mesh.tensor = 1  # tensor parallelism
    config.mesh.rules = None  # logical axis rules; None = moejax.sharding.DEFAULT_RULES

    # Training loop.
    config.train = ml_collections.ConfigDict()
    config.train.steps = 500  # optimizer steps
    config.train.batch_size = 16  # global batch (sequences per step)
    config.train.seq_len = 128  # tokens (bytes) per sequence
    config.train.microbatches = 1  # gradient accumulation slices per step
    config.train.seed = 0  # parameter init and per-step rng seed
    config.train.log_every = 25  # steps between metric records
    config.train.eval_every = 100  # steps between validation passes (and at the end)
    config.train.eval_batches = 16  # validation batches per pass (fixed windows)
    config.train.checkpoint_every = 250  # steps between (async) checkpoints
    config.train.keep_checkpoints = 2  # committed checkpoints kept
    config.train.nonfinite = "skip"  # non-finite loss/grads: "skip" the update or "stop"
    config.train.sample_tokens = 200  # bytes generated at the end (0 disables)
    config.train.sample_prompt = "def "  # prompt of the final sample
    config.train.peak_flops = placeholder(
        float
    )  # per-device peak FLOP/s for MFU; None = rough table
    return config
