"""`mmfm pretrain` and `mmfm finetune`: next-token / masked / hybrid training of the decoder, as a
user of the Trainer (mmfm/train/trainer.py, which owns the engine, row slicing, learning rate,
checkpoints and resume, NaN skipping, signals, logging and evaluation). This module supplies:

  - ObjectiveStep: the objective prepares inputs, labels and masks for the whole global batch
    with the Trainer's seeded torch.Generator; the denominator is the global batch's weighted label
    count; a micro-batch's numerator is its rows' weighted CE sum through the model's fused head
    (model_loss_and_report -> Transformer.loss: no [tokens, vocab] logits,
    mmfm/ops/linear_cross_entropy.py); so the engine backpropagates
    weighted CE sum x world x accum / denominator, and after DeepSpeed's 1/accum scaling and
    gradient averaging over ranks the gradient is that of the global batch's weighted mean loss,
    exactly as a 1-rank run at the same global batch computes it. It reports the per-modality
    CE sums and counts, logged as loss_<modality>;
  - the held-out evaluation (per-modality loss of the run's objective on fixed sequences), run by
    the Trainer at the start, every train.eval_every steps and at the end;
  - the run's outputs: config.json, metrics.jsonl and tb/ (through the Trainer), summary.json and
    loss_curve.png.

The data: the global batch (micro_batch x world_size x grad_accum packed sequences) from the
token shards, drawn identically on every rank (mmfm/train/tokens.py).
"""
from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import torch

from mmfm.jsonio import write_json
from mmfm.train.config import RunConfig, output_dir, resolve_vocab_size
from mmfm.train.engine import spec_of, zero_stage
from mmfm.train.trainer import (Evaluator, Hooks, ResumableData, Trainer, TrainingStopped,  # noqa: F401
                                TrainStep)  # TrainingStopped: re-exported for the commands


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
                       pad_id=vocab.pad_id, seed=0, shuffle_buffer=0, loop=False, pack=cfg.data.pack)
    out, n = [], 0
    for b in ShardLoader(ds, num_workers=0):
        if "tokens" not in b:
            continue
        out.append((b["tokens"], b["segment_ids"] >= 0))
        n += len(b["tokens"])
        if n >= cfg.data.eval_sequences:
            break
    return out


class ObjectiveStep(TrainStep):
    """The decoder's training step under an objective (ar, masked, hybrid): see the module docstring."""

    def __init__(self, objective, table, modality_names: list[str], seq_len: int, flops_per_token: float,
                 name: str = "pretrain", source_names: list[str] = ()):
        self.objective, self.table, self.names = objective, table, modality_names
        self.name, self.tokens_per_row, self.flops_per_token = name, seq_len, flops_per_token
        self.source_names = list(source_names)   # by source index of the batches' source_ids (several shard sets)
        self._source_share: dict = {}

    def prepare(self, batch, generator):
        if "tokens" not in batch:        # a trailer between epochs
            return None
        ids, valid = batch["tokens"], batch["segment_ids"] >= 0
        if self.source_names and "source_ids" in batch:
            self._source_share = self.source_share(batch["source_ids"])
        prep = self.objective.prepare(ids, self.table[ids], valid, generator)
        if "latents" in batch:           # continuous targets for a flow head (mmfm/models/flow_head.py)
            prep = prep.with_latents(batch["latents"], batch["latent_mask"])
        return prep

    def source_share(self, source_ids) -> dict:
        """The realised per-source mix of a global batch: mix_source_<set> = its share of the tokens."""
        counts = torch.bincount(source_ids[source_ids >= 0].long(), minlength=len(self.source_names)).double()
        out: dict[str, float] = {}
        for i, n in enumerate(self.source_names):
            out[f"mix_source_{n}"] = out.get(f"mix_source_{n}", 0.0) + float(counts[i] / counts.sum().clamp_min(1))
        return out

    def denominator(self, prep) -> float:
        has = prep.labels != -100
        return max(float((self.objective.weights[prep.label_mod] * has).sum()), 1e-8)

    def micro(self, engine, prep, rows):
        from mmfm.objectives import joint_loss_and_report

        sub = prep.rows(rows, engine.device)   # the global batch is prepared on the CPU
        local_sum, s, c, fs, fc = joint_loss_and_report(engine, sub, self.objective.weights,
                                                        self.objective.cfg.flow_weight, denominator=1.0)
        flow = torch.tensor([fs, fc], dtype=torch.float64, device=s.device)
        return local_sum, torch.cat([s.to(torch.float64), c.to(torch.float64), flow])

    def metrics(self, prep, loss, report) -> dict:
        if report is None:
            return {}
        G = len(self.names)
        sums, counts = report[:G], report[G:2 * G]
        out = {f"loss_{n}": float(sums[i] / counts[i]) for i, n in enumerate(self.names) if counts[i] > 0}
        # the realised data mix (data.mix sets sampling weights): each modality's share of the labelled tokens
        out.update({f"mix_{n}": float(counts[i] / counts.sum()) for i, n in enumerate(self.names) if counts[i] > 0})
        # the flow head's mean error per target (standardised units); absent from reports of 2G entries
        if len(report) > 2 * G + 1 and report[2 * G + 1] > 0:
            out["loss_flow"] = float(report[2 * G] / report[2 * G + 1])
        out.update(self._source_share)
        return out


