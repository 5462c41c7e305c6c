"""Quantized experts (moejax.compress.quantize_experts): the stored values and scales against a
numpy reference of symmetric absmax quantization, the model's outputs within the int8/int4
error, the mixed policy, byte accounting, dequantization and bad arguments."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("qwix")

from moejax.compress.quantize import (  # noqa: E402
    dequantize_experts,
    expert_nbytes,
    quantize_experts,
)
from moejax.compress.stats import routing_stats  # noqa: E402
from moejax.layers import ModelConfig, MoEConfig, Transformer  # noqa: E402
from moejax.moe.experts import dequantize_weight  # noqa: E402

E, D, F = 4, 32, 32


def _model(scan=True):
    cfg = ModelConfig(
        vocab_size=64,
        d_model=D,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        d_ff=32,
        max_len=32,
        scan_layers=scan,
        moe=MoEConfig(num_experts=E, top_k=2, d_ff=F),
    )
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)))
    variables = nn.meta.unbox(Transformer(cfg).init(jax.random.key(0), tokens))
    return cfg, variables, tokens


def _experts(cfg, variables, layer_slot=0):
    tree = variables["params"]["moe_layers"]["moe"]["experts"]
    return {k: np.asarray(v)[layer_slot] for k, v in tree.items()}


@pytest.mark.parametrize(("bits", "group"), [(8, None), (4, None), (4, 8), (8, 16)])
def test_values_and_scales_match_symmetric_absmax_quantization(bits, group):
    cfg, variables, _ = _model()
    new_cfg, new_vars = quantize_experts(cfg, variables, bits, group)
    assert (new_cfg.moe.expert_bits, new_cfg.moe.expert_group_size) == (bits, group)
    before, after = _experts(cfg, variables), _experts(new_cfg, new_vars)
    qmax = 2 ** (bits - 1) - 1
    for name in ("wi_gate", "wi_up", "wo"):
        w, q, scale = before[name], after[name], after[f"{name}_scale"]
        k = w.shape[1]
        g = group or k
        assert q.dtype == np.int8 and scale.shape == (E, k // g, w.shape[2])
        assert q.min() >= -qmax - 1 and q.max() <= qmax
        # numpy reference: per (expert, group, column) absmax, values = round(w / scale).
        w_g = w.reshape(E, k // g, g, -1)
        absmax = np.abs(w_g).max(axis=2)
        np.testing.assert_allclose(scale, absmax / (qmax + 0.5), rtol=1e-3, atol=1e-8)
        ratio = (w_g / scale[:, :, None, :]).reshape(w.shape)
        want_q = np.clip(np.round(ratio), -qmax - 1, qmax)
        # Only values on a rounding boundary (x.5, e.g. each group's absmax at +-(qmax + 0.5))
        # may round the other way (qwix multiplies by a reciprocal).
        differ = q != want_q
        assert np.abs(q - want_q).max() <= 1
        assert (np.abs(np.abs(ratio[differ]) % 1 - 0.5) < 1e-3).all()
        back = np.asarray(dequantize_weight(jnp.asarray(q), jnp.asarray(scale)))
        step = np.repeat(scale, g, axis=1)
        assert (np.abs(back - w) <= 0.5 * step + 1e-6).all()  # within half a step everywhere


def test_quantized_model_outputs_within_the_quantization_error():
    cfg, variables, tokens = _model()
    ref, _ = Transformer(cfg).apply(variables, tokens)
    errors = {}
    for bits, group in ((8, None), (4, None), (4, 8)):
        new_cfg, new_vars = quantize_experts(cfg, variables, bits, group)
        out, _ = Transformer(new_cfg).apply(new_vars, tokens)
        errors[(bits, group)] = float(jnp.abs(out - ref).mean())
        # Dequantizing gives a float model with exactly these outputs (for to_hf or training).
        f_cfg, f_vars = dequantize_experts(new_cfg, new_vars)
        again, _ = Transformer(f_cfg).apply(f_vars, tokens)
        np.testing.assert_allclose(again, out, atol=1e-6)
    assert errors[(8, None)] < 0.02 * float(jnp.abs(ref).mean())
    # Routing flips make the model-level int4 error noisy; int8 is clearly below both.
    assert 5 * errors[(8, None)] < min(errors[(4, 8)], errors[(4, None)])


def test_unrolled_layout_and_gradients_reach_the_scales():
    cfg, variables, _ = _model(scan=False)
    _, unrolled = quantize_experts(cfg, variables, 8)
    assert unrolled["params"]["layers_0"]["moe"]["experts"]["wo_scale"].shape == (E, 1, D)
    cfg, variables, tokens = _model()
    new_cfg, new_vars = quantize_experts(cfg, variables, 8)
    model = Transformer(new_cfg)

    def loss(params):
        logits, _ = model.apply({**new_vars, "params": params}, tokens)
        return jnp.mean(logits**2)

    grads = jax.grad(loss, allow_int=True)(new_vars["params"])
    g = grads["moe_layers"]["moe"]["experts"]
    assert float(jnp.abs(g["wi_up_scale"]).sum()) > 0  # the scales are trainable floats


def test_mixed_policy_keeps_the_most_used_experts_at_8_bits():
    cfg, variables, tokens = _model()
    stats = routing_stats(cfg, variables, [np.asarray(tokens)])
    new_cfg, new_vars = quantize_experts(
        cfg, variables, 4, policy="mixed", stats=stats, keep_fraction=0.5
    )
    for slot, s in enumerate(stats):
        bits = np.asarray(new_vars["quant_bits"]["moe_layers"]["moe"]["experts"]["expert_bits"])[
            slot
        ]
        top = set(np.argsort(-s.counts_E, kind="stable")[:2].tolist())
        assert {e for e in range(E) if bits[e] == 8} == top
        q = _experts(new_cfg, new_vars, slot)["wi_up"]
        for e in range(E):
            lo, hi = (-128, 127) if bits[e] == 8 else (-8, 7)
            assert q[e].min() >= lo and q[e].max() <= hi
    # Bytes: values at each expert's width, plus the float32 scales.
    want = 0
    for slot in range(len(stats)):
        bits = np.asarray(new_vars["quant_bits"]["moe_layers"]["moe"]["experts"]["expert_bits"])[
            slot
        ]
        # wi_gate, wi_up [E, D, F] and wo [E, F, D] (D = F): values plus one scale per column
        want += 3 * (sum(D * F * int(b) // 8 for b in bits) + E * 1 * F * 4)
    assert expert_nbytes(new_cfg, new_vars) == want
    assert expert_nbytes(cfg, variables) == len(stats) * 3 * E * D * F * 4


def test_bad_arguments_name_the_field():
    cfg, variables, tokens = _model()
    with pytest.raises(ValueError, match="bits=3"):
        quantize_experts(cfg, variables, 3)
    with pytest.raises(ValueError, match="policy='best'"):
        quantize_experts(cfg, variables, 8, policy="best")
    with pytest.raises(ValueError, match="group_size=5"):
        quantize_experts(cfg, variables, 8, 5)
    with pytest.raises(ValueError, match="needs stats"):
        quantize_experts(cfg, variables, 4, policy="mixed")
    q_cfg, q_vars = quantize_experts(cfg, variables, 8)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_experts(q_cfg, q_vars, 8)
    with pytest.raises(ValueError, match="expert_bits=6"):
        MoEConfig(num_experts=4, top_k=2, d_ff=32, expert_bits=6)
    with pytest.raises(ValueError, match="expert_group_size=5"):
        MoEConfig(num_experts=4, top_k=2, d_ff=32, expert_bits=8, expert_group_size=5)


def test_to_hf_writes_the_dequantized_experts(tmp_path):
    pytest.importorskip("transformers")
    from moejax.hf import from_hf, to_hf

    cfg, variables, tokens = _model()
    q_cfg, q_vars = quantize_experts(cfg, variables, 4, 8)
    want, _ = Transformer(q_cfg).apply(q_vars, tokens)
    to_hf(q_cfg, q_vars, tmp_path)
    hf_cfg, hf_vars = from_hf(str(tmp_path))
    got, _ = Transformer(hf_cfg).apply(hf_vars, tokens)
    np.testing.assert_allclose(got, want, atol=1e-5)
