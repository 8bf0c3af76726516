"""Driver for tests/test_elastic.py::test_zero3_universal_resume_continues_bit_for_bit: one process,
DeepSpeed ZeRO-3 (gloo), the tiny decoder with its two param groups (decay, no decay). Trains 2
steps, checkpoints (mmfm/train/checkpoint.py: save), trains 2 more (the uninterrupted losses); then a
fresh engine loads that checkpoint through the universal path an elastic resume takes
(checkpoint.load_universal) and trains the same 2 steps. Writes {"uninterrupted", "resumed",
"steps": Adam step of each sub-group after the resumed steps, "shared_step": whether sub-groups
share one step tensor after the load}.

    python tests/zero3_universal_run.py FOLDER OUT.json
"""
import json
import sys

import torch

from mmfm.models import Transformer
from mmfm.models.config import ModelConfig
from mmfm.train import checkpoint as ckpt
from mmfm.train.config import OptimSection, TrainSection
from mmfm.train.engine import EngineSpec, build_engine, init_distributed

CFG = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=172, max_seq_len=64, vocab_size=135)


def engine():
    torch.manual_seed(0)
    es = EngineSpec(OptimSection(lr=3e-3, warmup_steps=0, weight_decay=0.1),
                    TrainSection(micro_batch=2, grad_accum=1), {"zero_optimization": {"stage": 3}})
    return build_engine(es, Transformer(ModelConfig(**CFG)))[0]


def step(e, i: int) -> float:
    ids = torch.randint(0, CFG["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(100 + i))
    loss, _ = e(ids, labels=ids)
    e.backward(loss / ids.numel())
    e.step()
    return float(loss.detach())


def steps_of(e) -> list:
    return [st["step"] for st in e.optimizer.optimizer.state.values()]


if __name__ == "__main__":
    torch.set_num_threads(1)
    init_distributed()
    root, out = sys.argv[1], sys.argv[2]
    a = engine()
    for i in range(2):
        step(a, i)
    ckpt.save(a, root, 2, {"step": 2}, 2)
    uninterrupted = [step(a, i) for i in (2, 3)]
    b = engine()
    ckpt.load_universal(b, f"{root}/{ckpt.tag_for(2)}")
    shared = len({id(s) for s in steps_of(b)}) < len(steps_of(b))
    resumed = [step(b, i) for i in (2, 3)]
    with open(out, "w") as f:
        json.dump({"uninterrupted": uninterrupted, "resumed": resumed, "shared_step": shared,
                   "steps": [float(s) for s in steps_of(b)], "groups": len(steps_of(b))}, f)
