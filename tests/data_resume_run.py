"""Run a ShardLoader for some batches in a fresh process; used by tests/test_data_pipeline.py.

    python data_resume_run.py CONFIG_JSON OUT_JSON N_BATCHES [--state-in PATH] [--state-out PATH]

Writes {"keys": [...], "tokens": [...]} for the batches it took, and the loader state after them.
"""
import argparse
import json

from mmfm.data.dataset import ShardDataset, ShardLoader
from mmfm.data.pipeline import utf8_byte_tokens


def main(config_path, out_path, n_batches, state_in=None, state_out=None):
    cfg = json.load(open(config_path))
    num_workers = cfg.pop("num_workers")
    if cfg.pop("tokenize", False):
        cfg["tokenize"] = utf8_byte_tokens
    loader = ShardLoader(ShardDataset(cfg.pop("shards"), **cfg), num_workers=num_workers)
    if state_in:
        loader.load_state_dict(json.load(open(state_in)))
    keys, tokens = [], []
    for batch in loader:
        keys.append(batch["__key__"])
        if "tokens" in batch:
            tokens.append(batch["tokens"].tolist())
        if len(keys) == n_batches:
            break
    json.dump({"keys": keys, "tokens": tokens}, open(out_path, "w"))
    if state_out:
        json.dump(loader.state_dict(), open(state_out, "w"))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("out")
    p.add_argument("n_batches", type=int)
    p.add_argument("--state-in")
    p.add_argument("--state-out")
    a = p.parse_args()
    main(a.config, a.out, a.n_batches, a.state_in, a.state_out)
