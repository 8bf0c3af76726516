"""`mmfm cacheaug train`: the coprocessor trained under the DeepSpeed engine, the decoder frozen.

Per optimizer step:
  1. the global batch (micro_batch x world x grad_accum packed sequences) from the token shards,
     drawn identically on every rank (mmfm/train/tokens.py, as in pretraining);
  2. data.points augmentation points per sequence, drawn for the whole global batch with one
     seeded generator (mmfm/cacheaug/objective.py: choose_points), so every rank agrees on the rows
     and on the loss denominator (all ahead tokens of the global batch);
  3. each micro-step takes its sequences' rows; loss = summed ahead-token nll x world x accum /
     denominator, so the gradient is that of the global batch's mean ahead-token loss;
  4. lr = warmup + cosine (mmfm/train/engine.py: lr_at); DeepSpeed clips and steps.
Only the coprocessor's parameters (soft tokens, blocks, final norm) are in the optimizer. The
decoder's weights are hashed before and after: a changed hash stops the run with an error.

Outputs under train.out: checkpoints/ (mmfm/train/checkpoint.py, exact resume), metrics.jsonl,
config.json, summary.json and coprocessor/ (mmfm.cacheaug.load_coprocessor reads it).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import torch

from mmfm.train import checkpoint as ckpt


def _say(rank: int):
    return lambda msg: print(msg, file=sys.stderr, flush=True) if rank == 0 else None


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


def run(cfg, log=None) -> dict:
    from mmfm.cacheaug.coprocessor import Coprocessor, load_decoder, save_coprocessor, weights_hash
    from mmfm.cacheaug.objective import AugmentedDecoder, choose_points
    from mmfm.data.dataset import ShardLoader
    from mmfm.train.engine import build_engine, init_distributed, lr_at
    from mmfm.train.tokens import token_dataset
    from mmfm.vocab import Vocab

    init_distributed()
    dist = torch.distributed
    rank, world = dist.get_rank(), dist.get_world_size()
    t, d, c = cfg.train, cfg.data, cfg.coprocessor
    if t.threads:
        torch.set_num_threads(t.threads)
    say = log or _say(rank)
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
    sparse = decoder.cfg.groups > 1
    hash_before = weights_hash(decoder)
    out = os.path.abspath(t.out)
    ckdir = os.path.join(out, "checkpoints")
    os.makedirs(out, exist_ok=True)

    torch.manual_seed(t.seed)
    coproc = Coprocessor.from_decoder(decoder, c.num_latents, c.latent_group, c.init_seed)
    model = AugmentedDecoder(decoder, coproc, d.ahead)
    engine, _ = build_engine(cfg, model)
    gen = torch.Generator().manual_seed(t.seed + 1)
    gbatch = t.micro_batch * world * t.grad_accum
    loader = ShardLoader(token_dataset(d.shards, seq_len=d.seq_len, batch_size=gbatch, pad_id=vocab.pad_id,
                                       seed=t.seed, shuffle_buffer=d.shuffle_buffer), num_workers=0)
    step = 0
    state = ckpt.load(engine, ckdir)
    if state is not None:
        step = state["step"]
        loader.load_state_dict(state["data"])
        gen.set_state(state["generator"])
        say(f"[cacheaug] resumed from {os.path.join(ckdir, state['tag'])} at step {step}")

    def save():
        return ckpt.save(engine, ckdir, step, {"step": step, "data": loader.state_dict(),
                                               "generator": gen.get_state()}, t.keep_last)

    logger = None
    if rank == 0:
        from mmfm.train.metrics import JsonlLogger

        logger = JsonlLogger(os.path.join(out, "metrics.jsonl"), os.path.join(out, "tb"))
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump({**cfg.to_dict(), "world_size": world, "decoder_sha256": hash_before}, f, indent=1)
    bar = None
    if t.progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=t.steps, initial=step, desc="cacheaug", unit="step", file=sys.stderr)
    losses: dict[int, float] = {}
    gains: dict[int, float] = {}    # plain - augmented ahead loss on the same batch (> 0: the latents help)
    it = iter(loader)
    t_window = time.perf_counter()
    try:
        while step < t.steps:
            batch = next(it)
            while "tokens" not in batch:     # a trailer between epochs
                batch = next(it)
            ids, valid = batch["tokens"], batch["segment_ids"] >= 0
            rows, points = choose_points(ids, valid, table, points=d.points, ahead=d.ahead,
                                         min_prefix=d.min_prefix, groups=groups, generator=gen)
            den = float(rows.numel() * d.ahead)
            lr = lr_at(step, cfg.optim.lr, cfg.optim.warmup_steps, t.steps, cfg.optim.min_lr_ratio)
            total = torch.zeros(2, dtype=torch.float64)     # augmented, plain
            for a in range(t.grad_accum):
                s0 = (a * world + rank) * t.micro_batch
                mine = (rows >= s0) & (rows < s0 + t.micro_batch)
                sub = ids[s0:s0 + t.micro_batch]
                mods = table[sub] if sparse else None
                if bool(mine.any()):
                    nll, plain = engine(sub, rows[mine] - s0, points[mine], mods)
                    loss = nll.sum() * (world * t.grad_accum) / max(den, 1.0)
                    total += torch.tensor([float(nll.detach().sum()), float(plain.sum())], dtype=torch.float64)
                else:   # no eligible point here: a zero loss that still touches every trainable tensor
                    loss = sum(p.sum() for p in coproc.parameters() if p.requires_grad) * 0.0
                if not bool(torch.isfinite(loss)):
                    raise RuntimeError(f"cacheaug: non-finite loss at step {step + 1}; lower optim.lr")
                engine.backward(loss)
                if a == t.grad_accum - 1:
                    for g in engine.optimizer.param_groups:
                        g["lr"] = lr
                engine.step()
            step += 1
            dist.all_reduce(total)
            loss_val, plain_val = (float(x) / max(den, 1.0) for x in total)
            losses[step] = loss_val
            gains[step] = plain_val - loss_val
            if bar is not None:
                bar.update(1)
                bar.set_postfix(ahead_loss=f"{loss_val:.4f}", gain=f"{plain_val - loss_val:+.4f}")
            if step % t.log_every == 0 or step == t.steps:
                now = time.perf_counter()
                if logger:
                    logger(step, {"ahead_loss": loss_val, "ahead_ppl": math.exp(min(loss_val, 50.0)),
                                  "plain_loss": plain_val, "gain": plain_val - loss_val, "lr": lr,
                                  "points": int(rows.numel()), "step_s": (now - t_window) / t.log_every})
                t_window = now
            if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.steps:
                save()
    finally:
        if bar is not None:
            bar.close()
    hash_after = weights_hash(decoder)
    if hash_after != hash_before:
        raise RuntimeError(f"cacheaug: the decoder's weights changed during training ({hash_before[:12]} -> "
                           f"{hash_after[:12]}); the decoder must stay frozen")
    result = {"out": out, "step": step, "losses": losses, "gains": gains, "decoder_sha256_before": hash_before,
              "decoder_sha256_after": hash_after, "coprocessor": os.path.join(out, "coprocessor")}
    if rank == 0:
        save_coprocessor(coproc, result["coprocessor"],
                         {"decoder": os.path.abspath(cfg.decoder), "decoder_sha256": hash_before, "ahead": d.ahead,
                          "trained_steps": step, "config": cfg.path})
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(result, f, indent=1)
        if logger:
            logger.close()
        first, last = window_means(gains)
        say(f"[cacheaug] step {step}: gain over the plain decoder {first:+.4f} nats/token (mean of the first 10 "
            f"steps) -> {last:+.4f} (last 10); decoder unchanged "
            f"(sha256 {hash_before[:12]}); coprocessor in {result['coprocessor']}")
    dist.barrier()
    return result
