"""train.freeze_text_steps: N — when pretraining starts from an existing LLM (train.init_from), the
first N optimizer steps train only the new rows (the non-text ids') of the input embedding and the
output projection; every other weight (all layers, norms, every Mixture-of-Transformers group, the
text rows of embedding and head) stays bitwise unchanged. From step N on everything trains.

How: a gradient hook on every parameter zeroes the frozen part of its gradient (the whole gradient,
or the text rows of embed_tokens / lm_head) while the window is open, and the weight decay of every
optimizer group is 0 inside the window. Why this and not restoring weights after the step: under
ZeRO 1/2 the weights that count are the optimizer's fp32 partitions inside flat buffers, which a
restore of the module's tensors would not reach (the next step would copy the moved partition back).
A tensor hook (param.register_hook) runs in autograd before the gradient reaches DeepSpeed's
accumulation hooks and its flattened reduce buckets, so the same code is right for ZeRO 0, 1 and 2
(tested in fp32 under ZeRO 1 and 2; bf16 keeps fp32 master weights the same way, but is untested). With a zero gradient from the first step, AdamW's moments stay exactly 0 and its
update is 0 / (sqrt(0) + eps) = 0, so the frozen weights do not move by a single bit; its decoupled
weight decay (p *= 1 - lr * wd) would move them, hence decay 0 in the window (the new rows therefore
do not decay during the window either; they do afterwards). Gradient clipping sees the masked
gradients, so the new rows get the whole clipping budget.

The window is a function of the global step index (the Trainer's counter, restored on resume), so a
run resumed inside the window freezes exactly the steps the uninterrupted run froze. ZeRO-3 (weights
partitioned, gathered per layer) and optimizer offload are refused by the config check: untested."""
from __future__ import annotations

import torch

ROW_PARAMS = ("embed_tokens.weight", "lm_head.weight")   # rows indexed by token id


class TextFreeze:
    def __init__(self, model: torch.nn.Module, text_start: int, text_size: int, steps: int):
        self.steps = steps
        self.active = False
        self.handles = []
        text = torch.arange(text_start, text_start + text_size)
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if name in ROW_PARAMS:
                self.handles.append(p.register_hook(self._rows_hook(text)))
            else:
                self.handles.append(p.register_hook(self._whole_hook))

    def _rows_hook(self, text: torch.Tensor):
        def hook(g):
            return g.index_fill(0, text.to(g.device), 0.0) if self.active else g
        return hook

    def _whole_hook(self, g):
        # zeros, not g * 0: a non-finite gradient would stay NaN through a multiplication
        return torch.zeros_like(g) if self.active else g

    def begin_step(self, index: int, optimizer, weight_decay: list[float]) -> bool:
        """Before optimizer step index (0-based, global): open or close the window and set each
        group's weight decay (weight_decay: the groups' configured values, recorded when the engine
        was built, since a checkpoint saved inside the window holds 0). True while frozen."""
        self.active = index < self.steps
        for g, wd in zip(optimizer.param_groups, weight_decay):
            g["weight_decay"] = 0.0 if self.active else wd
        return self.active
