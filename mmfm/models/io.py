"""Reading an exported folder (`mmfm export` writes it, mmfm/export): safetensors weights in the
Llama layout (dense) or mmfm's own names (modality-sparse), and mmfm_model.json."""
from __future__ import annotations

import json
import os

from mmfm.models.config import ModelConfig, build_model
from mmfm.models.hf import from_hf
from mmfm.models.transformer import Transformer


def read_state(folder: str) -> tuple[dict, ModelConfig]:
    from safetensors.torch import load_file

    with open(os.path.join(folder, "mmfm_model.json")) as f:
        cfg = ModelConfig(**json.load(f))
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    tensors = {}
    for f in files:
        tensors.update(load_file(os.path.join(folder, f)))
    return (from_hf(tensors, cfg) if cfg.groups == 1 else tensors), cfg


def load(folder: str) -> Transformer:
    """An exported folder -> mmfm Transformer (eval mode, fp32)."""
    state, cfg = read_state(folder)
    model = build_model(cfg)
    model.load_state_dict(state)
    return model.eval()
