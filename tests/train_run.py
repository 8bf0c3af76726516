"""Driver for tests/test_train.py: runs mmfm pretrain once per given ZeRO stage in one process
(under torchrun for 2 ranks, or alone), and writes {stage: {step: loss}} to OUT as JSON.

    python tests/train_run.py CONFIG OUT STAGE[,STAGE...] [section.field=value ...]
"""
import json
import os
import sys

import torch

from mmfm.train.config import load_run_config
from mmfm.train.loop import run

if __name__ == "__main__":
    torch.set_num_threads(1)
    config, out, stages, overrides = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4:]
    results = {}
    for stage in stages:
        cfg = load_run_config(config, overrides + [f"train.out={out}.run_zero{stage}"])
        cfg.deepspeed["zero_optimization"] = {"stage": int(stage)}
        res = run(cfg)
        results[stage] = res["losses"]
        engine = res["engine"]
        engine.eval()
        with torch.no_grad():   # logits of the engine's final weights on fixed ids, for the export test
            ids = torch.arange(48).reshape(2, 24) % cfg.model.vocab_size
            logits = engine(ids).float()
        if torch.distributed.get_rank() == 0:
            torch.save(logits, f"{out}.run_zero{stage}.logits.pt")
        del res
    if torch.distributed.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f)
