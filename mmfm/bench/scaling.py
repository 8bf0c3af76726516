"""Scaling figures of training: `mmfm bench train --scaling` (or `python -m mmfm.bench.scaling`).

    mmfm bench train --scaling [--parts ranks,pack,compile,mfu] [--quick] [--json PATH]
        [--config small] [--mfu-configs small,m100] [--batch 8] [--seq 256] [--vocab 4096]
        [--shards TOKEN_SHARDS] [--ranks 1,2]

Parts (records bench "train_scaling", case.part says which):
  ranks    tokens/s and model-state memory per rank under DeepSpeed ZeRO-1/2/3 at 1 and 2 ranks
           (gloo on CPU), one torchrun per rank count running `--worker` below. The global batch is
           --batch x ranks (weak scaling: each rank keeps its micro-batch). state_mb: bytes of every
           live tensor in the rank's process after a step (parameters, gradients, ZeRO's flat
           partitions, Adam's moments, DeepSpeed's buckets; counted once per storage), the memory
           that ZeRO shards; it must fall with ranks at stage 3 (and at 1-2 for the optimizer
           part). Buckets are sized to the model and ZeRO-3 shards every parameter (ZERO_BENCH).
           rss_mb: the process' peak resident set (torch, DeepSpeed and the model built whole
           before sharding included).
  pack     real (non-pad) tokens/s of one model trained on token shards read two ways: packed
           (mmfm's concat packing, every row full) and padded (one sample per row, padded to
           --seq, the naive layout); the same step shape, so the ratio is the fill ratio in time.
  compile  tokens/s of torch.compile(model) against the eager model, steps interleaved in blocks;
           compile_s is the first compiled step (tracing + codegen).
  mfu      model FLOPs utilisation of plain training steps (AdamW, fp32) of each --mfu-configs
           config against a matmul peak measured in the same rounds: each round times a
           --peak-n square fp32 matmul and then a few steps, MFU = flops_per_token x tokens/s /
           peak of that round, median over rounds (load from other processes hits both alike).

The Trainer on a device (tools/gpu_check.sh's training stage; `trainer_run`):
    python -m mmfm.bench.scaling --trainer-run --device cuda --config llama_1b --precision bf16 \
        --seq 2048 --batch 4 --steps 50 --peak-n 8192 --json OUT.json    [under torchrun for 2 GPUs]
A worker and its own JSON (internal; the `ranks` part starts it under torchrun):
    python -m mmfm.bench.scaling --worker SPEC_JSON OUT_JSON
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from mmfm.bench.common import TrainSteps, interleaved_blocks, machine, record
from mmfm.jsonio import write_records
from mmfm.typed_config import packaged_config

BENCH = "train_scaling"
# DeepSpeed's defaults are sized for billion-parameter models: a 5e8-element (2 GB fp32) gradient
# bucket allocated up front, and ZeRO-3 keeps every parameter under 1e5 elements whole on every
# rank (persistence threshold), i.e. all of a small model but its embeddings. Both would hide the
# sharding this part measures, so the buckets are sized to a small model and everything is sharded.
ZERO_BENCH = {"reduce_bucket_size": 2_000_000, "allgather_bucket_size": 2_000_000,
              "stage3_prefetch_bucket_size": 2_000_000, "stage3_param_persistence_threshold": 0}


def _model_cfg(name: str, vocab: int, seq: int):
    from mmfm.models.config import load_model_config

    cfg = load_model_config(name if name.endswith(".yaml") else packaged_config(f"models/{name}.yaml"))
    cfg.vocab_size = vocab
    cfg.max_seq_len = max(cfg.max_seq_len, seq)
    return cfg


def _loss_fn(model):
    from mmfm.bench.train import mmfm_loss

    return mmfm_loss(model)


def live_tensor_mb() -> float:
    """MiB of every tensor storage alive in this process (each storage once)."""
    gc.collect()
    seen, total = set(), 0
    for o in gc.get_objects():
        try:
            if not torch.is_tensor(o) or o.device.type != "cpu":
                continue
            st = o.untyped_storage()
        except Exception:   # noqa: BLE001 - half-built or exotic tensors (meta, sparse) are not state
            continue
        key = st.data_ptr()
        if key and key not in seen:
            seen.add(key)
            total += st.nbytes()
    return total / 2**20


def matmul_peak(n: int = 1024, reps: int = 3, dtype=torch.float32, device: str = "cpu") -> float:
    """Achieved FLOP/s of an n x n matmul (best of reps): the MFU denominator."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    best = float("inf")
    for _ in range(reps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


# ----------------------------------------------------------------------------- ranks (worker)
def worker(spec: dict, out: str) -> None:
    """Under torchrun: for each ZeRO stage, a DeepSpeed engine of spec's model, timed steps on random
    ids; rank 0 writes {stage: {tokens_per_s, state_mb: [per rank], rss_mb: [per rank]}}."""
    from mmfm.models import Transformer
    from mmfm.train.config import OptimSection, TrainSection
    from mmfm.train.engine import EngineSpec, build_engine, init_distributed

    torch.set_num_threads(spec.get("threads", 1))
    init_distributed()
    dist = torch.distributed
    rank, world = dist.get_rank(), dist.get_world_size()
    batch, seq, steps = spec["batch"], spec["seq"], spec["steps"]
    cfg = _model_cfg(spec["config"], spec["vocab"], seq)
    results = {}
    for stage in spec["stages"]:
        torch.manual_seed(0)
        model = Transformer(cfg)
        es = EngineSpec(OptimSection(lr=1e-4, warmup_steps=0), TrainSection(micro_batch=batch, grad_accum=1),
                        {"zero_optimization": {"stage": int(stage), **ZERO_BENCH}})
        engine, _ = build_engine(es, model)
        del model
        gen = torch.Generator().manual_seed(rank)
        ids = torch.randint(cfg.vocab_size, (batch, seq), generator=gen)
        loss_fn = _loss_fn(engine)
        times = []
        for i in range(steps + 1):                    # the first step is warm-up (allocations, buffers)
            dist.barrier()
            t0 = time.perf_counter()
            loss = loss_fn(ids)
            engine.backward(loss)
            engine.step()
            dist.barrier()
            if i:
                times.append(time.perf_counter() - t0)
        state = torch.tensor([live_tensor_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024])
        gathered = [torch.zeros(2) for _ in range(world)]
        dist.all_gather(gathered, state)
        results[str(stage)] = {"tokens_per_s": batch * seq * world / statistics.median(times),
                               "step_ms": statistics.median(times) * 1e3,
                               "state_mb": [float(g[0]) for g in gathered], "rss_mb": [float(g[1]) for g in gathered]}
        if hasattr(engine, "destroy"):     # frees DeepSpeed's hooks and buffers before the next stage's engine
            engine.destroy()
        del engine, loss_fn
        gc.collect()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)


