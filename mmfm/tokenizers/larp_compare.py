"""Video tokenizers with and without LARP's prior: held-out reconstruction and AR loss of their tokens
(docs/benchmarks.md, "## tokenizer", "video: LARP's prior").

    python -m mmfm.tokenizers.larp_compare --shards 'runs/demo-corpus/video-*.tar' \\
        --run fsq_patches=runs/tokenizers/video_small --run svq_prior=runs/tokenizers/video_larp_small \\
        --prior-steps 600 --seeds 0,1 --json larp.json
    python -m mmfm.tokenizers.larp_compare --shards ... --cache clips.pt --train svq_w0=a.yaml --train ...

--train NAME=CONFIG trains the config's tokenizer in this process first (and saves it to the
config's train.out/tokenizer), with the optimisation `mmfm tokenizer train` does on one rank
(Adam at optim.lr, betas, eps, gradient clipping at optim.clip, constant rate, train.batch_size rows
drawn with replacement by a generator seeded train.seed, train.steps steps), without the DeepSpeed
engine: the clips are decoded once (--cache keeps them) and every variant trains on the same
tensor, which is what the comparison needs on a shared CPU.

For each saved tokenizer (`NAME=FOLDER`, the folder `mmfm tokenizer train` wrote, holding
tokenizer/): the held-out clips (the config rule: key hash < --holdout) are reconstructed (PSNR,
every held-out clip), and the tokens of the training and held-out clips (argmax, eval mode) are
fitted by a fresh AR prior, the same one for every tokenizer (tokenbridge_prior.train_prior,
`flattened`: a 2-layer width-64 causal transformer over the token ids), whose held-out NLL is the
figure compared: bits per token. A tokenizer trained with the prior also reports its own jointly
trained prior's held-out loss. Beside them: the held-out tokens' unigram entropy (what a prior
that ignores order could reach) and code usage.
"""
from __future__ import annotations

import argparse
import math
import os
import sys


