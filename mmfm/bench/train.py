"""Training throughput: mmfm's Transformer vs transformers' LlamaForCausalLM of identical size.

    mmfm bench train [--quick] [--json PATH] [--configs tiny,small] [--batch 8] [--seq 256] [--vocab 4096]
    mmfm bench train --scaling [...]     ranks, ZeRO memory, packing, compile, MFU: mmfm/bench/scaling.py

For each model config, both models are built with the same weights (mmfm/models/hf.py adapter),
the same batch of random ids (batch x seq), the same next-token loss (mean cross-entropy over the
shifted labels) and the same optimizer (torch AdamW, lr 1e-4, foreach), in this process, with
torch's default threads. Each side computes the loss its own standard way: HF as its users do
(logits, then F.cross_entropy on the shifted logits); mmfm through its training path, the one
`mmfm pretrain` runs (mmfm.objectives.model_loss_and_report -> Transformer.loss: output
projection and cross-entropy fused in row chunks, no [tokens, vocab] logits). HF uses its default attention
(sdpa). One timed step = data (slice the next batch out of a pre-generated id tensor), forward
(+ loss), backward, optimizer (step + zero_grad), each timed with perf_counter; steps of the two
models alternate in blocks so that load from other processes hits both alike. Figures are
medians over the timed steps; tokens_per_s = batch x seq / median step time. cpu_step_ms is the
process CPU time of a step (time.process_time) and tokens_per_cpu_s the rate over it: on a machine
shared with other work, wall time includes the time this process waited for a core, CPU time
mostly does not (with one thread; with several, spin-waiting threads count), so the two ratios
bracket the comparison.
Records (docs/records.md): bench "train", case {config, batch, seq, vocab, params_m}, impl
"mmfm" or "hf_llama", tokens_per_s and data_ms / forward_ms / backward_ms / optimizer_ms / step_ms.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F

from mmfm.bench.common import base_parser, machine, record
from mmfm.jsonio import write_records
from mmfm.typed_config import packaged_config


def _build(config_path: str, vocab: int):
    from mmfm.models import Transformer
    from mmfm.models.config import load_model_config
    from mmfm.models.hf import to_hf

    cfg = load_model_config(config_path)
    cfg.vocab_size = vocab
    torch.manual_seed(0)
    model = Transformer(cfg)
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmfm.models.hf import hf_config_dict

    d = hf_config_dict(cfg)
    for k in ("architectures", "model_type", "torch_dtype"):
        d.pop(k, None)
    hf = LlamaForCausalLM(LlamaConfig(**d, attn_implementation="sdpa"))
    missing, unexpected = hf.load_state_dict(to_hf(model.state_dict(), cfg), strict=False)
    assert not unexpected and all(m.endswith("inv_freq") for m in missing), (missing, unexpected)
    return cfg, model, hf


def hf_loss(hf):
    def loss(ids):
        logits = hf(input_ids=ids, use_cache=False).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
    return loss


def mmfm_loss(model):
    """The trainer's loss call (mmfm/train/loop.py) on AR labels of one modality group."""
    from mmfm.objectives import Prepared, model_loss_and_report

    weights = torch.ones(1)

    def loss(ids):
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:]
        zeros = torch.zeros_like(ids)
        return model_loss_and_report(model, Prepared(ids, zeros, labels, zeros, None), weights)[0]
    return loss


class Runner:
    def __init__(self, name, model, loss, data):
        self.name, self.model, self.loss, self.data = name, model, loss, data
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, foreach=True)
        self.times = {"data": [], "forward": [], "backward": [], "optimizer": [], "step": [], "cpu_step": []}
        self.i = 0
        model.train()

    def step(self, record_it: bool = True) -> float:
        c0 = time.process_time()
        t0 = time.perf_counter()
        ids = self.data[self.i % len(self.data)]
        self.i += 1
        t1 = time.perf_counter()
        loss = self.loss(ids)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        c4 = time.process_time()
        if record_it:
            for k, v in (("data", t1 - t0), ("forward", t2 - t1), ("backward", t3 - t2), ("optimizer", t4 - t3),
                         ("step", t4 - t0), ("cpu_step", c4 - c0)):
                self.times[k].append(v * 1e3)
        return float(loss.detach())


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--scaling" in argv:       # the scaling figures: their own options (mmfm/bench/scaling.py)
        from mmfm.bench.scaling import main as scaling

        return scaling([a for a in argv if a != "--scaling"])
    p = base_parser("train", __doc__.splitlines()[0])
    p.add_argument("--configs", default="tiny,small", help="model configs shipped with mmfm (configs/models/<name>.yaml), "
                   "comma separated")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary size (the demo's unified vocab is ~5.5k)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per model (default 20; 4 with --quick)")
    p.add_argument("--block", type=int, default=2, help="steps per model before switching to the other")
    args = p.parse_args(argv)
    steps = args.steps or (4 if args.quick else 20)
    seq = min(args.seq, 64) if args.quick else args.seq
    print(f"# {machine()}; batch {args.batch} x seq {seq}, vocab {args.vocab}, {steps} timed steps per model "
          f"(median), AdamW", file=sys.stderr)
    records = []
    for name in args.configs.split(","):
        cfg, model, hf = _build(packaged_config(f"models/{name}.yaml"), args.vocab)
        gen = torch.Generator().manual_seed(0)
        data = [torch.randint(args.vocab, (args.batch, seq), generator=gen) for _ in range(8)]
        runners = [Runner("mmfm", model, mmfm_loss(model), data), Runner("hf_llama", hf, hf_loss(hf), data)]
        for r in runners:          # warm-up (allocator, SDPA dispatch)
            r.step(record_it=False)
            r.step(record_it=False)
        done = 0
        while done < steps:
            for r in runners:
                for _ in range(min(args.block, steps - done)):
                    r.step()
            done += min(args.block, steps - done)
        params = sum(p.numel() for p in model.parameters())
        case = {"config": name, "batch": args.batch, "seq": seq, "vocab": args.vocab, "params_m": round(params / 1e6, 2)}
        for r in runners:
            med = {k: statistics.median(v) for k, v in r.times.items()}
            records.append(record("train", case, r.name, tokens_per_s=args.batch * seq / (med["step"] / 1e3),
                                  tokens_per_cpu_s=args.batch * seq / (med["cpu_step"] / 1e3),
                                  **{f"{k}_ms": round(v, 3) for k, v in med.items()}))
    _print(records)
    write_records(records, args.json)
    return 0


def _print(records: list[dict]) -> None:
    figs = ("tokens_per_s", "data_ms", "forward_ms", "backward_ms", "optimizer_ms", "step_ms", "cpu_step_ms")
    base = {r["case"]["config"]: r for r in records if r["impl"] == "hf_llama"}
    rows = [["config", "params_m", "impl", *figs, "vs hf_llama", "cpu vs hf_llama"]]
    for r in records:
        b = base[r["case"]["config"]]
        rows.append([r["case"]["config"], str(r["case"]["params_m"]), r["impl"],
                     *[f"{r[f]:.1f}" if f == "tokens_per_s" else f"{r[f]:.2f}" for f in figs],
                     f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}x", f"{r['tokens_per_cpu_s'] / b['tokens_per_cpu_s']:.2f}x"])
    widths = [max(len(c) for c in col) for col in zip(*rows)]
    for cells in rows:
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)))


if __name__ == "__main__":
    sys.exit(main())
