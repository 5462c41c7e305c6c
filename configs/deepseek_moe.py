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
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # Decoder LM: fields of moejax.layers.ModelConfig (unlisted fields keep its defaults).
    config.model = ml_collections.ConfigDict()
    config.model.vocab_size = 256  # byte-level
    config.model.d_model = 256  # residual width D
    config.model.num_layers = 6  # decoder layers (first one dense)
    config.model.num_heads = 8  # query heads (head_dim 32)
    config.model.num_kv_heads = (
        8  # multi-head attention (V3 uses MLA: attention='mla' with moejax.hf)
    )
    config.model.d_ff = 1024  # width of the dense first layer's FFN
    config.model.max_len = 512  # context length
    config.model.first_dense_layers = 1  # DeepSeek first_k_dense_replace
    config.model.moe_every = 1  # all later layers are MoE
    config.model.dtype = "float32"  # compute dtype ('bfloat16' on accelerators)
    config.model.param_dtype = "float32"  # parameter storage
    config.model.remat = "none"  # activation checkpointing
    config.model.scan_layers = True  # nn.scan over the MoE layers

    # MoE block: fields of moejax.layers.MoEConfig (unlisted fields keep its defaults).
    config.moe = ml_collections.ConfigDict()
    config.moe.num_experts = 64  # fine-grained routed experts E
    config.moe.top_k = 6  # experts per token K
    config.moe.d_ff = 64  # expert hidden width F (fine-grained: small)
    config.moe.activation = "swiglu"  # gated experts
    config.moe.score_func = "sigmoid"  # V3: sigmoid affinities
    config.moe.norm_topk_prob = True  # selected affinities renormalised
    config.moe.routed_scaling_factor = 2.5  # V3 routed_scaling_factor
    config.moe.n_groups = 4  # expert groups for group-limited routing
    config.moe.topk_groups = 2  # groups a token may use
    config.moe.use_expert_bias = True  # aux-loss-free balancing bias (moe_state)
    config.moe.bias_update_rate = 0.001  # bias step u: b += u * sign(mean_load - load)
    config.moe.num_shared_experts = 1  # always-on shared expert
    config.moe.shared_d_ff = 256  # shared expert width
    config.moe.dispatch = "dropless"  # no token dropped
    config.moe.load_balance_type = "sequence"  # V3's complementary sequence-wise balance loss
    config.moe.load_balance_coef = 0.0001  # tiny: the bias does the balancing
    config.moe.router_z_coef = 0.0  # no z-loss

    # Optimizer: clip by global norm, then AdamW with linear warmup + cosine decay.
    config.opt = ml_collections.ConfigDict()
    config.opt.lr = 0.002  # peak learning rate
    config.opt.warmup_steps = 100  # linear warmup (steps)
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
    config.train.steps = 2000  # optimizer steps
    config.train.batch_size = 32  # global batch (sequences per step)
    config.train.seq_len = 256  # tokens per sequence
    config.train.microbatches = 1  # gradient accumulation slices per step
    config.train.seed = 0  # parameter init and per-step rng seed
    config.train.log_every = 25  # steps between metric records
    config.train.eval_every = 250  # steps between validation passes (and at the end)
    config.train.eval_batches = 16  # validation batches per pass
    config.train.checkpoint_every = 500  # steps between (async) checkpoints
    config.train.keep_checkpoints = 3  # committed checkpoints kept
    config.train.nonfinite = "skip"  # non-finite loss/grads: "skip" the update or "stop"
    config.train.sample_tokens = 200  # tokens generated at the end (0 disables)
    config.train.sample_prompt = "def "  # prompt of the final sample (byte-level data only)
    config.train.peak_flops = placeholder(
        float
    )  # per-device peak FLOP/s for MFU; None = rough table
    return config
