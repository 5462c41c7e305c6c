"""Fine-tuning data: segments and padding (attention, loss, router statistics), jsonl packing,
completion-only loss, and the CLI path HF checkpoint -> fine-tune on jsonl -> HF export."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.layers import ModelConfig, MoEConfig, MoEExecution, Transformer
from moejax.layers.attention import causal_attention, segment_positions
from moejax.moe.pipeline import plan_routing
from moejax.moe.routing import expert_choice_route, mask_routing, topk_route
from moejax.train import data as data_lib
from moejax.train.step import _forward, as_batch, cross_entropy, model_inputs

REPO = Path(__file__).resolve().parent.parent


# --- attention inside segments ---------------------------------------------------------------


def _np_segment_attention(q, k, v, seg, scale):
    """numpy: each query attends causally to the keys of its own segment; [B, L, H, K]."""
    b, length, h, _ = q.shape
    n = k.shape[2]
    out = np.zeros(q.shape[:3] + (v.shape[-1],))
    for bi in range(b):
        for hi in range(h):
            kv = hi // (h // n)
            s = np.einsum("lk,sk->ls", q[bi, :, hi], k[bi, :, kv]) * scale
            allowed = np.tril(np.ones((length, length), bool)) & (seg[bi][:, None] == seg[bi][None])
            s = np.where(allowed, s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[bi, :, hi] = p @ v[bi, :, kv]
    return out


def _segments(b, length, seed):
    """Random packed segment ids with trailing padding (0) in some rows."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((b, length), np.int32)
    for bi in range(b):
        pos, sid = 0, 1
        end = length - rng.integers(0, length // 3)
        while pos < end:
            n = int(rng.integers(1, max(2, length // 3)))
            seg[bi, pos : min(pos + n, end)] = sid
            pos, sid = pos + n, sid + 1
    return seg


@pytest.mark.parametrize("length", [12, 128])  # 128: the CPU's blocked attention
def test_segment_attention_matches_numpy_forward_and_per_segment_backward(length):
    b, h, n, k = 2, 4, 2, 8
    rng = np.random.default_rng(length)
    q, kk, v = (rng.normal(size=(b, length, heads, k)).astype(np.float32) for heads in (h, n, n))
    seg = _segments(b, length, length)
    slots = jnp.arange(length, dtype=jnp.int32)

    def attend(q, kk, v):
        return causal_attention(
            q, kk, v, slots, slots, scale=k**-0.5, q_segments_BxL=seg, k_segments_BxS=seg
        )

    np.testing.assert_allclose(
        attend(q, kk, v), _np_segment_attention(q, kk, v, seg, k**-0.5), atol=2e-5, rtol=1e-5
    )
    # Backward: the gradient equals that of each segment attended alone (no mask needed);
    # at L = 128 (each of the many segments a compile of its own) that of a dense masked jnp
    # softmax attention instead.
    w = rng.normal(size=(b, length, h, k)).astype(np.float32)
    grads = jax.grad(lambda *a: (attend(*a) * w).sum(), argnums=(0, 1, 2))(q, kk, v)
    if length > 16:

        def dense(q, kk, v):
            kr, vr = (jnp.repeat(a, h // n, axis=2) for a in (kk, v))
            scores = jnp.einsum("blhk,bshk->bhls", q, kr) * k**-0.5
            allowed = jnp.tril(jnp.ones((length, length), bool)) & (
                seg[:, :, None] == seg[:, None, :]
            )
            scores = jnp.where(allowed[:, None], scores, -jnp.inf)
            out = jnp.einsum("bhls,bshk->blhk", jax.nn.softmax(scores, axis=-1), vr)
            return (out * w).sum()

        want = jax.grad(dense, argnums=(0, 1, 2))(q, kk, v)
        for got, ref in zip(grads, want, strict=True):
            np.testing.assert_allclose(got, ref, atol=5e-5, rtol=1e-4)
        return
    for bi in range(b):
        for sid in np.unique(seg[bi]):
            idx = np.flatnonzero(seg[bi] == sid)
            s_slots = jnp.arange(len(idx), dtype=jnp.int32)

            def alone(q1, k1, v1, w1=w[bi : bi + 1, idx], s_slots=s_slots):
                out = causal_attention(q1, k1, v1, s_slots, s_slots, scale=k**-0.5)
                return (out * w1).sum()

            want = jax.grad(alone, argnums=(0, 1, 2))(
                q[bi : bi + 1, idx], kk[bi : bi + 1, idx], v[bi : bi + 1, idx]
            )
            for got, ref in zip(grads, want, strict=True):
                np.testing.assert_allclose(got[bi : bi + 1, idx], ref, atol=2e-5, rtol=1e-4)


def test_segment_positions_restart_at_each_segment():
    seg = np.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], np.int32)
    want = np.array([[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]])
    np.testing.assert_array_equal(segment_positions(jnp.asarray(seg)), want)


# --- padding leaves the loss and every router statistic unchanged ----------------------------

ROUTER_CASES = {
    "topk_bias_sequence": dict(use_expert_bias=True, load_balance_type="sequence"),
    "top_p": dict(router="top_p", top_p=0.5, max_k=3),
    "null_experts": dict(num_null_experts=2),
    "sigmoid_groups": dict(score_func="sigmoid", n_groups=2, topk_groups=1),
}


def _tiny(moe_kw):
    moe = MoEConfig(
        num_experts=4,
        top_k=2,
        d_ff=16,
        router_z_coef=1e-3,
        execution=MoEExecution(gmm_tile=8),
        **moe_kw,
    )
    return ModelConfig(
        vocab_size=64,
        d_model=16,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        d_ff=24,
        max_len=64,
        moe=moe,
    )


def _loss_and_stats(model, variables, batch):
    """The train step's forward (`moejax.train.step._forward`): its cross-entropy, every router
    statistic it reports, and the moe_stats the bias update reads."""
    _, (metrics, moe_stats) = _forward(
        model, variables["params"], variables.get("moe_state"), as_batch(batch), jax.random.key(0)
    )
    out = {"ce": metrics["ce_loss"], "moe_stats": moe_stats}
    for key in (
        "load_balance_loss",
        "router_z_loss",
        "dropped_fraction",
        "router_entropy",
        "experts_per_token",
        "null_fraction",
        "expert_load",
    ):
        out[key] = metrics[key]
    return out


@pytest.mark.parametrize("case", sorted(ROUTER_CASES))
def test_padding_leaves_loss_and_router_statistics_unchanged(case):
    cfg = _tiny(ROUTER_CASES[case])
    model = Transformer(cfg)
    rng = np.random.default_rng(0)
    b, length = 3, 12
    tokens = rng.integers(1, cfg.vocab_size, (b, length + 1)).astype(np.int32)
    seg = np.ones((b, length + 1), np.int32)
    seg[1, 7:] = 2  # two packed documents in row 1
    seg[:, -1] = 0  # the window ends in padding, so padding more adds no real input token
    mask = np.ones_like(seg)
    mask[2, :4] = 0  # a prompt
    batch = {"tokens": tokens, "segment_ids": seg, "loss_mask": mask}
    # Padded: 5 positions of padding after every row (random tokens there), plus a row of padding.
    pad = 5
    padded = {
        "tokens": np.concatenate(
            [np.pad(tokens, ((0, 1), (0, pad))), np.zeros((1, length + 1 + pad), np.int32)]
        )[: b + 1],
        "segment_ids": np.pad(seg, ((0, 1), (0, pad))),
        "loss_mask": np.pad(mask, ((0, 1), (0, pad))),
    }
    padded["tokens"][:, length + 1 :] = rng.integers(0, cfg.vocab_size, (b + 1, pad))
    padded["tokens"][b] = rng.integers(0, cfg.vocab_size, length + 1 + pad)
    variables = model.init(
        {"params": jax.random.key(0)}, jnp.zeros((1, length), jnp.int32), deterministic=True
    )
    if cfg.moe.use_expert_bias:  # a non-zero bias, so selection depends on it
        bias = jax.random.normal(jax.random.key(3), (2, 4)) * 0.1
        variables = {
            **variables,
            "moe_state": {"moe_layers": {"moe": {"router": {"expert_bias": bias}}}},
        }
    want = _loss_and_stats(model, variables, batch)
    got = _loss_and_stats(model, variables, padded)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-6), got, want)
    if case != "topk_bias_sequence":
        return  # the gradient once: the masks it depends on are the same for every router

    # ...and the gradient of the loss.
    def loss(params, batch):
        return _loss_and_stats(model, {**variables, "params": params}, batch)["ce"]

    g_want = jax.grad(loss)(variables["params"], batch)
    g_got = jax.grad(loss)(variables["params"], padded)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6), g_got, g_want)


