"""The tokenizer training loop: plain PyTorch, small enough to hold in your head.

THE SEAM FOR THE TRAINING ENGINE. The issue asks tokenizers to train with the same engine and
checkpointing as the model. That engine (DeepSpeed ZeRO, issue 6) does not exist yet, so this
is a plain single-process loop with the same three duties, each behind one small method:

    step(batch)        forward, backward, optimizer step          -> engine.backward / engine.step
    save_checkpoint()  atomic: write <dir>/ckpt.tmp, os.replace    -> engine.save_checkpoint
    load_checkpoint()  model, optimizer, step, data-RNG state       -> engine.load_checkpoint

When the engine lands, a subclass overrides those three and nothing else changes: the model is
any NeuralTokenizer (forward(batch) -> StepOutput with .loss), the data is any iterator of
batches whose state is a torch.Generator (or a ShardLoader's state_dict).

Resume is exact: the checkpoint holds the model, the optimizer, the step and the state of the
generator that draws the batches, so the resumed run sees the same batches as an uninterrupted one.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Iterator

import torch

CHECKPOINT = "checkpoint.pt"


class TrainLoop:
    """Args:
        model: a NeuralTokenizer (forward(batch) -> StepOutput).
        optimizer: any torch optimizer over the model's parameters.
        batches: iterator of input batches; `generator` is the torch.Generator it draws from
            (saved in checkpoints so that resume continues the same sequence), or None.
        checkpoint_dir: folder for checkpoint.pt (None: no checkpoints).
        log: callable(step, metrics dict) for the JSONL / TensorBoard loggers, or None.
    """

    def __init__(self, model, optimizer, batches: Iterator[torch.Tensor], checkpoint_dir: str | None = None,
                 generator: torch.Generator | None = None, log: Callable[[int, dict], None] | None = None):
        self.model, self.optimizer, self.batches = model, optimizer, batches
        self.checkpoint_dir, self.generator, self.log = checkpoint_dir, generator, log
        self.step_count = 0

    def step(self, batch: torch.Tensor) -> dict:
        self.model.train()
        out = self.model(batch)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.step_count += 1
        return {"loss": float(out.loss.detach()), **out.metrics}

    def run(self, steps: int, log_every: int = 25, checkpoint_every: int = 0, progress: bool = False) -> list[dict]:
        """Train until `steps` total steps (counting steps done before a resume). Returns the logged rows."""
        rows = []
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=steps, initial=self.step_count, desc="train", unit="step")
        t0 = time.perf_counter()
        while self.step_count < steps:
            metrics = self.step(next(self.batches))
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
        if self.checkpoint_dir:
            self.save_checkpoint()
        return rows

    # -- checkpointing: the part the DeepSpeed engine will replace ---------------------------
    def checkpoint_path(self) -> str:
        return os.path.join(self.checkpoint_dir, CHECKPOINT)

    def save_checkpoint(self) -> None:
        if not self.checkpoint_dir:
            return
        os.makedirs(self.checkpoint_dir, exist_ok=True)
        state = {"step": self.step_count, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "generator": self.generator.get_state() if self.generator is not None else None}
        tmp = self.checkpoint_path() + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint_path())  # a crash mid-write leaves the previous checkpoint intact

    def load_checkpoint(self) -> bool:
        """Resume from checkpoint_dir if it holds a checkpoint; returns whether it did."""
        if not self.checkpoint_dir or not os.path.exists(self.checkpoint_path()):
            return False
        # weights_only: tensors, dicts and numbers only, never arbitrary pickled objects
        state = torch.load(self.checkpoint_path(), map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.generator is not None and state["generator"] is not None:
            self.generator.set_state(state["generator"])
        self.step_count = int(state["step"])
        return True


class JsonlLogger:
    """Appends {"step": s, **metrics} lines to a JSONL file and, if available, to TensorBoard."""

    def __init__(self, path: str, tensorboard_dir: str | None = None):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.tb = None
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(tensorboard_dir)
            except ImportError:  # tensorboard is a dependency, but the loop must not need it
                self.tb = None

    def __call__(self, step: int, metrics: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
