"""Starting from an existing LLM: a Hugging Face Llama-architecture folder (config.json + safetensors,
sharded or not) -> mmfm ModelConfig fields and an mmfm state dict over the unified vocabulary.

The unified vocabulary keeps the LLM's text ids: text comes first (mmfm/vocab.py), so the LLM's
embedding and output rows stay where they are, and the modality ranges and markers are appended
after them. The appended rows are drawn from a normal distribution with the mean and covariance of
the existing rows (Hewitt's recipe for new tokens: they start "like an average token", so their
logits neither dominate nor vanish before training). On text-only input the imported model computes
what the LLM computes: only the new rows are new, and text ids never read them as inputs.

Every check runs before any weight is read into a model, and names the file and the field.
"""
from __future__ import annotations

import json
import os

import torch

from mmfm.models.config import ModelConfig
from mmfm.models.hf import from_hf

LLAMA = ("LlamaForCausalLM",)
INDEX = "model.safetensors.index.json"


def is_hf_folder(folder: str) -> bool:
    """A Hugging Face model folder (config.json) that is not an mmfm export or run."""
    return (os.path.isdir(folder) and os.path.exists(os.path.join(folder, "config.json"))
            and not os.path.exists(os.path.join(folder, "mmfm_model.json"))
            and not os.path.isdir(os.path.join(folder, "checkpoints")))


def read_llama_config(folder: str) -> dict:
    """config.json of a Llama-architecture folder; anything mmfm's decoder cannot compute is an error."""
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not found (init_from needs a Hugging Face model folder)")
    with open(path) as f:
        c = json.load(f)
    archs = c.get("architectures") or []
    if not any(a in LLAMA for a in archs) and c.get("model_type") != "llama":
        raise ValueError(f"{path}: architectures {archs} (model_type {c.get('model_type')!r}): mmfm maps "
                         f"{', '.join(LLAMA)} only (Llama-architecture checkpoints)")
    scaling = c.get("rope_scaling") or (c.get("rope_parameters") or {})
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
        raise ValueError(f"{path}: rope_scaling {scaling}: mmfm's rotary is the default (unscaled) one")
    for flag in ("attention_bias", "mlp_bias"):
        if c.get(flag):
            raise ValueError(f"{path}: {flag} is true; mmfm's projections have no bias")
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: hidden_act {c['hidden_act']!r}; mmfm's MLP is SwiGLU (silu)")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if not isinstance(c.get(key), int):
            raise ValueError(f"{path}: {key} missing or not an integer")
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    if head_dim * c["num_attention_heads"] != c["hidden_size"]:
        raise ValueError(f"{path}: head_dim {head_dim} x num_attention_heads {c['num_attention_heads']} != "
                         f"hidden_size {c['hidden_size']}; mmfm needs head_dim = hidden_size / heads")
    return c


def model_fields(c: dict) -> dict:
    """ModelConfig fields of a Llama config (vocab_size left to the unified vocabulary)."""
    theta = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    return {"dim": c["hidden_size"], "n_layers": c["num_hidden_layers"], "n_heads": c["num_attention_heads"],
            "n_kv_heads": c.get("num_key_value_heads") or c["num_attention_heads"], "ffn_hidden": c["intermediate_size"],
            "max_seq_len": c.get("max_position_embeddings", 2048), "rope_theta": float(theta),
            "norm_eps": float(c.get("rms_norm_eps", 1e-6)), "tie_embeddings": bool(c.get("tie_word_embeddings", False))}


def weight_files(folder: str) -> list[str]:
    """The safetensors files of a folder: the index's shards (each must exist) or model.safetensors."""
    index = os.path.join(folder, INDEX)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: weight_map missing or empty")
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.exists(os.path.join(folder, name)):
                raise FileNotFoundError(f"{index}: weight_map names shard {name!r}, which is not in {folder}")
        return [os.path.join(folder, n) for n in files]
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"{folder}: no model.safetensors or {INDEX} (safetensors weights are required; "
                            "convert a pytorch_model.bin with transformers' save_pretrained first)")


def apply_llama_shape(cfg: ModelConfig, folder: str) -> ModelConfig:
    """Set the model section's shape fields (dim, layers, heads, FFN width, rotary base, norm epsilon,
    tied embeddings) to the checkpoint's; max_seq_len, attention and modality sparsity stay the run's."""
    for k, v in model_fields(read_llama_config(folder)).items():
        if k != "max_seq_len":
            setattr(cfg, k, v)
    return cfg


