"""Thresholds calibrated on held-out, in-distribution data.

The gate compares a score (worst-step plan disagreement, OOD distance) against a threshold. Both
are calibrated the same way: compute the score on held-out data the model did not train on, then
take an upper quantile so that an in-distribution score exceeds the threshold with probability at
most the target false-alarm rate (the split-conformal quantile, see :func:`calibrate_threshold`).

:func:`plan_disagreement_scores` computes, for held-out real segments, exactly the statistic the
planner reports in ``PlanInfo.worst_disagreement``: every member rolls its own k-step trajectory
with the actions that really followed, and the per-step ``Prediction.disagreement`` is maximized
over the k steps.

:func:`residual_calibration` maps the shift monitor's standardized one-step residuals to zero mean
and identity covariance on held-out data (the ensemble's predicted std is not calibrated by its NLL
training on little data), so the CUSUM levels solved from Siegmund's approximation
(:func:`solve_cusum_h`, which assumes N(0, 1) residuals in control) mean what they say.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from robot_mbrl.models.base import DynamicsModel

log = logging.getLogger(__name__)


def min_calibration_samples(target_false_alarm_rate: float) -> int:
    """Fewest scores for which :func:`calibrate_threshold` gives a finite threshold."""
    return math.ceil(1.0 / target_false_alarm_rate) - 1


def calibrate_threshold(scores: np.ndarray, target_false_alarm_rate: float) -> float:
    """Upper quantile of ``scores`` (shape N) with the finite-sample (conformal) correction.

    With the scores sorted ``s_(1) <= ... <= s_(n)``, the threshold is ``s_(r)`` with
    ``r = ceil((n + 1) (1 - alpha))``. If a new score is exchangeable with the calibration scores
    (same distribution, i.i.d.), then ``alpha - 1/(n+1) < P(new > threshold) <= alpha`` (ties
    aside): the plain empirical quantile ``ceil(n (1 - alpha))`` would exceed alpha by up to 1/n,
    which matters for the small held-out sets and small alpha we use.

    Raises ``ValueError`` when a score is not finite or when ``n`` is too small for ``alpha``
    (``r > n``): a threshold of +inf would make the trigger silently never fire (fail open).
    """
    alpha = float(target_false_alarm_rate)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"target false-alarm rate must be in (0, 1), got {alpha}")
    s = np.asarray(scores, dtype=float).reshape(-1)
    if not np.all(np.isfinite(s)):
        raise ValueError(f"calibration scores must be finite ({int(np.sum(~np.isfinite(s)))} are not)")
    n = s.size
    r = math.ceil((n + 1) * (1.0 - alpha))
    if r > n:
        raise ValueError(
            f"{n} calibration scores cannot certify a false-alarm rate of {alpha}: "
            f"need at least {min_calibration_samples(alpha)}"
        )
    threshold = float(np.partition(s, r - 1)[r - 1])
    log.debug("calibrated threshold %.4g from %d scores (alpha=%g, rank %d)", threshold, n, alpha, r)
    return threshold


def tail_threshold(scores: np.ndarray, target_false_alarm_rate: float, tail_fraction: float = 0.1,
                   min_exceedances: int = 20) -> float:  # fmt: skip
    """Threshold for a false-alarm rate below what the ``n`` scores certify (``alpha < 1/(n+1)``),
    by peaks over threshold: a generalized Pareto distribution (GPD) fitted to the exceedances over
    the empirical ``1 - tail_fraction`` quantile ``u`` and extrapolated to ``alpha``
    (Pickands-Balkema-de Haan; the streaming version is SPOT, Siffer et al., KDD 2017).

    The GPD shape ``xi`` and scale ``sigma`` come from probability-weighted moments (Hosking &
    Wallis 1987), closed form and robust on a few dozen exceedances; ``xi`` is clipped to
    ``[-0.5, 0.5]`` (beyond 0.5 the PWM estimate is invalid, and a very short tail would claim a
    finite end point from few points). The result is ``u + sigma / xi ((alpha n / N_u)^(-xi) - 1)``,
    never below the largest score. Where ``n`` certifies ``alpha`` this is
    :func:`calibrate_threshold` (the conformal quantile, no model). Raises ``ValueError`` for
    non-finite scores or fewer than ``min_exceedances`` points in the tail."""
    alpha = float(target_false_alarm_rate)
    s = np.sort(np.asarray(scores, dtype=float).reshape(-1))
    n = s.size
    if n + 1 >= 1.0 / alpha or not np.all(np.isfinite(s)):
        return calibrate_threshold(s, alpha)  # certifiable (or: raises on non-finite scores)
    n_u = max(min_exceedances, int(round(tail_fraction * n)))
    if n_u >= n:
        raise ValueError(f"tail extrapolation needs more than {n_u} calibration scores, got {n}")
    u = s[n - n_u - 1]
    y = s[n - n_u :] - u  # ascending exceedances
    a0 = float(y.mean())
    if a0 <= 0:  # a flat top: nothing to extrapolate
        return float(s[-1])
    p = (np.arange(1, n_u + 1) - 0.35) / n_u
    a1 = float(np.mean((1.0 - p) * y))
    k = a0 / (a0 - 2.0 * a1) - 2.0  # Hosking's k = -xi
    xi = float(np.clip(-k, -0.5, 0.5))
    sigma = max(2.0 * a0 * a1 / (a0 - 2.0 * a1), 1e-12) if a0 > 2.0 * a1 else a0
    tail = alpha * n / n_u  # conditional exceedance probability beyond u
    excess = sigma * math.log(1.0 / tail) if abs(xi) < 1e-6 else sigma / xi * (tail ** (-xi) - 1.0)
    threshold = max(float(u + excess), float(s[-1]))
    log.debug("tail threshold %.4g from %d scores (alpha=%g, xi=%.3f, sigma=%.3g, u=%.4g)",
              threshold, n, alpha, xi, sigma, u)  # fmt: skip
    return threshold


@torch.no_grad()
def plan_disagreement_scores(
    model: DynamicsModel,
    obs0: np.ndarray | torch.Tensor,
    actions: np.ndarray | torch.Tensor,
    batch_size: int = 4096,
) -> np.ndarray:
    """Worst-step ensemble disagreement along real action sequences.

    ``obs0``: N x S real observations at the start of each held-out segment; ``actions``:
    N x k x A, the k actions that really followed. Every member propagates its own trajectory
    (E x N x S inputs to ``model.predict``), the disagreement of step t is the model's own
    ``Prediction.disagreement`` (N), and the score is its maximum over the k steps, the same
    statistic as ``PlanInfo.worst_disagreement``. With the planner's ``action_repeat`` r > 1, pass
    the ``k * r`` real per-tick actions (the planner maximizes over all ticks as well). Returns N
    scores (numpy, float64). Batched over segments in chunks of ``batch_size``.
    """
    obs0_t = torch.as_tensor(obs0, dtype=torch.float32)
    act_t = torch.as_tensor(actions, dtype=torch.float32)
    if obs0_t.ndim != 2 or act_t.ndim != 3 or act_t.shape[0] != obs0_t.shape[0]:
        raise ValueError(
            f"expected obs0 N x S and actions N x k x A, got {tuple(obs0_t.shape)}, {tuple(act_t.shape)}"
        )
    n, k = act_t.shape[0], act_t.shape[1]
    if k < 1:
        raise ValueError("segments need at least one action")
    num_members = model.num_members
    out = torch.empty(n, dtype=torch.float64)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        obs = obs0_t[start:stop].unsqueeze(0).expand(num_members, -1, -1).contiguous()  # E x B x S
        worst = torch.full((stop - start,), float("-inf"), dtype=torch.float64)
        for t in range(k):
            act = act_t[start:stop, t].unsqueeze(0).expand(num_members, -1, -1)  # E x B x A
            pred = model.predict(obs, act)
            worst = torch.maximum(worst, pred.disagreement.to(torch.float64))
            obs = pred.mean
        out[start:stop] = worst
    return out.numpy()


SIEGMUND_OFFSET = 1.166  # b = h + 1.166: Siegmund's correction for the overshoot of the boundary


def siegmund_arl(h: float, k: float, mu: float) -> float:
    """Average run length of a one-sided upper CUSUM ``S = max(0, S + z - k)``, alarm ``S > h``,
    for ``z ~ N(mu, 1)`` (Siegmund 1985, *Sequential Analysis*, eq. 2.57)::

        ARL ~= (exp(-2 D b) + 2 D b - 1) / (2 D^2),   D = mu - k,  b = h + 1.166
        ARL ~= b^2                                     (D = 0)
    """
    d = mu - k
    b = h + SIEGMUND_OFFSET
    if abs(d) < 1e-9:
        return b * b
    x = -2.0 * d * b  # beyond exp's float range the run length is astronomically long: inf
    return math.inf if x > 700.0 else (math.exp(x) - x - 1.0) / (2.0 * d * d)


def solve_cusum_h(k: float, one_sided_arl0: float) -> float:
    """The alarm level h for which one side's in-control ARL (mu = 0) equals ``one_sided_arl0``.

    The ARL grows monotonically in h, so bisection on [0, 1000] converges.
    """
    lo, hi = 0.0, 1000.0
    if siegmund_arl(lo, k, 0.0) >= one_sided_arl0:
        return lo
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if siegmund_arl(mid, k, 0.0) < one_sided_arl0:
            lo = mid
        else:
            hi = mid
    return hi


def residual_calibration(
    z: np.ndarray, min_var: float = 1e-6, full: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """``(bias, whiten)`` from held-out standardized residuals ``z`` (``N x S``): ``bias`` ``S`` and
    the ZCA whitening matrix ``whiten`` ``S x S`` (symmetric ``Sigma^-1/2``) such that
    ``(z - bias) @ whiten.T`` has zero mean and identity covariance on them - the independent N(0, 1)
    channels the CUSUM's Siegmund levels assume. Model errors of coupled channels (cart and pole
    velocities) are correlated; after whitening, a shift that breaks the usual pattern stands out.
    ``full=False``: only per-channel scales (a diagonal ``whiten``). Rows with a non-finite entry are dropped; eigenvalues are floored at ``min_var``. Raises
    ``ValueError`` with fewer than ``max(10, 2 S)`` usable rows."""
    z = np.asarray(z, dtype=float)
    z = z[np.all(np.isfinite(z), axis=1)]
    need = max(10, 2 * z.shape[1])
    if len(z) < need:
        raise ValueError(f"residual calibration needs >= {need} finite held-out residuals, got {len(z)}")
    bias = z.mean(axis=0)
    cov = np.atleast_2d(np.cov(z - bias, rowvar=False))
    if not full:
        return bias, np.diag(1.0 / np.sqrt(np.maximum(np.diag(cov), min_var)))
    evals, evecs = np.linalg.eigh(cov)
    whiten = (evecs / np.sqrt(np.maximum(evals, min_var))) @ evecs.T
    return bias, whiten


def long_run_inflation(z: np.ndarray, groups: np.ndarray, batch: int, min_batches: int = 5) -> np.ndarray:
    """Per-channel factor ``lambda >= 1`` by which serial correlation (and a bias) of calibrated
    residuals ``z`` (``N x S``, rows in time order, ``groups`` ``N`` episode ids) inflates the
    variance of their sums: ``lambda^2 = batch * mean(batch_mean^2)`` over non-overlapping batches of
    ``batch`` consecutive rows within a group (the batch-means estimate of the long-run variance
    about 0, in units of the nominal variance 1). A CUSUM accumulates sums, so its in-control run
    length on autocorrelated residuals is that of i.i.d. residuals with std ``lambda``: dividing
    ``z`` by ``lambda`` restores the ARL0 that Siegmund's levels promise. Ones (no change) with fewer
    than ``min_batches`` batches; non-finite rows are dropped."""
    z = np.asarray(z, dtype=float)
    groups = np.asarray(groups).reshape(-1)
    ok = np.all(np.isfinite(z), axis=1)
    means = []
    for g in np.unique(groups[ok]):
        zg = z[ok & (groups == g)]
        nb = len(zg) // batch
        if nb:
            means.append(zg[: nb * batch].reshape(nb, batch, -1).mean(axis=1))
    if sum(len(m) for m in means) < min_batches:
        return np.ones(z.shape[1])
    m = np.concatenate(means)
    return np.sqrt(np.maximum(batch * np.mean(m**2, axis=0), 1.0))


def fit_variance_model(residual: np.ndarray, aleatoric: np.ndarray, epistemic: np.ndarray) -> np.ndarray:
    """Per-channel ``[a, b]`` (``2 x S``, both >= 0) with ``residual^2 ~ a * aleatoric + b * epistemic``
    on held-out data (least squares on the squared residuals; a negative coefficient is dropped and
    the other refitted alone). The ensemble's disagreement grows where the model has seen little data,
    and a policy that moves into such states should not look like a changed robot: the fitted
    variance follows it there, while a real dynamics change (same inputs, new outputs) does not
    raise the disagreement and stands out. Non-finite rows are ignored; falls back to ``[1, 1]``."""
    r2 = np.square(np.asarray(residual, dtype=float))
    ale, epi = np.asarray(aleatoric, dtype=float), np.asarray(epistemic, dtype=float)
    coef = np.ones((2, r2.shape[1]))
    for c in range(r2.shape[1]):
        ok = np.isfinite(r2[:, c]) & np.isfinite(ale[:, c]) & np.isfinite(epi[:, c])
        y, x = r2[ok, c], np.stack([ale[ok, c], epi[ok, c]], 1)
        if len(y) < 10:
            continue
        ab = np.linalg.lstsq(x, y, rcond=None)[0]
        if np.any(ab < 0):  # keep the better single-term fit
            single = [(float(x[:, i] @ y / max(x[:, i] @ x[:, i], 1e-300)), i) for i in (0, 1)]
            errs = [np.sum((y - k * x[:, i]) ** 2) for k, i in single]
            k, i = single[int(np.argmin(errs))]
            ab = np.zeros(2)
            ab[i] = max(k, 0.0)
        if ab.sum() > 0:
            coef[:, c] = ab
    return coef
