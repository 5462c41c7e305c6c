"""Typed, frozen configuration for the layers.

Layers take these dataclasses, never an ml_collections ConfigDict: `moejax.train` converts a
config file's `model`/`moe` sections with `model_config_from_dict`. Every field is validated once,
at construction, and a bad value raises `ValueError` naming the field and the allowed values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

ACTIVATIONS = ("swiglu", "geglu", "gelu", "relu", "silu")
SCORE_FUNCS = ("softmax", "sigmoid")
ROUTERS = ("topk", "expert_choice")
DISPATCHES = ("dropless", "capacity")
DROP_POLICIES = ("position", "probs")
LOAD_BALANCE_TYPES = ("global", "sequence")
EXPERT_PARALLEL = ("none", "all_to_all", "all_gather")
GMM_BACKENDS = ("auto", "xla", "triton", "mosaic", "ragged_dot")
REMAT_POLICIES = ("none", "full", "dots")
QK_NORMS = ("none", "head", "full")
ATTENTIONS = ("gqa", "mla")
DTYPES = ("float32", "bfloat16", "float16")


def _fail(cls: str, field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{cls}.{field}={value!r} is invalid: {allowed}")


def _check_choice(cls: str, field: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(cls, field, value, f"allowed values are {', '.join(map(repr, choices))}")


def _check_positive(cls: str, field: str, value: Any, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, int | float) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        _fail(cls, field, value, "must be " + ("a number >= 0" if allow_zero else "a number > 0"))


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """One MoE feed-forward block: router, experts, dispatch, balancing.

    Attributes:
      num_experts: routed experts E.
      top_k: experts per token K (token-choice routing); 1 <= top_k <= num_experts.
      d_ff: hidden size F of each routed expert.
      activation: expert MLP type; "swiglu"/"geglu" are gated (wi_gate, wi_up, wo), the others
        use wi_up and wo only.
      router: "topk" (token choice) or "expert_choice" (each expert takes its top-C tokens).
      score_func: "softmax" or "sigmoid" over the router logits, always computed in float32.
      norm_topk_prob: renormalise the K selected weights to sum to 1.
      routed_scaling_factor: multiplies the routed weights (DeepSeek-V3 uses 2.5).
      n_groups: expert groups for group-limited top-k (DeepSeek-V3); 1 disables it.
      topk_groups: groups kept per token; experts outside them are not selectable.
      use_expert_bias: aux-loss-free balancing bias in collection `moe_state` (selection only).
      bias_update_rate: step size u of the bias update b += u * sign(mean_load - load).
      jitter_eps: multiplicative jitter on router inputs, uniform in [1-eps, 1+eps], train only.
      dispatch: "dropless" (sort + grouped matmul) or "capacity" (per-expert buffers).
      capacity_factor: train-time capacity factor; capacity = ceil(T * K / E * factor).
      eval_capacity_factor: capacity factor used when `deterministic=True`.
      min_capacity: lower bound on the per-expert capacity.
      drop_policy: which assignments an over-full expert keeps: "position" (earliest tokens
        first) or "probs" (highest router weight first).
      load_balance_type: switch loss over the whole batch ("global") or per sequence, averaged.
      load_balance_coef: weight of the load-balance loss in `aux["aux_loss"]`.
      router_z_coef: weight of the router z-loss in `aux["aux_loss"]`.
      num_shared_experts: always-on experts added to the routed output.
      shared_d_ff: hidden size of the shared expert MLP (all shared experts fused into one);
        None means num_shared_experts * d_ff.
      shared_expert_gate: Qwen2-MoE style sigmoid gate (x @ w, one scalar per token) on the
        shared output.
      expert_parallel: expert-parallel strategy inside shard_map when a mesh with an `expert`
        axis is active: "none", "all_to_all" or "all_gather".
      ep_capacity_factor: all_to_all send-buffer bound, as a multiple of the balanced load.
      gmm_backend: backend for `moejax.pallas.gmm` (see that function).
      gmm_tile: row tile of the XLA grouped matmul / padding granularity of the dropless layout.
    """

    num_experts: int = 8
    top_k: int = 2
    d_ff: int = 1024
    activation: str = "swiglu"
    router: str = "topk"
    score_func: str = "softmax"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_groups: int = 1
    topk_groups: int = 1
    use_expert_bias: bool = False
    bias_update_rate: float = 1e-3
    jitter_eps: float = 0.0
    dispatch: str = "dropless"
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    drop_policy: str = "position"
    load_balance_type: str = "global"
    load_balance_coef: float = 1e-2
    router_z_coef: float = 1e-3
    num_shared_experts: int = 0
    shared_d_ff: int | None = None
    shared_expert_gate: bool = False
    expert_parallel: str = "none"
    ep_capacity_factor: float = 2.0
    gmm_backend: str = "auto"
    gmm_tile: int = 256

    def __post_init__(self):
        c = "MoEConfig"
        for name in ("num_experts", "top_k", "d_ff", "n_groups", "topk_groups", "gmm_tile"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                _fail(c, name, v, "must be an integer >= 1")
        if self.top_k > self.num_experts:
            _fail(c, "top_k", self.top_k, f"must be <= num_experts={self.num_experts}")
        _check_choice(c, "activation", self.activation, ACTIVATIONS)
        _check_choice(c, "router", self.router, ROUTERS)
        _check_choice(c, "score_func", self.score_func, SCORE_FUNCS)
        _check_choice(c, "dispatch", self.dispatch, DISPATCHES)
        _check_choice(c, "drop_policy", self.drop_policy, DROP_POLICIES)
        _check_choice(c, "load_balance_type", self.load_balance_type, LOAD_BALANCE_TYPES)
        _check_choice(c, "expert_parallel", self.expert_parallel, EXPERT_PARALLEL)
        _check_choice(c, "gmm_backend", self.gmm_backend, GMM_BACKENDS)
        if self.num_experts % self.n_groups:
            _fail(c, "n_groups", self.n_groups, f"must divide num_experts={self.num_experts}")
        if self.topk_groups > self.n_groups:
            _fail(c, "topk_groups", self.topk_groups, f"must be <= n_groups={self.n_groups}")
        per_group = self.num_experts // self.n_groups
        if self.n_groups > 1 and self.top_k > self.topk_groups * per_group:
            _fail(c, "top_k", self.top_k, "must be <= topk_groups * experts per group")
        _check_positive(c, "capacity_factor", self.capacity_factor)
        _check_positive(c, "eval_capacity_factor", self.eval_capacity_factor)
        _check_positive(c, "ep_capacity_factor", self.ep_capacity_factor)
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

    Attributes:
      vocab_size: tokens V (256 for the byte-level default corpus).
      d_model: residual width D.
      num_layers: decoder layers.
      num_heads / num_kv_heads: query heads and key/value heads (GQA; equal = MHA).
      head_dim: per-head width; None means d_model // num_heads.
      d_ff: hidden size of the dense FFN layers.
      dense_activation: activation of the dense FFN (same choices as MoEConfig.activation).
      max_len: longest sequence (RoPE tables, KV cache).
      rope_theta: RoPE base.
      norm_eps: RMSNorm epsilon.
      qk_norm: RMSNorm on queries and keys: "none", "head" (per head, Qwen3-MoE) or "full"
        (over all heads' features, OLMoE).
      qkv_bias: bias on the q/k/v projections (Qwen2-MoE).
      attention: "gqa" or "mla" (DeepSeek-V3 multi-head latent attention).
      q_lora_rank / kv_lora_rank / qk_nope_head_dim / qk_rope_head_dim / v_head_dim: MLA sizes.
      tie_embeddings: output projection = embedding transposed.
      moe: the MoE block config, or None for a dense model.
      moe_every / first_dense_layers: where the MoE layers are (see above).
      dtype: compute dtype; param_dtype: storage dtype of the parameters.
      remat: activation checkpointing per layer: "none", "full" or "dots" (save matmul outputs).
      scan_layers: run identical layers with nn.scan (compile time flat in depth).
    """

    vocab_size: int = 256
    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    d_ff: int = 512
    dense_activation: str = "swiglu"
    max_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    qk_norm: str = "none"
    qkv_bias: bool = False
    attention: str = "gqa"
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    tie_embeddings: bool = False
    moe: MoEConfig | None = dataclasses.field(default_factory=MoEConfig)
    moe_every: int = 1
    first_dense_layers: int = 0
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = True

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
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                _fail(c, name, v, "must be an integer >= 1")
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
    """MoEConfig from a plain mapping (e.g. `config.moe.to_dict()`); unknown keys are an error."""
    return _from_mapping(MoEConfig, dict(values))


def model_config_from_dict(model: Mapping[str, Any], moe: Mapping[str, Any] | None) -> ModelConfig:
    """ModelConfig from a config file's `model` and `moe` sections (moe None = dense model)."""
    values = dict(model)
    values["moe"] = None if moe is None else moe_config_from_dict(moe)
    return _from_mapping(ModelConfig, values)
