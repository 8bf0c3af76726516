"""`mmfm cacheaug train`: the coprocessor trained under the DeepSpeed engine, the decoder frozen, as a
user of the Trainer (mmfm/train/trainer.py: engine, row slicing, learning rate, checkpoints and exact
resume, NaN skipping, signals, logging). This module supplies the step (AheadStep):
  1. the global batch (micro_batch x world x grad_accum packed sequences) from the token shards,
     drawn identically on every rank (mmfm/train/tokens.py, as in pretraining);
  2. data.points augmentation points per sequence, drawn for the whole global batch with the
     Trainer's seeded generator (mmfm/cacheaug/objective.py: choose_points), so every rank agrees on
     the rows and on the loss denominator (all ahead tokens of the global batch);
  3. each micro-step takes its sequences' rows; numerator = summed ahead-token nll, so the Trainer's
     numerator x world x accum / denominator gives the gradient of the global batch's mean
     ahead-token loss; the frozen decoder's own ahead nll on the same rows is reported beside it.
Only the coprocessor's parameters (soft tokens, blocks, final norm) are in the optimizer. The
decoder's weights are hashed before and after: a changed hash stops the run with an error.

Outputs under train.out: checkpoints/ (mmfm/train/checkpoint.py, exact resume), metrics.jsonl,
config.json, summary.json and coprocessor/ (mmfm.cacheaug.load_coprocessor reads it).
"""
from __future__ import annotations

import math
import os

import torch

from mmfm.jsonio import write_json
from mmfm.train.trainer import Trainer, TrainStep


def modality_groups(cfg, vocab) -> list[int]:
    from mmfm.typed_config import ConfigError

    out = []
    for m in cfg.data.modalities:
        if m not in vocab.ranges:
            raise ConfigError(f"{cfg.path}: data.modalities: {m!r} is not in the vocabulary "
                              f"(has {', '.join(vocab.ranges)})")
        out.append(vocab.modality_index(m))
    return out


def window_means(losses: dict, k: int = 10) -> tuple[float, float]:
    """Mean ahead loss of the first and of the last k steps (one step's batch is too noisy to compare)."""
    if not losses:
        return float("nan"), float("nan")
    steps = sorted(losses)
    return (sum(losses[s] for s in steps[:k]) / len(steps[:k]), sum(losses[s] for s in steps[-k:]) / len(steps[-k:]))


class AheadStep(TrainStep):
    """The coprocessor's step: see the module docstring. Reports [plain ahead nll sum, points]."""
    name = "cacheaug"

    def __init__(self, coproc, table, groups, data, sparse: bool):
        self.coproc, self.table, self.groups, self.d, self.sparse = coproc, table, groups, data, sparse
        self.tokens_per_row = data.seq_len

    def prepare(self, batch, generator):
        from mmfm.cacheaug.objective import choose_points

        if "tokens" not in batch:     # a trailer between epochs
            return None
        d = self.d
        ids, valid = batch["tokens"], batch["segment_ids"] >= 0
        rows, points = choose_points(ids, valid, self.table, points=d.points, ahead=d.ahead,
                                     min_prefix=d.min_prefix, groups=self.groups, generator=generator)
        return ids, rows, points

    def denominator(self, prep) -> float:
        return max(float(prep[1].numel() * self.d.ahead), 1.0)

    def micro(self, engine, prep, sl):
        ids, rows, points = prep
        mine = (rows >= sl.start) & (rows < sl.stop)
        sub = ids[sl]
        mods = self.table[sub] if self.sparse else None
        if bool(mine.any()):
            nll, plain = engine(sub, rows[mine] - sl.start, points[mine], mods)
            return nll.sum(), torch.tensor([float(plain.sum())], dtype=torch.float64)
        # no eligible point here: a zero loss that still touches every trainable tensor
        zero = sum(p.sum() for p in self.coproc.parameters() if p.requires_grad) * 0.0
        return zero, torch.zeros(1, dtype=torch.float64)

    def metrics(self, prep, loss, report) -> dict:
        plain = float(report[0]) / self.denominator(prep)
        return {"ahead_loss": loss, "ahead_ppl": math.exp(min(loss, 50.0)), "plain_loss": plain,
                "gain": plain - loss, "points": int(prep[1].numel())}


