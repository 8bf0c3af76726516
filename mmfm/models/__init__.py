"""The unified decoder (mmfm/models/transformer.py), its typed configs (config.py) and the Hugging
Face LlamaForCausalLM adapter (hf.py). `build_model(cfg)` builds the architecture `cfg.arch` names
(registered in `MODELS`; `transformer` is the default and the only one so far)."""
from mmfm.models.config import MODELS, ModelConfig, build_model, load_model_config, model_config_from_dict
from mmfm.models.kv_cache import KVCache
from mmfm.models.transformer import Transformer, flash_attn_available

__all__ = ["KVCache", "MODELS", "ModelConfig", "Transformer", "build_model", "load_model_config", "model_config_from_dict",
           "flash_attn_available"]
