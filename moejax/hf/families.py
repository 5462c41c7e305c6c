"""Hugging Face config <-> ModelConfig for the supported MoE families.

Supported `model_type`s: "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3". Options a
family's config can express but moejax cannot reproduce exactly (sliding windows, RoPE scaling,
attention output bias, qkv clipping, activations other than SiLU, ...) raise `ValueError`
naming the option, so an import never silently changes the model's function.
"""

from __future__ import annotations

from typing import Any

from moejax.layers.config import ModelConfig, MoEConfig

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")

# Architecture class written into config.json so AutoModelForCausalLM picks the right model.
ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}


def _unsupported(family: str, option: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{family}: config option {option}={value!r} is not supported: {why}")


def _get(hf_cfg: Any, name: str, default: Any = None) -> Any:
    return getattr(hf_cfg, name, default)


def _rope_theta(family: str, hf_cfg: Any) -> float:
    rope = _get(hf_cfg, "rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise _unsupported(
            family, "rope_parameters.rope_type", rope_type, "only 'default' RoPE (no scaling)"
        )
    theta = rope.get("rope_theta", _get(hf_cfg, "rope_theta"))
    if theta is None:
        raise ValueError(f"{family}: config has no rope_theta")
    return float(theta)


def _check_common(family: str, hf_cfg: Any) -> None:
    act = _get(hf_cfg, "hidden_act", "silu")
    if act != "silu":
        raise _unsupported(family, "hidden_act", act, "only 'silu' (SwiGLU experts)")
    if _get(hf_cfg, "use_sliding_window", False):
        raise _unsupported(family, "use_sliding_window", True, "no sliding-window attention")
    if family in ("mixtral", "qwen3_moe", "olmoe") and _get(hf_cfg, "sliding_window") is not None:
        raise _unsupported(
            family, "sliding_window", hf_cfg.sliding_window, "no sliding-window attention"
        )
    if _get(hf_cfg, "attention_bias", False):
        raise _unsupported(family, "attention_bias", True, "no bias on the attention output")
    quant = _get(hf_cfg, "quantization_config")
    if quant:
        method = quant.get("quant_method", quant) if isinstance(quant, dict) else quant
        raise _unsupported(family, "quantization_config", method, "dequantize first")
    if _get(hf_cfg, "clip_qkv") is not None:
        raise _unsupported(family, "clip_qkv", hf_cfg.clip_qkv, "no q/k/v clipping")


def _dense_prefix(family: str, hf_cfg: Any, num_layers: int) -> tuple[int, int]:
    """(first_dense_layers, moe_every) from Qwen's decoder_sparse_step / mlp_only_layers.

    Qwen layer i is MoE iff i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0.
    ModelConfig expresses a dense prefix followed by a period, so mlp_only_layers must be a
    prefix [0, k) and then the period must be 1.
    """
    step = int(_get(hf_cfg, "decoder_sparse_step", 1) or 1)
    mlp_only = sorted(_get(hf_cfg, "mlp_only_layers", None) or [])
    if not mlp_only:
        return 0, step
    if mlp_only != list(range(len(mlp_only))) or step != 1 or len(mlp_only) > num_layers:
        raise _unsupported(
            family,
            "mlp_only_layers",
            mlp_only,
            "only a leading block of dense layers [0, k) with decoder_sparse_step=1",
        )
    return len(mlp_only), 1


def model_config_from_hf(hf_cfg: Any, *, param_dtype: str = "float32") -> ModelConfig:
    """Map a transformers config object of a supported family to a ModelConfig.

    Args:
      hf_cfg: a `transformers.PretrainedConfig` (e.g. `model.config` or `AutoConfig` output).
      param_dtype: storage dtype of the imported parameters.

    Returns:
      The equivalent ModelConfig (dropless dispatch, so inference matches HF exactly).
    """
    family = _get(hf_cfg, "model_type")
    if family not in FAMILIES:
        raise ValueError(
            f"model_type={family!r} is not supported: allowed values are "
            f"{', '.join(map(repr, FAMILIES))}"
        )
    _check_common(family, hf_cfg)
    d_model = int(hf_cfg.hidden_size)
    num_heads = int(hf_cfg.num_attention_heads)
    num_kv = int(_get(hf_cfg, "num_key_value_heads", None) or num_heads)
    num_layers = int(hf_cfg.num_hidden_layers)
    common = dict(
        vocab_size=int(hf_cfg.vocab_size),
        d_model=d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv,
        max_len=int(hf_cfg.max_position_embeddings),
        rope_theta=_rope_theta(family, hf_cfg),
        norm_eps=float(hf_cfg.rms_norm_eps),
        tie_embeddings=bool(_get(hf_cfg, "tie_word_embeddings", False)),
        dense_activation="swiglu",
        dtype="float32",
        param_dtype=param_dtype,
    )
    head_dim = _get(hf_cfg, "head_dim", None)
    if family != "deepseek_v3":
        common["head_dim"] = int(head_dim) if head_dim else None
    lb_coef = float(_get(hf_cfg, "router_aux_loss_coef", 0.0) or 0.0)
    moe_common = dict(
        num_experts=int(
            next(
                v
                for v in (
                    _get(hf_cfg, "num_local_experts"),
                    _get(hf_cfg, "num_experts"),
                    _get(hf_cfg, "n_routed_experts"),
                )
                if v is not None
            )
        ),
        top_k=int(hf_cfg.num_experts_per_tok),
        activation="swiglu",
        dispatch="dropless",
        load_balance_coef=lb_coef,
    )

    if family == "mixtral":
        # Mixtral's jitter also scales the expert inputs; moejax scales the router input only.
        # Both are train-time noise, so inference is unaffected.
        moe = MoEConfig(
            d_ff=int(hf_cfg.intermediate_size),
            norm_topk_prob=True,
            jitter_eps=float(_get(hf_cfg, "router_jitter_noise", 0.0) or 0.0),
            **moe_common,
        )
        return ModelConfig(d_ff=int(hf_cfg.intermediate_size), moe=moe, **common)

    if family == "olmoe":
        if head_dim and int(head_dim) != d_model // num_heads:
            raise _unsupported(family, "head_dim", head_dim, "OLMoE uses hidden_size // heads")
        moe = MoEConfig(
            d_ff=int(hf_cfg.intermediate_size),
            norm_topk_prob=bool(hf_cfg.norm_topk_prob),
            **moe_common,
        )
        return ModelConfig(d_ff=int(hf_cfg.intermediate_size), qk_norm="full", moe=moe, **common)

    if family in ("qwen2_moe", "qwen3_moe"):
        if int(hf_cfg.num_experts) == 0:
            raise _unsupported(family, "num_experts", 0, "a dense model is not an MoE import")
        first_dense, every = _dense_prefix(family, hf_cfg, num_layers)
        shared = {}
        if family == "qwen2_moe":
            shared = dict(
                num_shared_experts=1,
                shared_d_ff=int(hf_cfg.shared_expert_intermediate_size),
                shared_expert_gate=True,
            )
        moe = MoEConfig(
            d_ff=int(hf_cfg.moe_intermediate_size),
            norm_topk_prob=bool(hf_cfg.norm_topk_prob),
            **shared,
            **moe_common,
        )
        return ModelConfig(
            d_ff=int(hf_cfg.intermediate_size),
            qk_norm="head" if family == "qwen3_moe" else "none",
            qkv_bias=family == "qwen2_moe" and bool(_get(hf_cfg, "qkv_bias", True)),
            moe=moe,
            moe_every=every,
            first_dense_layers=first_dense,
            **common,
        )

    # deepseek_v3
    if num_kv != num_heads:
        raise _unsupported(
            family, "num_key_value_heads", num_kv, f"MLA needs num_attention_heads={num_heads}"
        )
    n_shared = int(hf_cfg.n_shared_experts or 0)
    if n_shared < 1:
        raise _unsupported(family, "n_shared_experts", n_shared, "must be >= 1")
    moe_ff = int(hf_cfg.moe_intermediate_size)
    moe = MoEConfig(
        d_ff=moe_ff,
        score_func="sigmoid",
        norm_topk_prob=bool(hf_cfg.norm_topk_prob),
        routed_scaling_factor=float(hf_cfg.routed_scaling_factor),
        n_groups=int(hf_cfg.n_group or 1),
        topk_groups=int(hf_cfg.topk_group or 1),
        use_expert_bias=True,
        num_shared_experts=n_shared,  # shared width n_shared * d_ff, as shared_d_ff=None means
        **moe_common,
    )
    qk_head_dim = int(hf_cfg.qk_nope_head_dim) + int(hf_cfg.qk_rope_head_dim)
    q_lora = _get(hf_cfg, "q_lora_rank")
    return ModelConfig(
        d_ff=int(hf_cfg.intermediate_size),
        attention="mla",
        head_dim=qk_head_dim,
        q_lora_rank=None if q_lora is None else int(q_lora),
        kv_lora_rank=int(hf_cfg.kv_lora_rank),
        qk_nope_head_dim=int(hf_cfg.qk_nope_head_dim),
        qk_rope_head_dim=int(hf_cfg.qk_rope_head_dim),
        v_head_dim=int(hf_cfg.v_head_dim),
        moe=moe,
        first_dense_layers=min(int(hf_cfg.first_k_dense_replace or 0), num_layers),
        **common,
    )


def infer_family(cfg: ModelConfig) -> str:
    """The HF family whose architecture matches `cfg` (checked in detail by hf_config_dict)."""
    moe = cfg.moe
    if cfg.attention == "mla" or (moe is not None and moe.score_func == "sigmoid"):
        return "deepseek_v3"
    if cfg.qk_norm == "full":
        return "olmoe"
    if cfg.qk_norm == "head":
        return "qwen3_moe"
    if moe is not None and moe.num_shared_experts > 0:
        return "qwen2_moe"
    if cfg.qkv_bias or cfg.first_dense_layers or cfg.moe_every > 1:
        return "qwen2_moe"
    return "mixtral"


def _require(family: str, field: str, value: Any, ok: bool, why: str) -> None:
    if not ok:
        raise ValueError(f"cannot export to {family}: {field}={value!r}, {why}")


def hf_config_dict(cfg: ModelConfig, family: str) -> dict[str, Any]:
    """config.json content (plain dict) for `cfg` written as `family`.

    Raises:
      ValueError: naming the ModelConfig field that the family cannot express.
    """
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is invalid: allowed values are {FAMILIES}")
    moe = cfg.moe
    _require(family, "moe", moe, moe is not None, "the HF families here are MoE models")
    _require(family, "moe.router", moe.router, moe.router == "topk", "HF routes token-choice")
    for name, value in (
        ("moe.activation", moe.activation),
        ("dense_activation", cfg.dense_activation),
    ):
        _require(family, name, value, value == "swiglu", "HF experts are SwiGLU ('silu')")
    is_ds = family == "deepseek_v3"
    _require(
        family,
        "attention",
        cfg.attention,
        cfg.attention == ("mla" if is_ds else "gqa"),
        "DeepSeek-V3 uses MLA, the other families GQA",
    )
    _require(
        family,
        "moe.score_func",
        moe.score_func,
        moe.score_func == ("sigmoid" if is_ds else "softmax"),
        "fixed by the family",
    )
    want_qk = {"olmoe": "full", "qwen3_moe": "head"}.get(family, "none")
    _require(family, "qk_norm", cfg.qk_norm, cfg.qk_norm == want_qk, f"{family} uses {want_qk!r}")
    _require(
        family,
        "qkv_bias",
        cfg.qkv_bias,
        not cfg.qkv_bias or family == "qwen2_moe",
        "only qwen2_moe has q/k/v bias",
    )
    if not is_ds:
        for name in ("routed_scaling_factor", "n_groups", "topk_groups"):
            v = getattr(moe, name)
            _require(family, f"moe.{name}", v, v == 1, "only deepseek_v3 has it")
        _require(family, "moe.use_expert_bias", True, not moe.use_expert_bias, "only deepseek_v3")
    if family in ("mixtral", "olmoe"):
        _require(
            family,
            "first_dense_layers",
            cfg.first_dense_layers,
            not cfg.first_dense_layers,
            "every layer is MoE",
        )
        _require(family, "moe_every", cfg.moe_every, cfg.moe_every == 1, "every layer is MoE")
    if family == "mixtral":
        _require(family, "moe.norm_topk_prob", False, moe.norm_topk_prob, "Mixtral renormalises")
    if family != "qwen2_moe" and not is_ds:
        _require(
            family,
            "moe.num_shared_experts",
            moe.num_shared_experts,
            moe.num_shared_experts == 0,
            "no shared experts in this family",
        )
    if family == "qwen2_moe":
        _require(
            family,
            "moe.shared_expert_gate",
            moe.shared_expert_gate,
            moe.shared_expert_gate,
            "Qwen2-MoE always has a gated shared expert",
        )
    if family in ("qwen2_moe", "qwen3_moe"):
        _require(
            family,
            "moe_every",
            cfg.moe_every,
            cfg.first_dense_layers == 0 or cfg.moe_every == 1,
            "a dense prefix (mlp_only_layers) needs moe_every=1",
        )
    if is_ds:
        _require(family, "moe_every", cfg.moe_every, cfg.moe_every == 1, "DeepSeek-V3 has 1")
        _require(
            family,
            "moe.num_shared_experts",
            moe.num_shared_experts,
            moe.num_shared_experts >= 1,
            "DeepSeek-V3 always has shared experts",
        )
        _require(
            family,
            "moe.shared_d_ff",
            moe.shared_d_ff,
            moe.shared_hidden == moe.num_shared_experts * moe.d_ff,
            "must be num_shared_experts * d_ff",
        )
    head_dim = cfg.resolved_head_dim
    if family == "olmoe":
        _require(
            family,
            "head_dim",
            cfg.head_dim,
            head_dim == cfg.d_model // cfg.num_heads,
            "OLMoE uses hidden_size // num_heads",
        )

    out: dict[str, Any] = dict(
        architectures=[ARCHITECTURES[family]],
        model_type=family,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        hidden_act="silu",
        max_position_embeddings=cfg.max_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings,
        num_experts_per_tok=moe.top_k,
        router_aux_loss_coef=moe.load_balance_coef,
        attention_dropout=0.0,
    )
    if family in ("mixtral", "qwen2_moe", "qwen3_moe") and cfg.head_dim is not None:
        out["head_dim"] = cfg.head_dim
    if family == "mixtral":
        out.update(
            intermediate_size=moe.d_ff,
            num_local_experts=moe.num_experts,
            router_jitter_noise=moe.jitter_eps,
            sliding_window=None,
        )
        # Mixtral has no dense layers: its intermediate_size is the expert width.
    elif family == "olmoe":
        out.update(
            intermediate_size=moe.d_ff,
            num_experts=moe.num_experts,
            norm_topk_prob=moe.norm_topk_prob,
            clip_qkv=None,
            attention_bias=False,
        )
    elif family in ("qwen2_moe", "qwen3_moe"):
        out.update(
            moe_intermediate_size=moe.d_ff,
            num_experts=moe.num_experts,
            norm_topk_prob=moe.norm_topk_prob,
            decoder_sparse_step=cfg.moe_every,
            mlp_only_layers=list(range(cfg.first_dense_layers)),
            use_sliding_window=False,
        )
        if family == "qwen2_moe":
            out.update(shared_expert_intermediate_size=moe.shared_hidden, qkv_bias=cfg.qkv_bias)
        else:
            out.update(attention_bias=False)
    else:
        out.update(
            moe_intermediate_size=moe.d_ff,
            n_routed_experts=moe.num_experts,
            n_shared_experts=moe.num_shared_experts,
            routed_scaling_factor=moe.routed_scaling_factor,
            n_group=moe.n_groups,
            topk_group=moe.topk_groups,
            norm_topk_prob=moe.norm_topk_prob,
            first_k_dense_replace=cfg.first_dense_layers,
            q_lora_rank=cfg.q_lora_rank,
            kv_lora_rank=cfg.kv_lora_rank,
            qk_nope_head_dim=cfg.qk_nope_head_dim,
            qk_rope_head_dim=cfg.qk_rope_head_dim,
            v_head_dim=cfg.v_head_dim,
            # Weights are stored with the RoPE features split in halves (rotate_half), the layout
            # moejax computes in; from_hf permutes interleaved checkpoints into it.
            rope_interleave=False,
            attention_bias=False,
            num_nextn_predict_layers=0,
        )
    return out
