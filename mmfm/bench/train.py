"""Training throughput: mmfm's Transformer vs transformers' LlamaForCausalLM of identical size.

    mmfm bench train [--quick] [--json PATH] [--configs tiny,small,medium] [--batch 8] [--seq 256] [--vocab 4096]
                     [--device cpu|cuda] [--hf-chunk-rows 512]
    mmfm bench train --scaling [...]     ranks, ZeRO memory, packing, compile, MFU: mmfm/bench/scaling.py

For each model config every side is built with the same weights (mmfm/models/hf.py adapter), fed
the same batches of random ids (batch x seq) in the same order, with the same next-token loss
(mean cross-entropy over the shifted labels) and the same optimizer (torch AdamW, lr 1e-4,
foreach), in this process. The configs: `tiny` and `small` are the packaged
configs/models/*.yaml (0.6M and 1.8M parameters at vocab 4096, where Python dispatch is a large
share of a step); `medium` (defined here: small.yaml widened to dim 256, 8 layers, ~8M
parameters) is compute-bound, so its ratio measures the kernels rather than the dispatch.
Impls (each its own copy of the weights and its own optimizer):
    mmfm              mmfm's training path, the call `mmfm pretrain` makes
                      (mmfm.objectives.model_loss_and_report -> Transformer.loss: output projection
                      and cross-entropy fused in row chunks, no [tokens, vocab] logits)
    hf_llama          HF as most users write it: logits, then F.cross_entropy on the shifted logits
    hf_llama_labels   HF's own loss: model(input_ids, labels=ids).loss (ForCausalLMLoss)
    hf_llama_chunked  the strongest plain-transformers setting on the CPU: the base model's hidden
                      states, then the head and cross-entropy in chunks of --hf-chunk-rows rows
                      under torch.utils.checkpoint (no [tokens, vocab] logits kept). transformers'
                      own fused loss is Liger's Triton kernels (CUDA only; liger-kernel is not a
                      dependency of mmfm), so a chunked loss written in torch stands for it.
All HF sides use the default attention (sdpa). Before timing, the first step's losses of all
impls (same weights, same batch) must agree within 1e-4 relative, and after the last step within
1e-2 (they trained in lockstep; only summation order differs): a side that computed something
else fails the benchmark.

One timed step = data (slice the next batch out of a pre-generated id tensor), forward (+ loss),
backward, optimizer (step + zero_grad), each timed with perf_counter; impls alternate in blocks
of --block steps so that load from other processes hits all alike. Figures are medians over the
timed steps; tokens_per_s = batch x seq / median step time. cpu_step_ms is the process CPU time
of a step (time.process_time) and tokens_per_cpu_s the rate over it: on a machine shared with
other work, wall time includes the time this process waited for a core, CPU time mostly does
not (with one thread; with several, spin-waiting threads count), so the two ratios bracket the
comparison. The summary gives mmfm against the fastest HF impl of each config.
Records (docs/records.md): bench "train", case {config, batch, seq, vocab, params_m}, impl
"mmfm" / "hf_llama" / "hf_llama_labels" / "hf_llama_chunked", tokens_per_s, tokens_per_cpu_s,
first_loss, last_loss and data_ms / forward_ms / backward_ms / optimizer_ms / step_ms / cpu_step_ms.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mmfm.bench.common import base_parser, machine, parse_args, record
from mmfm.jsonio import write_records
from mmfm.typed_config import packaged_config

# configs defined here rather than shipped: (packaged base config, fields replaced)
EXTRA_CONFIGS = {"medium": ("small", dict(dim=256, n_layers=8, n_heads=8, n_kv_heads=4, ffn_hidden=688))}
HF_IMPLS = ("hf_llama", "hf_llama_labels", "hf_llama_chunked")


def _model_config(name: str, vocab: int):
    from mmfm.models.config import load_model_config

    base, fields = EXTRA_CONFIGS.get(name, (name, {}))
    cfg = load_model_config(packaged_config(f"models/{base}.yaml"))
    for k, v in fields.items():
        setattr(cfg, k, v)
    cfg.vocab_size = vocab
    return cfg


def _build(name: str, vocab: int, n_hf: int, device: str):
    """mmfm's Transformer and n_hf LlamaForCausalLM copies with its weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmfm.models import Transformer
    from mmfm.models.hf import hf_config_dict, to_hf

    cfg = _model_config(name, vocab)
    torch.manual_seed(0)
    model = Transformer(cfg)
    d = hf_config_dict(cfg)
    for k in ("architectures", "model_type", "torch_dtype"):
        d.pop(k, None)
    hfs = []
    for _ in range(n_hf):
        hf = LlamaForCausalLM(LlamaConfig(**d, attn_implementation="sdpa"))
        missing, unexpected = hf.load_state_dict(to_hf(model.state_dict(), cfg), strict=False)
        assert not unexpected and all(m.endswith("inv_freq") for m in missing), (missing, unexpected)
        hfs.append(hf.to(device))
    return cfg, model.to(device), hfs


