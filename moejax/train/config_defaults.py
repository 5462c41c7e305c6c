"""Default config sections: every field of configs/*.py is defined and commented here, once.

Each section comes at the scale of configs/tiny.py (byte-level LM on the embedded corpus, CPU);
a config file builds its `get_config()` from these and sets only what differs, saying why.
Sections come back unlocked; fields that may be None are typed placeholders, so command-line
overrides such as `--config.opt.decay_steps=100` still type-check.

`model_section(*optional, every_field=False)` and `moe_section(...)` list the fields every config
sets, plus the optional ones a config names (all of them with `every_field=True`, as the reference
config tiny.py does): a field left out keeps its `moejax.layers.ModelConfig` / `MoEConfig` default
and cannot be overridden from the command line.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def _with_optional(
    section: ml_collections.ConfigDict,
    optional: ml_collections.ConfigDict,
    names: tuple[str, ...],
    every_field: bool,
) -> ml_collections.ConfigDict:
    """Adds the `names` fields of `optional` (all of them if `every_field`) to `section`."""
    unknown = sorted(set(names) - set(optional.keys()))
    if unknown:
        raise KeyError(f"unknown optional fields {unknown}; allowed: {sorted(optional.keys())}")
    for name in optional.keys() if every_field else names:
        # The raw field, so a placeholder stays a typed FieldReference rather than a bare None.
        section[name] = optional._fields[name]
    return section


def model_section(*optional: str, every_field: bool = False) -> ml_collections.ConfigDict:
    """Decoder LM: moejax.layers.ModelConfig fields, plus those of `_model_optional` named."""
    model = ml_collections.ConfigDict()
    model.vocab_size = 256  # byte-level: every byte is a token
    model.d_model = 128  # residual width D
    model.num_layers = 4  # decoder layers
    model.num_heads = 4  # query heads; head_dim = d_model // num_heads = 32
    model.num_kv_heads = 2  # GQA: 2 query heads share each key/value head
    model.d_ff = 512  # dense FFN width (only used by dense layers)
    model.max_len = 256  # longest sequence (RoPE table / KV cache for sampling)
    model.moe_every = 1  # every layer's FFN is an MoE block
    model.dtype = "float32"  # compute dtype ("bfloat16" for bf16 compute on accelerators)
    model.param_dtype = "float32"  # parameter (and AdamW moment) storage dtype (keep float32)
    model.remat = "none"  # activation checkpointing: "none", "full", "dots"
    model.scan_layers = True  # nn.scan over layers: compile time flat in depth
    return _with_optional(model, _model_optional(), optional, every_field)


def _model_optional() -> ml_collections.ConfigDict:
    model = ml_collections.ConfigDict()
    model.first_dense_layers = 0  # leading dense layers (DeepSeek first_k_dense_replace)
    model.head_dim = placeholder(int)  # per-head width; None = d_model // num_heads
    model.dense_activation = "swiglu"  # dense FFN type (dense layers only)
    model.rope_theta = 10000.0  # RoPE base
    model.norm_eps = 1e-6  # RMSNorm epsilon
    model.qk_norm = "none"  # RMSNorm on q/k: "none", "head", "full"
    model.qkv_bias = False  # bias on the q/k/v projections
    model.tie_embeddings = False  # separate output projection
    return model


def moe_section(*optional: str, every_field: bool = False) -> ml_collections.ConfigDict:
    """MoE block: moejax.layers.MoEConfig fields, plus those of `_moe_optional` named."""
    moe = ml_collections.ConfigDict()
    moe.num_experts = 8  # routed experts E
    moe.top_k = 2  # experts per token K (expert choice: average experts per token)
    moe.d_ff = 128  # hidden width F of each expert (active FFN width K*F = 256)
    moe.activation = "swiglu"  # gated expert MLP
    moe.score_func = "softmax"  # router scores: "softmax" or "sigmoid"
    moe.load_balance_coef = 1e-2  # switch load-balance loss weight
    moe.router_z_coef = 1e-3  # router z-loss weight
    return _with_optional(moe, _moe_optional(), optional, every_field)


def _moe_optional() -> ml_collections.ConfigDict:
    moe = ml_collections.ConfigDict()
    moe.router = "topk"  # "topk" (token choice) or "expert_choice"
    moe.norm_topk_prob = True  # selected weights renormalised to sum to 1
    moe.routed_scaling_factor = 1.0  # multiplies the routed weights
    moe.n_groups = 1  # expert groups for group-limited top-k (1 = off)
    moe.topk_groups = 1  # groups kept per token
    moe.use_expert_bias = False  # aux-loss-free balancing bias (moe_state)
    moe.bias_update_rate = 1e-3  # bias step u: b += u * sign(mean_load - load)
    moe.jitter_eps = 0.0  # multiplicative router input jitter (train only)
    moe.dispatch = "dropless"  # "dropless" (sort + grouped matmul) or "capacity"
    moe.capacity_factor = 1.25  # capacity dispatch: train capacity = ceil(T * K / E * factor)
    moe.eval_capacity_factor = 2.0  # capacity dispatch: eval capacity factor
    moe.min_capacity = 4  # capacity dispatch: minimum slots per expert
    moe.drop_policy = "position"  # over-full expert keeps: "position" or "probs"
    moe.load_balance_type = "global"  # switch loss over the batch or per "sequence"
    moe.num_shared_experts = 0  # always-on shared experts
    moe.shared_d_ff = placeholder(int)  # shared expert width; None = num_shared * d_ff
    moe.shared_expert_gate = False  # sigmoid gate on the shared output (Qwen2-MoE)
    moe.expert_parallel = "none"  # "none", "all_to_all", "all_gather" (expert mesh axis)
    moe.ep_capacity_factor = 2.0  # all_to_all send-buffer bound (x balanced load)
    moe.gmm_backend = "auto"  # grouped matmul backend: "xla" on CPU, Triton GPU, Mosaic TPU
    moe.gmm_tile = 256  # row tile of the CPU grouped matmul
    return moe


def opt_section() -> ml_collections.ConfigDict:
    """Optimizer: clip by global norm, then AdamW with linear warmup + cosine decay."""
    opt = ml_collections.ConfigDict()
    opt.lr = 3e-3  # peak learning rate
    opt.warmup_steps = 50  # linear warmup from 0 (steps)
    opt.decay_steps = placeholder(int)  # cosine length in steps; None = train.steps
    opt.end_lr_ratio = 0.1  # final lr = lr * end_lr_ratio
    opt.b1 = 0.9  # Adam beta1
    opt.b2 = 0.95  # Adam beta2
    opt.eps = 1e-8  # Adam epsilon
    opt.weight_decay = 0.1  # decoupled weight decay (matrices only)
    opt.grad_clip = 1.0  # max global gradient norm; 0 disables clipping
    return opt


def data_section() -> ml_collections.ConfigDict:
    """Data: see moejax.train.data."""
    data = ml_collections.ConfigDict()
    data.source = "stdlib"  # "stdlib" (embedded corpus), "text" or "tokens"
    data.path = placeholder(str)  # text file/dir ("text") or token file ("tokens")
    data.val_path = placeholder(str)  # optional separate validation token file ("tokens")
    data.val_fraction = 0.05  # share of files (or tail of a single file) held out
    data.token_dtype = "uint16"  # dtype of raw (non-.npy) token files
    data.max_files = placeholder(int)  # read only the first N files (sorted); None = all
    data.seed = 0  # shuffle seed
    return data


def mesh_section() -> ml_collections.ConfigDict:
    """Device mesh (moejax.sharding.make_mesh): axis sizes, -1 = all remaining devices."""
    mesh = ml_collections.ConfigDict()
    mesh.data = -1  # data parallelism
    mesh.fsdp = 1  # parameter sharding (ZeRO-3)
    mesh.expert = 1  # expert parallelism (experts split over this axis)
    mesh.tensor = 1  # tensor parallelism
    mesh.rules = None  # logical axis rules; None = moejax.sharding.DEFAULT_RULES
    return mesh


def train_section() -> ml_collections.ConfigDict:
    """Training loop."""
    train = ml_collections.ConfigDict()
    train.steps = 500  # optimizer steps
    train.batch_size = 16  # global batch (sequences per step)
    train.seq_len = 128  # tokens per sequence (bytes for byte-level data)
    train.microbatches = 1  # gradient accumulation slices per step
    train.seed = 0  # parameter init and per-step rng seed
    train.log_every = 25  # steps between metric records
    train.eval_every = 100  # steps between validation passes (and at the end)
    train.eval_batches = 16  # validation batches per pass (fixed windows)
    train.checkpoint_every = 250  # steps between (async) checkpoints
    train.keep_checkpoints = 3  # committed checkpoints kept
    train.nonfinite = "skip"  # non-finite loss/grads: "skip" the update or "stop"
    train.sample_tokens = 200  # tokens generated at the end (0 disables)
    train.sample_prompt = "def "  # prompt of the final sample (byte-level data only)
    train.peak_flops = placeholder(float)  # per-device peak FLOP/s for MFU; None = rough table
    return train


def base_config(
    model: ml_collections.ConfigDict, moe: ml_collections.ConfigDict | None
) -> ml_collections.ConfigDict:
    """A full config: the given model and moe sections plus the default opt/data/mesh/train.

    Args:
      model: from `model_section`.
      moe: from `moe_section`; None makes every layer's FFN dense.

    Returns:
      An unlocked ConfigDict with sections model, moe, opt, data, mesh, train.
    """
    config = ml_collections.ConfigDict()
    config.model = model
    config.moe = moe
    config.opt = opt_section()
    config.data = data_section()
    config.mesh = mesh_section()
    config.train = train_section()
    return config


def at_scale(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Turns a base_config into an accelerator pretraining job (the mixtral/olmoe settings).

    Args:
      config: from `base_config`; changed in place.

    Returns:
      `config`, reading pre-tokenized data with bf16 compute, remat and 8-way expert parallelism.
    """
    config.model.dtype = "bfloat16"  # bf16 compute; parameters and AdamW moments stay float32
    config.model.remat = "full"  # recompute each layer in the backward pass (activation memory)
    config.opt.warmup_steps = 2000  # linear warmup (steps)
    config.data.source = "tokens"  # pre-tokenized with the model's own tokenizer
    config.data.path = "/path/to/tokens.bin"  # set with --config.data.path
    config.data.val_fraction = 0.001  # the tail of a large token file is plenty to validate on
    config.mesh.expert = 8  # expert parallelism (experts split over this axis)
    config.train.batch_size = 1024  # global batch (sequences per step)
    config.train.seq_len = 4096  # tokens per sequence
    config.train.log_every = 10  # steps between metric records
    config.train.eval_every = 1000  # steps between validation passes (and at the end)
    config.train.eval_batches = 50  # validation batches per pass
    config.train.checkpoint_every = 1000  # steps between (async) checkpoints
    config.train.sample_tokens = 0  # no end-of-run sample (the prompt is byte-level)
    return config
