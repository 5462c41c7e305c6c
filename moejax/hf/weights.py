"""Per-layer weight tables: HF tensor names and layouts <-> moejax parameter paths and layouts.

Legend: D model width, H query heads, N kv heads, K head width, E experts, F expert hidden,
V vocabulary; HF `nn.Linear` weights are [out, in], moejax kernels are [in, ...out].

HF checkpoints come in two layouts: the on-disk one (one tensor per expert, e.g.
`mlp.experts.3.gate_proj.weight`, Mixtral `block_sparse_moe.experts.3.w1.weight`) and the
in-memory one of transformers >= 5 (`mlp.experts.gate_up_proj` [E, 2F, D] and
`mlp.experts.down_proj` [E, D, F]). `canonical_state` turns either into one canonical form with
stacked experts (`mlp.experts.gate_proj` [E, F, D], `up_proj` [E, F, D], `down_proj` [E, D, F]);
`hf_layout_state` writes the on-disk layout, which every transformers version loads.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import numpy as np

from moejax.layers.config import ModelConfig

Path = tuple[str, ...]

# Buffers some checkpoints carry that hold no weights (recomputed at load).
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor: its canonical HF name and shape, its moejax path and shape, and how to convert.

    kind: "linear" (HF [out, in] <-> moejax [in, ...out] via transpose + reshape), "reshape"
    (same element order, e.g. norm scales and biases), "experts" (HF [E, out, in] <-> moejax
    [E, in, out]).
    collection: "params" or "moe_state".
    """

    hf_name: str
    hf_shape: tuple[int, ...]
    path: Path
    shape: tuple[int, ...]
    kind: str
    collection: str = "params"

    def to_moejax(self, w: np.ndarray) -> np.ndarray:
        if self.kind == "linear":
            return np.ascontiguousarray(w.T).reshape(self.shape)
        if self.kind == "experts":
            return np.ascontiguousarray(np.transpose(w, (0, 2, 1)))
        return w.reshape(self.shape)

    def to_hf(self, w: np.ndarray) -> np.ndarray:
        if self.kind == "linear":
            return np.ascontiguousarray(w.reshape(self.hf_shape[1], self.hf_shape[0]).T)
        if self.kind == "experts":
            return np.ascontiguousarray(np.transpose(w, (0, 2, 1)))
        return w.reshape(self.hf_shape)


def _attention_entries(cfg: ModelConfig, pre: str) -> list[Entry]:
    d, h, n, k = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    a = f"{pre}.self_attn"
    if cfg.attention == "mla":
        p, r, v, c = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        out = []
        if cfg.q_lora_rank is None:
            out.append(
                Entry(
                    f"{a}.q_proj.weight", (h * (p + r), d), ("attn", "q"), (d, h, p + r), "linear"
                )
            )
        else:
            q = cfg.q_lora_rank
            out += [
                Entry(f"{a}.q_a_proj.weight", (q, d), ("attn", "q_a"), (d, q), "linear"),
                Entry(
                    f"{a}.q_a_layernorm.weight",
                    (q,),
                    ("attn", "q_a_norm", "scale"),
                    (q,),
                    "reshape",
                ),
                Entry(
                    f"{a}.q_b_proj.weight",
                    (h * (p + r), q),
                    ("attn", "q_b"),
                    (q, h, p + r),
                    "linear",
                ),
            ]
        out += [
            Entry(
                f"{a}.kv_a_proj_with_mqa.weight", (c + r, d), ("attn", "kv_a"), (d, c + r), "linear"
            ),
            Entry(
                f"{a}.kv_a_layernorm.weight", (c,), ("attn", "kv_a_norm", "scale"), (c,), "reshape"
            ),
            Entry(
                f"{a}.kv_b_proj.weight", (h * (p + v), c), ("attn", "kv_b"), (c, h, p + v), "linear"
            ),
            Entry(f"{a}.o_proj.weight", (d, h * v), ("attn", "o", "kernel"), (h, v, d), "linear"),
        ]
        return out
    out = [
        Entry(f"{a}.q_proj.weight", (h * k, d), ("attn", "q", "kernel"), (d, h, k), "linear"),
        Entry(f"{a}.k_proj.weight", (n * k, d), ("attn", "k", "kernel"), (d, n, k), "linear"),
        Entry(f"{a}.v_proj.weight", (n * k, d), ("attn", "v", "kernel"), (d, n, k), "linear"),
        Entry(f"{a}.o_proj.weight", (d, h * k), ("attn", "o", "kernel"), (h, k, d), "linear"),
    ]
    if cfg.qkv_bias:
        for name, heads in (("q", h), ("k", n), ("v", n)):
            out.append(
                Entry(
                    f"{a}.{name}_proj.bias",
                    (heads * k,),
                    ("attn", name, "bias"),
                    (heads, k),
                    "reshape",
                )
            )
    if cfg.qk_norm == "head":
        for name in ("q", "k"):
            out.append(
                Entry(
                    f"{a}.{name}_norm.weight",
                    (k,),
                    ("attn", f"{name}_norm", "scale"),
                    (k,),
                    "reshape",
                )
            )
    elif cfg.qk_norm == "full":
        for name, heads in (("q", h), ("k", n)):
            out.append(
                Entry(
                    f"{a}.{name}_norm.weight",
                    (heads * k,),
                    ("attn", f"{name}_norm", "scale"),
                    (heads * k,),
                    "reshape",
                )
            )
    return out


