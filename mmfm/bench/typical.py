"""Locally typical sampling's claim at small scale: at matched perplexity of the generated text,
typical sampling repeats fewer n-grams than top-p (nucleus) and top-k sampling (Meister et al.,
"Locally Typical Sampling", Figure/Table on REP at matched quality).

Each sampler's one parameter is swept over a grid; every setting continues the same held-out
text prompts (the first --prompt-len tokens of the text documents in the run's eval token shards)
for exactly --gen-len text tokens (ids restricted to the text range: no end marker, so every
continuation has the same length and the repetition figures are comparable). For each
continuation:

  ppl    exp(mean NLL of the generated tokens given the prompt and what precedes them), scored
         at temperature 1 over the full vocabulary by the generating model itself and, with
         --reference, by another export sharing its text tokenizer;
  rep-n  1 - distinct n-grams / n-grams of the continuation (0 = no n-gram repeats), n = 2, 3, 4.

Each sweep gives a curve rep-n(log ppl); the curves are compared at matched perplexities by linear
interpolation in log ppl between the two settings bracketing the target. Targets: the perplexity
the scorer gives the human continuations of the same prompts (the paper's reference point) and
the quartiles of the range all three sweeps cover. The standard error of an interpolated rep is
that of the two bracketing settings' per-prompt means, weighted as the interpolation weights them.
Nothing is fixed in favour of typical: if its curve lies above the others the table says so.

    mmfm bench typical --model EXPORT [--reference EXPORT] [--shards 'tokens/eval-*.tar']
                       [--prompts 48] [--prompt-len 32] [--gen-len 128] [--seed 0] [--json PATH]
"""
from __future__ import annotations

import glob
import io
import json
import math
import os
import sys
import tarfile

import numpy as np
import torch

from mmfm.bench.common import base_parser, machine, parse_args, record
from mmfm.jsonio import write_records

SWEEPS = {
    "top_k": (2, 3, 5, 10, 20, 40, 100, 0),
    "top_p": (0.2, 0.4, 0.6, 0.75, 0.85, 0.92, 0.97, 1.0),
    "typical_p": (0.2, 0.4, 0.6, 0.75, 0.85, 0.92, 0.97, 1.0),
}
QUICK = {"top_k": (3, 0), "top_p": (0.5, 1.0), "typical_p": (0.5, 1.0)}   # --quick: smoke runs
NS = (2, 3, 4)


def text_documents(pattern: str, vocab, min_len: int, limit: int) -> list[np.ndarray]:
    """Unified-id arrays of the text samples (.json modality 'text') in the token shards matching
    `pattern`, in shard and member order, at least `min_len` long; the first `limit`."""
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise FileNotFoundError(f"--shards {pattern!r}: no token shards match")
    docs: list[np.ndarray] = []
    for path in paths:
        with tarfile.open(path) as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            for name in sorted(members):
                if not name.endswith(".json"):
                    continue
                meta = json.loads(tar.extractfile(members[name]).read())
                npy = members.get(name[:-5] + ".npy")
                if meta.get("modality") != "text" or npy is None:
                    continue
                ids = np.load(io.BytesIO(tar.extractfile(npy).read()))
                if len(ids) >= min_len:
                    docs.append(ids.astype(np.int64))
                if len(docs) == limit:
                    return docs
    if not docs:
        raise ValueError(f"--shards {pattern!r}: no text sample of at least {min_len} tokens")
    return docs


@torch.no_grad()
def continue_text(model, prompts: torch.Tensor, gen_len: int, text_range: tuple[int, int], seed: int,
                  **sampler) -> torch.Tensor:
    """[B, gen_len] continuations of equal-length prompts [B, P], every token drawn by the fused
    sampler with `sampler` settings among the text ids only (mmfm.generate.decode's constraints
    would end a text row at <end_text>; here every row must run the full length)."""
    from mmfm.generate.step import DenseStep
    from mmfm.models.kv_cache import KVCache
    from mmfm.ops.sampling import sample

    B, P = prompts.shape
    cache = KVCache.for_model(model, B, capacity=P + gen_len)
    last = model(prompts, cache=cache)[:, -1]
    step = DenseStep(model, P + gen_len)
    rng = torch.tensor([text_range] * B, dtype=torch.long)
    out = torch.empty(B, gen_len, dtype=torch.long)
    for i in range(gen_len):
        tok = sample(last, allowed_range=rng, seed=seed, offset=i, **sampler)
        out[:, i] = tok
        if i + 1 < gen_len:
            last = step(tok, cache, P + i + 1, False)
    return out


