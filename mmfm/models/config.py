"""Typed model configs (configs/models/<name>.yaml) and the sizes derived from them.

    model:                     # ModelConfig
      arch: transformer        # a name in MODELS (the default; the only architecture so far)
      dim: 256
      n_layers: 4
      n_heads: 8
      n_kv_heads: 2            # grouped-query attention: n_heads % n_kv_heads == 0
      ffn_hidden: 688          # SwiGLU hidden width
      vocab_size: 0            # 0: taken from the unified vocabulary at build time
      modality_sparse: false   # Mixture-of-Transformers: per-modality projections, FFN and norms
      flow_latent_dim: 0       # > 0: a flow-matching head predicting a continuous vector of this size
                               # beside the token head (mmfm/models/flow_head.py); its loss weight is
                               # the objective's flow_weight

Unknown fields and wrong types fail with the file and the field named (the same checker as the
tokenizer configs, mmfm.tokenizers.config.from_dict).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mmfm.registry import Registry
from mmfm.typed_config import ConfigError, read_sections

# Model architectures by the name a `model:` section gives in `arch`; each takes a ModelConfig.
MODELS = Registry("model architecture", field="arch", default="transformer", modules=("mmfm.models.transformer",))


@dataclass
class ModelConfig:
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 8
    ffn_hidden: int = 688
    vocab_size: int = 0             # 0 = the unified vocabulary's size, filled in by the trainer
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    modality_sparse: bool = False   # Mixture-of-Transformers
    num_modalities: int = 0         # groups for modality_sparse: 0 = the vocabulary's (specials + modalities)
    attention: str = "auto"         # auto (flash-attn on CUDA when importable, else sdpa), sdpa, eager
    arch: str = "transformer"       # the architecture in MODELS that builds from this config
    # continuous head (Flow-Omni / xAR, mmfm/models/flow_head.py): 0 = none; else the size of the
    # vector it predicts (e.g. TokenBridge's latent_dim), and its MLP's width and number of blocks
    flow_latent_dim: int = 0
    flow_width: int = 256
    flow_depth: int = 3

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def validate(self) -> None:
        """Raises ValueError('<field>: why') so callers can prefix the file."""
        for f in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f}: must be >= 1, got {getattr(self, f)}")
        if self.dim % self.n_heads:
            raise ValueError(f"n_heads: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"n_heads: head_dim {self.head_dim} must be even for rotary positions")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads: n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.vocab_size < 0:
            raise ValueError(f"vocab_size: must be >= 0, got {self.vocab_size}")
        if self.attention not in ("auto", "sdpa", "eager", "flash"):
            raise ValueError(f"attention: expected auto, sdpa, eager or flash, got {self.attention!r}")
        if self.flow_latent_dim < 0:
            raise ValueError(f"flow_latent_dim: must be >= 0 (0 = no flow head), got {self.flow_latent_dim}")
        if self.flow_latent_dim and (self.flow_width < 1 or self.flow_depth < 1):
            bad = "flow_width" if self.flow_width < 1 else "flow_depth"
            raise ValueError(f"{bad}: must be >= 1 when flow_latent_dim > 0, got {getattr(self, bad)}")
        if self.modality_sparse and self.num_modalities == 1:
            raise ValueError("num_modalities: modality_sparse needs at least 2 groups")

    @property
    def groups(self) -> int:
        """How many copies of each non-embedding weight (1 unless modality_sparse)."""
        return max(self.num_modalities, 1) if self.modality_sparse else 1

    # ------------------------------------------------------------------ sizes
    def layer_params(self) -> int:
        """Parameters of one block, one modality group."""
        hd = self.head_dim
        attn = self.dim * (self.n_heads * hd) * 2 + self.dim * (self.n_kv_heads * hd) * 2
        ffn = 3 * self.dim * self.ffn_hidden
        return attn + ffn + 2 * self.dim

    def num_params(self) -> int:
        """All parameters (every modality group counted)."""
        emb = self.vocab_size * self.dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return emb + head + (self.n_layers * self.layer_params() + self.dim) * self.groups

    def active_params(self) -> int:
        """Parameters one token touches (modality_sparse: one group's weights)."""
        emb = self.vocab_size * self.dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return emb + head + self.n_layers * self.layer_params() + self.dim

    def flops_per_token(self, seq_len: int, training: bool = True) -> float:
        """Matmul FLOPs per token (PaLM appendix B / nanoGPT): 2 per multiply-add for every weight a
        token touches (embedding lookup excluded, output head included), plus attention scores and
        weighted values, 2 * 2 * n_layers * seq_len * dim (full, not causal-halved). Training = 3x
        forward (backward is twice the forward)."""
        # untied: the embedding is a lookup, not a matmul; tied: the one matrix counts once, as the head
        weights = self.active_params() - (0 if self.tie_embeddings else self.vocab_size * self.dim)
        fwd = 2 * weights + 4 * self.n_layers * seq_len * self.dim
        return float(fwd * (3 if training else 1))


def model_config_from_dict(d, where: str) -> ModelConfig:
    cfg = MODELS.config_from_dict(d, where)
    try:
        cfg.validate()
    except ValueError as exc:
        raise ConfigError(f"{where}.{exc}") from None
    return cfg


def load_model_config(path) -> ModelConfig:
    """configs/models/<name>.yaml: a mapping with one key, `model`."""
    path = str(path)
    raw = read_sections(path, ("model",))
    if "model" not in raw:
        raise ConfigError(f"{path}: model: missing; the file needs one top-level field, 'model'")
    return model_config_from_dict(raw.get("model"), f"{path}: model")


def build_model(cfg: ModelConfig):
    """The model `cfg.arch` names (an mmfm Transformer for the default arch)."""
    return MODELS.build(cfg.arch, cfg, where="model.")


def to_dict(cfg: ModelConfig) -> dict:
    return dataclasses.asdict(cfg)