def hf_loss(hf):
    def loss(ids):
        logits = hf(input_ids=ids, use_cache=False).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
    return loss


def hf_labels_loss(hf):
    def loss(ids):
        return hf(input_ids=ids, labels=ids, use_cache=False).loss
    return loss


def _ce_sum(h: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(h, w).float(), y, reduction="sum")


def hf_chunked_loss(hf, chunk_rows: int):
    """Head + cross-entropy over chunks of rows, each recomputed in backward (checkpoint), so only
    one chunk's logits exist at a time."""
    def loss(ids):
        h = hf.model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
        h = h.reshape(-1, h.shape[-1])
        y = ids[:, 1:].reshape(-1)
        total = sum(checkpoint(_ce_sum, hc, yc, hf.lm_head.weight, use_reentrant=False)
                    for hc, yc in zip(h.split(chunk_rows), y.split(chunk_rows)))
        return total / y.numel()
    return loss


def mmfm_loss(model):
    """The trainer's loss call (mmfm/train/loop.py) on AR labels of one modality group."""
    from mmfm.objectives import Prepared, model_loss_and_report

    weights = torch.ones(1, device=next(model.parameters()).device)

    def loss(ids):
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:]
        zeros = torch.zeros_like(ids)
        return model_loss_and_report(model, Prepared(ids, zeros, labels, zeros, None), weights)[0]
    return loss


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Runner:
    def __init__(self, name, model, loss, data, device: str = "cpu"):
        self.name, self.model, self.loss, self.data, self.device = name, model, loss, data, device
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, foreach=True)
        self.times = {"data": [], "forward": [], "backward": [], "optimizer": [], "step": [], "cpu_step": []}
        self.losses: list[float] = []
        self.i = 0
        model.train()

    def step(self, record_it: bool = True) -> float:
        sync = self.device.startswith("cuda")
        c0 = time.process_time()
        t0 = time.perf_counter()
        ids = self.data[self.i % len(self.data)]
        self.i += 1
        t1 = time.perf_counter()
        loss = self.loss(ids)
        if sync:
            _sync(self.device)
        t2 = time.perf_counter()
        loss.backward()
        if sync:
            _sync(self.device)
        t3 = time.perf_counter()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        _sync(self.device)
        t4 = time.perf_counter()
        c4 = time.process_time()
        if record_it:
            for k, v in (("data", t1 - t0), ("forward", t2 - t1), ("backward", t3 - t2), ("optimizer", t4 - t3),
                         ("step", t4 - t0), ("cpu_step", c4 - c0)):
                self.times[k].append(v * 1e3)
        self.losses.append(float(loss.detach()))
        return self.losses[-1]


def check_lockstep(runners: list[Runner], what: str) -> None:
    """Same weights, same batches, same optimizer: the first losses must agree closely, the last
    ones loosely (summation order differs between the implementations)."""
    for when, i, rtol in (("first", 0, 1e-4), ("last", -1, 1e-2)):
        ref = runners[0].losses[i]
        for r in runners[1:]:
            if abs(r.losses[i] - ref) > rtol * abs(ref):
                raise AssertionError(f"{what}: the {when} loss of {r.name} is {r.losses[i]:.6f}, {runners[0].name}'s "
                                     f"{ref:.6f} (relative tolerance {rtol}); they did not compute the same training step")


