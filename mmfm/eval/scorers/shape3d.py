"""3D scorer: which primitive (sphere, box, torus, cylinder, capsule, cone) a point cloud is, by
logistic regression on features that do not depend on position, size, rotation or point count:
the principal-axis extents, the histogram of distances from the centroid, per-axis coordinate
histograms in the principal frame, and the D2 shape distribution (distances between point pairs),
all in units of the cloud's RMS radius. Fitted on the corpus' one-primitive training shapes."""
from __future__ import annotations

import numpy as np
import torch

from mmfm.eval.scorers.linear import LinearClassifier

PAIRS = 4000


def as_points(sample) -> torch.Tensor:
    """A shard sample (npz points) or a tensor [N, >=3] -> float [N, 3]."""
    if isinstance(sample, torch.Tensor):
        return sample[:, :3].float()
    return torch.from_numpy(np.asarray(sample["npz"]["points"], np.float32)[:, :3])


def point_features(points: torch.Tensor) -> np.ndarray:
    p = points[:, :3].double().numpy()
    p = p[np.isfinite(p).all(1)]
    if len(p) < 4:
        return np.zeros(3 + 12 + 24 + 12, np.float32)
    p = p - p.mean(0)
    rms = np.sqrt((p ** 2).sum(1).mean()) + 1e-9
    p = p / rms
    evals, evecs = np.linalg.eigh(np.cov(p.T))
    q = p @ evecs[:, ::-1]                       # principal frame, largest axis first
    ext = evals[::-1] / max(evals.sum(), 1e-12)
    r = np.linalg.norm(p, axis=1)
    hist = lambda v, lo, hi, k: np.histogram(v, bins=k, range=(lo, hi))[0] / len(v)  # noqa: E731
    axes = np.concatenate([hist(np.abs(q[:, i]), 0, 2.5, 8) for i in range(3)])
    rng = np.random.default_rng(0)               # fixed pairs: the same features for the same cloud
    i, j = rng.integers(len(p), size=(2, PAIRS))
    d2 = np.linalg.norm(p[i] - p[j], axis=1)
    return np.concatenate([ext, hist(r, 0, 2.5, 12), axes, hist(d2, 0, 4, 12)]).astype(np.float32)


class PrimitiveScorer:
    tasks = ("primitive",)

    def __init__(self, clf: LinearClassifier):
        self.clf = clf

    @classmethod
    def fit(cls, clouds: list[torch.Tensor], labels: list[dict]) -> "PrimitiveScorer":
        x = np.stack([point_features(c) for c in clouds])
        return cls(LinearClassifier.fit(x, [lab["primitive"] for lab in labels], c=1.0, name="3D primitive scorer"))

    def predict(self, clouds: list[torch.Tensor]) -> dict[str, list[str]]:
        return {"primitive": self.clf.predict(np.stack([point_features(c) for c in clouds]))}
