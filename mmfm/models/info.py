"""python -m mmfm.models.info CONFIG.yaml [--vocab N] [--seq-len L]: parameters and FLOPs/token."""
from __future__ import annotations

import argparse

from mmfm.models.config import load_model_config


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmfm.models.info")
    p.add_argument("config")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size when the config leaves it 0")
    p.add_argument("--seq-len", type=int, default=0, help="default: the config's max_seq_len")
    a = p.parse_args(argv)
    cfg = load_model_config(a.config)
    if not cfg.vocab_size:
        cfg.vocab_size = a.vocab
    L = a.seq_len or cfg.max_seq_len
    print(f"{a.config}: params {cfg.num_params():,} (active per token {cfg.active_params():,}), "
          f"groups {cfg.groups}, training FLOPs/token at L={L}: {cfg.flops_per_token(L):.4g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
