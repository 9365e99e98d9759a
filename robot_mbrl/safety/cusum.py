"""CUSUM detectors on standardized one-step residuals ``z`` (``D`` per tick, N(0, 1) in control).

* :class:`CusumMonitor` - two-sided, per-dimension CUSUM for a change in the residual MEAN.
* :class:`VarianceCusum` - one-sided, per-dimension CUSUM for an increase of the residual VARIANCE.

A dynamics change seen through a closed loop often moves residuals both ways (their sign follows
the motion), so their mean barely changes while their spread grows: ``benchmarks/bench_shift.py
--residual-stats`` measured the pole-mass x2 shift as RMS x1.3-1.7 with mean changes under 0.15 std
on the twin. The variance detector sees that; the mean detector sees biases (e.g. a sensor offset).
"""

from __future__ import annotations

import math

import numpy as np

from robot_mbrl.safety.calibration import siegmund_arl, solve_cusum_h


class CusumMonitor:
    """Two-sided CUSUM on standardized residuals ``z`` (D per tick).

    Per dimension: ``S+ = max(0, S+ + z - k)``, ``S- = max(0, S- - z - k)``; alarm while
    ``max(S+, S-) > h`` in any dimension. ``k = shift_sigma / 2`` (optimal for detecting a mean
    shift of ``shift_sigma``); ``h`` is solved from Siegmund's approximation so that the whole
    monitor's in-control ARL is ``arl0_ticks``: with ``2 D`` independent one-sided detectors
    (two sides, D dims with ``aggregate="max"``, D = 1 with ``"mean"``) the first false alarm comes
    at ``ARL_one / (2 D)``, so each one-sided detector gets ``ARL_one = 2 D arl0_ticks``. This
    assumes the residuals are N(0, 1) in control, i.e. a calibrated predicted std.

    Statistics are capped at ``cap_factor * h`` so that after a shift ends the alarm clears within
    about ``(cap_factor - 1) h / k`` ticks. The statistic is not restarted on alarm: the alarm
    holds while the shift persists and is cleared by :meth:`reset` (after a retrain).
    """

    def __init__(
        self,
        num_dims: int,
        arl0_ticks: float = 10_000.0,
        shift_sigma: float = 1.0,
        aggregate: str = "max",
        z_clip: float = 6.0,
        cap_factor: float = 2.0,
    ):
        if aggregate not in ("max", "mean"):
            raise ValueError(f"aggregate must be max or mean, got {aggregate!r}")
        self.num_dims = num_dims
        self.aggregate = aggregate
        self.detectors = num_dims if aggregate == "max" else 1
        self.k = shift_sigma / 2.0
        self.h = solve_cusum_h(self.k, 2.0 * self.detectors * arl0_ticks)
        self.z_clip = z_clip
        self.cap = cap_factor * self.h
        self.s_pos = np.zeros(self.detectors)
        self.s_neg = np.zeros(self.detectors)

    @property
    def threshold(self) -> float:
        return self.h

    @property
    def score(self) -> float:
        return float(max(self.s_pos.max(), self.s_neg.max()))

    @property
    def alarm(self) -> bool:
        return self.score > self.h

    def expected_delay(self, shift: float) -> float:
        """Siegmund ARL for a mean shift ``shift`` (in std) in ONE residual dimension.

        With ``aggregate="mean"`` the aggregated residual sees ``shift / sqrt(D)``.
        """
        mu = shift if self.aggregate == "max" else shift / math.sqrt(self.num_dims)
        rate = 1.0 / siegmund_arl(self.h, self.k, mu) + 1.0 / siegmund_arl(self.h, self.k, -mu)
        rate += 2.0 * (self.detectors - 1) / siegmund_arl(self.h, self.k, 0.0)
        return 1.0 / rate

    def update(self, z: np.ndarray) -> bool:
        """Add one tick of standardized residuals (D); returns whether the monitor is in alarm."""
        z = np.clip(np.asarray(z, dtype=float).reshape(self.num_dims), -self.z_clip, self.z_clip)
        if self.aggregate == "mean":
            z = np.array([z.sum() / math.sqrt(self.num_dims)])
        self.s_pos = np.clip(self.s_pos + z - self.k, 0.0, self.cap)
        self.s_neg = np.clip(self.s_neg - z - self.k, 0.0, self.cap)
        return self.alarm

    def reset(self) -> None:
        self.s_pos[:] = 0.0
        self.s_neg[:] = 0.0


class VarianceCusum:
    """Upper CUSUM of the log-likelihood ratio for ``z_d ~ N(0, ratio)`` vs ``N(0, 1)``::

        l_d = 0.5 (1 - 1/ratio) min(z_d^2, z_clip^2) - 0.5 ln(ratio)

    ``aggregate="sum"``: one statistic ``S = min(cap, max(0, S + sum_d l_d))`` - the LLR of "every
    channel's variance grew", which adds up the evidence of a change that spreads over coupled
    channels (a mass change moves cart and pole residuals); ``"max"``: one statistic per dimension,
    alarm on any. For a likelihood-ratio CUSUM the in-control run length is at least ``e^h`` (Wald /
    Lorden), so ``h = ln(arl0_ticks)`` (``ln(D arl0_ticks)`` for ``"max"``) gives the monitor an ARL
    of at least ``arl0_ticks`` for independent N(0, 1) residuals (conservative: overshoot ignored).
    The clip bounds what one glitch can add (``0.5 (1 - 1/ratio) z_clip^2`` per channel).
    """

    def __init__(self, num_dims: int, arl0_ticks: float = 10_000.0, ratio: float = 2.0, z_clip: float = 6.0,
                 cap_factor: float = 2.0, aggregate: str = "sum"):  # fmt: skip
        if ratio <= 1.0:
            raise ValueError(f"variance ratio must be > 1, got {ratio}")
        if aggregate not in ("sum", "max"):
            raise ValueError(f"aggregate must be sum or max, got {aggregate!r}")
        self.num_dims, self.ratio, self.z_clip, self.aggregate = num_dims, ratio, z_clip, aggregate
        self.a, self.b = 0.5 * (1.0 - 1.0 / ratio), 0.5 * math.log(ratio)
        detectors = 1 if aggregate == "sum" else num_dims
        self.h = math.log(detectors * arl0_ticks)
        self.cap = cap_factor * self.h
        self.s = np.zeros(detectors)

    @property
    def threshold(self) -> float:
        return self.h

    @property
    def score(self) -> float:
        return float(self.s.max())

    @property
    def alarm(self) -> bool:
        return self.score > self.h

    def expected_delay(self, variance_ratio: float | np.ndarray) -> float:
        """Wald's approximation of the ticks to alarm when the residual variances grow by
        ``variance_ratio`` (a scalar: one dimension, the others in control; or ``D`` per-dimension
        ratios). inf when the statistic does not drift up."""
        r = np.ones(self.num_dims)
        r[:] = variance_ratio if np.ndim(variance_ratio) else [variance_ratio] + [1.0] * (self.num_dims - 1)
        per_dim = self.a * r - self.b
        drift = per_dim.sum() if self.aggregate == "sum" else per_dim.max()
        return self.h / drift if drift > 0 else math.inf

    def update(self, z: np.ndarray) -> bool:
        z = np.minimum(np.square(np.asarray(z, dtype=float).reshape(self.num_dims)), self.z_clip**2)
        llr = self.a * z - self.b
        self.s = np.clip(self.s + (llr.sum(keepdims=True) if self.aggregate == "sum" else llr), 0.0, self.cap)
        return self.alarm

    def reset(self) -> None:
        self.s[:] = 0.0
