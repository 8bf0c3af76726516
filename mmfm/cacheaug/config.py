"""Typed cache-augmentation configs (configs/cacheaug/<name>.yaml) with `section.field=value` overrides.

    decoder: runs/demo/export                 # the frozen decoder (an export folder); --decoder overrides
    deepspeed: ../deepspeed/zero2.json        # plain DeepSpeed JSON (relative to this file), as for pretraining
    coprocessor: {num_latents: 16}            # CoprocessorSection
    data: {...}                               # AugDataSection: token shards, points per sequence, ahead tokens
    optim: {...}                              # mmfm.train.config.OptimSection (AdamW, warmup + cosine)
    train: {...}                              # mmfm.train.config.TrainSection (steps, batch, checkpoints)

The optimizer and training sections are pretraining's own typed sections, so the engine and the
Trainer take this config as they take pretraining's (mmfm/train/engine.py: spec_of). Unknown or ill-typed fields stop with the file and field named.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from mmfm.train.config import OptimSection, TrainSection, apply_overrides, read_deepspeed
from mmfm.typed_config import ConfigError, from_dict, packaged_config, read_sections

SECTIONS = ("decoder", "deepspeed", "coprocessor", "data", "optim", "train")


@dataclass
class CoprocessorSection:
    num_latents: int = 16       # N latent embeddings appended to the decoder's cache per augmentation
    latent_group: int = 0       # modality group of the soft tokens and latents (modality-sparse decoders only)
    init_seed: int = 0          # which vocabulary rows the soft tokens start from


@dataclass
class AugDataSection:
    shards: str = ""            # token shards (mmfm/train/tokens.py), packed into seq_len sequences
    vocab: str = ""             # vocab.json ("" = the decoder folder's vocab.json)
    seq_len: int = 256
    shuffle_buffer: int = 64
    points: int = 4             # augmentation points drawn per sequence
    ahead: int = 8              # tokens scored after each point
    min_prefix: int = 8         # a point leaves at least this many tokens before it
    modalities: list[str] = field(default_factory=lambda: ["text"])  # ahead tokens must lie in these ([] = any)


@dataclass
class AugConfig:
    decoder: str
    deepspeed: dict
    coprocessor: CoprocessorSection
    data: AugDataSection
    optim: OptimSection
    train: TrainSection
    path: str = ""
    deepspeed_path: str = ""

    def to_dict(self) -> dict:
        d = {k: dataclasses.asdict(getattr(self, k)) for k in ("coprocessor", "data", "optim", "train")}
        return {"decoder": self.decoder, "deepspeed": self.deepspeed, **d}


def load_aug_config(path, overrides: list[str] | None = None, decoder: str | None = None) -> AugConfig:
    path = str(path)
    raw = apply_overrides(read_sections(path, SECTIONS, files=("deepspeed",)), overrides or [], path, SECTIONS)
    dec = decoder if decoder is not None else raw.get("decoder", "")
    if not isinstance(dec, str) or not dec:
        raise ConfigError(f"{path}: decoder: expected the export folder of the frozen decoder (or pass --decoder)")
    ds, ds_path = read_deepspeed(raw.get("deepspeed", packaged_config("deepspeed/zero0.json")), f"{path}: deepspeed")
    cfg = AugConfig(
        decoder=dec, deepspeed=ds,
        coprocessor=from_dict(CoprocessorSection, raw.get("coprocessor"), f"{path}: coprocessor"),
        data=from_dict(AugDataSection, raw.get("data"), f"{path}: data"),
        optim=from_dict(OptimSection, raw.get("optim"), f"{path}: optim"),
        train=from_dict(TrainSection, raw.get("train"), f"{path}: train"),
        path=path, deepspeed_path=ds_path)
    validate(cfg)
    return cfg


def validate(cfg: AugConfig) -> None:
    p, c, d, t, o = cfg.path, cfg.coprocessor, cfg.data, cfg.train, cfg.optim
    checks = [
        (c.num_latents >= 1, "coprocessor.num_latents", f"must be >= 1, got {c.num_latents}"),
        (c.latent_group >= 0, "coprocessor.latent_group", f"must be >= 0, got {c.latent_group}"),
        (d.points >= 1, "data.points", f"must be >= 1, got {d.points}"),
        (d.ahead >= 1, "data.ahead", f"must be >= 1, got {d.ahead}"),
        (d.min_prefix >= 1, "data.min_prefix", f"must be >= 1, got {d.min_prefix}"),
        (d.seq_len >= d.min_prefix + d.ahead, "data.seq_len",
         f"must be >= data.min_prefix + data.ahead ({d.min_prefix + d.ahead}), got {d.seq_len}"),
        (bool(d.shards), "data.shards", "expected the token shards to train on"),
        (t.precision == "fp32", "train.precision",
         f"cache augmentation trains in fp32 only (a bf16 engine would cast the frozen decoder), got {t.precision!r}"),
        (t.steps >= 1, "train.steps", "must be >= 1"),
        (t.micro_batch >= 1, "train.micro_batch", "must be >= 1"),
        (t.grad_accum >= 1, "train.grad_accum", "must be >= 1"),
        (t.keep_last >= 1, "train.keep_last", "must be >= 1"),
        (t.log_every >= 1, "train.log_every", "must be >= 1"),
        (not t.init_from, "train.init_from", "not used here: the coprocessor starts from the decoder"),
        (o.lr > 0, "optim.lr", "must be > 0"),
        (0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]"),
        (o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0"),
    ]
    for ok, name, why in checks:
        if not ok:
            raise ConfigError(f"{p}: {name}: {why}")
    zero = cfg.deepspeed.get("zero_optimization", {})
    if not isinstance(zero, dict) or zero.get("stage", 0) not in (0, 1, 2):
        raise ConfigError(f"{p}: deepspeed ({cfg.deepspeed_path or 'inline'}): zero_optimization.stage must be "
                          "0, 1 or 2 (ZeRO-3 would partition the frozen decoder the coprocessor reads layer by layer)")