@torch.no_grad()
def nll(model, prompts: torch.Tensor, cont: torch.Tensor) -> torch.Tensor:
    """[B]: mean negative log-likelihood (nats) of `cont` after `prompts` under `model` at
    temperature 1 over its whole vocabulary."""
    ids = torch.cat([prompts, cont], 1)
    logits = model(ids[:, :-1])[:, prompts.shape[1] - 1:]
    lp = torch.log_softmax(logits.float(), -1).gather(-1, cont[:, :, None])[..., 0]
    return -lp.mean(1)


def rep_n(cont: torch.Tensor, n: int) -> torch.Tensor:
    """[B]: 1 - distinct n-grams / n-grams of each row."""
    out = []
    for row in cont.tolist():
        grams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]
        out.append(1.0 - len(set(grams)) / len(grams))
    return torch.tensor(out, dtype=torch.float64)


def interpolate(points: list[dict], target: float, key: str) -> tuple[float, float] | None:
    """rep `key` (and its standard error) at log-ppl `target` on the curve through `points`
    (sorted by log ppl; None outside the range they cover)."""
    pts = sorted(points, key=lambda p: p["log_ppl"])
    for a, b in zip(pts, pts[1:]):
        if a["log_ppl"] <= target <= b["log_ppl"]:
            w = 0.0 if b["log_ppl"] == a["log_ppl"] else (target - a["log_ppl"]) / (b["log_ppl"] - a["log_ppl"])
            val = (1 - w) * a[key] + w * b[key]
            se = math.sqrt(((1 - w) * a[key + "_se"]) ** 2 + (w * b[key + "_se"]) ** 2)
            return val, se
    return None


def load_export(folder: str):
    from mmfm.models.io import load
    from mmfm.vocab import Vocab

    if not os.path.exists(os.path.join(folder, "vocab.json")):
        raise FileNotFoundError(f"{folder!r}: not an exported model folder with vocab.json (mmfm export)")
    model = load(folder).eval()
    if model.cfg.groups != 1:
        raise ValueError(f"{folder!r}: typical bench decodes dense models (this one is modality-sparse)")
    return model, Vocab.load(os.path.join(folder, "vocab.json"))


def same_text_tokenizer(a: str, b: str) -> bool:
    def blob(folder):
        d = os.path.join(folder, "tokenizers", "text")
        return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d))} if os.path.isdir(d) else None
    ta, tb = blob(a), blob(b)
    return ta is not None and ta == tb


def measure(model, scorers: dict, prompts: torch.Tensor, gen_len: int, text_range, seed: int,
            sweeps: dict = SWEEPS) -> list[dict]:
    """One record per (sampler, value): per-scorer ppl and log ppl, rep-n means and standard errors."""
    rows = []
    for name, values in sweeps.items():
        for v in values:
            cont = continue_text(model, prompts, gen_len, text_range, seed, **{name: v})
            rec = {"sampler": name, "value": v}
            for s, m in scorers.items():
                lp = nll(m, prompts, cont)
                rec[f"log_ppl_{s}"] = float(lp.mean())
                rec[f"ppl_{s}"] = math.exp(rec[f"log_ppl_{s}"])
            for n in NS:
                r = rep_n(cont, n)
                rec[f"rep{n}"] = float(r.mean())
                rec[f"rep{n}_se"] = float(r.std(unbiased=True) / math.sqrt(len(r)))
            rows.append(rec)
            print(f"  {name}={v}: " + " ".join(f"ppl_{s} {rec[f'ppl_{s}']:.2f}" for s in scorers)
                  + " " + " ".join(f"rep{n} {rec[f'rep{n}']:.3f}" for n in NS), file=sys.stderr, flush=True)
    return rows


def matched(rows: list[dict], scorer: str, targets: dict[str, float]) -> list[dict]:
    """rep-n of each sampler at each target log ppl (interpolated), one record per target."""
    out = []
    for label, t in targets.items():
        rec = {"scorer": scorer, "target": label, "ppl": math.exp(t)}
        for name in SWEEPS:
            pts = [dict(r, log_ppl=r[f"log_ppl_{scorer}"]) for r in rows if r["sampler"] == name]
            for n in NS:
                got = interpolate(pts, t, f"rep{n}")
                rec[f"{name}_rep{n}"] = None if got is None else got[0]
                rec[f"{name}_rep{n}_se"] = None if got is None else got[1]
        out.append(rec)
    return out


def print_matched(recs: list[dict]) -> None:
    for n in NS:
        print(f"\nrep-{n} at matched perplexity (mean +- s.e. over prompts)")
        print(f"| scorer | target | ppl | {' | '.join(SWEEPS)} | typical lowest |")
        print("|" + " --- |" * (4 + len(SWEEPS)))
        for r in recs:
            vals = {s: r[f"{s}_rep{n}"] for s in SWEEPS}
            cells = [("-" if vals[s] is None else f"{vals[s]:.3f} +- {r[f'{s}_rep{n}_se']:.3f}") for s in SWEEPS]
            known = {s: x for s, x in vals.items() if x is not None}
            lowest = "-" if len(known) < 2 else ("yes" if min(known, key=known.get) == "typical_p" else "no")
            print(f"| {r['scorer']} | {r['target']} | {r['ppl']:.2f} | {' | '.join(cells)} | {lowest} |")


