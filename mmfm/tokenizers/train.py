"""Tokenizer training as a user of the Trainer (mmfm/train/trainer.py), so that tokenizers train on
the model's DeepSpeed engine and checkpoints and scale to many GPUs the way model training does.

This module supplies what is the tokenizer's own:
  - `engine_spec`: the tokenizer config's `train:` fields as the shared typed sections every
    engine is built from (mmfm/train/engine.py: EngineSpec of OptimSection + TrainSection + the
    DeepSpeed JSON). train.batch_size is the global batch, split evenly over the ranks
    (micro_batch = batch_size / world, no accumulation);
  - `RandomBatches`: the data source, global batches drawn with replacement from the in-memory
    training split by a seeded generator whose state is the source's state_dict;
  - `TokenizerStep`: a micro-batch's loss is the tokenizer's own mean loss over the rank's rows
    (forward(batch) -> StepOutput); the denominator is the number of ranks, so the engine's
    gradient average over ranks is the step of the global batch's mean loss; the step's metrics are
    the tokenizer's (rank 0's rows). Its state_dict holds the state of every torch.Generator the
    tokenizer's modules own (image_1d's nested-dropout draws), so a resumed run sees the same
    batches and draws as an uninterrupted one.

The Trainer owns the rest: engine, learning rate (warmup + cosine, engine.lr_at), gradient
clipping (train.clip), checkpoints (atomic tag folders under <checkpoint_dir> with a `latest`
pointer, the last `keep_last` kept) and exact resume, NaN skipping, the progress bar and the log rows.

Single process with no launcher: a one-rank gloo group (engine.init_distributed); under torchrun
or the deepspeed launcher the launcher's ranks are used.
"""
from __future__ import annotations

from typing import Callable

import torch

from mmfm.tokenizers.config import TrainConfig
from mmfm.train.config import OptimSection, TrainSection
from mmfm.train.engine import EngineSpec, init_distributed
from mmfm.train.trainer import Hooks, Trainer, TrainResult, TrainStep

DEFAULT_DEEPSPEED = {"zero_optimization": {"stage": 0}, "zero_allow_untested_optimizer": True,
                     "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}


def engine_spec(t: TrainConfig, world: int, steps: int, progress: bool = False, config_path: str = "") -> EngineSpec:
    """The tokenizer's `train:` fields as the shared sections. steps: where this stage's cosine ends.
    AdamW's betas are (0.9, 0.999) here, torch's defaults, as tokenizer training has always used."""
    from mmfm.typed_config import ConfigError

    where = f"{config_path}: " if config_path else ""
    if t.batch_size % world:
        raise ConfigError(f"{where}train.batch_size: {t.batch_size} is not divisible by the {world} ranks")
    ds = dict(DEFAULT_DEEPSPEED)
    if t.deepspeed:
        from mmfm.train.config import read_deepspeed

        ds, _ = read_deepspeed(t.deepspeed, f"{where}train.deepspeed")
    optim = OptimSection(lr=t.lr, min_lr_ratio=t.min_lr_ratio, warmup_steps=t.warmup_steps,
                         weight_decay=t.weight_decay, beta1=0.9, beta2=0.999, eps=1e-8, clip=t.clip)
    train = TrainSection(out=t.out, steps=steps, micro_batch=t.batch_size // world, grad_accum=1, seed=t.seed,
                         log_every=t.log_every, checkpoint_every=t.checkpoint_every, keep_last=t.keep_last,
                         progress=progress, threads=t.threads, plot=False)
    return EngineSpec(optim, train, ds, t.deepspeed)


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
        for k, g in _generators(self.model).items():
            if k in state["model_generators"]:
                g.set_state(state["model_generators"][k])


def train_stage(model, t: TrainConfig, data: torch.Tensor, *, steps: int, seed: int, checkpoint_dir: str | None,
                logger: Callable[[int, dict], None] | None = None, progress: bool = False, config_path: str = "",
                hooks: Hooks | None = None) -> TrainResult:
    """Trains the parameters of `model` that require grad (physics' second stage freezes all but the
    refinement) for `steps` steps in all (resuming from checkpoint_dir when it holds a checkpoint),
    on batches of `data` drawn with a generator seeded `seed`."""
    init_distributed()
    world = torch.distributed.get_world_size()
    spec = engine_spec(t, world, steps, progress, config_path)
    trainer = Trainer(spec, name="tokenizer", checkpoint_dir=checkpoint_dir, logger=logger, hooks=hooks)
    batches = RandomBatches(data, t.batch_size, torch.Generator().manual_seed(seed))
    return trainer.fit(model, TokenizerStep(model, world), batches)
