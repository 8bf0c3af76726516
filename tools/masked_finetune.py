"""Continue training an exported model on one modality's token samples under an objective (masked,
hybrid or ar), in one plain torch process, and export it: the cheap way to get a masked-trained
model on a machine too loaded for a DeepSpeed run (docs/benchmarks.md, issue 18).

    python tools/masked_finetune.py --init runs/demo/export --tokens runs/demo/tokens --modality image \
        --objective masked --steps 200 --out runs/masked_ft

Each row is one whole sample (no packing: the masked objective's attention is full over a row's
valid tokens), padded to the batch's longest. The objective is mmfm.objectives' (masked: 4M's
Dirichlet budgets with MMM's cosine mask ratio; ar: next-token), the loss the trainer's
(model_loss_and_report), AdamW with linear warmup and cosine decay. --save-every writes
<out>/step-<k>/ exports along the way; <out>/export is the last.
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import math
import os
import sys
import tarfile
import time


def read_samples(folder: str, modality: str, split: str = "train"):
    import numpy as np

    out = []
    for shard in sorted(glob.glob(os.path.join(folder, f"{split}-*.tar"))):
        with tarfile.open(shard) as t:
            names = {m.name: m for m in t.getmembers()}
            for name, m in names.items():
                if not name.endswith(".json"):
                    continue
                meta = json.load(t.extractfile(m))
                npy = names.get(name[:-5] + ".npy")
                if meta.get("modality") == modality and npy is not None:
                    out.append(np.load(io.BytesIO(t.extractfile(npy).read())).astype("int64"))
    if not out:
        raise SystemExit(f"--tokens {folder}: no {modality} samples in {split}-*.tar")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init", required=True, help="exported model to start from (with --scratch: whose "
                   "architecture, vocabulary and tokenizers to use)")
    p.add_argument("--scratch", action="store_true",
                   help="start from freshly initialised weights of --init's architecture, not its weights")
    p.add_argument("--tokens", required=True, help="token shards folder (train-*.tar, vocab.json)")
    p.add_argument("--modality", default="image")
    p.add_argument("--objective", choices=("masked", "hybrid", "ar"), default="masked")
    p.add_argument("--loss-on", choices=("all", "generated"), default="all",
                   help="objective.loss_on: generated confines masks (masked, hybrid) or the loss (ar) to each "
                        "sample's generated segment, its prompt always seen")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import torch

    from mmfm.export import write_folder
    from mmfm.models.io import load
    from mmfm.objectives import ObjectiveConfig, build_objective
    from mmfm.objectives.base import model_loss_and_report
    from mmfm.vocab import Vocab

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    vocab_path = os.path.join(args.tokens, "vocab.json")
    vocab = Vocab.load(vocab_path)
    model = load(args.init).train()
    if args.scratch:   # the same architecture, trained from nothing under this objective alone
        model.reset_parameters()
    cfg = ObjectiveConfig(kind=args.objective, loss_weights={"text": 0.3}, loss_on=args.loss_on)
    if args.objective != "ar":
        cfg.mask_schedule = "cosine"
        cfg.input_fraction, cfg.target_fraction = 0.5, 0.5
    obj = build_objective(cfg, vocab)
    samples = read_samples(args.tokens, args.modality)
    table = vocab.modality_table()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(args.seed)
    tokenizers = os.path.join(args.init, "tokenizers")
    log = open(os.path.join(args.out, "log.jsonl"), "a") if os.makedirs(args.out, exist_ok=True) is None else None

    def save(folder):
        write_folder({k: v.detach() for k, v in model.state_dict().items()}, model.cfg, folder, vocab_path,
                     tokenizers if os.path.isdir(tokenizers) else None)

    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        pick = torch.randint(0, len(samples), (args.batch,), generator=g).tolist()
        L = max(len(samples[i]) for i in pick)
        ids = torch.full((args.batch, L), vocab.pad_id, dtype=torch.long)
        valid = torch.zeros(args.batch, L, dtype=torch.bool)
        for r, i in enumerate(pick):
            ids[r, :len(samples[i])] = torch.from_numpy(samples[i])
            valid[r, :len(samples[i])] = True
        prep = obj.prepare(ids, table[ids], valid, g)
        lr = args.lr * min(1.0, step / max(1, args.warmup)) * (0.55 + 0.45 * math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        loss, sums, counts = model_loss_and_report(model, prep, obj.weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        rec = {"step": step, "loss": float(loss.detach()), "lr": lr, "s": time.perf_counter() - t0,
               **{f"loss_{n}": float(sums[k] / counts[k]) for k, n in enumerate(vocab.modality_names) if counts[k]}}
        log.write(json.dumps(rec) + "\n")
        log.flush()
        if args.save_every and step % args.save_every == 0:
            save(os.path.join(args.out, f"step-{step}"))
    save(os.path.join(args.out, "export"))
    print(f"{args.steps} steps in {time.perf_counter() - t0:.0f} s; export {os.path.join(args.out, 'export')}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
