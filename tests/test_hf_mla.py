"""moejax.layers.mla.MLA against HF DeepseekV3Attention (forward and input gradient), and its
latent KV cache: prefill + step-by-step decoding equals the full forward, greedy generation
equals HF's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
modeling = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")

from moejax.generate import generate  # noqa: E402
from moejax.hf import from_hf, model_config_from_hf  # noqa: E402
from moejax.hf.weights import layer_entries, rope_deinterleave  # noqa: E402
from moejax.layers.mla import MLA  # noqa: E402

D, H, P, R, V, C = 32, 4, 6, 4, 8, 12


def ds_config(q_lora_rank, rope_interleave, **kw):
    cfg = transformers.DeepseekV3Config(
        vocab_size=128,
        hidden_size=D,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=H,
        num_key_value_heads=H,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=C,
        qk_rope_head_dim=R,
        qk_nope_head_dim=P,
        v_head_dim=V,
        max_position_embeddings=32,
        rope_interleave=rope_interleave,
        **kw,
    )
    cfg._attn_implementation = "eager"
    return cfg


def mla_params(hf_cfg, attn) -> dict:
    """The attention module's HF weights -> MLA params (the same tables from_hf uses)."""
    cfg = model_config_from_hf(hf_cfg)
    state = {
        f"model.layers.0.self_attn.{k}": v.detach().numpy() for k, v in attn.state_dict().items()
    }
    params: dict = {}
    perm = rope_deinterleave(R)
    for entry in layer_entries(cfg, "deepseek_v3", 0):
        if entry.path[0] != "attn":
            continue
        value = entry.to_moejax(state[entry.hf_name])
        if hf_cfg.rope_interleave and entry.path in (("attn", "q"), ("attn", "q_b")):
            value = np.concatenate([value[..., :P], value[..., P:][..., perm]], axis=-1)
        if hf_cfg.rope_interleave and entry.path == ("attn", "kv_a"):
            value = np.concatenate([value[..., :C], value[..., C:][..., perm]], axis=-1)
        node = params
        for key in entry.path[1:-1]:
            node = node.setdefault(key, {})
        node[entry.path[-1]] = jnp.asarray(value)
    return cfg, params


@pytest.mark.parametrize(("q_lora_rank", "rope_interleave"), [(16, True), (None, False)])
def test_mla_matches_hf_attention_forward_and_grad(q_lora_rank, rope_interleave):
    torch.manual_seed(0)
    hf_cfg = ds_config(q_lora_rank, rope_interleave)
    attn = modeling.DeepseekV3Attention(hf_cfg, 0).eval()
    with torch.no_grad():
        for name, p in attn.named_parameters():
            p.copy_(
                1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p)
            )
    rotary = modeling.DeepseekV3RotaryEmbedding(hf_cfg)
    b, length = 2, 7
    x = torch.randn(b, length, D, requires_grad=True)
    cos, sin = rotary(x, torch.arange(length)[None].expand(b, length))
    mask = torch.full((length, length), float("-inf")).triu(1)[None, None]
    y = attn(x, (cos, sin), mask)[0]
    cotangent = torch.randn_like(y)
    (y * cotangent).sum().backward()

    cfg, params = mla_params(hf_cfg, attn)
    module = MLA(cfg)

    def loss(x_in):
        out = module.apply({"params": params}, x_in)
        return jnp.sum(out * jnp.asarray(cotangent.numpy())), out

    (_, out), grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(x.detach().numpy()))
    np.testing.assert_allclose(np.asarray(out), y.detach().numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(grad), x.grad.numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("q_lora_rank", [None, 8])
def test_mla_decode_matches_full_forward(q_lora_rank):
    cfg = model_config_from_hf(ds_config(q_lora_rank, False))
    x = jax.random.normal(jax.random.key(1), (2, 9, D))
    variables = MLA(cfg).init(jax.random.key(0), x)
    full = MLA(cfg).apply(variables, x)

    step = jax.jit(lambda v, xs: MLA(cfg, decode=True).apply(v, xs, mutable=["cache"]))
    cache = {}
    pieces = []
    for start, stop in ((0, 4), (4, 5), (5, 6), (6, 9)):  # prefill, then steps of 1 and 3
        out, state = step({**variables, **cache}, x[:, start:stop])
        cache = {"cache": state["cache"]}
        pieces.append(out)
    assert int(cache["cache"]["cache_index"]) == 9
    assert cache["cache"]["cached_latent"].shape == (2, cfg.max_len, C)
    np.testing.assert_allclose(
        np.asarray(jnp.concatenate(pieces, axis=1)), np.asarray(full), atol=1e-5, rtol=0
    )


def test_mla_refuses_bad_input():
    cfg = model_config_from_hf(ds_config(None, False))
    x = jnp.zeros((1, 3, D))
    variables = MLA(cfg).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="mutable"):
        MLA(cfg, decode=True).apply(variables, x)
    with pytest.raises(ValueError, match="max_len"):
        MLA(cfg, decode=True).apply(
            variables, jnp.zeros((1, cfg.max_len + 1, D)), mutable=["cache"]
        )


def test_deepseek_greedy_generation_matches_hf():
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(ds_config(16, True)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p)
            )
    prompt = np.random.default_rng(0).integers(0, 128, (2, 5))
    with torch.no_grad():
        want = model.generate(
            torch.as_tensor(prompt), max_new_tokens=6, do_sample=False, min_new_tokens=6
        ).numpy()
    cfg, variables = from_hf(model)
    got = generate(cfg, variables, jnp.asarray(prompt, jnp.int32), max_new_tokens=6)
    np.testing.assert_array_equal(np.asarray(got), want)
