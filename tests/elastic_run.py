"""Driver for tests/test_elastic.py: one `mmfm pretrain` run (loop.run, as the CLI calls it) under
torchrun or alone, that stops itself with SIGTERM after a given step (save and stop, as a preempted
job does) and records every global batch the Trainer took.

    python tests/elastic_run.py CONFIG OUT STOP_AT [section.field=value ...]

STOP_AT 0 runs to train.steps. Rank 0 appends one JSON line per trained step to OUT.rows.jsonl:
{"rows": [[token ids of each row of the global batch]]}, and writes {"losses", "step",
"world_size", "stopped_by"} to OUT.
"""
import json
import os
import signal
import sys

import torch

from mmfm.data.dataset import ShardLoader
from mmfm.train.config import load_run_config
from mmfm.train.loop import run
from mmfm.train.tokens import train_token_dataset
from mmfm.train.trainer import Hooks
from mmfm.vocab import Vocab


class StopAt(Hooks):
    def __init__(self, step: int):
        self.stop = step

    def on_step_end(self, step):
        if step == self.stop:
            os.kill(os.getpid(), signal.SIGTERM)


class Recorded:
    """The pretrain data stream (train_token_dataset), passed through, each batch written down as
    the Trainer takes it; state_dict/load_state_dict are the loader's own."""

    def __init__(self, loader: ShardLoader, path: str | None):
        self.loader, self.path = loader, path

    def __iter__(self):
        for batch in self.loader:
            if self.path and "tokens" in batch:
                with open(self.path, "a") as f:
                    f.write(json.dumps({"rows": batch["tokens"].tolist()}) + "\n")
            yield batch

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)


if __name__ == "__main__":
    torch.set_num_threads(1)
    config, out, stop_at, overrides = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    cfg = load_run_config(config, overrides)
    rank0 = int(os.environ.get("RANK", "0")) == 0

    def data(global_batch):
        vocab = Vocab.load(cfg.data.vocab)
        ds = train_token_dataset(cfg.data, vocab, batch_size=global_batch, seed=cfg.train.seed)
        return Recorded(ShardLoader(ds, num_workers=0), out + ".rows.jsonl" if rank0 else None)

    res = run(cfg, hooks=StopAt(stop_at), data=data)
    if torch.distributed.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"losses": res["losses"], "step": res["step"], "stopped_by": res["stopped_by"],
                       "world_size": torch.distributed.get_world_size()}, f)
