"""State-dict adapter between mmfm's Transformer and Hugging Face's LlamaForCausalLM layout.

A dense mmfm model uses Llama's names under `model.` (plus `lm_head.weight`), with the same
rotary convention (rotate_half), so the mapping is a renaming: no permutation of q/k rows.
A modality-sparse (Mixture-of-Transformers) model has per-modality weights that Llama has no
place for: `to_hf` refuses it, naming the first such weight, unless `group` picks one modality's
copy (a per-modality dense slice, e.g. the text backbone).
"""
from __future__ import annotations

import torch

from mmfm.models.config import ModelConfig


def hf_config_dict(cfg: ModelConfig, bos_id: int | None = None, eos_id: int | None = None,
                   pad_id: int | None = None) -> dict:
    """config.json for transformers' LlamaConfig."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "initializer_range": cfg.init_std, "torch_dtype": "float32",
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
    }


def to_hf(state: dict, cfg: ModelConfig, group: int | None = None) -> dict:
    """mmfm state dict -> LlamaForCausalLM state dict."""
    out = {}
    for name, t in state.items():
        if cfg.groups > 1 and name != "embed_tokens.weight" and not name.startswith("lm_head"):
            if group is None:
                raise ValueError(f"to_hf: {name} is modality-specific (shape {tuple(t.shape)}); Llama has one copy: "
                                 "pass group=<modality index> to export one modality's slice, or load it with mmfm.load")
            t = t[group]
        out[name if name.startswith("lm_head") else f"model.{name}"] = t
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def from_hf(state: dict, cfg: ModelConfig) -> dict:
    """LlamaForCausalLM state dict -> mmfm state dict (dense configs; a sparse one gets every group
    initialised from the one Llama weight, the usual way to start a Mixture-of-Transformers)."""
    out = {}
    for name, t in state.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        key = name[len("model."):] if name.startswith("model.") else name
        if cfg.groups > 1 and key != "embed_tokens.weight" and not key.startswith("lm_head"):
            t = t.unsqueeze(0).repeat(cfg.groups, *([1] * t.dim())).contiguous()
        out[key] = t
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def build_hf_llama(cfg: ModelConfig, state: dict | None = None):
    """A transformers LlamaForCausalLM of the same shape (eager attention), optionally loaded from an
    mmfm state dict."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = hf_config_dict(cfg)
    d.pop("architectures"), d.pop("model_type"), d.pop("torch_dtype")
    hf = LlamaForCausalLM(LlamaConfig(**d))
    if state is not None:
        missing, unexpected = hf.load_state_dict(to_hf(state, cfg), strict=False)
        missing = [m for m in missing if not m.endswith("inv_freq")]
        if missing or unexpected:
            raise ValueError(f"build_hf_llama: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return hf


@torch.no_grad()
def copy_into_hf(model, hf) -> None:
    hf.load_state_dict(to_hf(model.state_dict(), model.cfg), strict=False)