def measure(name: str, folder: str, train_x, held_x, prior_steps: int, seeds: list[int]) -> dict:
    import torch

    from mmfm.tokenizers.base import load_tokenizer
    from mmfm.tokenizers.metrics import psnr
    from mmfm.tokenizers.tokenbridge_prior import train_prior

    tok = load_tokenizer(os.path.join(folder, "tokenizer"))
    with torch.no_grad():
        held_tokens = torch.cat([tok.encode_tensor(b) for b in held_x.split(32)])
        train_tokens = torch.cat([tok.encode_tensor(b) for b in train_x.split(32)])
        recon = torch.cat([tok.decode_tensor(t) for t in held_tokens.split(32)])
    counts = torch.bincount(held_tokens.reshape(-1), minlength=tok.vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    n = tok.tokens_per_sample
    rec = {"bench": "tokenizer_video_prior", "case": {"tokenizer": name, "tokens": n, "vocab": tok.vocab_size},
           "impl": name, "psnr": psnr(held_x.flatten(0, 1), recon.flatten(0, 1)),
           "bits_per_clip_code": round(n * math.log2(tok.vocab_size), 1),
           "unigram_bits_per_token": float(-(p * p.log2()).sum()),
           "codes_used_heldout": int((counts > 0).sum()), "heldout_clips": held_x.shape[0],
           "train_clips": train_x.shape[0], "prior_steps": prior_steps}
    c = tok.config
    rec["quantizer"], rec["num_queries"], rec["prior_weight"] = c.quantizer, c.num_queries, c.prior_weight
    if c.prior_weight > 0:
        rec["joint_prior_bits_per_token"] = sum(tok.prior_bits_per_token(b) * b.shape[0]
                                                for b in held_x.split(32)) / held_x.shape[0]
    per_seed = []
    for s in seeds:
        r = train_prior("flattened", train_tokens, held_tokens, 1, tok.vocab_size, steps=prior_steps, seed=s)
        per_seed.append(r.bits_per_image / n)
        rec["prior_train_bits_per_token"] = r.train_bits_per_image / n
    rec["ar_bits_per_token"] = sum(per_seed) / len(per_seed)
    rec["ar_bits_per_token_seeds"] = [round(v, 4) for v in per_seed]
    return rec


def train_in_process(config_path: str, train_x) -> str:
    """Train the config's tokenizer on train_x as one rank of `mmfm tokenizer train` would; returns train.out."""
    import torch

    from mmfm.tokenizers.config import load_config
    from mmfm.tokenizers.registry import build_tokenizer
    from mmfm.tokenizers.train import RandomBatches

    cfg = load_config(config_path)
    o, t = cfg.optim, cfg.train
    torch.manual_seed(t.seed)
    tok = build_tokenizer(cfg.tokenizer, cfg.model)
    opt = torch.optim.Adam(tok.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                           weight_decay=o.weight_decay)
    batches = iter(RandomBatches(train_x, t.batch_size, torch.Generator().manual_seed(t.seed)))
    tok.train()
    log = []
    for step in range(1, t.steps + 1):
        out = tok(next(batches))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if o.clip:
            torch.nn.utils.clip_grad_norm_(tok.parameters(), o.clip)
        opt.step()
        if step % t.log_every == 0 or step == t.steps:
            log.append({"step": step, "loss": float(out.loss.detach()), **out.metrics})
            print(f"{config_path} {log[-1]}", file=sys.stderr, flush=True)
    tok.eval()
    tok.save(os.path.join(t.out, "tokenizer"))
    from mmfm.jsonio import write_json

    write_json(os.path.join(t.out, "train_log.json"), log, indent=None)
    return t.out


def main(argv=None) -> int:
    import torch

    from mmfm.jsonio import write_records
    from mmfm.tokenizers.base import load_tokenizer
    from mmfm.tokenizers.data import prepare_all, read_samples

    ap = argparse.ArgumentParser(prog="python -m mmfm.tokenizers.larp_compare", description=__doc__.split("\n")[0])
    ap.add_argument("--shards", required=True, help="the video shards the tokenizers were trained on")
    ap.add_argument("--run", action="append", default=[], metavar="NAME=FOLDER",
                    help="a trained tokenizer's train.out (repeatable)")
    ap.add_argument("--train", action="append", default=[], metavar="NAME=CONFIG",
                    help="train this tokenizer config here first, then measure it (repeatable)")
    ap.add_argument("--cache", default=None, help="a .pt file holding the prepared clips (written if absent)")
    ap.add_argument("--holdout", type=float, default=0.1, help="the configs' data.holdout_fraction")
    ap.add_argument("--prior-steps", type=int, default=600)
    ap.add_argument("--seeds", default="0", help="comma-separated seeds of the post-hoc prior")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    from mmfm.tokenizers.config import load_config
    from mmfm.tokenizers.registry import build_tokenizer

    runs, to_train = [], []
    for r in args.run:
        name, sep, folder = r.partition("=")
        if not sep or not name or not os.path.isdir(os.path.join(folder, "tokenizer")):
            print(f"--run: expected NAME=FOLDER with FOLDER/tokenizer a saved tokenizer, got {r!r}", file=sys.stderr)
            return 2
        runs.append((name, folder))
    for r in args.train:
        name, sep, path = r.partition("=")
        if not sep or not name or not os.path.isfile(path):
            print(f"--train: expected NAME=CONFIG with CONFIG a tokenizer YAML, got {r!r}", file=sys.stderr)
            return 2
        to_train.append((name, path))
    if not runs and not to_train:
        print("larp_compare: give at least one --run or --train", file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.cache and os.path.exists(args.cache):
        train_x, held_x = torch.load(args.cache)
    else:
        shape = (load_tokenizer(os.path.join(runs[0][1], "tokenizer")) if runs else
                 build_tokenizer(*(lambda c: (c.tokenizer, c.model))(load_config(to_train[0][1]))))
        train_x = prepare_all(shape, read_samples(args.shards, "video", "train", args.holdout))
        held_x = prepare_all(shape, read_samples(args.shards, "video", "eval", args.holdout))
        if args.cache:
            torch.save((train_x, held_x), args.cache)
    print(f"{train_x.shape[0]} training clips, {held_x.shape[0]} held-out clips {tuple(held_x.shape[1:])}",
          file=sys.stderr, flush=True)
    for name, path in to_train:
        runs.append((name, train_in_process(path, train_x)))
    records = []
    for name, folder in runs:
        records.append(measure(name, folder, train_x, held_x, args.prior_steps, seeds))
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in records[-1].items()}, file=sys.stderr,
              flush=True)
    print("| tokenizer | quantizer | queries | prior_weight | bits/clip | held-out PSNR | AR bits/token (fresh prior) "
          "| joint prior bits/token | unigram bits/token | codes used |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in records:
        jp = r.get("joint_prior_bits_per_token")
        print(f"| {r['impl']} | {r['quantizer']} | {r['num_queries'] or '-'} | {r['prior_weight']} | "
              f"{r['bits_per_clip_code']} | {r['psnr']:.2f} | {r['ar_bits_per_token']:.3f} "
              f"({', '.join(f'{v:.3f}' for v in r['ar_bits_per_token_seeds'])}) | "
              f"{'-' if jp is None else f'{jp:.3f}'} | {r['unigram_bits_per_token']:.3f} | {r['codes_used_heldout']} |")
    write_records(records, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
