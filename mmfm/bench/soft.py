"""Soft Thinking's claim at small scale: reasoning in concept space (mmfm/generate/soft.py) answers
a checkable task more often than discrete sampling at the same token budget.

The task is synthetic arithmetic text, since the demo corpus has none: a prompt `x+c=` (two digits)
asks for x + K c mod 10 (K = 6); the reasoning span writes the running values `s1,s2,...,sK`
(s_j = s_{j-1} + c mod 10, s_0 = x), then `>`, the answer sK and a newline. The training text is
noisy the way sampled reasoning is: each running value is written wrong with probability --noise (a
uniformly drawn other digit), and the following values and the answer continue from what was
written. A model that fits this text puts about 1 - noise of its mass on the right value at each
step, so sampling at temperature 1 takes a wrong turn every 1/noise steps on average, while the
right digit is always the mode. The answer is checked against x + K c mod 10.

Modes (all get the same budget of 2 K + 2 new tokens; an answer is the token after `>`):
  sample       discrete sampling, temperature 1, for the whole continuation
  sample_t0.6  discrete sampling at temperature 0.6, top-p 0.95 (the paper's baseline settings)
  soft         the reasoning span in concept space (top-k 15, top-p 0.95, temperature 1) until the
               concept's top token is `>`; then discrete sampling at temperature 1
  soft_t0.6    soft with the concept at temperature 0.6, top-p 0.95 and discrete steps as sample_t0.6
  soft_cold    soft with cold stop: back to discrete sampling once the concept's entropy stays
               below --cold-entropy nats for 2 steps
  greedy       discrete argmax (no sampling at all: the ceiling a sampler can approach)

The model (2 layers, dim 64) is trained here from --seed in a few minutes on a CPU (or loaded from
--model-dir when it holds one trained with the same settings). Soft Thinking is training-free, as in
the paper: the model never saw a concept embedding, so soft inputs are out of its training
distribution and can as well hurt as help; the table says which.

    mmfm bench soft [--steps 600] [--noise 0.2] [--problems 500] [--seed 0] [--model-dir DIR] [--json PATH]
"""
from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import torch

from mmfm.bench.common import base_parser, machine, parse_args, record
from mmfm.jsonio import write_json, write_records

PLUS, EQ, COMMA, END, NL, PAD = 10, 11, 12, 13, 14, 15
V = 16
K = 6
BUDGET = 2 * K + 2
CHARS = "0123456789+=,>\n_"


def problem(rng: np.random.Generator, noise: float) -> tuple[list[int], list[int], int]:
    """(prompt ids, continuation ids as the noisy training text writes them, the true answer)."""
    x, c = (int(v) for v in rng.integers(0, 10, size=2))
    prompt = [x, PLUS, c, EQ]
    cont, written = [], x
    for j in range(K):
        value = (written + c) % 10
        if rng.random() < noise:
            value = (value + int(rng.integers(1, 10))) % 10
        written = value
        cont += ([COMMA] if j else []) + [written]
    cont += [END, written, NL]
    return prompt, cont, (x + K * c) % 10