def check_hf_init(cfg: RunConfig, vocab=None) -> bool:
    """train.init_from names a Hugging Face (Llama) folder: set the model section's shape from its
    config.json and check the folder and the vocabulary against each other before anything trains
    (mmfm/models/hf_import.py). False (nothing done) for an mmfm export or run, or no init_from."""
    from mmfm.models.hf_import import apply_llama_shape, check_llama_import, is_hf_folder
    from mmfm.vocab import Vocab

    src = cfg.train.init_from
    if not src or not is_hf_folder(src):
        return False
    vocab = Vocab.load(cfg.data.vocab) if vocab is None else vocab
    apply_llama_shape(cfg.model, src)
    check_llama_import(src, vocab.ranges["text"].size)
    return True


def run(cfg: RunConfig, prepare_model=None, log=None, hooks: Hooks | None = None,
        evaluators: Sequence[Evaluator] = (), data: Callable[[int], ResumableData] | None = None) -> dict:
    """Trains per cfg; returns {"losses": {step: loss}, "eval_start", "eval_end", "out", "stopped_by",
    "step", "engine"}. prepare_model(model) -> model, if given, runs before the engine (fine-tuning:
    LoRA, freezing). hooks: fault injection for tests (mmfm/train/trainer.py: Hooks).
    evaluators: more (engine, step) -> {metric: value} callables, run beside the held-out loss at the
    start, every train.eval_every steps and at the end, their metrics logged. data(global_batch) ->
    a resumable data source of global batches ({"tokens", "segment_ids"}), instead of cfg.data.shards."""
    from mmfm.data.dataset import ShardLoader
    from mmfm.models import build_model
    from mmfm.objectives import build_objective
    from mmfm.train.tokens import train_token_dataset
    from mmfm.vocab import Vocab

    t = cfg.train
    name = "finetune" if cfg.finetune is not None else "pretrain"
    vocab = Vocab.load(cfg.data.vocab)
    hf_init = check_hf_init(cfg, vocab)
    resolve_vocab_size(cfg, vocab)
    table = vocab.modality_table()
    out = output_dir(cfg)
    os.makedirs(out, exist_ok=True)
    trainer = Trainer(spec_of(cfg), name=name, checkpoint_dir=os.path.join(out, "checkpoints"), hooks=hooks, say=log)
    trainer.open_log(os.path.join(out, "metrics.jsonl"), os.path.join(out, "tb"))
    trainer.write_record(os.path.join(out, "config.json"), {**cfg.to_dict(), "zero_stage": zero_stage(cfg)})

    torch.manual_seed(t.seed)                     # the same initial weights on every rank
    model = build_model(cfg.model)
    if hf_init:
        from mmfm.models.hf_import import import_llama

        model.load_state_dict(import_llama(t.init_from, cfg.model, vocab.ranges["text"].size, seed=t.seed))
    elif t.init_from:
        from mmfm.train.checkpoint import load_state_into

        load_state_into(model, t.init_from)
    if prepare_model is not None:
        model = prepare_model(model)
    freeze = None
    if t.freeze_text_steps:
        from mmfm.train.freeze import TextFreeze

        text = vocab.ranges["text"]
        freeze = TextFreeze(model, text.start, text.size, t.freeze_text_steps)
    objective = build_objective(cfg.objective, vocab)
    sources: list[str] = []
    if data is not None:
        loader = data(trainer.global_batch)
    else:
        from mmfm.train.tokens import source_names

        ds = train_token_dataset(cfg.data, vocab, batch_size=trainer.global_batch, seed=t.seed)
        sources = source_names(ds) if cfg.data.sources else []
        loader = ShardLoader(ds, num_workers=0)
    step = ObjectiveStep(objective, table, list(vocab.modality_names), cfg.data.seq_len,
                         cfg.model.flops_per_token(cfg.data.seq_len), name, sources)
    evals = eval_batches(cfg, vocab)

    def held_out(engine, at: int) -> dict:
        ev = evaluate(engine, evals, vocab, table, objective)
        trainer.say(f"[{name}] held-out loss at step {at}: {_fmt(ev)}")
        return ev

    try:
        res = trainer.fit(model, step, loader, ([held_out] if evals else []) + list(evaluators), freeze=freeze)
    finally:
        trainer.close_log()
    result = {"losses": res.losses, "out": out, "stopped_by": res.stopped_by, "eval_start": res.eval_start,
              "eval_end": res.eval_end, "skipped": res.skipped}
    if trainer.rank == 0:
        _finish(out, result, t.plot)
    result["engine"] = res.engine
    result["step"] = res.step
    return result


def _fmt(ev: dict) -> str:
    return ", ".join(f"{k.replace('eval_loss_', '').replace('eval_loss', 'all')} {v:.3f}" for k, v in ev.items())


def _finish(out: str, result: dict, plot: bool = True) -> None:
    from mmfm.train.metrics import loss_plot, prompt_plot

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
    if plot:
        prompt_plot(rows, os.path.join(out, "prompts_curve.png"))
    summary = {k: v for k, v in result.items() if k not in ("engine",)}
    write_json(os.path.join(out, "summary.json"), summary)
