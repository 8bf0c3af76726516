"""Tokenizer training on the model's DeepSpeed engine and checkpoints (mmfm/train/engine.py,
mmfm/train/checkpoint.py), so that tokenizer training scales to many GPUs the way model training does.

One `TrainLoop` per training stage. Per step: every rank draws the same global batch from the
seeded generator and takes its rows (rank r: rows r*mb .. (r+1)*mb, mb = batch_size / world);
the engine averages gradients over ranks, so the step is that of the global batch's mean loss;
the learning rate (warmup + cosine, engine.lr_at) is written into the optimizer's groups before
engine.step(), which clips gradients (train.clip).

Checkpoints are the model's: atomic tag folders under <checkpoint_dir> with a `latest` pointer,
the last `keep_last` kept. Each holds the engine's model and optimizer state plus the step, the
batch generator's state and the state of any torch.Generator the tokenizer owns (image_1d's
nested-dropout draws), so a resumed run sees the same batches and draws as an uninterrupted one.

Single process with no launcher: a one-rank gloo group (engine.init_distributed); under torchrun
or the deepspeed launcher the launcher's ranks are used.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

DEFAULT_DEEPSPEED = {"zero_optimization": {"stage": 0}, "zero_allow_untested_optimizer": True,
                     "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}


@dataclass
class _Optim:
    """The fields of mmfm.train.config.OptimSection that build_engine reads."""
    lr: float
    weight_decay: float
    clip: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8


@dataclass
class _Train:
    micro_batch: int
    grad_accum: int = 1
    precision: str = "fp32"
    offload_optimizer: bool = False


@dataclass
class EngineConfig:
    """What mmfm.train.engine.build_engine needs, filled from a tokenizer TrainConfig."""
    optim: _Optim
    train: _Train
    deepspeed: dict = field(default_factory=lambda: dict(DEFAULT_DEEPSPEED))
    deepspeed_path: str = ""


def engine_config(t, world: int, config_path: str = "") -> EngineConfig:
    """t: a tokenizer TrainConfig. Its batch_size is the global batch, split evenly over the ranks."""
    from mmfm.tokenizers.config import ConfigError

    where = f"{config_path}: " if config_path else ""
    if t.batch_size % world:
        raise ConfigError(f"{where}train.batch_size: {t.batch_size} is not divisible by the {world} ranks")
    ds = dict(DEFAULT_DEEPSPEED)
    if t.deepspeed:
        from mmfm.train.config import read_deepspeed

        ds, _ = read_deepspeed(t.deepspeed, f"{where}train.deepspeed")
    return EngineConfig(_Optim(t.lr, t.weight_decay, t.clip), _Train(t.batch_size // world), ds, t.deepspeed)


def _generators(model) -> dict[str, torch.Generator]:
    """torch.Generators the tokenizer's modules own (image_1d's nested dropout), by module path."""
    out = {}
    for name, m in model.named_modules():
        for attr, v in vars(m).items():
            if isinstance(v, torch.Generator):
                out[f"{name}.{attr}" if name else attr] = v
    return out


class TrainLoop:
    """Args:
        model: a NeuralTokenizer (forward(batch) -> StepOutput). Only parameters with
            requires_grad train (physics' second stage freezes all but the refinement).
        train: the tokenizer TrainConfig (lr, warmup_steps, min_lr_ratio, clip, batch_size,
            weight_decay, keep_last, deepspeed).
        batches: iterator of global batches; `generator` is the torch.Generator it draws from
            (saved in checkpoints so that resume continues the same sequence), or None.
        checkpoint_dir: folder for the checkpoints (None: no checkpoints).
        log: callable(step, metrics dict) for the JSONL / TensorBoard loggers (rank 0), or None.
        config_path: the YAML file, for error messages.
    The cosine schedule ends at the `steps` given to run().
    """

    def __init__(self, model, train, batches: Iterator[torch.Tensor], checkpoint_dir: str | None = None,
                 generator: torch.Generator | None = None, log: Callable[[int, dict], None] | None = None,
                 config_path: str = ""):
        from mmfm.train.engine import build_engine, init_distributed

        init_distributed()
        self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.model, self.t, self.batches = model, train, batches
        self.checkpoint_dir, self.generator = checkpoint_dir, generator
        self.log = log if self.rank == 0 else None
        self.engine, _ = build_engine(engine_config(train, self.world, config_path), model)
        self.step_count = 0
        self._saved = -1             # the step of the newest checkpoint, never rewritten in place

    def step(self, batch: torch.Tensor, total: int) -> dict:
        from mmfm.train.engine import lr_at

        mb = batch.shape[0] // self.world
        rows = batch[self.rank * mb:(self.rank + 1) * mb] if self.world > 1 else batch
        self.engine.train()
        out = self.engine(rows)
        self.engine.backward(out.loss)
        lr = lr_at(self.step_count, self.t.lr, self.t.warmup_steps, total, self.t.min_lr_ratio)
        for g in self.engine.optimizer.param_groups:
            g["lr"] = lr
        self.engine.step()
        self.step_count += 1
        loss = out.loss.detach().clone()
        if self.world > 1:
            torch.distributed.all_reduce(loss)
            loss /= self.world
        return {"loss": float(loss), "lr": lr, **out.metrics}

    def run(self, steps: int, log_every: int = 25, checkpoint_every: int = 0, progress: bool = False) -> list[dict]:
        """Train until `steps` total steps (counting steps done before a resume). Returns the logged rows."""
        rows = []
        bar = None
        if progress and self.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=steps, initial=self.step_count, desc="train", unit="step", file=sys.stderr)
        t0 = time.perf_counter()
        while self.step_count < steps:
            metrics = self.step(next(self.batches), steps)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            if self.step_count % log_every == 0 or self.step_count == steps:
                metrics["seconds"] = time.perf_counter() - t0
                rows.append({"step": self.step_count, **metrics})
                if self.log is not None:
                    self.log(self.step_count, metrics)
            if checkpoint_every and self.step_count % checkpoint_every == 0:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        self.save_checkpoint()
        return rows

    def save_checkpoint(self) -> None:
        from mmfm.train import checkpoint as ckpt

        if not self.checkpoint_dir or self._saved == self.step_count:
            return
        state = {"step": self.step_count,
                 "generator": self.generator.get_state() if self.generator is not None else None,
                 "model_generators": {k: g.get_state() for k, g in _generators(self.model).items()}}
        ckpt.save(self.engine, self.checkpoint_dir, self.step_count, state, self.t.keep_last)
        self._saved = self.step_count

    def load_checkpoint(self) -> bool:
        """Resume from the newest complete checkpoint in checkpoint_dir, if any; returns whether it did."""
        from mmfm.train import checkpoint as ckpt

        if not self.checkpoint_dir:
            return False
        state = ckpt.load(self.engine, self.checkpoint_dir)
        if state is None:
            return False
        if self.generator is not None and state["generator"] is not None:
            self.generator.set_state(state["generator"])
        for k, g in _generators(self.model).items():
            if k in state["model_generators"]:
                g.set_state(state["model_generators"][k])
        self.step_count = self._saved = int(state["step"])
        return True