def run(cfg, log=None, hooks=None) -> dict:
    """Trains the coprocessor per cfg (an AugConfig); hooks: fault injection for tests
    (mmfm/train/trainer.py: Hooks)."""
    from mmfm.cacheaug.coprocessor import Coprocessor, load_decoder, save_coprocessor, weights_hash
    from mmfm.cacheaug.objective import AugmentedDecoder
    from mmfm.data.dataset import ShardLoader
    from mmfm.train.engine import spec_of
    from mmfm.train.tokens import token_dataset
    from mmfm.vocab import Vocab

    t, d, c = cfg.train, cfg.data, cfg.coprocessor
    out = os.path.abspath(t.out)
    os.makedirs(out, exist_ok=True)
    trainer = Trainer(spec_of(cfg), name="cacheaug", checkpoint_dir=os.path.join(out, "checkpoints"), hooks=hooks,
                      say=log)
    rank, say = trainer.rank, trainer.say
    decoder = load_decoder(cfg.decoder, f"{cfg.path}: decoder")
    vocab_path = d.vocab or os.path.join(cfg.decoder, "vocab.json")
    vocab = Vocab.load(vocab_path)
    if vocab.size > decoder.cfg.vocab_size:
        raise ValueError(f"{cfg.path}: data.vocab: {vocab_path} has {vocab.size} ids but the decoder's "
                         f"vocab_size is {decoder.cfg.vocab_size}")
    if d.seq_len > decoder.cfg.max_seq_len:
        from mmfm.typed_config import ConfigError

        raise ConfigError(f"{cfg.path}: data.seq_len: {d.seq_len} exceeds the decoder's max_seq_len "
                          f"{decoder.cfg.max_seq_len}")
    groups = modality_groups(cfg, vocab)
    table = vocab.modality_table()
    hash_before = weights_hash(decoder)
    trainer.open_log(os.path.join(out, "metrics.jsonl"), os.path.join(out, "tb"))
    trainer.write_record(os.path.join(out, "config.json"), {**cfg.to_dict(), "decoder_sha256": hash_before})

    torch.manual_seed(t.seed)
    coproc = Coprocessor.from_decoder(decoder, c.num_latents, c.latent_group, c.init_seed)
    model = AugmentedDecoder(decoder, coproc, d.ahead)
    loader = ShardLoader(token_dataset(d.shards, seq_len=d.seq_len, batch_size=trainer.global_batch,
                                       pad_id=vocab.pad_id, seed=t.seed, shuffle_buffer=d.shuffle_buffer), num_workers=0)
    try:
        res = trainer.fit(model, AheadStep(coproc, table, groups, d, decoder.cfg.groups > 1), loader)
    finally:
        trainer.close_log()
    hash_after = weights_hash(decoder)
    if hash_after != hash_before:
        raise RuntimeError(f"cacheaug: the decoder's weights changed during training ({hash_before[:12]} -> "
                           f"{hash_after[:12]}); the decoder must stay frozen")
    gains = {s: m["gain"] for s, m in res.metrics.items()}   # plain - augmented ahead loss (> 0: latents help)
    result = {"out": out, "step": res.step, "losses": res.losses, "gains": gains, "skipped": res.skipped,
              "stopped_by": res.stopped_by, "decoder_sha256_before": hash_before,
              "decoder_sha256_after": hash_after, "coprocessor": os.path.join(out, "coprocessor")}
    if rank == 0:
        save_coprocessor(coproc, result["coprocessor"],
                         {"decoder": os.path.abspath(cfg.decoder), "decoder_sha256": hash_before, "ahead": d.ahead,
                          "trained_steps": res.step, "config": cfg.path})
        write_json(os.path.join(out, "summary.json"), result)
        first, last = window_means(gains)
        say(f"[cacheaug] step {res.step}: gain over the plain decoder {first:+.4f} nats/token (mean of the first 10 "
            f"steps) -> {last:+.4f} (last 10); decoder unchanged "
            f"(sha256 {hash_before[:12]}); coprocessor in {result['coprocessor']}")
    torch.distributed.barrier()
    return result
