"""Import/export of Hugging Face MoE checkpoints: `from_hf` and `to_hf`.

Supported families (transformers `model_type`): mixtral, qwen2_moe, qwen3_moe, olmoe,
deepseek_v3 (MLA attention, sigmoid group-limited routing with the score-correction bias as
`moe_state` expert_bias, shared experts, dense first layers). See `moejax.hf.families` for the
config options that are refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from moejax.hf.families import FAMILIES, hf_config_dict, infer_family, model_config_from_hf
from moejax.hf.weights import (
    Entry,
    canonical_state,
    hf_layout_state,
    layer_entries,
    rope_deinterleave,
    top_entries,
)
from moejax.layers.config import ModelConfig
from moejax.layers.transformer import scan_to_unrolled, unrolled_to_scan

log = logging.getLogger(__name__)

SAFETENSORS_NAME = "model.safetensors"


def _entries(cfg: ModelConfig, family: str) -> list[tuple[str | None, Entry]]:
    """(unrolled layer name or None for top-level, entry) for every tensor of the model."""
    out: list[tuple[str | None, Entry]] = [(None, e) for e in top_entries(cfg)]
    for i in range(cfg.num_layers):
        out += [(f"layers_{i}", e) for e in layer_entries(cfg, family, i)]
    return out


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        if key not in tree:
            raise KeyError("/".join(path))
        tree = tree[key]
    return tree


# -- reading ----------------------------------------------------------------------------------


def _torch_to_numpy(t) -> np.ndarray:
    import torch  # noqa: PLC0415 (the hf extra)

    # float32 holds bf16/f16 values exactly; the requested param dtype is applied at the end.
    if t.is_floating_point():
        t = t.to(torch.float32)
    return t.detach().cpu().numpy()


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import safe_open  # noqa: PLC0415

    index = os.path.join(path, SAFETENSORS_NAME + ".index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not files:
        raise ValueError(f"model_or_path={path!r} has no *.safetensors weights")
    state = {}
    for name in files:
        with safe_open(os.path.join(path, name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                state[key] = _torch_to_numpy(f.get_tensor(key))
    return state


def _load(model_or_path: Any) -> tuple[Any, dict[str, np.ndarray]]:
    """(HF config, name -> float32 numpy state) from a model object or a local directory."""
    if isinstance(model_or_path, str | os.PathLike):
        path = os.fspath(model_or_path)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(
                f"model_or_path={path!r} must be a local directory with config.json and "
                "*.safetensors (no hub downloads)"
            )
        from transformers import AutoConfig  # noqa: PLC0415

        return AutoConfig.from_pretrained(path, local_files_only=True), _read_safetensors(path)
    if not (hasattr(model_or_path, "config") and hasattr(model_or_path, "state_dict")):
        raise ValueError(
            "model_or_path must be a transformers model (with .config and .state_dict()) or a "
            f"local directory path, got {type(model_or_path).__name__}"
        )
    state = {k: _torch_to_numpy(v) for k, v in model_or_path.state_dict().items()}
    return model_or_path.config, state


def _is_ignorable(name: str, cfg: ModelConfig, family: str) -> bool:
    if cfg.tie_embeddings and name == "lm_head.weight":
        return True  # tied head: some checkpoints still store the (identical) matrix
    m = re.match(r"^model\.layers\.(\d+)\.", name)
    # DeepSeek-V3 multi-token-prediction modules are stored as extra layers past the last one.
    return family == "deepseek_v3" and m is not None and int(m.group(1)) >= cfg.num_layers


def from_hf(
    model_or_path: Any, *, param_dtype: str = "float32", scan_layers: bool = True
) -> tuple[ModelConfig, dict[str, Any]]:
    """Imports a Hugging Face MoE model.

    Args:
      model_or_path: a transformers model object (e.g. MixtralForCausalLM) or a local directory
        with config.json and safetensors weights (single file or sharded with an index).
      param_dtype: storage dtype of the returned parameters ("float32", "bfloat16", "float16").
      scan_layers: return the scanned (stacked) layout of `moejax.layers.Transformer` (True) or
        the unrolled one (`layers_<i>`).

    Returns:
      (model_cfg, variables): variables["params"] (and variables["moe_state"] for DeepSeek-V3's
      expert bias) for `moejax.layers.Transformer(model_cfg).apply`.

    Raises:
      ValueError: unsupported model_type or config option (named), a missing or unexpected
        tensor, or a tensor whose shape does not match the config (named, with both shapes).
    """
    hf_cfg, state = _load(model_or_path)
    cfg = model_config_from_hf(hf_cfg, param_dtype=param_dtype)
    cfg = dataclasses.replace(cfg, scan_layers=scan_layers)
    family = hf_cfg.model_type
    state = canonical_state(state, family, cfg.moe.num_experts, cfg.moe.d_ff)
    dtype = jnp.dtype(param_dtype)

    trees: dict[str, dict] = {"params": {}}
    used = set()
    for layer, entry in _entries(cfg, family):
        if entry.hf_name not in state:
            raise ValueError(f"checkpoint is missing tensor {entry.hf_name}")
        w = state[entry.hf_name]
        used.add(entry.hf_name)
        if tuple(w.shape) != entry.hf_shape:
            raise ValueError(
                f"tensor {entry.hf_name} has shape {tuple(w.shape)} but the config implies "
                f"{entry.hf_shape}"
            )
        value = entry.to_moejax(w)
        if family == "deepseek_v3" and getattr(hf_cfg, "rope_interleave", False):
            value = _deinterleave_rope(entry, value, cfg)
        if entry.collection == "params":
            value = value.astype(dtype)
        path = entry.path if layer is None else (layer, *entry.path)
        _set(trees.setdefault(entry.collection, {}), path, jnp.asarray(value))
    extra = sorted(n for n in state if n not in used and not _is_ignorable(n, cfg, family))
    if extra:
        raise ValueError(
            f"checkpoint has tensors that a {family} model with this config does not use: "
            f"{', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''}"
        )
    if scan_layers:
        trees = {c: unrolled_to_scan(cfg, t) for c, t in trees.items()}
    return cfg, trees


def _deinterleave_rope(entry: Entry, value: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Permutes the RoPE output features of q/q_b and kv_a into the rotate-half layout."""
    perm = rope_deinterleave(cfg.qk_rope_head_dim)
    if entry.path in (("attn", "q"), ("attn", "q_b")):
        p = cfg.qk_nope_head_dim
        return np.concatenate([value[..., :p], value[..., p:][..., perm]], axis=-1)
    if entry.path == ("attn", "kv_a"):
        c = cfg.kv_lora_rank
        return np.concatenate([value[..., :c], value[..., c:][..., perm]], axis=-1)
    return value


