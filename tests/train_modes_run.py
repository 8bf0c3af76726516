"""Driver for tests/test_train_modes.py: several short `mmfm pretrain` runs in one process (one
DeepSpeed/gloo start-up), each from a config file plus overrides. Writes, per run name, the losses,
the metrics rows, the held-out evals and what the engine was actually built with.

    python tests/train_modes_run.py SPEC.json OUT.json
    SPEC: [{"name": ..., "config": ..., "overrides": ["train.steps=8", ...]}, ...]
"""
import json
import os
import sys

import torch
from torch._dynamo.utils import counters

from mmfm.models.transformer import LMHead
from mmfm.train.config import load_run_config
from mmfm.train.loop import run

HEAD_CALLS = {"logits": 0, "fused_loss": 0}
_head_forward = LMHead.forward


def _counting_forward(self, x, labels=None, token_weights=None):
    """Counts how the trainer calls the output head: full logits or the fused loss."""
    HEAD_CALLS["logits" if labels is None else "fused_loss"] += 1
    return _head_forward(self, x, labels, token_weights)

if __name__ == "__main__":
    torch.set_num_threads(1)
    spec, out = json.load(open(sys.argv[1])), sys.argv[2]
    results = {}
    for item in spec:
        cfg = load_run_config(item["config"], item["overrides"])
        # a compiled run is not counted: Dynamo would trace the counter and guard on its value,
        # recompiling the model every step
        LMHead.forward = _head_forward if cfg.train.compile else _counting_forward
        HEAD_CALLS.update(logits=0, fused_loss=0)
        counters.clear()
        res = run(cfg)
        engine = res.pop("engine")
        base = getattr(engine.optimizer, "optimizer", engine.optimizer)
        with open(os.path.join(res["out"], "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        results[item["name"]] = {
            "losses": res["losses"], "eval_start": res["eval_start"], "eval_end": res["eval_end"], "rows": rows,
            "optimizer": type(base).__name__, "bf16": bool(engine.bfloat16_enabled()),
            "param_dtype": str(next(engine.module.parameters()).dtype),
            "offload": bool(engine.zero_cpu_offload()), "zero_stage": int(engine.zero_optimization_stage()),
            "offload_param": bool(engine.zero_offload_param()),
            "params": sum(p.numel() for p in engine.module.parameters()), "head_calls": dict(HEAD_CALLS),
            # train.compile: did the module run compiled, in how many graphs, with which breaks
            "compiled": getattr(engine.module, "_compiled_call_impl", None) is not None,
            "graphs": int(counters["stats"]["unique_graphs"]), "graph_breaks": sorted(counters["graph_break"])}
        del engine, res
    with open(out, "w") as f:
        json.dump(results, f)