def run_config(name: str, batch: int, seq: int, vocab: int, steps: int, block: int, device: str,
               chunk_rows: int) -> list[dict]:
    """Train every impl of one config in alternating blocks; one record per impl."""
    cfg, model, hfs = _build(name, vocab, len(HF_IMPLS), device)
    gen = torch.Generator().manual_seed(0)
    data = [torch.randint(vocab, (batch, seq), generator=gen).to(device) for _ in range(8)]
    losses = {"hf_llama": hf_loss, "hf_llama_labels": hf_labels_loss,
              "hf_llama_chunked": lambda hf: hf_chunked_loss(hf, chunk_rows)}
    runners = [Runner("mmfm", model, mmfm_loss(model), data, device)]
    runners += [Runner(n, hf, losses[n](hf), data, device) for n, hf in zip(HF_IMPLS, hfs)]
    for r in runners:          # warm-up (allocator, SDPA dispatch)
        r.step(record_it=False)
        r.step(record_it=False)
    done = 0
    while done < steps:
        n = min(block, steps - done)
        for r in runners:
            for _ in range(n):
                r.step()
        done += n
    check_lockstep(runners, f"train {name}")
    params = sum(p.numel() for p in model.parameters())
    case = {"config": name, "batch": batch, "seq": seq, "vocab": vocab, "params_m": round(params / 1e6, 2)}
    if device != "cpu":
        case["device"] = device
    records = []
    for r in runners:
        med = {k: statistics.median(v) for k, v in r.times.items()}
        records.append(record("train", case, r.name, tokens_per_s=batch * seq / (med["step"] / 1e3),
                              tokens_per_cpu_s=batch * seq / (med["cpu_step"] / 1e3),
                              first_loss=r.losses[0], last_loss=r.losses[-1],
                              **{f"{k}_ms": round(v, 3) for k, v in med.items()}))
    return records


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--scaling" in argv:       # the scaling figures: their own options (mmfm/bench/scaling.py)
        from mmfm.bench.scaling import main as scaling

        return scaling([a for a in argv if a != "--scaling"])
    p = base_parser("train", __doc__.splitlines()[0])
    p.add_argument("--configs", default="tiny,small,medium",
                   help=f"model configs: those shipped with mmfm (configs/models/<name>.yaml) or "
                        f"{', '.join(EXTRA_CONFIGS)} (defined in mmfm/bench/train.py), comma separated")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary size (the demo's unified vocab is ~5.5k)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per impl (default 20; 4 with --quick)")
    p.add_argument("--block", type=int, default=2, help="steps per impl before switching to the next")
    p.add_argument("--hf-chunk-rows", type=int, default=512, help="rows per chunk of hf_llama_chunked's loss")
    # mmfm's training path calls no compiled op (the fused loss is torch), so no extension check
    args = parse_args(p, argv, compiled=False)
    if args is None:
        return 2
    steps = args.steps or (4 if args.quick else 20)
    seq = min(args.seq, 64) if args.quick else args.seq
    print(f"# {machine()}; batch {args.batch} x seq {seq}, vocab {args.vocab}, {steps} timed steps per impl "
          f"(median), AdamW, device {args.device}", file=sys.stderr)
    records = []
    for name in args.configs.split(","):
        records += run_config(name, args.batch, seq, args.vocab, steps, args.block, args.device, args.hf_chunk_rows)
    _print(records)
    for line in summary(records):
        print(line)
    write_records(records, args.json)
    return 0


def summary(records: list[dict]) -> list[str]:
    """Per config: mmfm's tokens/s over the fastest HF impl's, wall and CPU time."""
    lines = []
    for cfg in dict.fromkeys(r["case"]["config"] for r in records):
        rs = {r["impl"]: r for r in records if r["case"]["config"] == cfg}
        hf = [rs[n] for n in HF_IMPLS if n in rs]
        if "mmfm" not in rs or not hf:
            continue
        best = max(hf, key=lambda r: r["tokens_per_s"])
        best_cpu = max(hf, key=lambda r: r["tokens_per_cpu_s"])
        lines.append(f"{cfg} ({rs['mmfm']['case']['params_m']}M params): mmfm {rs['mmfm']['tokens_per_s'] / best['tokens_per_s']:.2f}x "
                     f"the fastest HF setting ({best['impl']}) in wall time, "
                     f"{rs['mmfm']['tokens_per_cpu_s'] / best_cpu['tokens_per_cpu_s']:.2f}x in CPU time ({best_cpu['impl']})")
    return lines


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