def batch(rng: np.random.Generator, n: int, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [n, L] (padded) and labels (the continuation only; -100 elsewhere)."""
    rows = [problem(rng, noise)[:2] for _ in range(n)]
    L = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((n, L), PAD, dtype=torch.long)
    labels = torch.full((n, L), -100, dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        seq = torch.tensor(p + c)
        ids[i, :len(seq)] = seq
        labels[i, len(p) - 1:len(seq) - 1] = seq[len(p):]
    return ids, labels


def model_config():
    from mmfm.models import ModelConfig

    return ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=176, vocab_size=V,
                       max_seq_len=4 + BUDGET + 4)


def train(steps: int, noise: float, seed: int, batch_size: int = 128, lr: float = 3e-3):
    """The arithmetic model, trained on fresh noisy problems every step (AdamW, cosine decay)."""
    from mmfm.models import Transformer

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = Transformer(model_config())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps))))
    for s in range(steps):
        ids, labels = batch(rng, batch_size, noise)
        loss_sum, _ = model.loss(ids, labels)
        loss = loss_sum / (labels != -100).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if s % 250 == 0 or s == steps - 1:
            print(f"  train step {s}: loss {float(loss.detach()):.4f}", file=sys.stderr, flush=True)
    return model.eval()


def load_or_train(folder: str, steps: int, noise: float, seed: int):
    from mmfm.models import Transformer

    meta = {"steps": steps, "noise": noise, "seed": seed, "format": 2}
    path, mpath = os.path.join(folder or "", "model.pt"), os.path.join(folder or "", "meta.json")
    if folder and os.path.exists(path) and os.path.exists(mpath):
        with open(mpath) as f:
            if json.load(f) == meta:
                model = Transformer(model_config())
                model.load_state_dict(torch.load(path, weights_only=True))
                return model.eval()
    model = train(steps, noise, seed)
    if folder:
        os.makedirs(folder, exist_ok=True)
        torch.save(model.state_dict(), path)
        write_json(mpath, meta)
    return model


def answers(outs: list[torch.Tensor]) -> tuple[list[int | None], list[int]]:
    """(the token after the first `>` of each row or None, tokens up to and with the newline)."""
    got, used = [], []
    for o in outs:
        row = o.tolist()
        at = row.index(END) if END in row else -1
        got.append(row[at + 1] if 0 <= at < len(row) - 1 and row[at + 1] < 10 else None)
        used.append(row.index(NL) + 1 if NL in row else len(row))
    return got, used


def run_mode(model, mode: str, prompts: list[torch.Tensor], seed: int, cold_entropy: float, stats: dict):
    from mmfm.generate.decode import SamplingConfig, decode
    from mmfm.generate.soft import SoftConfig, soft_decode

    t1 = SamplingConfig(temperature=1.0)
    if mode == "sample":
        return decode(model, prompts, None, t1, max_new_tokens=BUDGET, seed=seed, pad_id=PAD)
    if mode == "sample_t0.6":
        return decode(model, prompts, None, SamplingConfig(temperature=0.6, top_p=0.95), max_new_tokens=BUDGET,
                      seed=seed, pad_id=PAD)
    if mode == "greedy":
        return decode(model, prompts, None, SamplingConfig(temperature=0.0), max_new_tokens=BUDGET, pad_id=PAD)
    cool = mode == "soft_t0.6"   # the concept and the discrete steps at sample_t0.6's settings
    soft = SoftConfig(top_k=15, top_p=0.95, temperature=0.6 if cool else 1.0, max_think=BUDGET, end_think_id=END,
                      cold_stop_entropy=cold_entropy if mode == "soft_cold" else 0.0, cold_stop_steps=2)
    after = SamplingConfig(temperature=0.6, top_p=0.95) if cool else t1
    return soft_decode(model, prompts, BUDGET, soft, after, seed=seed, pad_id=PAD, stats=stats)


MODES = ("sample", "sample_t0.6", "soft", "soft_cold", "soft_t0.6", "greedy")


def main(argv=None) -> int:
    p = base_parser("soft", __doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600, help="training steps of the arithmetic model")
    p.add_argument("--noise", type=float, default=0.2, help="chance that a written running sum is wrong")
    p.add_argument("--problems", type=int, default=500, help="test problems (fresh, from seed + 1)")
    p.add_argument("--seed", type=int, default=0, help="training seed; the sampler's seeds are seed .. seed + 2")
    p.add_argument("--cold-entropy", type=float, default=0.3, help="soft_cold's entropy threshold (nats)")
    p.add_argument("--model-dir", default="", help="save the trained model here / reuse one trained with the "
                   "same --steps --noise --seed")
    args = parse_args(p, argv, cpu_only="what the task needs (a 100k-parameter model)")
    if args is None:
        return 2
    if not 0 <= args.noise < 0.9:
        raise ValueError(f"--noise must be in [0, 0.9), got {args.noise}")
    for name in ("steps", "problems"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.quick:
        args.steps, args.problems = min(args.steps, 200), min(args.problems, 64)
    model = load_or_train(args.model_dir, args.steps, args.noise, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    probs = [problem(rng, 0.0) for _ in range(args.problems)]
    prompts = [torch.tensor(p) for p, _, _ in probs]
    truth = [t for _, _, t in probs]
    print(f"soft: {args.problems} problems, noise {args.noise}, {machine()}", file=sys.stderr)
    records = []
    for mode in MODES:
        for s in range(1 if mode == "greedy" else 3):
            stats: dict = {}
            got, used = answers(run_mode(model, mode, prompts, args.seed + s, args.cold_entropy, stats))
            ok = np.array([g == t for g, t in zip(got, truth)], dtype=np.float64)
            rec = {"mode": mode, "sampler_seed": args.seed + s, "accuracy": float(ok.mean()),
                   "accuracy_se": float(ok.std(ddof=1) / math.sqrt(len(ok))),
                   "answered": float(np.mean([g is not None for g in got])), "tokens": float(np.mean(used))}
            if "soft_steps" in stats:
                rec["soft_steps"] = float(stats["soft_steps"].float().mean())
                rec["cold_stops"] = float(stats["cold_stops"].float().mean())
            records.append(rec)
            print(f"  {mode} seed {rec['sampler_seed']}: accuracy {rec['accuracy']:.3f}", file=sys.stderr, flush=True)
    print(f"\n| mode | accuracy (mean of seeds, +- s.e. over problems) | answered | tokens used | soft steps |")
    print("| --- | --- | --- | --- | --- |")
    for mode in MODES:
        rs = [r for r in records if r["mode"] == mode]
        acc = np.mean([r["accuracy"] for r in rs])
        se = math.sqrt(np.mean([r["accuracy_se"] ** 2 for r in rs]) / len(rs))
        soft = f"{np.mean([r['soft_steps'] for r in rs]):.1f}" if "soft_steps" in rs[0] else "-"
        each = ", ".join(f"{r['accuracy']:.3f}" for r in rs)
        print(f"| {mode} | {acc:.3f} +- {se:.3f} ({each}) | "
              f"{np.mean([r['answered'] for r in rs]):.3f} | {np.mean([r['tokens'] for r in rs]):.1f} | {soft} |")
    case = {"steps": args.steps, "noise": args.noise, "problems": args.problems, "seed": args.seed,
            "cold_entropy": args.cold_entropy, "machine": machine()}
    write_records([record("soft", {**case, "sampler_seed": r["sampler_seed"]}, r["mode"],
                          **{k: v for k, v in r.items() if k not in ("mode", "sampler_seed")}) for r in records], args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
