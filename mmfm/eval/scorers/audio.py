"""Audio scorer: which note or chord a clip plays, by logistic regression on its log magnitude
spectrum read at semitone bins (G3 to E6: the demo's notes and their first overtones), fitted on
the corpus' training tones. Levels are made relative to the loudest bin, so loudness and decay do
not matter; only which pitches sound."""
from __future__ import annotations

import numpy as np
import torch

from mmfm.eval.scorers.linear import LinearClassifier

RATE = 16000        # the demo audio tokenizer's rate; the corpus tones are written at it
WINDOW = 8000       # the first half second: the demo audio tokenizer's clip
MIDI = np.arange(55, 89)   # G3 .. E6


def as_wave(sample, rate: int = RATE) -> torch.Tensor:
    """A shard sample (wav (array, rate)) or a [N] tensor -> mono float [N] at `rate`."""
    from mmfm.tokenizers.audio import waveform_of

    if isinstance(sample, torch.Tensor):
        return sample.float()
    n = len(np.asarray(sample["wav"][0]))
    return waveform_of(sample, rate, max(n * rate // int(sample["wav"][1]), 1), "eval audio scorer")


def tone_features(wave: torch.Tensor, rate: int = RATE) -> np.ndarray:
    x = wave.float().numpy()[:int(WINDOW * rate / RATE)]
    x = x * np.hanning(len(x)) if len(x) > 1 else x
    n = max(len(x), WINDOW)                       # zero-pad: the same bins for short clips
    spec = np.abs(np.fft.rfft(x, n))
    freqs = np.fft.rfftfreq(n, 1.0 / rate)
    out = []
    for m in MIDI:
        f = 440.0 * 2 ** ((m - 69) / 12)
        band = (freqs >= f * 2 ** (-0.5 / 12)) & (freqs < f * 2 ** (0.5 / 12))
        out.append(spec[band].max() if band.any() else 0.0)
    level = np.log(np.asarray(out) + 1e-6)
    return (level - level.max()).astype(np.float32)


class ToneScorer:
    tasks = ("tone",)

    def __init__(self, clf: LinearClassifier):
        self.clf = clf

    @classmethod
    def fit(cls, waves: list[torch.Tensor], labels: list[dict], rate: int = RATE) -> "ToneScorer":
        x = np.stack([tone_features(w, rate) for w in waves])
        return cls(LinearClassifier.fit(x, [lab["tone"] for lab in labels], c=1.0, name="tone scorer"))

    def predict(self, waves: list[torch.Tensor], rate: int = RATE) -> dict[str, list[str]]:
        return {"tone": self.clf.predict(np.stack([tone_features(w, rate) for w in waves]))}
