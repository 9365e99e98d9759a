"""The ensemble's predictive distribution on real inputs, for the monitors and their calibration:
one-step mean and std (aleatoric + epistemic, optionally re-weighted by a fitted variance model)
and the k-step open-loop prediction through the actions really applied. numpy in, numpy out."""

from __future__ import annotations

import math

import numpy as np
import torch

from robot_mbrl.models.ensemble import ProbabilisticEnsemble


@torch.no_grad()
def predictive(model: ProbabilisticEnsemble, obs: np.ndarray, act: np.ndarray, angle_mask: np.ndarray,
               variance_coef: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The ensemble's one-step predictive distribution for ``N x S`` / ``N x A`` real inputs:
    mean ``N x S`` (circular mean on angle channels, so members at +pi and -pi do not average to 0)
    and std ``N x S``: ``sqrt(aleatoric + epistemic)`` (mean member variance + spread of the member
    means), or ``sqrt(a * aleatoric + b * epistemic)`` with ``variance_coef`` = ``[a, b]`` (``2 x S``,
    :func:`~robot_mbrl.safety.calibration.fit_variance_model`)."""
    mean, ale, epi = predictive_parts(model, obs, act, angle_mask)
    return mean, predictive_std(ale, epi, variance_coef)


def predictive_std(
    aleatoric: np.ndarray, epistemic: np.ndarray, variance_coef: np.ndarray | None
) -> np.ndarray:
    """``sqrt(aleatoric + epistemic)``, or ``sqrt(a * aleatoric + b * epistemic)`` with ``[a, b]``."""
    if variance_coef is None:
        return np.sqrt(aleatoric + epistemic)
    return np.sqrt(variance_coef[0] * aleatoric + variance_coef[1] * epistemic)


def open_loop(
    model: ProbabilisticEnsemble, obs0: np.ndarray, acts: np.ndarray, angle_mask: np.ndarray
) -> np.ndarray:
    """``N x S`` start observations and the ``N x k x A`` actions really applied -> the ensemble-mean
    open-loop prediction of the observation ``k`` ticks later (``N x S``), the same computation as
    :meth:`robot_mbrl.agents.mpc.GatedMPC.observe` runs tick by tick for ``monitor.residual_horizon = k``."""
    state = np.asarray(obs0, dtype=float)
    for j in range(acts.shape[1]):
        state, _, _ = predictive_parts(model, state, acts[:, j], angle_mask)
    return state


@torch.no_grad()
def predictive_parts(model: ProbabilisticEnsemble, obs: np.ndarray, act: np.ndarray, angle_mask: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Mean ``N x S``, aleatoric variance ``N x S`` and epistemic variance ``N x S`` (see :func:`predictive`)."""
    pred = model.predict(torch.from_numpy(np.array(obs, dtype=np.float32)),
                         torch.from_numpy(np.array(act, dtype=np.float32)))  # fmt: skip
    members = pred.mean  # E x N x S
    mean = members.mean(0)
    angle = torch.as_tensor(np.asarray(angle_mask, bool))
    if angle.any():
        a = members[..., angle]
        mean[..., angle] = torch.atan2(torch.sin(a).mean(0), torch.cos(a).mean(0))
    dev = members - mean
    dev[..., angle] = torch.remainder(dev[..., angle] + math.pi, 2 * math.pi) - math.pi
    return mean.numpy(), pred.var.mean(0).numpy().astype(float), (dev * dev).mean(0).numpy().astype(float)