def embedding_rows(folder: str) -> int:
    """Rows of model.embed_tokens.weight, read from the safetensors header (no tensor is loaded)."""
    from safetensors import safe_open

    for path in weight_files(folder):
        with safe_open(path, framework="pt") as f:
            if "model.embed_tokens.weight" in f.keys():
                return int(f.get_slice("model.embed_tokens.weight").get_shape()[0])
    raise ValueError(f"{folder}: no model.embed_tokens.weight in the safetensors")


def tokenizer_size(folder: str) -> tuple[str, int] | None:
    """(file, token count) of the folder's own tokenizer: tokenizer.json (added tokens included) or a
    sentencepiece tokenizer.model; None when it has neither."""
    path = os.path.join(folder, "tokenizer.json")
    if os.path.exists(path):
        from tokenizers import Tokenizer

        return path, Tokenizer.from_file(path).get_vocab_size(with_added_tokens=True)
    path = os.path.join(folder, "tokenizer.model")
    if os.path.exists(path):
        import sentencepiece as spm

        return path, spm.SentencePieceProcessor(model_file=path).get_piece_size()
    return None


def check_llama_import(folder: str, text_size: int) -> int:
    """Everything init_from=HF_FOLDER needs, checked before training: a Llama config, every shard
    the index names, the tokenizer's size equal to the embedding rows, and the run's vocabulary
    (vocab.json) built with that tokenizer. Returns the embedding rows."""
    read_llama_config(folder)
    rows = embedding_rows(folder)
    tok = tokenizer_size(folder)
    if tok is None:
        raise FileNotFoundError(f"{folder}: no tokenizer.json or tokenizer.model; init_from needs the checkpoint's "
                                "own tokenizer")
    if tok[1] != rows:
        raise ValueError(f"{tok[0]}: the tokenizer has {tok[1]} tokens but model.embed_tokens.weight has {rows} rows")
    if text_size != rows:
        raise ValueError(f"data.vocab: the vocabulary's text range has {text_size} ids but the checkpoint has {rows} "
                         "text rows; build vocab.json with the checkpoint's tokenizer (mmfm tokenizer import-hf)")
    return rows


def read_llama_state(folder: str) -> dict:
    from safetensors.torch import load_file

    state = {}
    for path in weight_files(folder):
        state.update(load_file(path))
    return state


def new_rows(rows: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n rows ~ N(mean, covariance) of `rows` [m, d], in fp32 then cast to rows' dtype. The covariance
    gets a small ridge so it factorises even when m <= d (rank-deficient)."""
    x = rows.double()
    mean = x.mean(0)
    cov = torch.cov(x.T) if x.shape[0] > 1 else torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    ridge = 1e-5 * float(cov.diagonal().mean().clamp_min(1e-12))
    chol = torch.linalg.cholesky(cov + ridge * torch.eye(cov.shape[0], dtype=torch.float64))
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, x.shape[1], generator=g, dtype=torch.float64)
    return (mean + z @ chol.T).to(rows.dtype)


def import_llama(folder: str, cfg: ModelConfig, text_size: int, seed: int = 0) -> dict:
    """The mmfm state dict of `cfg` (vocab_size = the unified vocabulary's size, text first) from the
    Llama folder: the LLM's rows at ids [0, text_size), new rows drawn for the rest."""
    c = read_llama_config(folder)
    fields = model_fields(c)
    for k, v in fields.items():
        if k != "max_seq_len" and getattr(cfg, k) != v:
            raise ValueError(f"{folder}/config.json: model.{k} is {getattr(cfg, k)!r} in the run config but the "
                             f"checkpoint has {v!r}")
    state = read_llama_state(folder)
    emb = state.get("model.embed_tokens.weight")
    if emb is None:
        raise ValueError(f"{folder}: no model.embed_tokens.weight in the safetensors")
    if emb.shape[0] != text_size:
        raise ValueError(f"{folder}: the text tokenizer has {text_size} tokens (the vocabulary's text range) but "
                         f"model.embed_tokens.weight has {emb.shape[0]} rows; use the checkpoint's own tokenizer")
    if cfg.vocab_size < text_size:
        raise ValueError(f"model.vocab_size {cfg.vocab_size} is smaller than the checkpoint's {text_size} rows")
    out = from_hf(state, cfg)
    extra = cfg.vocab_size - text_size
    for key, offset in (("embed_tokens.weight", 0), ("lm_head.weight", 1)):
        if key in out and extra:
            w = out[key]
            out[key] = torch.cat([w, new_rows(w.float(), extra, seed + offset).to(w.dtype)])
    return {k: v.float() for k, v in out.items()}