def test_padding_never_takes_a_capacity_slot():
    # Capacity dispatch keeps assignments in position order: padding placed first would take
    # every slot if it were routed.
    cfg = MoEConfig(num_experts=4, top_k=2, d_ff=8, dispatch="capacity", capacity_factor=1.0)
    t, pads = 16, 6
    logits = jax.random.normal(jax.random.key(0), (t, 4))
    valid = np.arange(t) >= pads
    capacity = 3
    masked = mask_routing(topk_route(logits, cfg), jnp.asarray(valid))
    plan = plan_routing(masked, cfg, capacity=capacity)
    alone = plan_routing(topk_route(logits[pads:], cfg), cfg, capacity=capacity)
    assert int(plan.num_kept) == int(alone.num_kept) > 0
    assert int(masked.experts_per_token[:pads].sum()) == 0


def test_expert_choice_never_chooses_padding():
    cfg = MoEConfig(num_experts=4, top_k=2, d_ff=8, router="expert_choice")
    t = 12
    logits = jax.random.normal(jax.random.key(1), (t, 4)) + 3.0 * (jnp.arange(t) < 4)[:, None]
    valid = jnp.arange(t) >= 4  # the padding has the highest scores
    out = mask_routing(expert_choice_route(logits, cfg, capacity=5, valid_T=valid), valid)
    alone = expert_choice_route(logits[4:], cfg, capacity=5)
    assert int(out.experts_per_token[:4].sum()) == 0
    np.testing.assert_array_equal(out.indices[4:], alone.indices)
    np.testing.assert_allclose(out.weights[4:], alone.weights)


