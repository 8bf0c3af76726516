"""Driver for the fault-injection tests (tests/test_train.py, tests/test_train_modes.py): runs
`mmfm pretrain ...` exactly as the CLI does (same parser, same command function, same exit status),
with a Hooks object passed to the Trainer instead of the CLI's none.

    python tests/train_fault_run.py [--kill-at K] [--kill-in-save K] [--nan-steps 2,3] -- pretrain --config ...

--kill-at K:       SIGKILL this process after step K (after its logging, before its checkpoint);
--kill-in-save K:  SIGKILL inside the step-K checkpoint write, after the shards, before COMPLETE;
--nan-steps LIST:  treat those steps' losses as NaN (every micro-batch of the step).
"""
import argparse
import os
import signal
import sys

import torch

from mmfm.cli import build_parser
from mmfm.train.trainer import Hooks


class FaultHooks(Hooks):
    def __init__(self, kill_at: int, kill_in_save: int, nan_steps: set[int]):
        self.kill_at, self.kill_in_save, self.nan_steps = kill_at, kill_in_save, nan_steps

    def on_loss(self, step, numerator):
        return numerator * float("nan") if step in self.nan_steps else numerator

    def on_step_end(self, step):
        if step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_checkpoint_shards(self, step):
        if step == self.kill_in_save:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    argv = sys.argv[1:]
    split = argv.index("--")
    p = argparse.ArgumentParser()
    p.add_argument("--kill-at", type=int, default=0)
    p.add_argument("--kill-in-save", type=int, default=0)
    p.add_argument("--nan-steps", default="")
    faults = p.parse_args(argv[:split])
    hooks = FaultHooks(faults.kill_at, faults.kill_in_save, {int(x) for x in faults.nan_steps.split(",") if x})
    args = build_parser().parse_args(argv[split + 1:])
    torch.set_num_threads(1)
    if args.command == "pretrain":
        from mmfm.train.commands import cmd_pretrain as cmd
    elif args.command == "finetune":
        from mmfm.train.finetune import cmd_finetune as cmd
    else:
        raise SystemExit(f"train_fault_run.py: {args.command}: expected pretrain or finetune")
    sys.exit(cmd(args, hooks=hooks))
