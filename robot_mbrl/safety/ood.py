"""Input out-of-distribution score of the shift monitor: how far the current input (s, a) lies
from the model's training inputs (k-NN or Mahalanobis distance in normalized units), with a
threshold calibrated on held-out (and leave-one-out) scores."""

from __future__ import annotations

import numpy as np

from robot_mbrl.safety.calibration import calibrate_threshold, tail_threshold


class OODMonitor:
    """Out-of-distribution score of model inputs relative to the training inputs.

    Inputs are normalized by the training mean and std. ``knn``: distance to the k-th nearest
    training input (a seeded subsample of at most ``max_reference`` points); ``mahalanobis``:
    ``sqrt(d^T Sigma^-1 d)`` with a slightly regularized covariance. The threshold is the
    calibrated quantile (:func:`calibrate_threshold`) of the scores of held-out training inputs,
    or with ``extrapolate`` a tail fit beyond them (:func:`tail_threshold`) for rates below 1/n.
    """

    def __init__(self, method: str = "knn", k: int = 5, max_reference: int = 20_000, seed: int = 0):
        if method not in ("knn", "mahalanobis"):
            raise ValueError(f"OOD method must be knn or mahalanobis, got {method!r}")
        self.method, self.k, self.max_reference, self.seed = method, k, max_reference, seed
        self.threshold: float | None = None
        self._mean = self._std = self._precision = self._reference = None

    @property
    def fitted(self) -> bool:
        return self._mean is not None

    def fit(
        self,
        train_inputs: np.ndarray,
        holdout_inputs: np.ndarray,
        false_alarm_rate: float,
        extrapolate: bool = False,
    ) -> float:
        """Fit on N x D training inputs, calibrate on M x D held-out inputs; returns the threshold."""
        x = np.asarray(train_inputs, dtype=float)
        if x.ndim != 2 or x.shape[0] < max(self.k + 1, 2):
            raise ValueError(f"need a 2-D array of at least {max(self.k + 1, 2)} training inputs")
        self._mean = x.mean(axis=0)
        self._std = np.maximum(x.std(axis=0), 1e-6)
        xn = (x - self._mean) / self._std
        if self.method == "mahalanobis":
            cov = np.cov(xn, rowvar=False).reshape(xn.shape[1], xn.shape[1])
            self._precision = np.linalg.inv(cov + 1e-6 * np.eye(xn.shape[1]))
        else:
            if xn.shape[0] > self.max_reference:
                rng = np.random.default_rng(self.seed)
                xn = xn[rng.choice(xn.shape[0], self.max_reference, replace=False)]
            self._reference = xn
        calibrate = tail_threshold if extrapolate else calibrate_threshold
        self.threshold = calibrate(self.calibration_scores(holdout_inputs), false_alarm_rate)
        return self.threshold

    def calibration_scores(self, holdout_inputs: np.ndarray) -> np.ndarray:
        """Held-out scores plus, for k-NN, the leave-one-out scores of the reference points (the
        (k+1)-th neighbour: the first is the point itself), so the threshold is certified by all the
        data (``n_holdout + n_reference`` scores), not only the small held-out split."""
        held = self.score(holdout_inputs)
        if self.method != "knn":
            return held
        return np.concatenate([held, self.score(self._reference * self._std + self._mean, k=self.k + 1)])

    def score(self, x: np.ndarray, chunk: int = 1024, k: int | None = None) -> np.ndarray:
        """Scores of ``... x D`` inputs (shape ``...``); larger means farther from the data
        (``k`` overrides the k-NN's k)."""
        if not self.fitted:
            raise RuntimeError("OODMonitor.score before fit")
        x = np.asarray(x, dtype=float)
        flat = ((x - self._mean) / self._std).reshape(-1, x.shape[-1])
        if self.method == "mahalanobis":
            out = np.sqrt(np.maximum(np.einsum("nd,de,ne->n", flat, self._precision, flat), 0.0))
        else:
            ref, kk = self._reference, self.k if k is None else k
            ref_sq = np.sum(ref * ref, axis=1)
            out = np.empty(flat.shape[0])
            for i in range(0, flat.shape[0], chunk):
                q = flat[i : i + chunk]
                d2 = np.sum(q * q, axis=1)[:, None] - 2.0 * q @ ref.T + ref_sq[None, :]
                kth = np.partition(d2, kk - 1, axis=1)[:, kk - 1]
                out[i : i + chunk] = np.sqrt(np.maximum(kth, 0.0))
        return out.reshape(x.shape[:-1])
