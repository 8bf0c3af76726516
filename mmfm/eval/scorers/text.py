"""The text baseline: an interpolated bigram model over the text tokenizer's ids,

    p(w | v) = lam * c(v, w) / c(v) + (1 - lam) * p1(w),    p1(w) = (c(w) + 1) / (N + V)

fitted on the same training text as the model (every training-split text segment, in the same
tokenization). lam is chosen on a tenth of the training documents held aside, never on eval text.
Every sequence starts from a start symbol (id V), as the model starts from <begin_text>."""
from __future__ import annotations

import math

import numpy as np

LAMBDAS = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)


class Bigram:
    def __init__(self, vocab_size: int, lam: float = 0.8):
        self.V, self.lam = int(vocab_size), float(lam)
        self.pair: dict[int, dict[int, int]] = {}
        self.ctx = np.zeros(self.V + 1, np.int64)
        self.uni = np.zeros(self.V, np.int64)

    def add(self, seqs) -> "Bigram":
        for s in seqs:
            prev = self.V
            for w in (int(t) for t in s):
                row = self.pair.setdefault(prev, {})
                row[w] = row.get(w, 0) + 1
                self.ctx[prev] += 1
                self.uni[w] += 1
                prev = w
        return self

    def nll(self, seqs) -> tuple[float, int]:
        """(summed negative log-likelihood in nats, token count) of seqs."""
        p1 = (self.uni + 1) / (self.uni.sum() + self.V)
        total, n = 0.0, 0
        for s in seqs:
            prev = self.V
            for w in (int(t) for t in s):
                c = self.ctx[prev]
                p = (1 - self.lam) * p1[w] + (self.lam * self.pair.get(prev, {}).get(w, 0) / c if c else 0.0)
                total -= math.log(p)
                n += 1
                prev = w
        return total, n

    @classmethod
    def fit(cls, seqs: list, vocab_size: int) -> "Bigram":
        """Counts on all of seqs, lam chosen by likelihood on every tenth sequence (fitted on the rest)."""
        seqs = [s for s in seqs if len(s)]
        if not seqs:
            raise ValueError("Bigram.fit: no training text (the corpus has no training-split text)")
        dev = seqs[::10]
        rest = [s for i, s in enumerate(seqs) if i % 10]
        best = 0.8
        if rest and dev:
            probe = cls(vocab_size).add(rest)
            scores = []
            for lam in LAMBDAS:
                probe.lam = lam
                scores.append(probe.nll(dev)[0])
            best = LAMBDAS[int(np.argmin(scores))]
        return cls(vocab_size, best).add(seqs)
