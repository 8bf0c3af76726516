"""`mmfm pretrain`: the training loop under DeepSpeed. One function, `run`, read top to bottom.

Per optimizer step:
  1. data: the global batch (micro_batch x world_size x grad_accum packed sequences) from the token
     shards, drawn identically on every rank (mmfm/train/tokens.py);
  2. the objective prepares inputs, labels and masks for the whole global batch with one seeded
     torch.Generator, and the loss denominator (weighted label count) of the whole global batch;
  3. each micro-step a, rank r takes rows (a * world + r) * micro_batch ...; the engine computes the
     loss through the model's fused head (model_loss_and_report -> Transformer.loss: no
     [tokens, vocab] logits, mmfm/ops/linear_cross_entropy.py); its loss is its
     weighted CE sum x world x accum / denominator, so after DeepSpeed's 1/accum scaling and
     gradient averaging over ranks the gradient is that of the global batch's weighted mean loss,
     exactly as a 1-rank run at the same global batch computes it;
  4. non-finite loss on any rank (all-reduced flag): that micro-batch backpropagates zero and the
     step's learning rate is set to 0, so the weights do not change; the step is counted as
     skipped; train.max_bad_steps consecutive skips stop the run with a message (exit status 3);
  5. lr = warmup + cosine of the step index (engine.lr_at), written into the optimizer's groups
     before the boundary engine.step(); DeepSpeed clips gradients (optim.clip).

Checkpoints (mmfm/train/checkpoint.py) every train.checkpoint_every steps, at the end, and on
SIGTERM/SIGINT (flag all-reduced each step, so every rank saves the same step). Resume is automatic
when <out>/checkpoints/latest exists.

Fault injection for tests: MMFM_FAULT_KILL_AT_STEP=k sends SIGKILL to the process after step k;
MMFM_FAULT_NAN_STEPS=3,4 treats those steps' losses as NaN.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time

import torch

from mmfm.train import checkpoint as ckpt
from mmfm.train.config import RunConfig, output_dir, resolve_vocab_size
from mmfm.train.engine import build_engine, init_distributed, lr_at, measure_peak_flops, zero_stage


class TrainingStopped(RuntimeError):
    """Too many consecutive non-finite steps."""


def _allreduce(t: torch.Tensor, op=torch.distributed.ReduceOp.SUM) -> torch.Tensor:
    torch.distributed.all_reduce(t, op=op)
    return t


def evaluate(engine, batches, vocab, table, objective=None) -> dict:
    """Per-modality loss of the run's objective (default: next token) on fixed held-out sequences,
    with the objective's random choices (masked positions, budgets, prefix lengths) drawn from a
    fixed seed so that evaluations at different steps see the same inputs and targets. Every rank
    evaluates all of them: collective-safe under ZeRO-3, identical results."""
    from mmfm.objectives import ObjectiveConfig, build_objective, model_loss_and_report

    ar = objective or build_objective(ObjectiveConfig(kind="ar"), vocab)
    gen = torch.Generator().manual_seed(1234)
    G = len(vocab.modality_names)
    sums, counts = torch.zeros(G, dtype=torch.float64), torch.zeros(G, dtype=torch.float64)
    engine.eval()
    with torch.no_grad():
        for ids, valid in batches:
            mods = table[ids]
            p = ar.prepare(ids, mods, valid, gen)
            _, s, c = model_loss_and_report(engine, p, ar.weights)
            sums += s
            counts += c
    engine.train()
    out = {f"eval_loss_{n}": float(sums[i] / counts[i]) for i, n in enumerate(vocab.modality_names) if counts[i] > 0}
    out["eval_loss"] = float(sums.sum() / counts.sum().clamp_min(1))
    return out


def eval_batches(cfg: RunConfig, vocab) -> list:
    if not cfg.data.eval_shards:
        return []
    from mmfm.data.dataset import ShardLoader
    from mmfm.train.tokens import token_dataset

    ds = token_dataset(cfg.data.eval_shards, seq_len=cfg.data.seq_len, batch_size=cfg.train.micro_batch,
                       pad_id=vocab.pad_id, seed=0, shuffle_buffer=0, loop=False)
    out, n = [], 0
    for b in ShardLoader(ds, num_workers=0):
        if "tokens" not in b:
            continue
        out.append((b["tokens"], b["segment_ids"] >= 0))
        n += len(b["tokens"])
        if n >= cfg.data.eval_sequences:
            break
    return out


def run(cfg: RunConfig, prepare_model=None, log=None) -> dict:
    """Trains per cfg; returns {"losses": {step: loss}, "eval_start", "eval_end", "out", "stopped_by"}.
    prepare_model(model) -> model, if given, runs before the engine (fine-tuning: LoRA, freezing)."""
    from mmfm.data.dataset import ShardLoader
    from mmfm.models import build_model
    from mmfm.objectives import build_objective, model_loss_and_report
    from mmfm.train.tokens import token_dataset
    from mmfm.vocab import Vocab

    init_distributed()
    dist = torch.distributed
    rank, world = dist.get_rank(), dist.get_world_size()
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True) if rank == 0 else None)
    vocab = Vocab.load(cfg.data.vocab)
    resolve_vocab_size(cfg, vocab)
    table = vocab.modality_table()
    out = output_dir(cfg)
    ckdir = os.path.join(out, "checkpoints")
    os.makedirs(out, exist_ok=True)

    torch.manual_seed(t.seed)                     # the same initial weights on every rank
    model = build_model(cfg.model)
    if t.init_from:
        ckpt.load_state_into(model, t.init_from)
    if prepare_model is not None:
        model = prepare_model(model)
    engine, _ = build_engine(cfg, model)
    dtype = torch.bfloat16 if t.precision == "bf16" else torch.float32
    objective = build_objective(cfg.objective, vocab)
    weights = objective.weights
    gen = torch.Generator().manual_seed(t.seed + 1)
    gbatch = t.micro_batch * world * t.grad_accum
    loader = ShardLoader(token_dataset(cfg.data.shards, seq_len=cfg.data.seq_len, batch_size=gbatch,
                                       pad_id=vocab.pad_id, seed=t.seed, shuffle_buffer=cfg.data.shuffle_buffer),
                         num_workers=0)
    step, skipped, bad_run = 0, 0, 0
    state = ckpt.load(engine, ckdir)
    if state is not None:
        step, skipped, bad_run = state["step"], state["skipped"], state["bad_run"]
        loader.load_state_dict(state["data"])
        gen.set_state(state["generator"])
        say(f"[pretrain] resumed from {os.path.join(ckdir, state['tag'])} at step {step}")

    def save():
        return ckpt.save(engine, ckdir, step, {"step": step, "skipped": skipped, "bad_run": bad_run,
                                                "data": loader.state_dict(), "generator": gen.get_state()},
                         t.keep_last)

    logger = None
    if rank == 0:
        from mmfm.train.metrics import JsonlLogger

        logger = JsonlLogger(os.path.join(out, "metrics.jsonl"), os.path.join(out, "tb"))
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump({**cfg.to_dict(), "world_size": world, "zero_stage": zero_stage(cfg)}, f, indent=1)
    peak = t.peak_flops or measure_peak_flops(dtype)
    flops_tok = cfg.model.flops_per_token(cfg.data.seq_len)
    evals = eval_batches(cfg, vocab)
    result = {"losses": {}, "out": out, "stopped_by": None, "eval_start": None, "eval_end": None}
    if evals:
        result["eval_start"] = evaluate(engine, evals, vocab, table, objective)
        if logger:
            logger(step, result["eval_start"])
        say(f"[pretrain] held-out loss at step {step}: {_fmt(result['eval_start'])}")

    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signal.Signals(signum).name

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    nan_steps = {int(x) for x in os.environ.get("MMFM_FAULT_NAN_STEPS", "").split(",") if x}
    kill_at = int(os.environ.get("MMFM_FAULT_KILL_AT_STEP", "0") or 0)
    bar = None
    if t.progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=t.steps, initial=step, desc="pretrain", unit="step", file=sys.stderr)
    it = iter(loader)
    G = len(vocab.modality_names)
    window = {"tokens": 0, "time": 0.0, "data": 0.0}
    try:
        while step < t.steps:
            t0 = time.perf_counter()
            batch = next(it)
            while "tokens" not in batch:        # a trailer between epochs
                batch = next(it)
            t_data = time.perf_counter() - t0
            ids, valid = batch["tokens"], batch["segment_ids"] >= 0
            prep = objective.prepare(ids, table[ids], valid, gen)
            has = prep.labels != -100
            den = float((weights[prep.label_mod] * has).sum())
            sums, counts = torch.zeros(G, dtype=torch.float64), torch.zeros(G, dtype=torch.float64)
            wsum = torch.zeros(1, dtype=torch.float64)
            finite_all = True
            lr = lr_at(step, cfg.optim.lr, cfg.optim.warmup_steps, t.steps, cfg.optim.min_lr_ratio)
            for a in range(t.grad_accum):
                r0 = (a * world + rank) * t.micro_batch
                rows = slice(r0, r0 + t.micro_batch)
                mask = None if prep.attn_mask is None else prep.attn_mask[rows]
                sub = type(prep)(prep.input_ids[rows], prep.modality_ids[rows], prep.labels[rows],
                                 prep.label_mod[rows], mask)
                # the fused output projection + cross-entropy (Transformer.loss); no logits materialised
                local_sum, s, c = model_loss_and_report(engine, sub, weights, denominator=1.0)
                loss = local_sum * (world * t.grad_accum) / max(den, 1e-8)
                ok = torch.tensor([1.0 if bool(torch.isfinite(loss)) and step + 1 not in nan_steps else 0.0])
                ok = _allreduce(ok, torch.distributed.ReduceOp.MIN)
                if ok.item() < 1:
                    finite_all = False
                    loss = local_sum.nan_to_num(0.0) * 0.0   # zero gradients, same graph
                else:
                    sums += s
                    counts += c
                    wsum += float(local_sum.detach())
                engine.backward(loss)
                if a == t.grad_accum - 1:
                    for g in engine.optimizer.param_groups:
                        g["lr"] = lr if finite_all else 0.0
                engine.step()
            step += 1
            sums, counts, wsum = _allreduce(sums), _allreduce(counts), _allreduce(wsum)
            dt = time.perf_counter() - t0
            tokens = gbatch * cfg.data.seq_len
            window["tokens"] += tokens
            window["time"] += dt
            window["data"] += t_data
            if finite_all:
                bad_run = 0
                loss_val = float(wsum / max(den, 1e-8))
                result["losses"][step] = loss_val
            else:
                skipped += 1
                bad_run += 1
                loss_val = float("nan")
                say(f"[pretrain] step {step}: non-finite loss, step skipped ({bad_run} in a row, {skipped} in all)")
                if bad_run >= t.max_bad_steps:
                    raise TrainingStopped(f"{bad_run} consecutive steps had a non-finite loss (train.max_bad_steps = "
                                          f"{t.max_bad_steps}); stopping. Lower optim.lr, check the data, or resume "
                                          "from the last checkpoint")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_val:.4f}")
            if step % t.log_every == 0 or step == t.steps:
                gn = engine.get_global_grad_norm()
                tps = window["tokens"] / max(window["time"], 1e-9)
                row = {"loss": loss_val, "lr": lr if finite_all else 0.0,
                       "grad_norm": float(gn) if gn is not None else float("nan"),
                       "tokens_per_s": tps, "mfu": flops_tok * tps / (peak * world),
                       "data_wait_frac": window["data"] / max(window["time"], 1e-9),
                       "step_s": window["time"] / max(1, t.log_every if step % t.log_every == 0 else 1),
                       "skipped_steps": skipped}
                for i, n in enumerate(vocab.modality_names):
                    if counts[i] > 0:
                        row[f"loss_{n}"] = float(sums[i] / counts[i])
                if logger:
                    logger(step, row)
                window = {"tokens": 0, "time": 0.0, "data": 0.0}
            if evals and t.eval_every and step % t.eval_every == 0 and step < t.steps:
                ev = evaluate(engine, evals, vocab, table, objective)
                if logger:
                    logger(step, ev)
            if kill_at and step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            sig = torch.tensor([1.0 if stop["signal"] else 0.0])
            if _allreduce(sig, torch.distributed.ReduceOp.MAX).item() > 0:
                result["stopped_by"] = stop["signal"] or "signal on another rank"
                say(f"[pretrain] {result['stopped_by']}: saving a checkpoint at step {step} and stopping")
                save()
                break
            if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.steps:
                save()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if bar is not None:
            bar.close()
    if evals and result["stopped_by"] is None:
        result["eval_end"] = evaluate(engine, evals, vocab, table, objective)
        if logger:
            logger(step, result["eval_end"])
        say(f"[pretrain] held-out loss at step {step}: {_fmt(result['eval_end'])}")
    if rank == 0:
        _finish(out, result, t.plot)
    if logger:
        logger.close()
    result["engine"] = engine
    result["step"] = step
    return result


def _fmt(ev: dict) -> str:
    return ", ".join(f"{k.replace('eval_loss_', '').replace('eval_loss', 'all')} {v:.3f}" for k, v in ev.items())


def _finish(out: str, result: dict, plot: bool = True) -> None:
    from mmfm.train.metrics import loss_plot

    rows = []
    p = os.path.join(out, "metrics.jsonl")
    if os.path.exists(p):
        with open(p) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    series = {}
    for key in sorted({k for r in rows for k in r if k == "loss" or k.startswith("loss_")}):
        pts = [(r["step"], r[key]) for r in rows if key in r and "tokens_per_s" in r]
        if pts:
            series[key] = ([s for s, _ in pts], [v for _, v in pts])
    if series and plot:
        loss_plot(os.path.join(out, "loss_curve.png"), series, "training loss (total and per modality)")
    summary = {k: v for k, v in result.items() if k not in ("engine",)}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
