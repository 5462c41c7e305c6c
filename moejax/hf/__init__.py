"""Import/export of Hugging Face MoE checkpoints (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
DeepSeek-V3): `from_hf(model_or_path) -> (model_cfg, variables)` and
`to_hf(model_cfg, variables, path)`. Needs the `hf` extra (torch, transformers, safetensors).
"""

from moejax.hf.convert import from_hf, to_hf
from moejax.hf.families import FAMILIES, hf_config_dict, model_config_from_hf

__all__ = ["FAMILIES", "from_hf", "hf_config_dict", "model_config_from_hf", "to_hf"]
