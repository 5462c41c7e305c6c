"""Decoder-only language model: embedding, pre-norm attention/FFN blocks, final norm, LM head.

Legend: B batch, L length, D model width, V vocabulary, E experts, H query heads, N kv heads,
K head width, F FFN hidden width, R repeats of a scanned unit, M MoE layers in the model.

Layer pattern. Layer i is an MoE layer iff `cfg.is_moe_layer(i)`; the others use the dense MLP
(width cfg.d_ff). With cfg.scan_layers=True the layers are grouped into at most three runs of
identical units, each run one `nn.scan` (so compile time does not grow with depth):

  segment         unit                                          repeats R
  dense_layers    one dense layer                               first_dense_layers
                  (all num_layers layers when cfg.moe is None)
  moe_layers      moe_every - 1 dense layers then one MoE layer  (num_layers - first) // moe_every
  tail_layers     one dense layer                               the remaining layers

A segment with R = 0 does not exist. When a unit holds one layer, the layer's params sit
directly under the segment name; when it holds several (moe_every > 1), under
`<segment>/layer_<j>`, j = position inside the unit. Every leaf of a scanned segment has a
leading stacked axis of size R (logical axis name "layers"). With cfg.scan_layers=False the
layers are unrolled as `layers_<i>` (i = 0..num_layers-1) with no stacked axis.
`layer_location(cfg, i)` gives the path and stacked index of layer i, and `scan_to_unrolled` /
`unrolled_to_scan` convert whole variable trees between the two layouts.

Params tree (scan layout; shapes without the leading [R] of the layer stacks):

  embed/embedding            [V, D]       ("vocab", "embed")
  <layer>/attn_norm/scale    [D]          ("norm",)
  <layer>/attn/q/kernel      [D, H, K]    ("embed", "heads", "head_dim")
  <layer>/attn/k/kernel      [D, N, K]    ("embed", "kv_heads", "head_dim")
  <layer>/attn/v/kernel      [D, N, K]    ("embed", "kv_heads", "head_dim")
  <layer>/attn/{q,k,v}/bias  [H|N, K]     only with cfg.qkv_bias
  <layer>/attn/o/kernel      [H, K, D]    ("heads", "head_dim", "embed")
  <layer>/attn/q_norm/scale  [K] (qk_norm "head") or [H*K] ("full"); k_norm: [K] or [N*K]
  <layer>/ffn_norm/scale     [D]          ("norm",)
  dense layer: <layer>/mlp/wi_gate [D, F] (gated activations only), mlp/wi_up [D, F],
               mlp/wo [F, D]   (moejax.layers.mlp.MLP, F = cfg.d_ff)
  MoE layer:   <layer>/moe/... (moejax.layers.moe.MoE: router/kernel [D, E],
               experts/wi_gate|wi_up [E, D, F], experts/wo [E, F, D], shared/..., shared_gate/...)
  final_norm/scale           [D]          ("norm",)
  lm_head/kernel             [D, V]       ("embed", "vocab"); absent when cfg.tie_embeddings
                                          (the head is embed/embedding transposed)

Other collections follow the same layer paths and stacking: "moe_state" (router expert bias),
"moe_stats" (router expert load, written when mutable), "cache" (attention KV cache:
attn/cached_key, attn/cached_value [B, max_len, N, K], attn/cache_index []).

Attention hook: `attention_class(cfg)` returns the attention module class; it is built as
`cls(cfg=cfg, decode=decode, name="attn")` and called as `attn(x_BxLxD, positions_BxL,
segment_ids_BxL)` with positions possibly None (meaning the sequence slots, offset by the cache
index when decoding) and segment ids possibly None (one segment), returning [B, L, D]; any KV
cache lives in collection "cache" and follows the decode protocol of
`moejax.layers.attention.Attention`. cfg.attention == "mla" selects `moejax.layers.mla.MLA`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.layers.attention import Attention, flat_matmul, segment_positions
from moejax.layers.common import Embed, RMSNorm
from moejax.layers.config import REMAT_POLICIES, ModelConfig
from moejax.layers.mlp import MLP
from moejax.layers.moe import MoE

# Per-block MoE scalars that the model averages over its MoE layers.
AUX_SCALARS = (
    "load_balance_loss",
    "router_z_loss",
    "aux_loss",
    "dropped_fraction",
    "router_entropy",
    "experts_per_token",
    "null_fraction",
)
# Also reported per MoE layer ([M], key "<name>_layers").
PER_LAYER = ("experts_per_token", "null_fraction")
SCANNED_COLLECTIONS = ("params", "moe_state", "moe_stats", "cache")


def attention_class(cfg: ModelConfig) -> type[nn.Module]:
    """The attention module selected by cfg.attention ("gqa" or "mla")."""
    if cfg.attention == "gqa":
        return Attention
    if cfg.attention == "mla":
        from moejax.layers.mla import MLA  # noqa: PLC0415 (optional module, owned by moejax.hf)

        return MLA
    raise ValueError(f"ModelConfig.attention={cfg.attention!r} is invalid: allowed 'gqa', 'mla'")


@dataclasses.dataclass(frozen=True)
class LayerSegment:
    """A run of R identical units of consecutive layers (one nn.scan when scanning)."""

    name: str
    kinds: tuple[str, ...]  # "dense" / "moe" for each layer of one unit, in order
    repeats: int
    first_layer: int


def layer_segments(cfg: ModelConfig) -> tuple[LayerSegment, ...]:
    """The scan-layout segments of cfg (see the module docstring), ignoring cfg.scan_layers."""
    n = cfg.num_layers
    if cfg.moe is None:
        return (LayerSegment("dense_layers", ("dense",), n, 0),)
    first, period = cfg.first_dense_layers, cfg.moe_every
    periods, tail = divmod(n - first, period)
    segments = []
    if first:
        segments.append(LayerSegment("dense_layers", ("dense",), first, 0))
    if periods:
        kinds = ("dense",) * (period - 1) + ("moe",)
        segments.append(LayerSegment("moe_layers", kinds, periods, first))
    if tail:
        segments.append(LayerSegment("tail_layers", ("dense",), tail, first + periods * period))
    return tuple(segments)


def layer_location(cfg: ModelConfig, i: int) -> tuple[tuple[str, ...], int | None]:
    """Where layer i's variables live: (module path, index on the stacked axis or None).

    E.g. ("moe_layers", "layer_1"), 3 for the MoE layer of the 4th period with moe_every=2, or
    ("layers_7",), None with scan_layers=False.
    """
    if not 0 <= i < cfg.num_layers:
        raise ValueError(f"layer index {i} is invalid: must be in [0, {cfg.num_layers})")
    if not cfg.scan_layers:
        return (f"layers_{i}",), None
    for seg in layer_segments(cfg):
        offset = i - seg.first_layer
        if 0 <= offset < seg.repeats * len(seg.kinds):
            repeat, j = divmod(offset, len(seg.kinds))
            path = (seg.name,) if len(seg.kinds) == 1 else (seg.name, f"layer_{j}")
            return path, repeat
    raise AssertionError(f"layer {i} not covered by the segments of {cfg}")


def _get(tree: Mapping[str, Any], path: tuple[str, ...]):
    """The subtree at path, or None when a collection has no entry there (e.g. moe_state of a
    dense layer)."""
    for key in path:
        if key not in tree:
            return None
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def scan_to_unrolled(cfg: ModelConfig, tree: Mapping[str, Any]) -> dict:
    """One collection's variables (e.g. variables["params"]), scan layout -> unrolled layout.

    Takes plain arrays (unbox LogicallyPartitioned leaves first with `flax.linen.meta.unbox`).
    Top-level entries that are not layer segments (embed, final_norm, lm_head) are kept.
    """
    scan_cfg = dataclasses.replace(cfg, scan_layers=True)
    seg_names = {seg.name for seg in layer_segments(scan_cfg)}
    out = {k: v for k, v in tree.items() if k not in seg_names}
    for i in range(cfg.num_layers):
        path, index = layer_location(scan_cfg, i)
        subtree = _get(tree, path)
        if subtree is not None:
            out[f"layers_{i}"] = jax.tree.map(lambda a, r=index: a[r], subtree)
    return out


def unrolled_to_scan(cfg: ModelConfig, tree: Mapping[str, Any]) -> dict:
    """One collection's variables, unrolled layout (`layers_<i>`) -> scan layout (stacked)."""
    scan_cfg = dataclasses.replace(cfg, scan_layers=True)
    layer_names = {f"layers_{i}" for i in range(cfg.num_layers)}
    out = {k: v for k, v in tree.items() if k not in layer_names}
    for seg in layer_segments(scan_cfg):
        for j in range(len(seg.kinds)):
            layers = [seg.first_layer + r * len(seg.kinds) + j for r in range(seg.repeats)]
            trees = [tree[f"layers_{i}"] for i in layers if f"layers_{i}" in tree]
            if not trees:
                continue
            path, _ = layer_location(scan_cfg, layers[0])
            _set(out, path, jax.tree.map(lambda *a: jnp.stack(a), *trees))
    return out


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x)) with ffn = MoE or dense MLP.

    `__call__(x_BxLxD, positions_BxL, segment_ids_BxL) -> (x_BxLxD, aux)`: segment ids mask
    attention (moejax.layers.attention) and the MoE block's padding (id 0); aux is {} for a
    dense layer and the
    MoE block's aux with a leading axis of size 1 for an MoE layer (so units of several layers
    concatenate their MoE layers' aux along axis 0).
    """

    cfg: ModelConfig
    kind: str
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(
        self,
        x_BxLxD: jax.Array,
        positions_BxL: jax.Array | None,
        segment_ids_BxL: jax.Array | None = None,
    ):
        cfg = self.cfg
        dtype, pdtype = cfg.compute_dtype, cfg.params_dtype
        h = RMSNorm(cfg.norm_eps, dtype, pdtype, name="attn_norm")(x_BxLxD)
        attn = attention_class(cfg)(cfg=cfg, decode=self.decode, name="attn")
        x_BxLxD = x_BxLxD + attn(h, positions_BxL, segment_ids_BxL).astype(x_BxLxD.dtype)
        h = RMSNorm(cfg.norm_eps, dtype, pdtype, name="ffn_norm")(x_BxLxD)
        if self.kind == "moe":
            moe = MoE(cfg.moe, cfg.d_model, dtype, pdtype, name="moe")
            valid_BxL = None if segment_ids_BxL is None else segment_ids_BxL > 0
            y_BxLxD, block_aux = moe(h, deterministic=self.deterministic, valid_BxL=valid_BxL)
            aux = {k: jnp.asarray(block_aux[k], jnp.float32)[None] for k in AUX_SCALARS}
            aux["expert_load"] = jnp.asarray(block_aux["expert_load"], jnp.float32)[None]
        else:
            y_BxLxD = MLP(cfg.d_ff, cfg.dense_activation, dtype, pdtype, name="mlp")(h)
            aux = {}
        x_BxLxD = x_BxLxD + y_BxLxD.astype(x_BxLxD.dtype)
        return nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed")), aux


class LayerGroup(nn.Module):
    """Several consecutive layers (`layer_<j>`) scanned as one unit (e.g. one moe_every period)."""

    cfg: ModelConfig
    kinds: tuple[str, ...]
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(
        self,
        x_BxLxD: jax.Array,
        positions_BxL: jax.Array | None,
        segment_ids_BxL: jax.Array | None = None,
    ):
        auxes = []
        for j, kind in enumerate(self.kinds):
            layer = DecoderLayer(self.cfg, kind, self.deterministic, self.decode, name=f"layer_{j}")
            x_BxLxD, aux = layer(x_BxLxD, positions_BxL, segment_ids_BxL)
            auxes.append(aux)
        return x_BxLxD, _concat_aux(auxes)


def _concat_aux(auxes: list[dict]) -> dict:
    auxes = [a for a in auxes if a]
    if not auxes:
        return {}
    return {k: jnp.concatenate([a[k] for a in auxes], axis=0) for k in auxes[0]}


# The MoE tensors a step keeps for the experts' backward without recomputing an expert matmul
# (checkpoint names of moejax.moe.pipeline).
MOE_MLP_NAMES = ("moe_dispatch", "moe_mlpwi", "moe_mlpwo")


def remat_policy(name: str):
    """The `jax.checkpoint` policy of ModelConfig.remat=name (None = save only the layer input).

    The MoE policies act on the checkpoint names of `moejax.moe.pipeline` (see ModelConfig.remat
    for what each saves). In the padded layout (the XLA/CPU path) the hidden activations are
    internal to the fused scan and carry no name, so "moe_save_mlp" and "moe_offload" keep only
    the rows going in and out there, and the scan's forward is recomputed in the backward pass.
    """
    cp = jax.checkpoint_policies
    if name == "full":
        return None  # save nothing: recompute the whole layer in the backward pass
    if name == "dots":
        return cp.checkpoint_dots
    if name == "moe_recompute_act":
        # Not save_anything_except_these_names("moe_act"): that policy still saves the same
        # value as the output of the op the name wraps.
        return cp.save_from_both_policies(
            cp.checkpoint_dots, cp.save_only_these_names(*MOE_MLP_NAMES)
        )
    if name == "moe_save_mlp":
        return cp.save_only_these_names(*MOE_MLP_NAMES)
    if name == "moe_save_dispatch":
        return cp.save_only_these_names("moe_dispatch")
    if name == "moe_offload":
        return cp.save_and_offload_only_these_names(
            names_which_can_be_saved=[],
            names_which_can_be_offloaded=list(MOE_MLP_NAMES),
            offload_src="device",
            offload_dst="pinned_host",
        )
    raise ValueError(
        f"ModelConfig.remat={name!r} has no checkpoint policy: allowed values are "
        f"{', '.join(map(repr, REMAT_POLICIES[1:]))}"
    )


def _unit(cfg: ModelConfig, kinds: tuple[str, ...]):
    cls = DecoderLayer if len(kinds) == 1 else LayerGroup
    if cfg.remat != "none":
        # Inside nn.scan the loop already keeps XLA from CSE-ing the recomputation away.
        cls = nn.remat(cls, policy=remat_policy(cfg.remat), prevent_cse=not cfg.scan_layers)
    return cls


class Transformer(nn.Module):
    """Decoder-only LM (see the module docstring for the params layout).

    `apply(variables, tokens_BxL, *, deterministic=True, decode=False, positions=None)` returns
    (logits_BxLxV float32, aux). aux holds the mean over MoE layers of each block scalar
    (load_balance_loss, router_z_loss, aux_loss, dropped_fraction, router_entropy) and
    expert_load [M, E] stacked in layer order. For a model with no MoE layer the scalars are 0.0
    and expert_load has shape [0, 1].

    Decoding: with decode=True and mutable=["cache"], the call appends the tokens to the KV
    cache (created zeroed, length cfg.max_len, by the first such call) and attends to everything
    cached so far; see `moejax.generate.generate`.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens_BxL: jax.Array,
        *,
        deterministic: bool = True,
        decode: bool = False,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ):
        """Args:
          tokens_BxL: int token ids in [0, V).
          deterministic: False in training (router jitter, train capacity factor).
          decode: use the KV cache (collection "cache" must be mutable).
          positions: RoPE positions [B, L] or [L]; None = sequence slots (offset by the cache
            index when decoding), or with segment_ids (not decoding) the position inside each
            segment.
          segment_ids: int [B, L]: 0 = padding, equal ids = one packed document. Attention
            stays inside a segment; padding is routed to no expert and left out of every MoE
            aux term. None = one segment, no padding.

        Returns:
          (logits [B, L, V] float32, aux dict as described in the class docstring).
        """
        cfg = self.cfg
        dtype, pdtype = cfg.compute_dtype, cfg.params_dtype
        if tokens_BxL.ndim != 2 or not jnp.issubdtype(tokens_BxL.dtype, jnp.integer):
            raise ValueError(
                f"tokens_BxL must be a 2-D integer array, got shape {tokens_BxL.shape} "
                f"dtype {tokens_BxL.dtype}"
            )
        b, length = tokens_BxL.shape
        if positions is not None:
            positions = jnp.asarray(positions)
            if positions.shape not in ((length,), (b, length)):
                raise ValueError(
                    f"positions shape {positions.shape} is invalid: must be [L]={(length,)} or "
                    f"[B, L]={(b, length)}"
                )
            positions = jnp.broadcast_to(positions, (b, length)).astype(jnp.int32)
        if segment_ids is not None:
            segment_ids = jnp.asarray(segment_ids)
            if segment_ids.shape != (b, length) or not jnp.issubdtype(
                segment_ids.dtype, jnp.integer
            ):
                raise ValueError(
                    f"segment_ids must be an integer array of shape [B, L]={(b, length)}, got "
                    f"shape {segment_ids.shape} dtype {segment_ids.dtype}"
                )
            segment_ids = segment_ids.astype(jnp.int32)
            if positions is None and not decode:
                positions = segment_positions(segment_ids)

        embed = Embed(cfg.vocab_size, cfg.d_model, dtype, pdtype, name="embed")
        x_BxLxD = embed(tokens_BxL)

        auxes = []
        if cfg.scan_layers:
            for seg in layer_segments(cfg):
                scanned = nn.scan(
                    _unit(cfg, seg.kinds),
                    variable_axes={c: 0 for c in SCANNED_COLLECTIONS},
                    split_rngs={"params": True, "dropout": True, "jitter": True, "router": True},
                    in_axes=(nn.broadcast, nn.broadcast),
                    length=seg.repeats,
                    metadata_params={nn.PARTITION_NAME: "layers"},
                )
                unit_args = (seg.kinds[0],) if len(seg.kinds) == 1 else (seg.kinds,)
                unit = scanned(cfg, *unit_args, deterministic, decode, name=seg.name)
                x_BxLxD, aux_RxM = unit(x_BxLxD, positions, segment_ids)
                # [R, m, ...] -> [R * m, ...]: MoE layers in layer order.
                auxes.append(jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), aux_RxM))
        else:
            for i in range(cfg.num_layers):
                kind = "moe" if cfg.is_moe_layer(i) else "dense"
                layer = _unit(cfg, (kind,))(cfg, kind, deterministic, decode, name=f"layers_{i}")
                x_BxLxD, aux = layer(x_BxLxD, positions, segment_ids)
                auxes.append(aux)

        x_BxLxD = RMSNorm(cfg.norm_eps, dtype, pdtype, name="final_norm")(x_BxLxD)
        if cfg.tie_embeddings:
            logits_BxLxV = embed.attend(x_BxLxD)
        else:
            logits_BxLxV = LMHead(cfg.vocab_size, dtype, pdtype, name="lm_head")(x_BxLxD)
        logits_BxLxV = nn.with_logical_constraint(logits_BxLxV, ("batch", "length", "vocab"))
        return logits_BxLxV, _model_aux(auxes)


class LMHead(nn.Module):
    """Untied output head: param `kernel` [D, V] ("embed", "vocab"); logits in float32."""

    vocab_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "vocab"))
        kernel = self.param("kernel", init, (x_BxLxD.shape[-1], self.vocab_size), self.param_dtype)
        return flat_matmul(x_BxLxD, kernel, self.dtype).astype(jnp.float32)


def _model_aux(auxes: list[dict]) -> dict:
    """Mean of each MoE scalar over the MoE layers; expert_load stacked [M, E]; the PER_LAYER
    scalars also stacked [M] as `<name>_layers`."""
    per_layer = _concat_aux(auxes)
    if not per_layer:
        aux = {k: jnp.zeros((), jnp.float32) for k in AUX_SCALARS}
        aux["expert_load"] = jnp.zeros((0, 1), jnp.float32)
        aux.update({f"{k}_layers": jnp.zeros((0,), jnp.float32) for k in PER_LAYER})
        return aux
    aux = {k: jnp.mean(per_layer[k]) for k in AUX_SCALARS}
    aux["expert_load"] = per_layer["expert_load"]
    for k in PER_LAYER:
        aux[f"{k}_layers"] = per_layer[k]  # [M]: how adaptive routing spends experts by depth
    return aux
