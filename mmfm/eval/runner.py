"""PromptEval: generate from held-out prompts of the demo corpus and score whether each output
matches its prompt, beside the scorer's chance level and ceiling.

    ev = PromptEval("runs/demo/corpus", vocab, tokenizers, n=50)   # prompt sets, scorers, ceilings
    metrics = ev.run(model)        # {"image/digit": 0.62, ..., "physics/rel_l2": 0.31, "text/ppl": 41.0}
    ev.records                     # bench records of the last run: mmfm, chance, ceiling, baselines

Everything that does not depend on the model (prompt sets, fitted scorers, ceilings, chance,
physics baselines, the bigram) is computed once in the constructor, so training can call `run`
every `train.eval_every` steps on its in-memory Transformer.

Definitions (docs/eval.md):
  accuracy  fraction of generated samples whose scorer label equals the prompt's label
  chance    sum_c p_eval(c) p_train(c): the accuracy of a model that ignores the prompt and draws
            labels as often as the training data has them (1/K for K balanced classes)
  ceiling   the scorer's accuracy on the same prompts' REAL samples after the modality tokenizer's
            encode + decode round trip (generated samples come out of that decoder too); the raw
            samples' accuracy is in the same record as accuracy_raw
  physics   relative L2 of the generated continuation vs the solver's, beside repeat_last (the
            last given frame held) and mean_field (the training runs' mean of each frame); the
            ceiling record is the tokenizer's own round-trip error of the true continuation
  text      perplexity of held-out documents (text tokens, full-vocabulary softmax) vs a bigram
            model fitted on the training text in the same tokenization
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch

from mmfm.eval import cache, gen
from mmfm.eval.promptsets import MODALITY_SETS, Corpus, PromptSet, build_set, physics_set
from mmfm.eval.scorers.physics import mean_field, rel_l2, repeat_last
from mmfm.eval.scorers.text import Bigram

BENCH = "eval_prompts"
ALL_MODALITIES = tuple(MODALITY_SETS)


@dataclass
class EvalConfig:
    n: int = 50                  # prompts (= generated samples) per prompt set
    physics_n: int = 8           # physics runs at most (new solver runs are the slow part of the set-up)
    physics_given: int = 0       # frames given in a physics prompt (0: half the tokenizer's frames)
    text_docs: int = 0           # held-out documents for perplexity (0: all)
    text_max_tokens: int = 510   # a document is cut here (the demo model's max_seq_len is 512)
    sampling: gen.Sampling = field(default_factory=gen.Sampling)


def task_name(set_name: str, task: str) -> str:
    return f"scene_{task}" if set_name == "scenes" else task


def record(modality: str, task: str, impl: str, **values) -> dict:
    return {"bench": BENCH, "case": {"modality": modality, "task": task}, "impl": impl, **values}


def chance(train_labels: list[str], eval_labels: list[str]) -> float:
    pt, pe = Counter(train_labels), Counter(eval_labels)
    nt, ne = max(len(train_labels), 1), max(len(eval_labels), 1)
    return sum(pe[c] / ne * pt[c] / nt for c in pe)


def accuracy(pred: list[str], want: list[str]) -> float:
    return sum(p == w for p, w in zip(pred, want)) / max(len(want), 1)


def _values(modality: str, batch: torch.Tensor) -> list[torch.Tensor]:
    """A decoded batch -> one scorer input per sample (3D: xyz only)."""
    return [x[:, :3] if modality == "shape3d" else x for x in batch]


class PromptEval:
    """The prompt-following eval of one corpus under one vocabulary and set of tokenizers.

    corpus: a demo corpus folder (or a promptsets.Corpus). vocab: mmfm.vocab.Vocab. tokenizers:
    the export's Tokenizers (mmfm.generate.prompt), a folder of <modality>/tokenizer.yaml, or a dict
    {modality: loaded tokenizer}.
    modalities: a subset of ALL_MODALITIES (default: every one the vocabulary has). cache_dir:
    where fitted scorers are kept (None: <corpus>/.scorers; "": not cached)."""

    def __init__(self, corpus, vocab, tokenizers, n: int | None = None, modalities=None,
                 config: EvalConfig | None = None, cache_dir: str | None = None):
        self.cfg = config or EvalConfig()
        if n is not None:
            self.cfg.n = n
        if isinstance(self.cfg.n, bool) or not isinstance(self.cfg.n, int) or self.cfg.n < 1:
            raise ValueError(f"argument 'n' must be an integer >= 1, got {self.cfg.n!r}")
        self.corpus = corpus if isinstance(corpus, Corpus) else Corpus(str(corpus))
        self.vocab = vocab
        self.toks = gen.as_tokenizers(tokenizers, vocab)
        self.modalities = self._check_modalities(modalities)
        self.notes: list[str] = []
        self.sets: dict[str, PromptSet] = {}
        self.scorers: dict = {}
        self.prompts: dict[str, list[torch.Tensor]] = {}
        self.reference: list[dict] = []
        self.records: list[dict] = []
        for m in self.modalities:
            if m == "physics":
                self._prepare_physics()
            elif m == "text":
                self._prepare_text()
            else:
                for name in MODALITY_SETS[m]:
                    self._prepare_set(name, cache_dir)

    # ------------------------------------------------------------------ set-up (model-free)
    def _check_modalities(self, modalities) -> list[str]:
        have = [m for m in self.vocab.ranges if m in ALL_MODALITIES]
        if modalities is None:
            want = have
        else:
            want = list(modalities)
            for m in want:
                if m not in ALL_MODALITIES:
                    raise ValueError(f"--modalities: unknown modality {m!r}; the eval knows {list(ALL_MODALITIES)}")
                if m not in self.vocab.ranges:
                    raise ValueError(f"--modalities: the model has no {m!r} modality (its vocabulary has "
                                     f"{list(self.vocab.ranges)})")
        for m in want:
            self.toks[m]      # a missing tokenizer folder fails here, naming it
        if "text" not in self.vocab.ranges:
            raise ValueError("the model has no text modality: prompts are captions, so the eval needs one")
        return want

    def _prompt(self, caption: str, to: str, given=None) -> torch.Tensor:
        return gen.prompt_ids(self.vocab, self.toks, caption, to, given)

    def _prepared(self, tok, samples) -> torch.Tensor:
        return torch.stack([tok.prepare(s) for s in samples])

    def _round_trip(self, tok, x: torch.Tensor) -> torch.Tensor:
        bs = self.cfg.sampling.batch_size
        with torch.no_grad():
            return torch.cat([tok.decode(tok.encode_batch(x[i:i + bs])) for i in range(0, len(x), bs)])

    def _predict(self, name: str, values: list[torch.Tensor]) -> dict[str, list[str]]:
        sc = self.scorers[name]
        if name == "tones":
            return sc.predict(values, rate=int(self.toks["audio"].config.sample_rate))
        return sc.predict(values)

    def _prepare_set(self, name: str, cache_dir) -> None:
        ps = build_set(self.corpus, name, self.cfg.n)
        self.sets[name] = ps
        tok = self.toks[ps.modality]
        self.scorers[name] = cache.scorer(name, ps.train, self.corpus.folder, cache_dir, tok)
        self.prompts[name] = [self._prompt(it.prompt, ps.modality) for it in ps.items]
        x = self._prepared(tok, [it.sample for it in ps.items])
        raw = self._predict(name, _values(ps.modality, x))
        rt = self._predict(name, _values(ps.modality, self._round_trip(tok, x)))
        n_held = sum(it.source == "held-out" for it in ps.items)
        for t in ps.tasks:
            want = [it.labels[t] for it in ps.items]
            task = task_name(name, t)
            self.reference += [
                record(ps.modality, task, "chance", accuracy=chance([lab[t] for _, lab in ps.train], want),
                       n=len(want)),
                record(ps.modality, task, "ceiling", accuracy=accuracy(rt[t], want),
                       accuracy_raw=accuracy(raw[t], want), n=len(want), n_held_out=n_held)]

    def _prepare_physics(self) -> None:
        tok = self.toks["physics"]
        c = tok.config
        if c.frames < 2:
            self.notes.append(f"physics: the tokenizer takes {c.frames} frame; a continuation needs 2 or more")
            return

        def accept(s) -> bool:
            try:
                tok.prepare(s)
                return isinstance(s.get("txt"), str)
            except (ValueError, KeyError, TypeError):
                return False

        ps = physics_set(self.corpus, min(self.cfg.n, self.cfg.physics_n), accept)
        if not ps.items:
            self.notes.append(f"physics: no run of the corpus fits the tokenizer ({c.channels} channel(s), "
                              f"{c.grid}x{c.grid}, {c.frames} frames); skipped")
            return
        self.sets["physics"] = ps
        k = self.cfg.physics_given or max(1, c.frames // 2)
        if not 1 <= k < c.frames:
            raise ValueError(f"physics_given: {k} frames given, but the tokenizer has {c.frames}; give 1 to "
                             f"{c.frames - 1}")
        per_frame = tok.tokens_per_sample // c.frames
        truth = self._prepared(tok, [it.sample for it in ps.items])            # [B, T, C, H, W]
        with torch.no_grad():
            tokens = torch.cat([tok.encode_batch(truth[i:i + 16]) for i in range(0, len(truth), 16)])
        self._phys = {"k": k, "per_frame": per_frame, "truth": truth, "tokens": tokens}
        self.prompts["physics"] = [self._prompt(it.prompt, "physics", tokens[i, :k * per_frame])
                                   for i, it in enumerate(ps.items)]
        later = truth[:, k:]
        n = len(ps.items)
        floor = rel_l2(later, self._round_trip(tok, truth)[:, k:]).mean()
        held = repeat_last(truth[:, :k], c.frames - k)
        self.reference += [
            record("physics", "continuation", "repeat_last", rel_l2=float(rel_l2(later, held).mean()), n=n),
            record("physics", "continuation", "ceiling", rel_l2=float(floor), n=n,
                   n_held_out=sum(it.source == "held-out" for it in ps.items), given_frames=k)]
        if ps.train:
            mf = mean_field(self._prepared(tok, [s for s, _ in ps.train]))[k:]
            self.reference.append(record("physics", "continuation", "mean_field",
                                         rel_l2=float(rel_l2(later, mf.expand_as(later)).mean()), n=n,
                                         train_runs=len(ps.train)))
        else:
            self.notes.append("physics: no training run fits the tokenizer; no mean_field baseline")

    def _prepare_text(self) -> None:
        tok = self.toks["text"]
        train_seqs = []
        for m in ALL_MODALITIES:    # every training-split text segment: documents, captions, transcripts
            train, _ = self.corpus.split(m)
            train_seqs += [tok.encode(s["txt"])[:512] for s in train if isinstance(s.get("txt"), str) and s["txt"]]
        _, held = self.corpus.split("text")
        docs = [s["txt"] for s in held if isinstance(s.get("txt"), str) and s["txt"]]
        if self.cfg.text_docs:
            docs = docs[:self.cfg.text_docs]
        if not docs:
            self.notes.append("text: the corpus has no held-out documents; perplexity skipped")
            return
        self._text = [tok.encode(d)[:self.cfg.text_max_tokens] for d in docs]
        self._text = [t for t in self._text if t.numel()]
        bigram = Bigram.fit(train_seqs, self.vocab.ranges["text"].size)
        nll, count = bigram.nll(self._text)
        self.reference.append(record("text", "perplexity", "bigram", ppl=math.exp(nll / count), n=count,
                                     docs=len(self._text), lam=bigram.lam))

    # ------------------------------------------------------------------ the model-dependent part
    @torch.no_grad()
    def run(self, model) -> dict[str, float]:
        """Generate and score with `model` (a Transformer, in memory); returns {"<modality>/<task>":
        accuracy, "physics/rel_l2": ..., "text/ppl": ...} and sets self.records."""
        s = self.cfg.sampling
        out: list[dict] = []
        metrics: dict[str, float] = {}
        by_modality: dict[str, list[str]] = {}
        for name, ps in self.sets.items():
            if name != "physics":
                by_modality.setdefault(ps.modality, []).append(name)
        for modality, names in by_modality.items():   # one decode per modality: digits and scenes together
            tok = self.toks[modality]
            prompts = [p for name in names for p in self.prompts[name]]
            local = gen.generate_tokens(model, self.vocab, prompts, modality, self.toks.segment_length(modality), s)
            decoded = _values(modality, tok.decode(local))
            at = 0
            for name in names:
                ps = self.sets[name]
                vals = decoded[at:at + len(ps.items)]
                at += len(ps.items)
                pred = self._predict(name, vals)
                for t in ps.tasks:
                    acc = accuracy(pred[t], [it.labels[t] for it in ps.items])
                    metrics[f"{modality}/{task_name(name, t)}"] = acc
                    out.append(record(modality, task_name(name, t), "mmfm", accuracy=acc, n=len(ps.items)))
        if "physics" in self.sets:
            err = self._run_physics(model)
            metrics["physics/rel_l2"] = err
            out.append(record("physics", "continuation", "mmfm", rel_l2=err, n=len(self.sets["physics"].items)))
        if getattr(self, "_text", None):
            ppl, count = self._text_ppl(model)
            metrics["text/ppl"] = ppl
            out.append(record("text", "perplexity", "mmfm", ppl=ppl, n=count, docs=len(self._text)))
        self.records = out + self.reference
        return metrics

    def _run_physics(self, model) -> float:
        tok, p = self.toks["physics"], self._phys
        k, per_frame, frames = p["k"], p["per_frame"], tok.config.frames
        new = gen.generate_tokens(model, self.vocab, self.prompts["physics"], "physics",
                                  (frames - k) * per_frame, self.cfg.sampling)
        full = torch.cat([p["tokens"][:, :k * per_frame], new], 1)
        pred = torch.cat([tok.decode(full[i:i + 16]) for i in range(0, len(full), 16)])
        return float(rel_l2(p["truth"][:, k:], pred[:, k:]).mean())

    def _text_ppl(self, model, batch: int = 8) -> tuple[float, int]:
        v = self.vocab
        device = next(model.parameters()).device
        limit = model.cfg.max_seq_len - 2
        seqs = sorted((t[:limit] for t in self._text), key=len)
        table = v.modality_table(device) if model.cfg.groups > 1 else None
        was = model.training
        model.eval()
        total, count = 0.0, 0
        try:
            for i in range(0, len(seqs), batch):
                chunk = seqs[i:i + batch]
                L = max(len(t) for t in chunk) + 2
                ids = torch.full((len(chunk), L), v.pad_id, dtype=torch.long)
                for r, t in enumerate(chunk):
                    head = torch.tensor([v.bos_id, v.begin_id("text")])
                    ids[r, :len(t) + 2] = torch.cat([head, v.to_global("text", t)])
                ids = ids.to(device)
                logits = model(ids, modality_ids=table[ids] if table is not None else None)
                logp = torch.log_softmax(logits[:, 1:-1].float(), -1)        # position j predicts token j + 1
                target = ids[:, 2:]
                nll = -logp.gather(-1, target[..., None])[..., 0]
                lens = torch.tensor([len(t) for t in chunk], device=device)
                mask = torch.arange(L - 2, device=device)[None, :] < lens[:, None]
                total += float(nll[mask].sum())
                count += int(mask.sum())
        finally:
            model.train(was)
        return math.exp(total / count), count
