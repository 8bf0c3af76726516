"""Tokenizer training as a user of the Trainer (mmfm/train/trainer.py), so that tokenizers train on
the model's DeepSpeed engine and checkpoints and scale to many GPUs the way model training does.

This module supplies what is the tokenizer's own:
  - `engine_spec`: the tokenizer file's sections as the EngineSpec every engine is built from
    (mmfm/train/engine.py): its `optim:` is pretraining's OptimSection and its `deepspeed:` the same
    JSON; its `train:` run fields fill the shared TrainSection, train.batch_size being the global
    batch, split evenly over the ranks (micro_batch = batch_size / world, no accumulation);
  - `RandomBatches`: the data source, global batches drawn with replacement from the in-memory
    training split by a seeded generator whose state is the source's state_dict;
  - `TokenizerStep`: a micro-batch's loss is the tokenizer's own mean loss over the rank's rows
    (forward(batch) -> StepOutput); the denominator is the number of ranks, so the engine's
    gradient average over ranks is the step of the global batch's mean loss; the step's metrics are
    the tokenizer's (rank 0's rows). Its state_dict holds the state of every torch.Generator the
    tokenizer's modules own (image_1d's nested-dropout draws), so a resumed run sees the same
    batches and draws as an uninterrupted one.

The Trainer owns the rest: engine, learning rate (warmup + cosine, engine.lr_at), gradient
clipping (optim.clip), checkpoints (atomic tag folders under <checkpoint_dir> with a `latest`
pointer, the last `keep_last` kept) and exact resume, NaN skipping, the progress bar and the log rows.

Single process with no launcher: a one-rank gloo group (engine.init_distributed); under torchrun
or the deepspeed launcher the launcher's ranks are used.
"""
from __future__ import annotations

from typing import Callable

import torch

from mmfm.tokenizers.config import TokenizerFile
from mmfm.train.config import TrainSection
from mmfm.train.engine import EngineSpec, init_distributed
from mmfm.train.trainer import Hooks, Trainer, TrainResult, TrainStep

def engine_spec(cfg: TokenizerFile, world: int, steps: int, progress: bool = False) -> EngineSpec:
    """The tokenizer file's optim section (pretraining's OptimSection) and its run fields as the
    shared TrainSection: micro_batch = train.batch_size / world, no accumulation. steps: where this
    stage's cosine ends."""
    from mmfm.typed_config import ConfigError

    t = cfg.train
    if t.batch_size % world:
        where = f"{cfg.path}: " if cfg.path else ""
        raise ConfigError(f"{where}train.batch_size: {t.batch_size} is not divisible by the {world} ranks")
    train = TrainSection(out=t.out, steps=steps, micro_batch=t.batch_size // world, grad_accum=1, seed=t.seed,
                         log_every=t.log_every, checkpoint_every=t.checkpoint_every, keep_last=t.keep_last,
                         progress=progress, threads=t.threads, plot=False)
    return EngineSpec(cfg.optim, train, cfg.deepspeed, cfg.deepspeed_path)


class RandomBatches:
    """Endless global batches drawn with replacement from `data` (min(batch_size, N) rows each); the
    generator's state is the source's state_dict."""

    def __init__(self, data: torch.Tensor, batch_size: int, generator: torch.Generator):
        self.data, self.batch_size, self.generator = data, batch_size, generator

    def __iter__(self):
        n = self.data.shape[0]
        while True:
            yield self.data[torch.randint(n, (min(self.batch_size, n),), generator=self.generator)]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def _generators(model) -> dict[str, torch.Generator]:
    """torch.Generators the tokenizer's modules own (image_1d's nested dropout), by module path."""
    out = {}
    for name, m in model.named_modules():
        for attr, v in vars(m).items():
            if isinstance(v, torch.Generator):
                out[f"{name}.{attr}" if name else attr] = v
    return out


class TokenizerStep(TrainStep):
    """A NeuralTokenizer's step (forward(batch) -> StepOutput with .loss and .metrics)."""
    name = "tokenizer"

    def __init__(self, model, world: int):
        self.model, self.world, self.last = model, world, {}

    def prepare(self, batch, generator):
        return batch

    def denominator(self, batch) -> float:
        return float(self.world)      # the mean of the ranks' row means: the global batch's mean

    def micro(self, engine, batch, rows):
        out = engine(batch[rows])
        self.last = out.metrics
        return out.loss, None

    def metrics(self, batch, loss, report) -> dict:
        return dict(self.last)

    def state_dict(self) -> dict:
        return {"model_generators": {k: g.get_state() for k, g in _generators(self.model).items()}}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("model_generators", {})
        for k, g in _generators(self.model).items():
            if k in saved:
                g.set_state(saved[k])


def train_stage(model, cfg: TokenizerFile, data: torch.Tensor, *, steps: int, seed: int,
                checkpoint_dir: str | None, logger: Callable[[int, dict], None] | None = None, progress: bool = False,
                hooks: Hooks | None = None) -> TrainResult:
    """Trains the parameters of `model` that require grad (physics' second stage freezes all but the
    refinement) for `steps` steps in all (resuming from checkpoint_dir when it holds a checkpoint),
    on batches of `data` (cfg.train.batch_size rows) drawn with a generator seeded `seed`."""
    init_distributed()
    world = torch.distributed.get_world_size()
    trainer = Trainer(engine_spec(cfg, world, steps, progress), name="tokenizer", checkpoint_dir=checkpoint_dir,
                      logger=logger, hooks=hooks)
    batches = RandomBatches(data, cfg.train.batch_size, torch.Generator().manual_seed(seed))
    return trainer.fit(model, TokenizerStep(model, world), batches)