# --- completion-only loss ----------------------------------------------------------------------


def test_model_inputs_count_targets_inside_segments_and_the_loss_mask():
    tokens = np.arange(10, dtype=np.int32)[None]
    seg = np.array([[1, 1, 1, 2, 2, 2, 2, 0, 0, 0]], np.int32)
    mask = np.array([[0, 0, 1, 0, 0, 1, 1, 0, 0, 0]], np.int32)  # prompt, completion, ...
    _, targets, segments, weights = model_inputs(
        as_batch({"tokens": tokens, "segment_ids": seg, "loss_mask": mask})
    )
    np.testing.assert_array_equal(targets, tokens[:, 1:])
    np.testing.assert_array_equal(segments, seg[:, :-1])
    # target j = token j + 1: counted iff same segment as token j, not padding, mask 1.
    np.testing.assert_array_equal(weights[0], [0, 1, 0, 0, 1, 1, 0, 0, 0])
    logits = jax.random.normal(jax.random.key(0), (1, 9, 16))
    ce = -jax.nn.log_softmax(logits)[0, np.arange(9), targets[0] % 16]
    want = float(ce[np.asarray(weights[0])].mean())
    assert float(cross_entropy(logits, targets % 16, weights)) == pytest.approx(want, rel=1e-6)


def test_as_batch_rejects_unknown_keys_and_shapes():
    with pytest.raises(ValueError, match="allowed keys"):
        as_batch({"tokens": np.zeros((2, 3)), "labels": np.zeros((2, 3))})
    with pytest.raises(ValueError, match="segment_ids"):
        as_batch({"tokens": np.zeros((2, 3)), "segment_ids": np.zeros((2, 4))})