def _mlp_entries(pre: str, d: int, f: int, path: Path) -> list[Entry]:
    return [
        Entry(f"{pre}.gate_proj.weight", (f, d), (*path, "wi_gate"), (d, f), "linear"),
        Entry(f"{pre}.up_proj.weight", (f, d), (*path, "wi_up"), (d, f), "linear"),
        Entry(f"{pre}.down_proj.weight", (d, f), (*path, "wo"), (f, d), "linear"),
    ]


def _moe_entries(cfg: ModelConfig, family: str, pre: str) -> list[Entry]:
    moe = cfg.moe
    d, e, f = cfg.d_model, moe.num_experts, moe.d_ff
    m = f"{pre}.mlp"
    out = [
        Entry(f"{m}.gate.weight", (e, d), ("moe", "router", "kernel"), (d, e), "linear"),
        Entry(
            f"{m}.experts.gate_proj", (e, f, d), ("moe", "experts", "wi_gate"), (e, d, f), "experts"
        ),
        Entry(f"{m}.experts.up_proj", (e, f, d), ("moe", "experts", "wi_up"), (e, d, f), "experts"),
        Entry(f"{m}.experts.down_proj", (e, d, f), ("moe", "experts", "wo"), (e, f, d), "experts"),
    ]
    if family == "deepseek_v3":
        out.append(
            Entry(
                f"{m}.gate.e_score_correction_bias",
                (e,),
                ("moe", "router", "expert_bias"),
                (e,),
                "reshape",
                "moe_state",
            )
        )
    if moe.num_shared_experts:
        shared = "shared_experts" if family == "deepseek_v3" else "shared_expert"
        out += _mlp_entries(f"{m}.{shared}", d, moe.shared_hidden, ("moe", "shared"))
    if moe.shared_expert_gate:
        out.append(
            Entry(
                f"{m}.shared_expert_gate.weight",
                (1, d),
                ("moe", "shared_gate", "kernel"),
                (d, 1),
                "linear",
            )
        )
    return out


def layer_entries(cfg: ModelConfig, family: str, i: int) -> list[Entry]:
    """The tensors of decoder layer i, paths relative to that layer's moejax subtree.

    Paths use the logical layer layout {attn_norm, attn, ffn_norm, mlp | moe}; the tree code in
    `moejax.hf.convert` maps them onto the Transformer's (scanned) parameter tree.
    """
    pre = f"model.layers.{i}"
    d = cfg.d_model
    out = [
        Entry(f"{pre}.input_layernorm.weight", (d,), ("attn_norm", "scale"), (d,), "reshape"),
        Entry(
            f"{pre}.post_attention_layernorm.weight", (d,), ("ffn_norm", "scale"), (d,), "reshape"
        ),
    ]
    out += _attention_entries(cfg, pre)
    if cfg.is_moe_layer(i):
        out += _moe_entries(cfg, family, pre)
    else:
        out += _mlp_entries(f"{pre}.mlp", d, cfg.d_ff, ("mlp",))
    return out


def top_entries(cfg: ModelConfig) -> list[Entry]:
    """Embedding, final norm and (untied) output head."""
    v, d = cfg.vocab_size, cfg.d_model
    out = [
        Entry("model.embed_tokens.weight", (v, d), ("embed", "embedding"), (v, d), "reshape"),
        Entry("model.norm.weight", (d,), ("final_norm", "scale"), (d,), "reshape"),
    ]
    if not cfg.tie_embeddings:
        out.append(Entry("lm_head.weight", (v, d), ("lm_head", "kernel"), (d, v), "linear"))
    return out


