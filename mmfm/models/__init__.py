"""The unified decoder (mmfm/models/transformer.py), its typed configs (config.py) and the Hugging
Face LlamaForCausalLM adapter (hf.py)."""
from mmfm.models.config import ModelConfig, load_model_config, model_config_from_dict
from mmfm.models.kv_cache import KVCache
from mmfm.models.transformer import Transformer, flash_attn_available

__all__ = ["KVCache", "ModelConfig", "Transformer", "load_model_config", "model_config_from_dict", "flash_attn_available"]