# --- jsonl data -------------------------------------------------------------------------------


def test_pack_documents_against_a_hand_packing():
    docs = [
        (np.array([1, 2, 3]), np.array([1, 1, 1])),
        (np.array([4, 5]), np.array([0, 1])),
        (np.array([6, 7, 8, 9, 10, 11, 12]), np.ones(7, np.int32)),  # longer than a row
        (np.array([13, 14]), np.array([1, 1])),
    ]
    rows = data_lib.pack_documents(docs, 5)
    np.testing.assert_array_equal(
        rows.tokens, [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 14, 0]]
    )
    np.testing.assert_array_equal(rows.segment_ids, [[1, 1, 1, 2, 2], [1] * 5, [1, 1, 2, 2, 0]])
    np.testing.assert_array_equal(rows.loss_mask, [[1, 1, 1, 0, 1], [1] * 5, [1, 1, 1, 1, 0]])


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_jsonl_corpus_bytes_prompt_completion_and_resumable_batches(tmp_path):
    records = [{"text": f"document {i} " * (1 + i % 2)} for i in range(40)]  # < 32 bytes
    records += [{"prompt": f"Q{i}: ", "completion": f"A{i}."} for i in range(40)]
    path = _write_jsonl(tmp_path / "d.jsonl", records)
    cfg = {"source": "jsonl", "path": str(path), "val_fraction": 0.1}
    corpus = data_lib.load_corpus(cfg, seq_len=31, vocab_size=256)
    rows = corpus.train_rows
    assert rows.tokens.shape[1] == 32 and len(corpus.val_rows) >= 1
    # Every document is in one split, packed whole: the bytes of each segment decode back.
    texts = {r.get("text") or r["prompt"] + r["completion"] for r in records}
    for i in range(len(rows)):
        for sid in set(rows.segment_ids[i]) - {0}:
            piece = bytes(rows.tokens[i][rows.segment_ids[i] == sid].astype(np.uint8)).decode()
            assert piece in texts
            if piece.startswith("Q"):  # completion-only loss
                m = rows.loss_mask[i][rows.segment_ids[i] == sid]
                assert m.tolist() == [0] * piece.index(" ") + [0] + [1] * (
                    len(piece) - piece.index(" ") - 1
                )
    it = data_lib.train_iterator(corpus, seq_len=31, batch_size=4, seed=0)
    first = [next(it) for _ in range(3)]
    state = it.get_state()
    nxt = next(it)
    it2 = data_lib.train_iterator(corpus, seq_len=31, batch_size=4, seed=0)
    it2.set_state(state)
    again = next(it2)
    assert set(first[0]) == {"tokens", "segment_ids", "loss_mask"}
    for key in nxt:
        np.testing.assert_array_equal(nxt[key], again[key])


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("not json", "not valid JSON"),
        ('{"prompt": "x"}', "'prompt' and 'completion'"),
        ("[1]", "JSON object"),
    ],
)
def test_jsonl_bad_records_name_the_line(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=match) as e:
        data_lib.load_corpus({"source": "jsonl", "path": str(path)}, seq_len=8, vocab_size=256)
    assert "line 2" in str(e.value)


