"""A standardised multinomial logistic regression, fitted with scikit-learn and stored as plain
arrays in an .npz (no pickle: a cached scorer is data, and loading it runs no code)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class LinearClassifier:
    classes: np.ndarray      # [K] str
    mean: np.ndarray         # [F]
    scale: np.ndarray        # [F]
    coef: np.ndarray         # [K, F] (or [1, F] for two classes, as scikit-learn keeps it)
    intercept: np.ndarray    # [K] (or [1])

    @classmethod
    def fit(cls, x: np.ndarray, y, c: float = 1.0, name: str = "classifier") -> "LinearClassifier":
        from sklearn.linear_model import LogisticRegression

        x = np.asarray(x, np.float64)
        y = np.asarray([str(v) for v in y])
        if x.ndim != 2 or len(x) != len(y) or len(x) == 0:
            raise ValueError(f"{name}: need features [N, F] and N labels, got {x.shape} and {len(y)}")
        if len(set(y.tolist())) < 2:
            raise ValueError(f"{name}: the corpus gives one class only ({y[0]!r}); a scorer needs at least two")
        mean, scale = x.mean(0), x.std(0) + 1e-6
        lr = LogisticRegression(C=c, max_iter=3000).fit((x - mean) / scale, y)
        return cls(lr.classes_.astype(str), mean, scale, lr.coef_, lr.intercept_)

    def predict(self, x: np.ndarray) -> list[str]:
        z = ((np.asarray(x, np.float64) - self.mean) / self.scale) @ self.coef.T + self.intercept
        if z.shape[1] == 1:   # binary: scikit-learn keeps the second class's logit only
            idx = (z[:, 0] > 0).astype(int)
        else:
            idx = z.argmax(1)
        return [str(self.classes[i]) for i in idx]

    def save(self, path: str) -> None:
        np.savez(path, classes=self.classes.astype(str), mean=self.mean, scale=self.scale, coef=self.coef,
                 intercept=self.intercept)

    @classmethod
    def load(cls, path: str) -> "LinearClassifier":
        with np.load(path, allow_pickle=False) as z:
            return cls(z["classes"], z["mean"], z["scale"], z["coef"], z["intercept"])