def part_ranks(args) -> list[dict]:
    from mmfm.train.engine import REPO_ROOT, _free_port

    records = []
    stages = [int(s) for s in args.stages.split(",")]
    for n in [int(r) for r in args.ranks.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            spec = {"config": args.config, "vocab": args.vocab, "batch": args.batch, "seq": args.seq,
                    "steps": args.steps, "stages": stages, "threads": args.worker_threads}
            sp, out = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
            with open(sp, "w") as f:
                json.dump(spec, f)
            env = {**os.environ, "OMP_NUM_THREADS": str(args.worker_threads)}
            for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(k, None)
            env.setdefault("PYTHONPATH", REPO_ROOT)
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}",
                   f"--master_port={_free_port()}", "-m", "mmfm.bench.scaling", "--worker", sp, out]
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if p.returncode != 0:
                raise RuntimeError(f"bench scaling: {n}-rank worker failed ({p.returncode}):\n{p.stderr[-3000:]}")
            res = json.load(open(out))
        for stage, r in res.items():
            case = {"part": "ranks", "config": args.config, "ranks": n, "zero": int(stage),
                    "micro_batch": args.batch, "seq": args.seq}
            records.append(record(BENCH, case, f"zero{stage}", tokens_per_s=r["tokens_per_s"], step_ms=r["step_ms"],
                                  state_mb_per_rank=max(r["state_mb"]), rss_mb_per_rank=max(r["rss_mb"])))
    return records


# ----------------------------------------------------------------------------- plain-torch steps
def _steps(model, batches) -> TrainSteps:
    """AdamW training steps of one model on (ids, real-token count) batches, the trainer's loss call."""
    return TrainSteps(model, _loss_fn(model), batches)


def _random_batches(vocab: int, batch: int, seq: int, n: int = 4):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randint(vocab, (batch, seq), generator=gen), batch * seq) for _ in range(n)]


def _token_samples(shards: str, limit: int) -> list:
    import io

    import numpy as np

    from mmfm.data.shards import expand_shards
    from mmfm.data.tario import iter_shard

    out = []
    for url in expand_shards(shards):
        for _, fields in iter_shard(url, lambda *a, **k: None):
            if "npy" in fields:
                out.append(np.load(io.BytesIO(fields["npy"])))
            if len(out) >= limit:
                return out
    return out


