"""`mmfm cacheaug train --decoder EXPORT --config configs/cacheaug/<name>.yaml [section.field=value ...]`
and `mmfm cacheaug eval --decoder EXPORT --coprocessor DIR [DIR ...] --shards EVAL [--json PATH]`."""
from __future__ import annotations

import argparse
import sys


def add_cacheaug_parser(sub) -> None:
    p = sub.add_parser("cacheaug", help="cache augmentation: train a coprocessor for a frozen decoder, "
                                        "measure it (docs/cacheaug.md)")
    s = p.add_subparsers(dest="cacheaug_command", required=True)
    t = s.add_parser("train", help="train a coprocessor under DeepSpeed, the decoder frozen")
    t.add_argument("--decoder", default=None, help="export folder of the frozen decoder (overrides the config's)")
    t.add_argument("--config", required=True, help="configs/cacheaug/<name>.yaml")
    t.add_argument("overrides", nargs="*", help="section.field=value, e.g. train.steps=20 coprocessor.num_latents=4")
    t.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    e = s.add_parser("eval", help="ppl of the tokens after an augmentation point, with and without latents")
    e.add_argument("--decoder", required=True, help="export folder of the decoder")
    e.add_argument("--coprocessor", nargs="*", default=[], metavar="DIR",
                   help="trained coprocessor folders (one per N); N = 0 (plain) is always reported")
    e.add_argument("--shards", required=True, help="held-out token shards (e.g. runs/demo/tokens/eval-*.tar)")
    e.add_argument("--vocab", default=None, help="vocab.json (default: the decoder folder's)")
    e.add_argument("--ahead", type=int, default=8, help="tokens scored after each point")
    e.add_argument("--points", type=int, default=4, help="points per text segment")
    e.add_argument("--min-prefix", type=int, default=8, help="tokens before a point, at least")
    e.add_argument("--max-rows", type=int, default=0, help="stop after this many points (0 = all)")
    e.add_argument("--batch", type=int, default=32, help="points scored per forward")
    e.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    e.add_argument("--json", metavar="PATH", help="also write the records as a JSON list")


def _positive(args, names) -> str | None:
    for n in names:
        v = getattr(args, n)
        if v < 1:
            return f"--{n.replace('_', '-')} must be >= 1, got {v}"
    return None


def cmd_cacheaug(args) -> int:
    if args.cacheaug_command == "train":
        return _train(args)
    return _eval(args)


def _train(args) -> int:
    from mmfm.cacheaug.config import load_aug_config
    from mmfm.cacheaug.train import run
    from mmfm.typed_config import ConfigError

    from mmfm.train.trainer import TrainingStopped

    try:
        cfg = load_aug_config(args.config, args.overrides, args.decoder)
        res = run(cfg)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"mmfm cacheaug train: {exc}", file=sys.stderr)
        return 2
    except TrainingStopped as exc:
        print(f"mmfm cacheaug train: {exc}", file=sys.stderr)
        return 3
    import torch

    if torch.distributed.get_rank() == 0:
        from mmfm.cacheaug.train import window_means

        first, last = window_means(res["gains"])
        tail = (f", gain over the plain decoder {first:+.4f} -> {last:+.4f} nats/token (means of the first and "
                f"last 10 steps)" if res["gains"] else "")
        print(f"cacheaug train: step {res['step']}{tail}; coprocessor in {res['coprocessor']}")
    return 0


def _eval(args) -> int:
    import torch

    from mmfm.cacheaug.evaluate import evaluate, print_records

    bad = _positive(args, ("ahead", "points", "min_prefix", "batch"))
    if bad:
        print(f"mmfm cacheaug eval: {bad}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        records = evaluate(args.decoder, args.coprocessor, args.shards, ahead=args.ahead, points=args.points,
                           min_prefix=args.min_prefix, max_rows=args.max_rows, batch=args.batch,
                           vocab_path=args.vocab)
    except (FileNotFoundError, ValueError) as exc:
        print(f"mmfm cacheaug eval: {exc}", file=sys.stderr)
        return 2
    print_records(records)
    from mmfm.jsonio import write_records

    write_records(records, args.json)
    return 0