def _save_tokenizer(path, texts):
    """A small byte-level BPE tokenizer (300 ids, <s> and </s>) trained here, saved as a HF
    tokenizer directory: what data.tokenizer reads, offline."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer)
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tok.save_pretrained(path)
    return tok


def test_jsonl_with_a_local_hf_tokenizer(tmp_path):
    records = [{"prompt": f"{i} + 1 = ", "completion": f"{i + 1}"} for i in range(30)]
    tok = _save_tokenizer(tmp_path / "tok", [r["prompt"] + r["completion"] for r in records])
    path = _write_jsonl(tmp_path / "d.jsonl", records)
    cfg = {"source": "jsonl", "path": str(path), "tokenizer": str(tmp_path / "tok")}
    corpus = data_lib.load_corpus(cfg, seq_len=15, vocab_size=300)
    rows = corpus.train_rows
    want = {}
    for r in records:
        prompt = [tok.bos_token_id, *tok(r["prompt"], add_special_tokens=False)["input_ids"]]
        completion = [*tok(r["completion"], add_special_tokens=False)["input_ids"], 2]
        want[tuple(prompt + completion)] = [0] * len(prompt) + [1] * len(completion)
    seen = 0
    for i in range(len(rows)):
        for sid in set(rows.segment_ids[i]) - {0}:
            where = rows.segment_ids[i] == sid
            assert rows.loss_mask[i][where].tolist() == want[tuple(rows.tokens[i][where])]
            seen += 1
    val = corpus.val_rows
    held_out = sum(len(set(val.segment_ids[i]) - {0}) for i in range(len(val)))
    assert seen + held_out == len(records) and held_out >= 1
    with pytest.raises(ValueError, match="outside"):
        data_lib.load_corpus(cfg, seq_len=15, vocab_size=256)
    with pytest.raises(ValueError, match="data.tokenizer"):
        data_lib.load_corpus(
            {**cfg, "tokenizer": str(tmp_path / "nothing")}, seq_len=15, vocab_size=300
        )


# --- HF checkpoint -> fine-tune on jsonl -> HF export ----------------------------------------


def test_cli_finetunes_a_local_hf_checkpoint_on_jsonl_and_exports_it(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from moejax.hf import from_hf

    torch.manual_seed(0)
    hf_cfg = transformers.MixtralConfig(
        vocab_size=320,  # the tokenizer's 300 ids fit
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    source = tmp_path / "hf_in"
    transformers.MixtralForCausalLM(hf_cfg).save_pretrained(source)
    records = [{"prompt": f"{i} + 1 = ", "completion": f"{i + 1}"} for i in range(60)]
    records += [{"text": f"counting: {' '.join(map(str, range(i, i + 5)))}"} for i in range(60)]
    data = _write_jsonl(tmp_path / "ft.jsonl", records)
    _save_tokenizer(
        tmp_path / "tok", [r.get("text") or r["prompt"] + r["completion"] for r in records]
    )
    out = tmp_path / "hf_out"
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "moejax.train",
            f"--workdir={tmp_path / 'run'}",
            f"--config.init.hf_checkpoint={source}",
            "--config.data.source=jsonl",
            f"--config.data.path={data}",
            "--config.data.val_fraction=0.3",
            f"--config.data.tokenizer={tmp_path / 'tok'}",
            "--config.train.sample_prompt=3 + 1 = ",
            f"--config.train.export_hf={out}",
            "--config.train.steps=20",
            "--config.train.batch_size=8",
            "--config.train.seq_len=32",
            "--config.train.log_every=10",
            "--config.train.eval_every=20",
            "--config.train.eval_batches=2",
            "--config.train.sample_tokens=4",
            "--config.opt.warmup_steps=2",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "HF export" in r.stdout and "sample       " in r.stdout
    assert (out / "tokenizer.json").is_file()  # the data's tokenizer, beside the weights
    before = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    after = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    moved = [
        n
        for n, p in after.state_dict().items()
        if not torch.allclose(p, before.state_dict()[n], atol=1e-6)
    ]
    assert len(moved) > len(after.state_dict()) // 2, moved
    cfg, variables = from_hf(str(out))
    toks = np.random.default_rng(0).integers(0, 320, (2, 17))
    want = after(torch.as_tensor(toks)).logits.detach().float().numpy()
    got, _ = Transformer(cfg).apply(variables, jnp.asarray(toks))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