def part_pack(args) -> list[dict]:
    """Packed (concat) against padded (one sample per row) on the same samples, same step shape."""
    from mmfm.data.dataset import ShardLoader
    from mmfm.models import Transformer
    from mmfm.train.tokens import synthetic_token_corpus, token_dataset
    from mmfm.vocab import Vocab

    tmp = None
    shards, source = args.shards, args.shards
    if not shards:
        tmp = tempfile.TemporaryDirectory()
        v = Vocab(args.vocab // 4, {"image": args.vocab // 4, "audio": args.vocab // 4})
        synthetic_token_corpus(os.path.join(tmp.name, "shards"), v, n=400)
        shards, source = os.path.join(tmp.name, "shards"), "synthetic (mmfm.train.tokens.synthetic_token_corpus)"
    n_batches = 4
    pad = 0
    packed = []
    for b in ShardLoader(token_dataset(shards, seq_len=args.seq, batch_size=args.batch, pad_id=pad, seed=0,
                                       shuffle_buffer=0, loop=False), num_workers=0):
        if "tokens" in b:
            packed.append((b["tokens"].clamp_max(args.vocab - 1), int((b["segment_ids"] >= 0).sum())))
        if len(packed) == n_batches:
            break
    samples = _token_samples(shards, args.batch * n_batches)
    padded = []
    for i in range(0, len(samples) - args.batch + 1, args.batch):
        ids = torch.full((args.batch, args.seq), pad, dtype=torch.long)
        real = 0
        for r, s in enumerate(samples[i:i + args.batch]):
            s = torch.as_tensor(s[:args.seq], dtype=torch.long).clamp_max(args.vocab - 1)
            ids[r, :len(s)] = s
            real += len(s)
        padded.append((ids, real))
    if tmp is not None:
        tmp.cleanup()
    cfg = _model_cfg(args.config, args.vocab, args.seq)
    torch.manual_seed(0)
    a, b = _steps(Transformer(cfg), packed), _steps(Transformer(cfg), padded)
    interleaved_blocks([a.step, b.step], args.steps)
    case = {"part": "pack", "config": args.config, "batch": args.batch, "seq": args.seq, "shards": source}
    fill = [sum(r for _, r in bs) / (len(bs) * args.batch * args.seq) for bs in (packed, padded)]
    return [record(BENCH, case, "packed", real_tokens_per_s=a.tokens_per_s(), fill=fill[0]),
            record(BENCH, case, "padded", real_tokens_per_s=b.tokens_per_s(), fill=fill[1])]


def part_compile(args) -> list[dict]:
    from mmfm.models import Transformer

    cfg = _model_cfg(args.config, args.vocab, args.seq)
    torch.manual_seed(0)
    eager = Transformer(cfg)
    torch.manual_seed(0)
    compiled_model = Transformer(cfg)
    batches = _random_batches(args.vocab, args.batch, args.seq)
    case = {"part": "compile", "config": args.config, "batch": args.batch, "seq": args.seq}
    e = _steps(eager, batches)
    try:
        c = _steps(torch.compile(compiled_model), batches)
        compile_s = c.step(keep=False)
    except Exception as exc:  # noqa: BLE001 - no C++ compiler, an op inductor cannot trace: say so, keep going
        interleaved_blocks([e.step], args.steps)
        return [record(BENCH, case, "eager", tokens_per_s=e.tokens_per_s()),
                record(BENCH, case, "compiled", tokens_per_s=float("nan"), error=f"{type(exc).__name__}: {exc}"[:300])]
    interleaved_blocks([e.step, c.step], args.steps)
    return [record(BENCH, case, "eager", tokens_per_s=e.tokens_per_s()),
            record(BENCH, case, "compiled", tokens_per_s=c.tokens_per_s(), compile_s=compile_s)]


def part_mfu(args) -> list[dict]:
    from mmfm.models import Transformer

    records = []
    rounds = max(2, args.steps // 2)
    for name in args.mfu_configs.split(","):
        cfg = _model_cfg(name, args.vocab, args.seq)
        torch.manual_seed(0)
        model = Transformer(cfg)
        params = sum(p.numel() for p in model.parameters())
        fpt = cfg.flops_per_token(args.seq)
        runner = _steps(model, _random_batches(args.vocab, args.mfu_batch, args.seq, n=2))
        runner.step(keep=False)
        mfus, peaks, tps = [], [], []
        for _ in range(rounds):
            peak = matmul_peak(args.peak_n)
            runner.reset()
            for _ in range(2):
                runner.step()
            peaks.append(peak)
            tps.append(runner.tokens_per_s())
            mfus.append(fpt * tps[-1] / peak)
        case = {"part": "mfu", "config": name, "params_m": round(params / 1e6, 1), "batch": args.mfu_batch,
                "seq": args.seq, "threads": torch.get_num_threads()}
        records.append(record(BENCH, case, "fp32", mfu=statistics.median(mfus), tokens_per_s=statistics.median(tps),
                              peak_gflops=statistics.median(peaks) / 1e9, flops_per_token=fpt))
        del model, runner
        gc.collect()
    return records


# ----------------------------------------------------------------------------- the Trainer on a device
def trainer_run(args) -> list[dict]:
    """`--trainer-run`: the Trainer (mmfm pretrain's step: mmfm/train/loop.py ObjectiveStep, DeepSpeed,
    concat packing into full rows) on synthetic token shards, no checkpoints, under torchrun or
    alone; rank 0 returns one record: tokens/s and MFU (medians over the log windows after the
    first, which holds the warm-up) against a matmul peak measured here, peak memory, first and
    last loss. tools/gpu_check.sh's training stage runs it on CUDA (llama_1b, bf16, flash-attn when
    importable); the tests run it on the CPU with the tiny config."""
    from mmfm.data.dataset import ShardLoader
    from mmfm.models import build_model, flash_attn_available
    from mmfm.objectives import build_objective
    from mmfm.train.config import load_run_config, resolve_vocab_size
    from mmfm.train.engine import spec_of
    from mmfm.train.loop import ObjectiveStep
    from mmfm.train.tokens import synthetic_token_corpus, train_token_dataset
    from mmfm.train.trainer import Trainer
    from mmfm.vocab import Vocab

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("mmfm bench train --scaling --trainer-run: --device cuda, but torch sees no CUDA device")
    out = os.path.abspath(args.out or tempfile.mkdtemp(prefix="mmfm_trainer_run_"))
    os.makedirs(out, exist_ok=True)
    model_yaml = args.config if args.config.endswith(".yaml") else packaged_config(f"models/{args.config}.yaml")
    ds_json = packaged_config(f"deepspeed/zero{args.zero}.json")
    with open(os.path.join(out, "run.yaml"), "w") as f:
        f.write(f"""model: {model_yaml}
deepspeed: {ds_json}
data: {{shards: {out}/shards, vocab: {out}/vocab.json, seq_len: {args.seq}, shuffle_buffer: 64, pack: concat}}
optim: {{lr: 1.0e-4, warmup_steps: 2}}
train: {{out: {out}, steps: {args.steps}, micro_batch: {args.batch}, precision: {args.precision},
        log_every: {max(1, args.steps // 5)}, checkpoint_every: 0, progress: false, plot: false}}
""")
    cfg = load_run_config(os.path.join(out, "run.yaml"), list(args.set))
    if cuda:       # before the first NCCL collective: each rank on its own GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    rows: dict[int, dict] = {}
    trainer = Trainer(spec_of(cfg), name="trainer-run", checkpoint_dir=None, logger=lambda step, r: rows.update({step: r}))
    if trainer.rank == 0 and not os.path.exists(os.path.join(out, "shards.done")):
        v = Vocab(args.vocab // 2, {"image": args.vocab // 4, "audio": args.vocab // 4})
        v.save(os.path.join(out, "vocab.json"))
        synthetic_token_corpus(os.path.join(out, "shards"), v, n=args.samples)
        open(os.path.join(out, "shards.done"), "w").close()
    torch.distributed.barrier()
    vocab = Vocab.load(cfg.data.vocab)
    resolve_vocab_size(cfg, vocab)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    peak = matmul_peak(args.peak_n, dtype=dtype, device="cuda" if cuda else "cpu")
    cfg.train.peak_flops = peak
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    params = sum(p.numel() for p in model.parameters())
    objective = build_objective(cfg.objective, vocab)
    step = ObjectiveStep(objective, vocab.modality_table(), list(vocab.modality_names), cfg.data.seq_len,
                         cfg.model.flops_per_token(cfg.data.seq_len), "trainer-run")
    loader = ShardLoader(train_token_dataset(cfg.data, vocab, batch_size=trainer.global_batch, seed=cfg.train.seed),
                         num_workers=0)
    t0 = time.perf_counter()
    res = trainer.fit(model, step, loader)
    wall = time.perf_counter() - t0
    peak_mem = (torch.cuda.max_memory_allocated() if cuda else
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    if trainer.rank != 0:
        return []
    steady = [rows[k] for k in sorted(rows)][1:] or [rows[k] for k in sorted(rows)]
    losses = [res.losses[k] for k in sorted(res.losses)]
    case = {"part": "trainer", "config": args.config, "params_m": round(params / 1e6, 1), "ranks": trainer.world,
            "micro_batch": args.batch, "seq": args.seq, "precision": cfg.train.precision, "zero": args.zero,
            "steps": args.steps, "device": torch.cuda.get_device_name() if cuda else "cpu",
            "attention": "flash-attn" if cuda and flash_attn_available() and cfg.model.attention in ("auto", "flash")
            else "sdpa" if cfg.model.attention != "eager" else "eager"}
    return [record(BENCH, case, "trainer", tokens_per_s=statistics.median(r["tokens_per_s"] for r in steady),
                   mfu=statistics.median(r["mfu"] for r in steady), peak_tflops=peak / 1e12,
                   peak_mem_gib=peak_mem, loss_first=losses[0], loss_last=losses[-1], wall_s=wall)]


PARTS = {"ranks": part_ranks, "pack": part_pack, "compile": part_compile, "mfu": part_mfu}


def _print(records: list[dict]) -> None:
    for r in records:
        case = " ".join(f"{k}={v}" for k, v in r["case"].items() if k != "part")
        figs = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                        if k not in ("bench", "case", "impl"))
        print(f"{r['case']['part']:8s} {r['impl']:9s} {case}  {figs}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmfm bench train --scaling", description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="ranks,pack,compile,mfu", help=f"comma separated, of {', '.join(PARTS)}")
    p.add_argument("--quick", action="store_true", help="tiny sizes: the tiny config, seq 64, 2 steps (a smoke run)")
    p.add_argument("--json", default=None, help="write the records here (docs/records.md)")
    p.add_argument("--config", default="small", help="model config (configs/models/<name>.yaml or a path) of "
                   "the ranks, pack and compile parts")
    p.add_argument("--mfu-configs", default="small,m100", help="model configs of the mfu part, comma separated")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (per rank in the ranks part)")
    p.add_argument("--mfu-batch", type=int, default=8, help="sequences per step of the mfu part")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--steps", type=int, default=None, help="timed steps per side (default 6; 2 with --quick)")
    p.add_argument("--ranks", default="1,2", help="rank counts of the ranks part")
    p.add_argument("--stages", default="1,2,3", help="ZeRO stages of the ranks part")
    p.add_argument("--worker-threads", type=int, default=1, help="torch threads per rank in the ranks part")
    p.add_argument("--peak-n", type=int, default=1024, help="matmul size of the measured peak")
    p.add_argument("--shards", default="", help="token shards of the pack part (e.g. a demo's "
                   "runs/demo/tokens/train-*.tar); default: a synthetic corpus")
    p.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    t = p.add_argument_group("--trainer-run: the Trainer on a device (tools/gpu_check.sh's training stage)")
    t.add_argument("--trainer-run", action="store_true", help="run the Trainer for --steps and report tokens/s, "
                   "MFU and peak memory instead of the parts (under torchrun for several ranks)")
    t.add_argument("--device", default="cpu", help="cpu or cuda")
    t.add_argument("--precision", default="fp32", help="fp32 or bf16")
    t.add_argument("--zero", type=int, default=0, help="ZeRO stage (configs/deepspeed/zero<N>.json)")
    t.add_argument("--samples", type=int, default=2000, help="samples of the synthetic token corpus")
    t.add_argument("--out", default="", help="run folder (config, shards); default: a temporary folder")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="an override of the run config (repeatable), e.g. objective.document_mask=true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        worker(json.load(open(args.worker[0])), args.worker[1])
        return 0
    if args.trainer_run:
        args.steps = args.steps or 50
        records = trainer_run(args)
        _print(records)
        if records:
            write_records(records, args.json)
        return 0
    unknown = [p for p in args.parts.split(",") if p not in PARTS]
    if unknown:
        print(f"mmfm bench train --scaling: --parts: unknown {', '.join(unknown)}; expected some of "
              f"{', '.join(PARTS)}", file=sys.stderr)
        return 2
    if args.quick:
        args.config, args.mfu_configs, args.seq, args.batch, args.mfu_batch = "tiny", "tiny", 64, 2, 2
        args.peak_n = min(args.peak_n, 256)
    args.steps = args.steps or (2 if args.quick else 6)
    print(f"# {machine()}; {args.steps} timed steps per side", file=sys.stderr)
    records = []
    for part in args.parts.split(","):
        t0 = time.perf_counter()
        got = PARTS[part](args)
        print(f"# {part}: {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        _print(got)
        records += got
    write_records(records, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