def main(argv=None) -> int:
    p = base_parser("typical", __doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="exported model folder (mmfm export) that generates")
    p.add_argument("--reference", default="", help="a second export with the same text tokenizer that also scores")
    p.add_argument("--shards", default="", help="token shards holding held-out text (default: the run's "
                   "tokens/eval-*.tar beside the export folder)")
    p.add_argument("--prompts", type=int, default=48, help="number of prompts (text documents)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (<bos> <begin_text> included)")
    p.add_argument("--gen-len", type=int, default=128, help="generated tokens per prompt")
    p.add_argument("--samples", type=int, default=2, help="continuations per prompt (each row draws its own)")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    args = parse_args(p, argv)
    if args is None:
        return 2
    for name, least in (("prompts", 2), ("prompt_len", 4), ("gen_len", 4), ("samples", 1)):
        if getattr(args, name) < least:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(args, name)}")
    model, vocab = load_export(args.model)
    shards = args.shards or os.path.join(os.path.dirname(os.path.abspath(args.model)), "tokens", "eval-*.tar")
    need = args.prompt_len + args.gen_len
    docs = text_documents(shards, vocab, need, args.prompts)
    if need > model.cfg.max_seq_len:
        raise ValueError(f"--prompt-len + --gen-len = {need} exceeds the model's max_seq_len {model.cfg.max_seq_len}")
    prompts = torch.tensor(np.stack([d[:args.prompt_len] for d in docs]))
    human = torch.tensor(np.stack([d[args.prompt_len:need] for d in docs]))
    r = vocab.ranges["text"]
    text_range = (r.start, r.stop)          # the sampler's allowed_range is [lo, hi)
    if int(human.min()) < r.start or int(human.max()) >= r.stop:
        # a document's end marker inside the window: the human side would not be text-only
        keep = ((human >= r.start) & (human < r.stop)).all(1)
        prompts, human = prompts[keep], human[keep]
    scorers = {"self": model}
    if args.reference:
        if not same_text_tokenizer(args.model, args.reference):
            raise ValueError(f"--reference {args.reference!r}: its tokenizers/text differs from --model's; "
                             "it cannot score the same ids")
        scorers["ref"] = load_export(args.reference)[0]
    prompts, human = prompts.repeat_interleave(args.samples, 0), human.repeat_interleave(args.samples, 0)
    sweeps = QUICK if args.quick else SWEEPS
    print(f"typical: {len(prompts)} rows ({args.samples} per prompt) x {args.gen_len} tokens; {machine()}",
          file=sys.stderr)
    human_rec = {"sampler": "human", "value": None}
    for s, m in scorers.items():
        human_rec[f"log_ppl_{s}"] = float(nll(m, prompts, human).mean())
        human_rec[f"ppl_{s}"] = math.exp(human_rec[f"log_ppl_{s}"])
    for n in NS:
        rr = rep_n(human, n)
        human_rec[f"rep{n}"] = float(rr.mean())
        human_rec[f"rep{n}_se"] = float(rr.std(unbiased=True) / math.sqrt(len(rr)))
    rows = measure(model, scorers, prompts, args.gen_len, text_range, args.seed, sweeps)
    summary = []
    for s in scorers:
        lo = max(min(r[f"log_ppl_{s}"] for r in rows if r["sampler"] == n) for n in sweeps)
        hi = min(max(r[f"log_ppl_{s}"] for r in rows if r["sampler"] == n) for n in sweeps)
        targets = {"human": human_rec[f"log_ppl_{s}"]}
        if lo < hi:
            targets.update({f"q{q}": lo + (hi - lo) * q / 4 for q in (1, 2, 3)})
        summary += matched(rows, s, targets)
    print(f"\nhuman continuations: " + " ".join(f"ppl_{s} {human_rec[f'ppl_{s}']:.2f}" for s in scorers)
          + " " + " ".join(f"rep{n} {human_rec[f'rep{n}']:.3f}" for n in NS))
    print_matched(summary)
    case = {"model": args.model, "reference": args.reference, "prompts": len(prompts), "gen_len": args.gen_len,
            "seed": args.seed, "machine": machine()}
    records = [record("typical", {**case, "value": r["value"]}, r["sampler"],
                      **{k: v for k, v in r.items() if k not in ("sampler", "value")}) for r in [human_rec] + rows]
    records += [record("typical", {**case, "scorer": m["scorer"], "target": m["target"]}, "matched",
                       **{k: v for k, v in m.items() if k not in ("scorer", "target")}) for m in summary]
    write_records(records, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
