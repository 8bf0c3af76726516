"""The Trainer: the one training loop under DeepSpeed, for every kind of training in mmfm.

A training kind (pretraining and fine-tuning: mmfm/train/loop.py; cache augmentation:
mmfm/cacheaug/train.py; neural tokenizers: mmfm/tokenizers/train.py) supplies a `TrainStep` (how to
turn the global batch into a loss for some of its rows, and what to report) and, optionally,
evaluators. The Trainer owns everything else, so that it is written and tested once:

  - distributed init (engine.init_distributed: one-process gloo group without a launcher);
  - the DeepSpeed engine (engine.build_engine from an EngineSpec);
  - data-parallel row slicing: every rank draws the same global batch (micro_batch x world x
    grad_accum rows) from the data source; at micro-step a, rank r takes rows
    (a * world + r) * micro_batch ... + micro_batch;
  - the loss scaling: the step returns its rows' loss numerator (e.g. the weighted CE sum) and
    the global batch's denominator (e.g. the weighted label count of the whole global batch); the
    engine backpropagates numerator x world x accum / denominator, so after DeepSpeed's 1/accum
    scaling and gradient averaging over ranks the gradient is that of the global batch's loss,
    exactly as a 1-rank run at the same global batch computes it;
  - the learning rate: warmup + cosine of the step index (engine.lr_at), written into the
    optimizer's groups before the boundary engine.step(); DeepSpeed clips (optim.clip);
  - non-finite losses: a flag all-reduced per micro-step; a non-finite micro-batch backpropagates
    zero and the step's learning rate is 0, so the weights do not change; the step counts as
    skipped; train.max_bad_steps consecutive skips raise TrainingStopped;
  - checkpoints (mmfm/train/checkpoint.py) every train.checkpoint_every steps, at the end and on
    SIGTERM/SIGINT (flag all-reduced each step, so every rank saves the same step), holding the
    counters, the data source's state_dict, the step's generator and the step's own state_dict;
    resume is automatic when the checkpoint folder has a `latest`;
  - logging on rank 0: one JSONL + TensorBoard row every train.log_every steps (loss, lr, grad
    norm, tokens/s and MFU when the step says how many tokens a row holds, data-wait fraction,
    step time, skipped steps, plus the step's own metrics); the tqdm progress bar;
  - evaluation: every evaluator (engine, step) -> {metric: value} runs on every rank at the start,
    every train.eval_every steps and at the end; their merged dict is logged;
  - fault injection through `Hooks`, an object a test passes in (kill after a step, inside a
    checkpoint write, or make a step's loss NaN), instead of environment variables.

Why a class with a `fit` and not a loop per kind: the three loops this replaces had drifted apart
(only pretraining skipped NaN steps, stopped on signals or measured MFU; only the tokenizer loop
saved the generators its model owns); one loop gives every kind the same guarantees.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

import torch

from mmfm.jsonio import write_json
from mmfm.train import checkpoint as ckpt
from mmfm.train.metrics import peak_memory
from mmfm.train.engine import EngineSpec, PeakFlops, autocast, build_engine, init_distributed, lr_at

Evaluator = Callable[[Any, int], dict]   # (engine, step) -> {metric name: number}


class TrainingStopped(RuntimeError):
    """Too many consecutive non-finite steps."""


class ResumableData(Protocol):
    """A data source: iterable over global batches, whose position is its state_dict (saved in every
    checkpoint, loaded before iteration starts on resume). mmfm.data's ShardLoader is one."""

    def __iter__(self): ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class TrainStep:
    """What a training kind supplies. Subclass and override prepare, denominator and micro; the
    rest has defaults.

    tokens_per_row: tokens in one row of the global batch (sequence length), for tokens/s; 0 = none.
    flops_per_token: model FLOPs per trained token, for MFU (mmfm/train/metrics.py); 0 = none.
    """
    name = "train"
    tokens_per_row = 0
    flops_per_token = 0.0

    def prepare(self, batch, generator: torch.Generator):
        """The global batch -> what micro() and denominator() read, identical on every rank (draws
        come from `generator`, which the Trainer seeds and checkpoints); or None to skip a batch that
        holds no rows (a data loader's trailer between epochs)."""
        raise NotImplementedError

    def denominator(self, prepared) -> float:
        """The global batch's loss denominator (> 0): loss = sum of every micro-batch's numerator
        over all ranks / denominator."""
        raise NotImplementedError

    def micro(self, engine, prepared, rows: slice) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Forward these rows of the global batch through the engine ->
        (numerator: a differentiable scalar, report: a float64 vector or None). The reports of the
        finite micro-batches are summed over micro-steps and all-reduced over ranks."""
        raise NotImplementedError

    def metrics(self, prepared, loss: float, report: torch.Tensor | None) -> dict:
        """Extra metrics for the step's log row and progress bar (report: the all-reduced sum)."""
        return {}

    def state_dict(self) -> dict:
        """State the step owns beyond the Trainer's generator (e.g. a tokenizer's own generators)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Hooks:
    """Fault injection and observation. The defaults do nothing; tests subclass.

    on_loss(step, numerator) -> numerator: step is the 1-based index of the step being computed;
        return a NaN to make the Trainer treat that micro-batch as non-finite.
    on_step_end(step): after the step's logging and evaluation, before the signal check and checkpoint.
    on_checkpoint_shards(step): inside a checkpoint save, after this rank's shards are written and
        before COMPLETE / `latest` (mmfm/train/checkpoint.py).
    """

    def on_loss(self, step: int, numerator: torch.Tensor) -> torch.Tensor:
        return numerator

    def on_step_end(self, step: int) -> None:
        pass

    def on_checkpoint_shards(self, step: int) -> None:
        pass


@dataclass
class TrainResult:
    step: int                                   # optimizer steps done (counting those before a resume)
    losses: dict[int, float] = field(default_factory=dict)      # step -> loss, steps run in this process
    metrics: dict[int, dict] = field(default_factory=dict)      # step -> the step's own metrics
    stopped_by: str | None = None               # the signal that stopped the run, if any
    skipped: int = 0                            # non-finite steps skipped in all
    eval_start: dict | None = None
    eval_end: dict | None = None
    engine: Any = None
    resumed_from: str | None = None             # the checkpoint tag this run started from


def _allreduce(t: torch.Tensor, op=torch.distributed.ReduceOp.SUM) -> torch.Tensor:
    torch.distributed.all_reduce(t, op=op)
    return t


class Trainer:
    """Args:
        spec: the engine's typed sections (optimizer, training, DeepSpeed JSON).
        name: the kind, in messages and on the progress bar ("pretrain", "cacheaug", ...).
        checkpoint_dir: where checkpoints go and resume reads from (None: no checkpoints).
        logger: callable(step, metrics dict) for rank 0 (e.g. metrics.JsonlLogger); None: no log rows.
        hooks: a Hooks object (fault injection in tests).
        say: callable(message) for rank 0's messages (default: stderr on rank 0).
    The cosine schedule ends at spec.train.steps."""

    def __init__(self, spec: EngineSpec, *, name: str = "train", checkpoint_dir: str | None = None,
                 logger: Callable[[int, dict], None] | None = None, hooks: Hooks | None = None,
                 say: Callable[[str], None] | None = None):
        init_distributed()
        self.spec, self.name, self.checkpoint_dir = spec, name, checkpoint_dir
        self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        t = spec.train
        if t.threads:
            torch.set_num_threads(t.threads)
        self.logger = logger if self.rank == 0 else None
        self.hooks = hooks or Hooks()
        self.say = say or (lambda msg: print(msg, file=sys.stderr, flush=True) if self.rank == 0 else None)
        self.global_batch = t.micro_batch * self.world * t.grad_accum

    def open_log(self, path: str, tensorboard_dir: str | None = None) -> None:
        """Log rows to a JSONL file and TensorBoard (rank 0; mmfm/train/metrics.py); close_log() ends it."""
        if self.rank == 0:
            from mmfm.train.metrics import JsonlLogger

            self.logger = JsonlLogger(path, tensorboard_dir)

    def close_log(self) -> None:
        close = getattr(self.logger, "close", None)
        if close is not None:
            close()

    def log(self, step: int, row: dict) -> None:
        if self.logger is not None:
            self.logger(step, row)

    def write_record(self, path: str, record: dict) -> None:
        """config.json of a run (rank 0): what was trained, with the number of ranks."""
        if self.rank == 0:
            write_json(path, {**record, "world_size": self.world})

    def evaluate(self, engine, step: int, evaluators: Iterable[Evaluator]) -> dict:
        out = {}
        for ev in evaluators:
            out.update(ev(engine, step))
        engine.train()
        if out:
            self.log(step, out)
        return out

    # ------------------------------------------------------------------------------ the loop
    def fit(self, model, step_fn: TrainStep, data: ResumableData, evaluators: Iterable[Evaluator] = (),
            freeze=None) -> TrainResult:
        """Trains model until spec.train.steps optimizer steps (resuming from checkpoint_dir if it
        holds a checkpoint); returns a TrainResult whose engine holds the final weights. freeze: a
        mmfm.train.freeze.TextFreeze (its hooks already on model), told each step's global index."""
        t, o = self.spec.train, self.spec.optim
        evaluators = list(evaluators)
        engine, _ = build_engine(self.spec, model)
        # the configured decays, before a checkpoint saved inside a freeze window overwrites them with 0
        weight_decay = [g["weight_decay"] for g in engine.optimizer.param_groups]
        gen = torch.Generator().manual_seed(t.seed + 1)
        res = TrainResult(step=0, engine=engine)
        bad_run = 0
        rows_seen = 0           # global batch rows trained so far, over resumes (in the checkpoint, for the log)
        if self.checkpoint_dir:
            state = ckpt.load(engine, self.checkpoint_dir)
            if state is not None:
                # .get: checkpoints of the loops before the Trainer lack the counters and step_state
                res.step, res.skipped, bad_run = state["step"], state.get("skipped", 0), state.get("bad_run", 0)
                data.load_state_dict(state["data"])
                gen.set_state(state["generator"])
                step_fn.load_state_dict(state.get("step_state", {}))
                res.resumed_from = state["tag"]
                rows = rows_seen = state.get("rows", res.step * self.global_batch)
                self.say(f"[{self.name}] resumed from step {res.step} "
                         f"({os.path.join(self.checkpoint_dir, state['tag'])}), global row {rows}")
                if state["saved_world_size"] != self.world:
                    self.say(f"[{self.name}] elastic resume: the checkpoint was written by {state['saved_world_size']} "
                             f"ranks, this run has {self.world}")
                saved_batch = state.get("global_batch", self.global_batch)
                if saved_batch != self.global_batch:
                    # the data continues at the same sample either way (its position counts samples,
                    # not batches); only the optimisation changes, so say it rather than refuse
                    self.say(f"[{self.name}] warning: global batch {self.global_batch} (micro_batch x ranks x "
                             f"grad_accum) differs from the checkpoint's {saved_batch}; set train.grad_accum to "
                             "keep it, or the loss curve will not continue the saved run's")

        def save():
            if self.checkpoint_dir:
                ckpt.save(engine, self.checkpoint_dir, res.step,
                          {"step": res.step, "skipped": res.skipped, "bad_run": bad_run, "data": data.state_dict(),
                           "rows": rows_seen, "global_batch": self.global_batch,
                           "generator": gen.get_state(), "step_state": step_fn.state_dict()},
                          t.keep_last, after_shards=self.hooks.on_checkpoint_shards)

        peak = None
        if step_fn.flops_per_token:
            peak = PeakFlops(t.peak_flops, torch.float32 if t.precision == "fp32" else torch.bfloat16)
        if evaluators:
            res.eval_start = self.evaluate(engine, res.step, evaluators)

        stop = {"signal": None}

        def on_signal(signum, frame):
            stop["signal"] = signal.Signals(signum).name

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        bar = None
        if t.progress and self.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=t.steps, initial=res.step, desc=self.name, unit="step", file=sys.stderr)
        it = iter(data)
        window = {"steps": 0, "tokens": 0, "time": 0.0, "data": 0.0}
        try:
            while res.step < t.steps:
                t0 = time.perf_counter()
                prep = step_fn.prepare(next(it), gen)
                while prep is None:
                    prep = step_fn.prepare(next(it), gen)
                t_data = time.perf_counter() - t0
                lr = lr_at(res.step, o.lr, o.warmup_steps, t.steps, o.min_lr_ratio)
                if freeze is not None:
                    freeze.begin_step(res.step, engine.optimizer, weight_decay)
                loss_val, report, finite = self._step(engine, step_fn, prep, res.step, lr)
                res.step += 1
                rows_seen += self.global_batch
                step = res.step
                window["steps"] += 1
                window["tokens"] += self.global_batch * step_fn.tokens_per_row
                window["time"] += time.perf_counter() - t0
                window["data"] += t_data
                extra = {}
                if finite:
                    bad_run = 0
                    res.losses[step] = loss_val
                    extra = step_fn.metrics(prep, loss_val, report)
                    res.metrics[step] = extra
                else:
                    res.skipped += 1
                    bad_run += 1
                    self.say(f"[{self.name}] step {step}: non-finite loss, step skipped ({bad_run} in a row, "
                             f"{res.skipped} in all)")
                    if bad_run >= t.max_bad_steps:
                        raise TrainingStopped(f"{bad_run} consecutive steps had a non-finite loss (train.max_bad_steps"
                                              f" = {t.max_bad_steps}); stopping. Lower optim.lr, check the data, or "
                                              "resume from the last checkpoint")
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_val:.4f}")
                if step % t.log_every == 0 or step == t.steps:
                    self.log(step, self._row(engine, step_fn, window, loss_val, lr if finite else 0.0, peak,
                                             res.skipped, extra))
                    window = {"steps": 0, "tokens": 0, "time": 0.0, "data": 0.0}
                if evaluators and t.eval_every and step % t.eval_every == 0 and step < t.steps:
                    self.evaluate(engine, step, evaluators)
                self.hooks.on_step_end(step)
                sig = torch.tensor([1.0 if stop["signal"] else 0.0], device=engine.device)
                if _allreduce(sig, torch.distributed.ReduceOp.MAX).item() > 0:
                    res.stopped_by = stop["signal"] or "signal on another rank"
                    self.say(f"[{self.name}] {res.stopped_by}: saving a checkpoint at step {step} and stopping")
                    save()
                    break
                if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.steps:
                    save()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if bar is not None:
                bar.close()
        if evaluators and res.stopped_by is None:
            res.eval_end = self.evaluate(engine, res.step, evaluators)
        return res

    def _step(self, engine, step_fn: TrainStep, prep, index: int, lr: float) -> tuple[float, Any, bool]:
        """One optimizer step over grad_accum micro-steps -> (loss of the global batch, summed report,
        whether every micro-batch on every rank was finite)."""
        t = self.spec.train
        world, rank, accum = self.world, self.rank, t.grad_accum
        den = step_fn.denominator(prep)
        # collectives' tensors live on the engine's device: NCCL takes only CUDA tensors, gloo CPU ones
        dev = engine.device
        wsum = torch.zeros(1, dtype=torch.float64, device=dev)
        report = None
        finite_all = True
        engine.train()
        for a in range(accum):
            r0 = (a * world + rank) * t.micro_batch
            with autocast(self.spec):       # train.precision bf16_autocast; backward runs outside it
                numerator, rep = step_fn.micro(engine, prep, slice(r0, r0 + t.micro_batch))
            injected = self.hooks.on_loss(index + 1, numerator)
            loss = injected * (world * accum) / den
            ok = torch.tensor([1.0 if bool(torch.isfinite(loss)) else 0.0], device=dev)
            if _allreduce(ok, torch.distributed.ReduceOp.MIN).item() < 1:
                finite_all = False
                loss = numerator.nan_to_num(0.0) * 0.0      # zero gradients through the same graph
            else:
                wsum += float(numerator.detach())
                if rep is not None:
                    report = rep.clone() if report is None else report + rep
            engine.backward(loss)
            if a == accum - 1:
                for g in engine.optimizer.param_groups:
                    g["lr"] = lr if finite_all else 0.0
            engine.step()
        wsum = _allreduce(wsum)
        if report is not None:
            report = _allreduce(report)
        return (float(wsum / den) if finite_all else float("nan")), report, finite_all

    def _row(self, engine, step_fn: TrainStep, window: dict, loss: float, lr: float, peak, skipped: int,
             extra: dict) -> dict:
        gn = engine.get_global_grad_norm()
        secs = max(window["time"], 1e-9)
        row = {"loss": loss, "lr": lr, "grad_norm": float(gn) if gn is not None else float("nan")}
        if window["tokens"]:
            tps = window["tokens"] / secs
            row["tokens_per_s"] = tps
            if peak is not None:
                row["mfu"] = peak.mfu(step_fn.flops_per_token * tps / self.world)
                row.update(peak_flops=peak.value, peak_flops_source=peak.source)
        row.update(data_wait_frac=window["data"] / secs, step_s=window["time"] / max(1, window["steps"]),
                   skipped_steps=skipped, **peak_memory(), **extra)
        return row