# -- writing ----------------------------------------------------------------------------------


def to_hf(
    model_cfg: ModelConfig,
    variables: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    family: str | None = None,
) -> str:
    """Writes config.json + model.safetensors that `AutoModelForCausalLM.from_pretrained` loads.

    Args:
      model_cfg: the model's config (quantized experts, moe.expert_bits, are written
        dequantized).
      variables: {"params": ..., optionally "moe_state": ...} in the scan or unrolled layout
        (per model_cfg.scan_layers); LogicallyPartitioned boxes are fine.
      path: output directory (created if needed).
      family: HF model_type to write; None infers it from the config (MLA/sigmoid -> deepseek_v3,
        qk_norm full -> olmoe, head -> qwen3_moe, shared experts/qkv bias/dense layers ->
        qwen2_moe, otherwise mixtral).

    Returns:
      The output directory.

    Raises:
      ValueError: the family cannot express some field of model_cfg (named), or a parameter is
        missing or of the wrong shape (named).
    """
    if model_cfg.moe is not None and model_cfg.moe.expert_bits is not None:
        # HF checkpoints hold float experts: write the dequantized weights.
        from moejax.compress.quantize import dequantize_experts  # noqa: PLC0415

        model_cfg, variables = dequantize_experts(model_cfg, variables)
    family = family or infer_family(model_cfg)
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is invalid: allowed values are {FAMILIES}")
    config = hf_config_dict(model_cfg, family)
    trees = {}
    for collection, tree in variables.items():
        if collection not in ("params", "moe_state"):
            continue
        tree = nn.meta.unbox(tree)
        if model_cfg.scan_layers:
            tree = scan_to_unrolled(model_cfg, tree)
        trees[collection] = tree
    if "params" not in trees:
        raise ValueError("variables must contain a 'params' collection")

    canonical: dict[str, np.ndarray] = {}
    dtypes = set()
    for layer, entry in _entries(model_cfg, family):
        full = entry.path if layer is None else (layer, *entry.path)
        tree = trees.get(entry.collection, {})
        try:
            value = np.asarray(_get(tree, full))
        except KeyError:
            if entry.collection == "moe_state" and not model_cfg.moe.use_expert_bias:
                value = np.zeros(entry.shape, np.float32)  # no bias = a zero correction bias
            else:
                raise ValueError(
                    f"variables[{entry.collection!r}] is missing {'/'.join(full)}"
                ) from None
        if tuple(value.shape) != entry.shape:
            raise ValueError(
                f"variables[{entry.collection!r}] {'/'.join(full)} has shape "
                f"{tuple(value.shape)}, expected {entry.shape}"
            )
        if entry.collection == "params":
            dtypes.add(value.dtype)
        canonical[entry.hf_name] = entry.to_hf(value)
    state = hf_layout_state(canonical, family)

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    dtype = dtypes.pop() if len(dtypes) == 1 else np.dtype(np.float32)
    config["dtype"] = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(
        np.dtype(dtype).name, "float32"
    )
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    _write_safetensors(state, os.path.join(path, SAFETENSORS_NAME))
    log.info("wrote %s model (%d tensors) to %s", family, len(state), path)
    return path


def _write_safetensors(state: Mapping[str, np.ndarray], filename: str) -> None:
    import torch  # noqa: PLC0415
    from safetensors.torch import save_file  # noqa: PLC0415

    tensors = {}
    for name, w in state.items():
        w = np.ascontiguousarray(w)
        if w.dtype == jnp.bfloat16:
            # numpy has no bfloat16: move the raw bits and reinterpret them in torch.
            t = torch.from_numpy(w.view(np.uint16).copy()).view(torch.bfloat16)
        else:
            t = torch.from_numpy(w.copy())
        tensors[name] = t
    save_file(tensors, filename, metadata={"format": "pt"})
