"""Typed, frozen configuration for the layers.

Layers take these dataclasses, never an ml_collections ConfigDict: `moejax.train` converts a
config file's `model`/`moe` sections with `model_config_from_dict`. The dataclasses are the single
source of the fields, their library defaults and their meaning (`metadata["help"]`); the config
sections are derived from them (`moejax.train.config_defaults`). Every field is validated once,
at construction, and a bad value raises `ValueError` naming the field and the allowed values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from moejax.activations import ACTIVATIONS
from moejax.moe.plans import PLANS
from moejax.moe.rounding import TOKEN_ROUNDINGS
from moejax.moe.routing import ROUTERS as ROUTER_TABLE
from moejax.moe.routing import router_spec

SCORE_FUNCS = ("softmax", "sigmoid")
EXPERT_BITS = (8, 4)
# The router and dispatch tables of moejax.moe are the source of the allowed names.
ROUTERS = tuple(ROUTER_TABLE)
DISPATCHES = tuple(PLANS)
DROP_POLICIES = ("position", "probs", "random")
BIAS_UPDATES = ("sign", "centered_sign", "proportional")
BIAS_SCHEDULES = ("constant", "inv_sqrt")
LOAD_BALANCE_TYPES = ("global", "sequence")
EXPERT_PARALLEL = ("none", "all_to_all", "all_gather")
EP_EXCHANGES = ("auto", "fixed", "ragged")
GMM_BACKENDS = ("auto", "xla", "triton", "mosaic", "ragged_dot", "tokamax")
# Per-layer activation checkpointing; the MoE policies act on the checkpoint names of
# moejax.moe.pipeline (policies: moejax.layers.transformer.remat_policy).
REMAT_POLICIES = (
    "none",
    "full",
    "dots",
    "moe_recompute_act",
    "moe_save_mlp",
    "moe_save_dispatch",
    "moe_offload",
)
QK_NORMS = ("none", "head", "full")
ATTENTIONS = ("gqa", "mla")
DTYPES = ("float32", "bfloat16", "float16")


def _field(default: Any, doc: str) -> Any:
    """A dataclass field whose meaning, units and choices are its `metadata["help"]`."""
    return dataclasses.field(default=default, metadata={"help": doc})


def _fail(cls: str, field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{cls}.{field}={value!r} is invalid: {allowed}")


def _check_choice(cls: str, field: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(cls, field, value, f"allowed values are {', '.join(map(repr, choices))}")


def _check_int(cls: str, field: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        _fail(cls, field, value, "must be an integer >= 1")


def _check_positive(cls: str, field: str, value: Any, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, int | float) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        _fail(cls, field, value, "must be " + ("a number >= 0" if allow_zero else "a number > 0"))


@dataclasses.dataclass(frozen=True)
class MoEExecution:
    """How an MoE block runs: kernels and expert parallelism. None of it changes the model.

    Each field's `metadata["help"]` says what it means (the config section `moe.execution` is
    derived from these fields).
    """

    gmm_backend: str = _field(
        "auto",
        "backend for `moejax.pallas.gmm` (see that function): 'auto' (Triton on GPU, Mosaic on "
        "TPU, 'xla' elsewhere), 'xla', 'triton', 'mosaic', 'ragged_dot' or 'tokamax' (tokamax's "
        "ragged_dot kernels, the tokamax extra)",
    )
    gmm_tile: int = _field(
        256, "row tile of the XLA grouped matmul / padding granularity of the dropless layout"
    )
    gmm_interpret: bool | None = _field(
        None,
        "run the Pallas gmm kernels in interpret mode; None = interpret on a CPU host (an "
        "ahead-of-time compile for an accelerator sets False)",
    )
    expert_parallel: str = _field(
        "none",
        "expert-parallel strategy inside shard_map when a mesh with an `expert` axis is active: "
        "'none', 'all_to_all' or 'all_gather'",
    )
    ep_capacity_factor: float | None = _field(
        2.0,
        "all_to_all send-buffer bound, as a multiple of the balanced load; None = buffers for "
        "the worst case (every token's picks on one shard): nothing dropped, ep x the memory",
    )
    ep_chunks: int = _field(
        1,
        "all_to_all: split each shard's tokens into this many chunks, each exchanged and computed "
        "on its own, so one chunk's all_to_all can overlap another's expert matmuls (one chunk "
        "when it does not divide the shard's tokens)",
    )
    ep_exchange: str = _field(
        "auto",
        "all_to_all: how the tokens travel. 'fixed' = one fixed-size send buffer per destination "
        "(jax.lax.all_to_all); 'ragged' = each destination gets exactly its rows "
        "(jax.lax.ragged_all_to_all: TPU and GPU only); 'auto' = ragged on TPU/GPU, fixed on CPU",
    )

    def __post_init__(self):
        c = "MoEExecution"
        _check_choice(c, "gmm_backend", self.gmm_backend, GMM_BACKENDS)
        _check_int(c, "gmm_tile", self.gmm_tile)
        if not (self.gmm_interpret is None or isinstance(self.gmm_interpret, bool)):
            _fail(c, "gmm_interpret", self.gmm_interpret, "allowed values are None, True, False")
        _check_choice(c, "expert_parallel", self.expert_parallel, EXPERT_PARALLEL)
        if self.ep_capacity_factor is not None:
            _check_positive(c, "ep_capacity_factor", self.ep_capacity_factor)
        _check_int(c, "ep_chunks", self.ep_chunks)
        _check_choice(c, "ep_exchange", self.ep_exchange, EP_EXCHANGES)


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """One MoE feed-forward block: router, experts, dispatch, balancing.

    Each field's `metadata["help"]` says what it means, in which units (the config section `moe`
    is derived from these fields); `execution` holds how the block runs, not what it computes.
    """

    num_experts: int = _field(8, "routed experts E")
    top_k: int = _field(
        2,
        "experts per token K (token-choice routing; expert choice: the average experts per "
        "token); 1 <= top_k <= num_experts",
    )
    d_ff: int = _field(1024, "hidden size F of each routed expert")
    activation: str = _field(
        "swiglu",
        "expert MLP type: 'swiglu'/'geglu' are gated (wi_gate, wi_up, wo), 'gelu', 'relu' and "
        "'silu' use wi_up and wo only",
    )
    router: str = _field(
        "topk",
        "a row of the router table (moejax.moe.routing.ROUTERS): 'topk' (token choice), "
        "'top_p' (dynamic: experts until their cumulative score reaches top_p), "
        "'expert_choice' (each expert takes its top-C tokens), 'random' (uniform random experts), "
        "'dts' (EvoMoE's dense-to-sparse gate: Gumbel softmax with a falling temperature)",
    )
    score_func: str = _field(
        "softmax", "'softmax' or 'sigmoid' over the router logits, always computed in float32"
    )
    norm_topk_prob: bool = _field(True, "renormalise the K selected weights to sum to 1")
    routed_scaling_factor: float = _field(
        1.0, "multiplies the routed weights (DeepSeek-V3 uses 2.5)"
    )
    n_groups: int = _field(1, "expert groups for group-limited top-k (DeepSeek-V3); 1 disables it")
    topk_groups: int = _field(1, "groups kept per token; experts outside them are not selectable")
    use_expert_bias: bool = _field(
        False, "aux-loss-free balancing bias in collection `moe_state` (selection only)"
    )
    bias_update_rate: float = _field(
        1e-3, "step size u of the bias update b += u * step(load) (see bias_update)"
    )
    bias_update: str = _field(
        "sign",
        "the bias update's step: 'sign' (DeepSeek-V3: sign(mean_load - load)), "
        "'centered_sign' (that minus its mean: the biases keep a zero sum) or 'proportional' "
        "((mean_load - load) / mean_load)",
    )
    bias_update_schedule: str = _field(
        "constant",
        "step size over training: 'constant' (u) or 'inv_sqrt' (u / sqrt(t) at optimizer step t)",
    )
    jitter_eps: float = _field(
        0.0, "multiplicative jitter on router inputs, uniform in [1-eps, 1+eps], train only"
    )
    dispatch: str = _field(
        "dropless", "'dropless' (sort + grouped matmul) or 'capacity' (per-expert buffers)"
    )
    capacity_factor: float = _field(
        1.25, "train-time capacity factor; capacity = ceil(T * K / E * factor)"
    )
    eval_capacity_factor: float = _field(2.0, "capacity factor used when `deterministic=True`")
    min_capacity: int = _field(4, "lower bound on the per-expert capacity")
    drop_policy: str = _field(
        "position",
        "which assignments an over-full expert keeps: 'position' (earliest tokens first), "
        "'probs' (highest router weight first) or 'random' (a uniformly random subset in "
        "training, DeepSpeed's random token selection; 'position' in evaluation; rng stream "
        "'router')",
    )
    load_balance_type: str = _field(
        "global",
        "switch loss over the whole batch ('global') or per sequence ('sequence'), averaged",
    )
    load_balance_coef: float = _field(1e-2, "weight of the load-balance loss in `aux['aux_loss']`")
    router_z_coef: float = _field(1e-3, "weight of the router z-loss in `aux['aux_loss']`")
    router_entropy_coef: float = _field(
        0.0,
        "weight of the routing-entropy term (mean over tokens of -sum p log p of the router "
        "scores) in `aux['aux_loss']` (top-p routing's paper uses it to keep routing decisive)",
    )
    num_null_experts: int = _field(
        0,
        "null experts m (AdaMoE, router='topk'): top-k runs over E + m places; a null pick "
        "computes nothing, so a token uses 0..top_k experts. Their router weights are the "
        "parameter router/null_kernel [D, m]",
    )
    top_p: float = _field(
        0.4,
        "router='top_p': each token keeps its best experts until their cumulative score "
        "reaches top_p (the expert that crosses it is kept), in (0, 1]",
    )
    max_k: int = _field(
        4,
        "router='top_p' or 'dts': static bound on the experts a token may keep, <= num_experts",
    )
    dts_tau_start: float = _field(
        2.0, "router='dts': Gumbel-softmax temperature at step 0 (large: dense, near-uniform)"
    )
    dts_tau_end: float = _field(
        0.1, "router='dts': temperature reached after dts_steps steps (small: about one expert)"
    )
    dts_steps: int = _field(
        500, "router='dts': optimizer steps of the cosine temperature schedule, then constant"
    )
    dts_threshold: float = _field(
        0.05,
        "router='dts': in training, experts whose gate is below this are not computed (the "
        "best one always is), in [0, 1)",
    )
    token_rounding: str = _field(
        "none",
        "tile-aware token rounding (SonicMoE), training only: each expert's token count "
        "rounded to a multiple of rounding_tile: 'down' drops its lowest-weight assignments, "
        "'up' adds its best-scoring other tokens, 'nearest' the closer; 'none' disables it",
    )
    rounding_tile: int | None = _field(
        None, "rows the counts are rounded to; None means execution.gmm_tile"
    )
    rounding_extra: int = _field(
        2,
        "token_rounding 'up'/'nearest': a token may be added to its rounding_extra best experts "
        "it did not pick (the routing widens by that many places)",
    )
    expert_bits: int | None = _field(
        None,
        "quantized routed experts (moejax.compress.quantize_experts): 8 or 4 bit integer weights "
        "stored as int8 with float32 scales; moejax.pallas.gmm dequantizes each tile as it "
        "loads it (compact layout), the other layouts and the expert-parallel exchange "
        "dequantize the whole weight first; None = floating point (param_dtype)",
    )
    expert_group_size: int | None = _field(
        None,
        "quantized experts: rows of the contraction axis sharing one scale (per output channel); "
        "None = one scale per output channel (per-channel)",
    )
    num_shared_experts: int = _field(0, "always-on experts added to the routed output")
    shared_d_ff: int | None = _field(
        None,
        "hidden size of the shared expert MLP (all shared experts fused into one); None means "
        "num_shared_experts * d_ff",
    )
    shared_expert_gate: bool = _field(
        False,
        "Qwen2-MoE style sigmoid gate (x @ w, one scalar per token) on the shared output",
    )
    execution: MoEExecution = _field(
        MoEExecution(), "how the block runs (kernels, expert parallelism), not what it computes"
    )

    def __post_init__(self):
        c = "MoEConfig"
        for name in ("num_experts", "top_k", "d_ff", "n_groups", "topk_groups"):
            _check_int(c, name, getattr(self, name))
        if self.top_k > self.num_experts:
            _fail(c, "top_k", self.top_k, f"must be <= num_experts={self.num_experts}")
        _check_choice(c, "activation", self.activation, ACTIVATIONS)
        _check_int(c, "max_k", self.max_k)
        if not isinstance(self.num_null_experts, int) or self.num_null_experts < 0:
            _fail(c, "num_null_experts", self.num_null_experts, "must be an integer >= 0")
        if not (isinstance(self.top_p, int | float) and 0.0 < self.top_p <= 1.0):
            _fail(c, "top_p", self.top_p, "must be in (0, 1]")
        _check_positive(c, "router_entropy_coef", self.router_entropy_coef, allow_zero=True)
        _check_positive(c, "dts_tau_start", self.dts_tau_start)
        _check_positive(c, "dts_tau_end", self.dts_tau_end)
        _check_int(c, "dts_steps", self.dts_steps)
        if not (isinstance(self.dts_threshold, int | float) and 0.0 <= self.dts_threshold < 1.0):
            _fail(c, "dts_threshold", self.dts_threshold, "must be in [0, 1)")
        _check_choice(c, "router", self.router, ROUTERS)
        router_spec(self.router).validate(self)
        _check_choice(c, "token_rounding", self.token_rounding, TOKEN_ROUNDINGS)
        if self.rounding_tile is not None:
            _check_int(c, "rounding_tile", self.rounding_tile)
        _check_int(c, "rounding_extra", self.rounding_extra)
        if self.token_rounding != "none" and not router_spec(self.router).token_choice:
            _fail(
                c,
                "token_rounding",
                self.token_rounding,
                f"needs a token-choice router (router={self.router!r} is not); allowed 'none'",
            )
        if self.expert_bits is not None and self.expert_bits not in EXPERT_BITS:
            _fail(c, "expert_bits", self.expert_bits, f"allowed values are None, {EXPERT_BITS}")
        if self.expert_group_size is not None:
            _check_int(c, "expert_group_size", self.expert_group_size)
            if self.d_ff % self.expert_group_size:
                _fail(
                    c,
                    "expert_group_size",
                    self.expert_group_size,
                    f"must divide d_ff={self.d_ff} (the contraction axis of wo)",
                )
        _check_choice(c, "score_func", self.score_func, SCORE_FUNCS)
        _check_choice(c, "dispatch", self.dispatch, DISPATCHES)
        _check_choice(c, "drop_policy", self.drop_policy, DROP_POLICIES)
        _check_choice(c, "bias_update", self.bias_update, BIAS_UPDATES)
        _check_choice(c, "bias_update_schedule", self.bias_update_schedule, BIAS_SCHEDULES)
        _check_choice(c, "load_balance_type", self.load_balance_type, LOAD_BALANCE_TYPES)
        if self.num_experts % self.n_groups:
            _fail(c, "n_groups", self.n_groups, f"must divide num_experts={self.num_experts}")
        if self.topk_groups > self.n_groups:
            _fail(c, "topk_groups", self.topk_groups, f"must be <= n_groups={self.n_groups}")
        per_group = self.num_experts // self.n_groups
        if self.n_groups > 1 and self.top_k > self.topk_groups * per_group:
            _fail(c, "top_k", self.top_k, "must be <= topk_groups * experts per group")
        _check_positive(c, "capacity_factor", self.capacity_factor)
        _check_positive(c, "eval_capacity_factor", self.eval_capacity_factor)
        _check_positive(c, "routed_scaling_factor", self.routed_scaling_factor)
        _check_positive(c, "min_capacity", self.min_capacity, allow_zero=True)
        _check_positive(c, "bias_update_rate", self.bias_update_rate, allow_zero=True)
        _check_positive(c, "load_balance_coef", self.load_balance_coef, allow_zero=True)
        _check_positive(c, "router_z_coef", self.router_z_coef, allow_zero=True)
        _check_positive(c, "num_shared_experts", self.num_shared_experts, allow_zero=True)
        if not 0.0 <= self.jitter_eps < 1.0:
            _fail(c, "jitter_eps", self.jitter_eps, "must be in [0, 1)")
        if self.shared_d_ff is not None and self.shared_d_ff < 1:
            _fail(c, "shared_d_ff", self.shared_d_ff, "must be None or an integer >= 1")
        if self.shared_expert_gate and self.num_shared_experts == 0:
            _fail(c, "shared_expert_gate", True, "needs num_shared_experts >= 1")
        if not isinstance(self.execution, MoEExecution):
            _fail(c, "execution", type(self.execution).__name__, "must be a MoEExecution")

    @property
    def gated(self) -> bool:
        return self.activation in ("swiglu", "geglu")

    @property
    def shared_hidden(self) -> int:
        if self.shared_d_ff is not None:
            return self.shared_d_ff
        return self.num_shared_experts * self.d_ff

    def capacity(self, num_tokens: int, *, train: bool) -> int:
        """Per-expert slots for `num_tokens` tokens: ceil(T * K / E * factor), >= min_capacity."""
        factor = self.capacity_factor if train else self.eval_capacity_factor
        slots = -(-num_tokens * self.top_k * factor // self.num_experts)
        return max(int(slots), self.min_capacity, 1)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only language model.

    Layer i uses the MoE FFN iff `moe is not None`, i >= first_dense_layers and
    (i - first_dense_layers) % moe_every == moe_every - 1 (Qwen2-MoE's `decoder_sparse_step`,
    DeepSeek's `first_k_dense_replace`); the other layers use a dense FFN of width d_ff.

    Each field's `metadata["help"]` says what it means, in which units (the config section
    `model` is derived from these fields; `moe` is the config section of the same name).
    """

    vocab_size: int = _field(
        256, "tokens V (256 for the byte-level default corpus: every byte is a token)"
    )
    d_model: int = _field(128, "residual width D")
    num_layers: int = _field(4, "decoder layers")
    num_heads: int = _field(4, "query heads")
    num_kv_heads: int = _field(
        2, "key/value heads (GQA: num_heads / num_kv_heads query heads share one; equal = MHA)"
    )
    head_dim: int | None = _field(None, "per-head width; None means d_model // num_heads")
    d_ff: int = _field(512, "hidden size of the dense FFN layers (only used by dense layers)")
    dense_activation: str = _field(
        "swiglu", "activation of the dense FFN (same choices as MoEConfig.activation)"
    )
    max_len: int = _field(512, "longest sequence (RoPE tables, KV cache)")
    rope_theta: float = _field(10000.0, "RoPE base")
    norm_eps: float = _field(1e-6, "RMSNorm epsilon")
    qk_norm: str = _field(
        "none",
        "RMSNorm on queries and keys: 'none', 'head' (per head, Qwen3-MoE) or 'full' (over all "
        "heads' features, OLMoE)",
    )
    qkv_bias: bool = _field(False, "bias on the q/k/v projections (Qwen2-MoE)")
    attention: str = _field("gqa", "'gqa' or 'mla' (DeepSeek-V3 multi-head latent attention)")
    q_lora_rank: int | None = _field(
        None, "MLA query low-rank latent width; None = a plain query projection"
    )
    kv_lora_rank: int = _field(512, "MLA key/value compression rank")
    qk_nope_head_dim: int = _field(128, "MLA per-head query/key width without RoPE")
    qk_rope_head_dim: int = _field(64, "MLA per-head query/key width with RoPE")
    v_head_dim: int = _field(128, "MLA per-head value width")
    tie_embeddings: bool = _field(False, "output projection = embedding transposed")
    moe: MoEConfig | None = dataclasses.field(
        default_factory=MoEConfig,
        metadata={"help": "the MoE block config, or None for a dense model"},
    )
    moe_every: int = _field(1, "an MoE layer every moe_every layers (see above)")
    first_dense_layers: int = _field(
        0, "leading dense layers before the MoE ones (DeepSeek first_k_dense_replace)"
    )
    dtype: str = _field(
        "float32", "compute dtype: 'float32', 'bfloat16' (bf16 compute on accelerators), 'float16'"
    )
    param_dtype: str = _field(
        "float32", "storage dtype of the parameters (and of the AdamW moments); keep float32"
    )
    remat: str = _field(
        "none",
        "activation checkpointing per layer: 'none' (save everything), 'full' (save only the "
        "layer input, recompute the layer), 'dots' (save matmul outputs), 'moe_recompute_act' "
        "('dots' plus the MoE rows moe_dispatch, wi outputs moe_mlpwi and expert outputs "
        "moe_mlpwo: only elementwise ops are recomputed, the experts' activation moe_act among "
        "them, as Megatron's moe_act recompute), 'moe_save_mlp' (save only the MoE "
        "rows moe_dispatch, wi outputs moe_mlpwi and expert outputs moe_mlpwo: the expert "
        "matmuls are not recomputed, attention and router are), 'moe_save_dispatch' (save only "
        "the dispatched rows: the experts' MLP is recomputed from them, not the gather nor "
        "the all_to_all that brought them; the one returning the results is re-run), "
        "'moe_offload' (moe_save_mlp's tensors offloaded to pinned host memory instead of "
        "kept on the device)",
    )
    scan_layers: bool = _field(
        True, "run identical layers with nn.scan (compile time flat in depth)"
    )

    def __post_init__(self):
        c = "ModelConfig"
        for name in (
            "vocab_size",
            "d_model",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "d_ff",
            "max_len",
            "moe_every",
        ):
            _check_int(c, name, getattr(self, name))
        if self.num_heads % self.num_kv_heads:
            _fail(c, "num_kv_heads", self.num_kv_heads, f"must divide num_heads={self.num_heads}")
        if self.head_dim is None and self.d_model % self.num_heads:
            _fail(
                c,
                "num_heads",
                self.num_heads,
                f"must divide d_model={self.d_model} when head_dim is None",
            )
        if self.head_dim is not None and (self.head_dim < 2 or self.head_dim % 2):
            _fail(c, "head_dim", self.head_dim, "must be an even integer >= 2 (RoPE pairs)")
        if not 0 <= self.first_dense_layers <= self.num_layers:
            _fail(
                c,
                "first_dense_layers",
                self.first_dense_layers,
                f"must be in [0, num_layers={self.num_layers}]",
            )
        _check_choice(c, "dense_activation", self.dense_activation, ACTIVATIONS)
        _check_choice(c, "qk_norm", self.qk_norm, QK_NORMS)
        _check_choice(c, "attention", self.attention, ATTENTIONS)
        _check_choice(c, "dtype", self.dtype, DTYPES)
        _check_choice(c, "param_dtype", self.param_dtype, DTYPES)
        _check_choice(c, "remat", self.remat, REMAT_POLICIES)
        _check_positive(c, "rope_theta", self.rope_theta)
        _check_positive(c, "norm_eps", self.norm_eps)
        if self.moe is not None and not isinstance(self.moe, MoEConfig):
            _fail(c, "moe", type(self.moe).__name__, "must be a MoEConfig or None")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def is_moe_layer(self, i: int) -> bool:
        if self.moe is None or i < self.first_dense_layers:
            return False
        return (i - self.first_dense_layers) % self.moe_every == self.moe_every - 1

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_layers))


def _from_mapping(cls, values: Mapping[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(
            f"{cls.__name__} has no field(s) {', '.join(unknown)}; known fields: "
            f"{', '.join(sorted(names))}"
        )
    return cls(**values)


def moe_config_from_dict(values: Mapping[str, Any]) -> MoEConfig:
    """MoEConfig from a plain mapping (e.g. `config.moe.to_dict()`); unknown keys are an error.

    A nested `execution` mapping becomes the MoEExecution (absent = its defaults).
    """
    values = dict(values)
    if isinstance(values.get("execution"), Mapping):
        values["execution"] = _from_mapping(MoEExecution, dict(values["execution"]))
    return _from_mapping(MoEConfig, values)


def model_config_from_dict(model: Mapping[str, Any], moe: Mapping[str, Any] | None) -> ModelConfig:
    """ModelConfig from a config file's `model` and `moe` sections (moe None = dense model)."""
    values = dict(model)
    values["moe"] = None if moe is None else moe_config_from_dict(moe)
    return _from_mapping(ModelConfig, values)