def rope_deinterleave(r: int) -> np.ndarray:
    """Feature order that turns DeepSeek's interleaved RoPE pairs (2i, 2i+1) into rotate-half
    pairs (i, i + r/2): [0, 2, 4, ..., 1, 3, 5, ...]."""
    return np.concatenate([np.arange(0, r, 2), np.arange(1, r, 2)])


# -- checkpoint layouts ----------------------------------------------------------------------

_MIXTRAL_EXPERT = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_PER_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+)\.weight$")


def _rename_mixtral(name: str) -> str:
    name = name.replace(".block_sparse_moe.", ".mlp.")
    m = re.match(r"^(.*\.mlp\.experts\.\d+)\.(w[123])\.weight$", name)
    if m:
        name = f"{m.group(1)}.{_MIXTRAL_EXPERT[m.group(2)]}.weight"
    return name


def canonical_state(
    state: Mapping[str, np.ndarray], family: str, num_experts: int, d_ff: int
) -> dict[str, np.ndarray]:
    """Either checkpoint layout -> canonical names with stacked [E, ...] expert tensors.

    Args:
      state: HF tensor name -> array (numpy), on-disk or transformers-5 in-memory layout.
      family: the model_type (Mixtral renames `block_sparse_moe` and w1/w2/w3).
      num_experts, d_ff: E and F, to split fused gate_up_proj [E, 2F, D] and to check that every
        expert of a layer is present.

    Raises:
      ValueError: a fused tensor whose shape does not split into [E, 2F, D], or a layer whose
        per-expert tensors are incomplete or of differing shapes (naming the tensor).
    """
    out: dict[str, np.ndarray] = {}
    per_expert: dict[tuple[str, str], dict[int, tuple[str, np.ndarray]]] = {}
    for name, w in state.items():
        if _IGNORED.match(name):
            continue
        canon = _rename_mixtral(name) if family == "mixtral" else name
        m = _PER_EXPERT.match(canon)
        if m:
            per_expert.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = (name, w)
            continue
        if canon.endswith(".mlp.experts.gate_up_proj"):
            if w.ndim != 3 or w.shape[0] != num_experts or w.shape[1] != 2 * d_ff:
                raise ValueError(
                    f"tensor {name} has shape {tuple(w.shape)}, expected "
                    f"[{num_experts}, {2 * d_ff}, hidden_size] (experts, 2 * intermediate, hidden)"
                )
            base = canon[: -len("gate_up_proj")]
            out[base + "gate_proj"] = w[:, :d_ff]
            out[base + "up_proj"] = w[:, d_ff:]
            continue
        out[canon] = w
    for (base, proj), experts in sorted(per_expert.items()):
        missing = sorted(set(range(num_experts)) - set(experts))
        extra = sorted(set(experts) - set(range(num_experts)))
        if missing or extra:
            what = f"missing experts {missing}" if missing else f"unexpected experts {extra}"
            raise ValueError(f"{base}.*.{proj}: {what} (num_experts={num_experts})")
        first_name, first = experts[0]
        for e in range(num_experts):
            name, w = experts[e]
            if w.shape != first.shape:
                raise ValueError(
                    f"tensor {name} has shape {tuple(w.shape)}, expected {tuple(first.shape)} "
                    f"like {first_name}"
                )
        out[f"{base}.{proj}"] = np.stack([experts[e][1] for e in range(num_experts)])
    return out


def hf_layout_state(canonical: Mapping[str, np.ndarray], family: str) -> dict[str, np.ndarray]:
    """Canonical names -> the family's on-disk names, one tensor per expert."""
    inverse = {v: k for k, v in _MIXTRAL_EXPERT.items()}
    out: dict[str, np.ndarray] = {}
    for name, w in canonical.items():
        m = re.match(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$", name)
        if not m:
            if family == "mixtral":
                name = name.replace(".mlp.", ".block_sparse_moe.")
            out[name] = w
            continue
        base, proj = m.groups()
        if family == "mixtral":
            base, proj = base.replace(".mlp.", ".block_sparse_moe."), inverse[proj]
        for e in range(w.shape[0]):
            out[f"{base}.{e}.{proj}.weight"] = np.ascontiguousarray(w[e])
    return out
