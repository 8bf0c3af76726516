"""`mmfm pretrain --config configs/pretrain/<name>.yaml [section.field=value ...]`."""
from __future__ import annotations

import sys


def add_train_parsers(sub) -> None:
    p = sub.add_parser("pretrain", help="train a unified token model under DeepSpeed (docs/training.md)")
    p.add_argument("--config", required=True, help="configs/pretrain/<name>.yaml")
    p.add_argument("overrides", nargs="*", help="section.field=value, e.g. train.steps=20 optim.lr=3e-4")
    p.add_argument("--local_rank", type=int, default=None, help=argparse_suppress())


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


def cmd_pretrain(args, hooks=None, make_evaluators=None) -> int:
    """hooks: fault injection for tests (mmfm/train/trainer.py: Hooks); the CLI passes none.
    make_evaluators(cfg) -> [evaluator]: more evaluations beside the held-out loss; the CLI passes
    mmfm.eval.training.evaluators_for (the config's eval_prompts section), which train/ cannot import."""
    from mmfm.train.config import load_run_config
    from mmfm.train.loop import TrainingStopped, run
    from mmfm.typed_config import ConfigError

    try:
        cfg = load_run_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"mmfm pretrain: {exc}", file=sys.stderr)
        return 2
    try:
        from mmfm.train.loop import check_hf_init

        check_hf_init(cfg)   # an existing LLM as the start: every check before DeepSpeed starts
        evaluators = make_evaluators(cfg) if make_evaluators is not None else []
    except (FileNotFoundError, ValueError) as exc:
        print(f"mmfm pretrain: {exc}", file=sys.stderr)
        return 2
    try:
        res = run(cfg, hooks=hooks, evaluators=evaluators)
    except TrainingStopped as exc:
        print(f"mmfm pretrain: {exc}", file=sys.stderr)
        return 3
    import torch

    if torch.distributed.get_rank() == 0:
        losses = res["losses"]
        last = losses[max(losses)] if losses else float("nan")
        print(f"pretrain: step {res['step']}, last loss {last:.4f}"
              + (f", stopped by {res['stopped_by']}" if res["stopped_by"] else "") + f"; outputs in {res['out']}")
    return 0
