"""LoRA for the decoder's projections: W x + (alpha / r) B A x with A [r, in] random, B [out, r] zero and
W frozen, and the merge W + (alpha / r) B A back into plain weights (`mmfm export` of a LoRA run;
tests: merged logits equal the unmerged model's). Fine-tuning (mmfm/train/finetune.py) applies it."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A dense GroupLinear with a low-rank update. State: weight (frozen), lora_A, lora_B."""

    def __init__(self, base, rank: int, scale: float):
        super().__init__()
        if base.groups != 1:
            raise ValueError("LoRA: modality-sparse (grouped) projections are not supported; use method: full")
        self.groups = 1
        self.weight = base.weight
        self.weight.requires_grad_(False)
        d_out, d_in = self.weight.shape
        self.scale = scale
        self.lora_A = nn.Parameter(torch.randn(rank, d_in) / math.sqrt(d_in))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank))

    def forward(self, x, plan):
        return F.linear(x, self.weight) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale


def apply_lora(model, targets, rank: int, scale: float, train_also=()):
    """Freezes every weight, wraps each targeted projection in a LoRALinear, and leaves trainable
    only the LoRA factors and the parameters whose names contain a `train_also` substring."""
    for p in model.parameters():
        p.requires_grad_(False)
    for module in list(model.modules()):
        for name in targets:
            child = getattr(module, name, None)
            if child is not None and hasattr(child, "groups"):
                setattr(module, name, LoRALinear(child, rank, scale))
    for n, p in model.named_parameters():
        if "lora_" in n or any(s in n for s in train_also):
            p.requires_grad_(True)
    return model


def merge_lora_state(state: dict, scale: float) -> dict:
    """{..., 'x.weight', 'x.lora_A', 'x.lora_B'} -> {'x.weight': W + scale * B @ A} (plain model keys)."""
    out = {k: v for k, v in state.items() if ".lora_" not in k}
    for k, a in state.items():
        if k.endswith(".lora_A"):
            prefix = k[: -len(".lora_A")]
            b = state[prefix + ".lora_B"]
            out[prefix + ".weight"] = (state[prefix + ".weight"].float() + scale * (b.float() @ a.float())).to(
                state[prefix + ".weight"].dtype)
    return out
