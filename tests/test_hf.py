"""moejax.hf: HF logits parity per family, directory import, round trips, refusals.

Tiny random models (hidden 32, 2-3 layers, 4-8 experts, vocab 128) built from a config with a
fixed torch seed; every weight (norm scales and DeepSeek's correction bias included) is
re-drawn at random so that a swapped or mis-transposed tensor cannot go unnoticed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from moejax.hf import from_hf, model_config_from_hf, to_hf  # noqa: E402
from moejax.layers import ModelConfig, MoEConfig  # noqa: E402
from moejax.layers.transformer import Transformer  # noqa: E402

TOL = 1e-4
COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def hf_config(family: str, **overrides):
    """Tiny HF config of a family; overrides replace any field."""
    if family == "mixtral":
        kw = dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)
        cls = transformers.MixtralConfig
    elif family == "qwen2_moe":
        kw = dict(
            num_hidden_layers=3,
            intermediate_size=40,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=36,
            num_experts=8,
            num_experts_per_tok=2,
            decoder_sparse_step=2,
            norm_topk_prob=False,
        )
        cls = transformers.Qwen2MoeConfig
    elif family == "qwen3_moe":
        kw = dict(
            head_dim=16,
            intermediate_size=40,
            moe_intermediate_size=24,
            num_experts=8,
            num_experts_per_tok=3,
            norm_topk_prob=True,
            mlp_only_layers=[0],
        )
        cls = transformers.Qwen3MoeConfig
    elif family == "olmoe":
        kw = dict(intermediate_size=24, num_experts=8, num_experts_per_tok=2, eos_token_id=2)
        cls = transformers.OlmoeConfig
    elif family == "deepseek_v3":
        kw = dict(
            num_hidden_layers=3,
            num_key_value_heads=4,
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=8,
            n_shared_experts=2,
            num_experts_per_tok=3,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,
            q_lora_rank=16,
            kv_lora_rank=12,
            qk_rope_head_dim=4,
            qk_nope_head_dim=6,
            v_head_dim=8,
            routed_scaling_factor=2.5,
            rope_interleave=True,
        )
        cls = transformers.DeepseekV3Config
    else:
        raise AssertionError(family)
    return cls(**{**COMMON, **kw, **overrides})


def randomize_(module, seed: int = 0) -> None:
    """Re-draws every parameter and float buffer (norm scales around 1, the rest around 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tensors = list(module.named_parameters()) + list(module.named_buffers())
        for name, t in tensors:
            if not t.is_floating_point() or "inv_freq" in name:
                continue
            noise = torch.randn(t.shape, generator=gen, dtype=t.dtype)
            if "norm" in name:
                t.copy_(1.0 + 0.2 * noise)
            elif "e_score_correction_bias" in name:
                t.copy_(0.3 * noise)
            else:
                t.copy_(0.15 * noise)


def hf_model(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = hf_config(family, **overrides)
    cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    randomize_(model, seed)
    return model.eval()


def tokens(batch: int = 2, length: int = 11, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, COMMON["vocab_size"], (batch, length))


def hf_logits(model, toks: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(toks)).logits.float().numpy()


@functools.cache
def _jitted_logits(cfg: ModelConfig):
    # One compile per config: the tests reuse a few configs across seeds and round trips.
    return jax.jit(lambda variables, toks: Transformer(cfg).apply(variables, toks)[0])


def moejax_logits(cfg: ModelConfig, variables, toks: np.ndarray) -> np.ndarray:
    return np.asarray(_jitted_logits(cfg)(variables, jnp.asarray(toks, jnp.int32)))


def random_variables(cfg: ModelConfig, seed: int = 0) -> dict:
    """Random numpy variables with the Transformer's tree (shapes via eval_shape, no init)."""
    abstract = jax.eval_shape(
        Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32)
    )
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = rng.normal(size=leaf.shape).astype(np.float32)
        name = jax.tree_util.keystr(path)
        return 1.0 + 0.2 * noise if "norm" in name else 0.15 * noise

    return jax.tree_util.tree_map_with_path(draw, nn_unbox(abstract))


def assert_trees_equal(a, b) -> None:
    """Same structure and bitwise-equal leaves (dtype included)."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


FAMILY_CASES = [
    pytest.param("mixtral", {}, id="mixtral"),
    pytest.param("qwen2_moe", {}, id="qwen2_moe-sparse_step2-shared-gate-qkv_bias"),
    pytest.param("qwen3_moe", {}, id="qwen3_moe-head_qk_norm-mlp_only_prefix"),
    pytest.param("olmoe", {"tie_word_embeddings": True}, id="olmoe-full_qk_norm-tied"),
    pytest.param("deepseek_v3", {}, id="deepseek_v3-q_lora-interleaved_rope"),
    pytest.param(
        "deepseek_v3",
        {"q_lora_rank": None, "rope_interleave": False, "n_group": 1, "topk_group": 1},
        id="deepseek_v3-no_q_lora-no_groups",
    ),
]


@pytest.mark.parametrize(("family", "overrides"), FAMILY_CASES)
def test_import_matches_hf_logits(family, overrides):
    model = hf_model(family, **overrides)
    toks = tokens()
    cfg, variables = from_hf(model)
    got = moejax_logits(cfg, variables, toks)
    want = hf_logits(model, toks)
    assert np.abs(got - want).max() <= TOL
    assert all(
        np.asarray(leaf).dtype == np.float32 for leaf in jax.tree.leaves(variables["params"])
    )


def test_import_config_mapping():
    cfg = model_config_from_hf(hf_config("qwen2_moe"))
    assert (cfg.moe_every, cfg.first_dense_layers, cfg.qkv_bias) == (2, 0, True)
    assert cfg.moe.shared_expert_gate and cfg.moe.shared_d_ff == 36
    assert [cfg.is_moe_layer(i) for i in range(3)] == [False, True, False]
    cfg = model_config_from_hf(hf_config("qwen3_moe"))
    assert (cfg.qk_norm, cfg.head_dim, cfg.first_dense_layers) == ("head", 16, 1)
    cfg = model_config_from_hf(hf_config("deepseek_v3"))
    moe = cfg.moe
    assert (cfg.attention, cfg.first_dense_layers, cfg.q_lora_rank) == ("mla", 1, 16)
    assert (moe.score_func, moe.n_groups, moe.topk_groups, moe.use_expert_bias) == (
        "sigmoid",
        4,
        2,
        True,
    )
    assert (moe.routed_scaling_factor, moe.num_shared_experts, moe.shared_hidden) == (2.5, 2, 32)


def test_logits_gradient_matches_hf():
    """Backward through MLA, group-limited sigmoid routing and shared experts: d(loss)/d(embed)."""
    model = hf_model("deepseek_v3", seed=3)
    toks = tokens(seed=3)
    cotangent = np.random.default_rng(1).normal(size=(2, 11, 128)).astype(np.float32)
    logits = model(torch.as_tensor(toks)).logits
    (logits * torch.as_tensor(cotangent)).sum().backward()
    want = model.model.embed_tokens.weight.grad.numpy()

    cfg, variables = from_hf(model)

    def loss(params):
        out, _ = Transformer(cfg).apply({**variables, "params": params}, jnp.asarray(toks))
        return jnp.sum(out * cotangent)

    got = jax.jit(jax.grad(loss))(variables["params"])["embed"]["embedding"]
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)


def test_deepseek_moe_block_matches_hf():
    """The DeepSeek-V3 MoE block alone: sigmoid + bias + group-limited top-k + shared experts."""
    from moejax.layers.moe import MoE

    model = hf_model("deepseek_v3", seed=5)
    block = model.model.layers[1].mlp
    cfg, variables = from_hf(model, scan_layers=False)
    x = torch.randn(3, 9, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = block(x).numpy()
    layer_vars = {c: variables[c]["layers_1"]["moe"] for c in ("params", "moe_state")}
    got, _ = jax.jit(MoE(cfg.moe, cfg.d_model).apply)(layer_vars, jnp.asarray(x.numpy()))
    assert np.abs(np.asarray(got) - want).max() <= TOL


def test_import_from_directory_equals_import_from_model(tmp_path):
    model = hf_model("mixtral")
    # On-disk layout (one tensor per expert, block_sparse_moe), sharded with an index file.
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert os.path.exists(os.path.join(tmp_path, "model.safetensors.index.json"))
    _, from_model = from_hf(model)
    _, from_dir = from_hf(tmp_path)
    assert_trees_equal(from_model, from_dir)


def test_bfloat16_params_round_trip(tmp_path):
    model = hf_model("qwen3_moe")
    cfg, variables = from_hf(model, param_dtype="bfloat16")
    assert cfg.param_dtype == "bfloat16"
    assert {np.asarray(x).dtype for x in jax.tree.leaves(variables["params"])} == {
        np.dtype(jnp.bfloat16)
    }
    to_hf(cfg, variables, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16
    _, variables2 = from_hf(tmp_path, param_dtype="bfloat16")
    assert_trees_equal(variables, variables2)


def test_unrolled_layout_matches_scanned():
    model = hf_model("qwen2_moe")
    cfg, scanned = from_hf(model)
    cfg_u, unrolled = from_hf(model, scan_layers=False)
    assert set(unrolled["params"]) >= {"layers_0", "layers_1", "layers_2"}
    toks = tokens()
    np.testing.assert_allclose(
        moejax_logits(cfg_u, unrolled, toks), moejax_logits(cfg, scanned, toks), atol=1e-6
    )


@pytest.mark.parametrize(
    ("family", "overrides"),
    [FAMILY_CASES[1], FAMILY_CASES[2], FAMILY_CASES[3], FAMILY_CASES[4]],
)
def test_round_trip_through_hf(tmp_path, family, overrides):
    """moejax -> HF dir -> moejax is bitwise; transformers loads the dir and gives the logits."""
    model = hf_model(family, seed=1, **overrides)
    cfg, variables = from_hf(model)
    to_hf(cfg, variables, tmp_path)
    cfg2, variables2 = from_hf(tmp_path)
    assert cfg2 == cfg
    # Bitwise even for DeepSeek's interleaved RoPE: the export keeps moejax's rotate-half layout
    # and says so (rope_interleave=False).
    assert_trees_equal(variables, variables2)
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    toks = tokens(seed=2)
    np.testing.assert_allclose(
        hf_logits(reloaded.eval(), toks), hf_logits(model, toks), atol=TOL, rtol=0
    )
    assert np.abs(moejax_logits(cfg2, variables2, toks) - hf_logits(model, toks)).max() <= TOL


NATIVE = [
    pytest.param(
        ModelConfig(
            vocab_size=128,
            d_model=32,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            d_ff=48,
            max_len=64,
            moe=MoEConfig(num_experts=4, top_k=2, d_ff=24),
        ),
        "mixtral",
        id="mixtral",
    ),
    pytest.param(
        ModelConfig(
            vocab_size=128,
            d_model=32,
            num_layers=4,
            num_heads=4,
            num_kv_heads=4,
            d_ff=40,
            max_len=64,
            attention="mla",
            q_lora_rank=None,
            kv_lora_rank=8,
            qk_nope_head_dim=4,
            qk_rope_head_dim=4,
            v_head_dim=6,
            first_dense_layers=2,
            moe=MoEConfig(
                num_experts=4,
                top_k=2,
                d_ff=16,
                score_func="sigmoid",
                n_groups=2,
                topk_groups=1,
                routed_scaling_factor=1.5,
                use_expert_bias=True,
                num_shared_experts=1,
            ),
        ),
        "deepseek_v3",
        id="deepseek_v3-mla-no_q_lora",
    ),
]


@pytest.mark.parametrize(("cfg", "family"), NATIVE)
def test_moejax_model_round_trip(tmp_path, cfg, family):
    """A moejax-initialised model -> HF -> moejax: bitwise params, HF logits equal moejax's."""
    toks = tokens(length=9)
    variables = random_variables(cfg)  # includes a random (trained-like) expert bias
    to_hf(cfg, variables, tmp_path)
    with open(os.path.join(tmp_path, "config.json")) as f:
        assert json.load(f)["model_type"] == family
    cfg2, variables2 = from_hf(tmp_path)
    # head_dim is written explicitly (None -> its value); a model without dense layers has no
    # use for d_ff, which Mixtral's config cannot carry.
    unused = {} if cfg.first_dense_layers else {"d_ff": cfg.d_ff}
    assert dataclasses.replace(cfg2, head_dim=cfg.head_dim, **unused) == cfg
    assert_trees_equal(variables, variables2)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    assert np.abs(hf_logits(reloaded, toks) - moejax_logits(cfg, variables, toks)).max() <= TOL


def nn_unbox(tree):
    import flax.linen as nn

    return nn.meta.unbox(tree)


def _rewrite_tensor(path, name, fn):
    file = os.path.join(path, "model.safetensors")
    state = safetensors_torch.load_file(file)
    state[name] = fn(state[name])
    safetensors_torch.save_file(state, file, metadata={"format": "pt"})


def test_shape_mismatch_is_refused_with_tensor_name(tmp_path):
    model = hf_model("qwen3_moe")
    model.save_pretrained(tmp_path)
    name = "model.layers.1.self_attn.k_proj.weight"
    _rewrite_tensor(tmp_path, name, lambda t: t[:-1].contiguous())
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        from_hf(tmp_path)


def test_expert_shape_mismatch_is_refused_with_tensor_name(tmp_path):
    model = hf_model("mixtral")
    model.save_pretrained(tmp_path)
    name = "model.layers.0.block_sparse_moe.experts.2.w3.weight"
    _rewrite_tensor(tmp_path, name, lambda t: t[:, :-2].contiguous())
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        from_hf(tmp_path)


def test_missing_and_unexpected_tensors_are_refused(tmp_path):
    model = hf_model("olmoe")
    model.save_pretrained(tmp_path)
    file = os.path.join(tmp_path, "model.safetensors")
    state = safetensors_torch.load_file(file)
    state["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    safetensors_torch.save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"self_attn\.extra\.weight"):
        from_hf(tmp_path)
    del state["model.layers.0.self_attn.extra.weight"]
    del state["model.layers.1.self_attn.q_norm.weight"]
    safetensors_torch.save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensor model\.layers\.1\.self_attn\.q_norm"):
        from_hf(tmp_path)


@pytest.mark.parametrize(
    ("family", "overrides", "option"),
    [
        ("mixtral", {"sliding_window": 16}, "sliding_window"),
        ("qwen2_moe", {"use_sliding_window": True}, "use_sliding_window"),
        ("qwen3_moe", {"mlp_only_layers": [1]}, "mlp_only_layers"),
        ("qwen3_moe", {"attention_bias": True}, "attention_bias"),
        ("olmoe", {"clip_qkv": 8.0}, "clip_qkv"),
        ("mixtral", {"hidden_act": "gelu"}, "hidden_act"),
        ("deepseek_v3", {"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
        (
            "deepseek_v3",
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
            "rope_type",
        ),
        (
            "mixtral",
            {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}},
            "rope_type",
        ),
    ],
)
def test_unsupported_options_are_named(family, overrides, option):
    with pytest.raises(ValueError, match=option):
        model_config_from_hf(hf_config(family, **overrides))


def test_unsupported_architecture_is_named():
    cfg = transformers.LlamaConfig(**{k: v for k, v in COMMON.items()}, intermediate_size=48)
    with pytest.raises(ValueError, match="model_type='llama'"):
        model_config_from_hf(cfg)
    with pytest.raises(ValueError, match="local directory"):
        from_hf("/nonexistent/dir")


def test_export_refuses_what_the_family_cannot_express(tmp_path):
    moe = MoEConfig(num_experts=4, top_k=2, d_ff=16, activation="geglu")
    cfg = ModelConfig(
        vocab_size=128, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, moe=moe
    )
    with pytest.raises(ValueError, match="moe.activation"):
        to_hf(cfg, {"params": {}}, tmp_path)
    cfg = ModelConfig(
        vocab_size=128,
        d_model=32,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        qk_norm="head",
        moe=MoEConfig(num_experts=4, top_k=2, d_ff=16),
    )
    with pytest.raises(ValueError, match="qk_norm"):
        to_hf(cfg, {"params": {}}, tmp_path, family="mixtral")
    # Wrong parameter shape: named with its path.
    params = random_variables(cfg)["params"]
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"][:, :-1]
    with pytest.raises(ValueError, match="lm_head/kernel"):
        to_hf(cfg, {"params": params}, tmp_path)
