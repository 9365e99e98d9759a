"""Calibration of the shift monitors for an agent's current model: the OOD threshold and the
residual CUSUM's bias / whitening (and variance model), from the held-out data kept in the
checkpoint plus, after ``robot-mbrl commission``, the deployed controller's own Phase-I run."""

from __future__ import annotations

import logging
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import numpy as np

from robot_mbrl.agents.predictive import open_loop, predictive_parts, predictive_std
from robot_mbrl.data.buffer import chain_breaks
from robot_mbrl.safety.calibration import (
    fit_variance_model,
    long_run_inflation,
    residual_calibration,
    tail_threshold,
)
from robot_mbrl.safety.monitors import ShiftMonitor

if TYPE_CHECKING:
    from robot_mbrl.agents.mpc import MPCAgent

log = logging.getLogger(__name__)

#: length of the held-out real segments kept in the checkpoint for k-step residual calibration
#: (the largest ``monitor.residual_horizon``)
SEGMENT_TICKS = 10


def calibrate_monitor(agent: MPCAgent, monitor: ShiftMonitor) -> None:
    """OOD threshold and CUSUM residual calibration from the model's training and held-out
    data (kept in the checkpoint), for the current model and monitor config."""
    ref = agent.ood_reference
    monitor.uncalibrated = "no held-out data in the checkpoint"  # until calibrated below
    if ref is None or len(ref["holdout_obs"]) < 10:
        return
    held = {k: pooled(ref, k) for k in ("obs", "act", "next_obs")}  # held-out + commissioning
    n = len(held["obs"])
    if agent.cfg.monitor.ood_method == "knn":  # + leave-one-out scores of the reference
        n += min(len(ref["train_obs"]), agent.cfg.monitor.ood_max_reference)
    rate = agent.cfg.monitor.ood_false_alarm_rate
    if agent.cfg.monitor.ood_tail == "empirical" or n < 200:  # no tail fit on a few dozen scores
        rate = max(rate, 1.0 / (n + 1))  # what n samples certify
    ood = monitor.fit_ood(ref["train_obs"], ref["train_act"], held["obs"], held["act"], rate)
    agent.thresholds["ood"] = float(ood)
    k = agent.cfg.monitor.residual_horizon
    z, n_comm, groups = None, 0, None  # uncalibrated residuals: held-out rows, then commissioning rows
    if k > 1:
        agent.variance_coef = None
        if len(ref.get("segment_obs0", ())) >= 2 * agent.spec.obs_dim:
            obs0, acts, target = (
                ref["segment_obs0"],
                ref["segment_act"][:, :k],
                ref["segment_next_obs"][:, k - 1],
            )
            if len(ref.get("commission_obs", ())) > 0:  # every k-tick window inside an episode
                c_obs0, c_act, c_next, groups = commission_windows(ref, k)
                obs0, acts = np.concatenate([obs0, c_obs0]), np.concatenate([acts, c_act])
                target, n_comm = np.concatenate([target, c_next]), len(c_obs0)
            pred = open_loop(agent.model, obs0, acts, agent.spec.angle_mask)
            z = monitor.residual_z(target, pred, np.ones_like(pred), calibrated=False)
        else:
            log.warning(
                "monitor.residual_horizon=%d: the checkpoint holds no held-out %d-tick segments; "
                "residual CUSUM uncalibrated", k, SEGMENT_TICKS,
            )  # fmt: skip
    elif "holdout_next_obs" in ref and len(held["obs"]) >= 2 * agent.spec.obs_dim:
        mean, ale, epi = predictive_parts(agent.model, held["obs"], held["act"], agent.spec.angle_mask)
        nxt = held["next_obs"]
        agent.variance_coef = None
        if agent.cfg.monitor.variance_model:  # fitted on the raw (angle-wrapped) residuals
            raw = monitor.residual_z(nxt, mean, np.ones_like(mean), calibrated=False)
            agent.variance_coef = fit_variance_model(raw, ale, epi)
        z = monitor.residual_z(nxt, mean, predictive_std(ale, epi, agent.variance_coef), calibrated=False)
        n_comm = len(held["obs"]) - len(ref["holdout_obs"])
        groups = ref.get("commission_episode")
    if z is None:  # the residuals cannot be judged: where the monitors gate, that is an alarm
        monitor.uncalibrated = f"no held-out residuals for monitor.residual_horizon={k}"
        return
    monitor.uncalibrated = None
    bias, whiten = residual_calibration(z, full=agent.cfg.monitor.whiten)
    batch = agent.cfg.monitor.autocorr_batch_ticks
    agent.thresholds.pop("residual_inflation", None)
    if batch > 0 and n_comm > 0:  # commissioning rows are in time order, after the held-out ones
        infl = long_run_inflation((z[len(z) - n_comm :] - bias) @ whiten.T, groups, batch)
        whiten = whiten / infl[:, None]
        agent.thresholds["residual_inflation"] = infl.tolist()
    monitor.set_residual_calibration(bias, whiten)
    agent.thresholds.update(residual_bias=bias.tolist(), residual_whiten=whiten.tolist())
    _calibrate_jump(agent, monitor, (z - bias) @ whiten.T)


def _calibrate_jump(agent: MPCAgent, monitor: ShiftMonitor, z: np.ndarray) -> None:
    """Threshold of the jump check at ``monitor.jump_false_alarm_rate`` per tick: a GPD tail fit of
    the largest calibrated |z| per calibration row (held-out + commissioning; off below 200 rows),
    never below what independent unit Gaussians on the watched channels give at that rate. The
    floor matters where the calibration rows have a short tail: extrapolating ~1,300 scores three
    decades down with a bounded GPD put one checkpoint's threshold at 3.6, below the largest |z| of
    its own 10k in-control ticks (4.2; 3 false alarms; RESULTS.md)."""
    rate = agent.cfg.monitor.jump_false_alarm_rate
    scores = np.abs(z[:, monitor.watched]).max(1) if len(z) else np.zeros(0)
    scores = scores[np.isfinite(scores)]
    if rate <= 0 or len(scores) < 200:
        agent.thresholds.pop("jump", None)
        return
    gauss = NormalDist().inv_cdf(1.0 - rate / (2 * int(monitor.watched.sum())))
    thr = max(tail_threshold(scores, rate), gauss)
    monitor.set_jump_threshold(thr)
    agent.thresholds["jump"] = float(thr)


def segment_starts(
    episode: np.ndarray, terminated: np.ndarray, rows: np.ndarray, length: int, whole: bool = False
) -> np.ndarray:
    """The ``rows`` (time-ordered indices) whose next ``length`` ticks stay inside one episode and
    do not pass a row that ends a chain (``terminated``: a termination, or a row whose next row is
    not its successor) before the last of them (``whole``: and are all in ``rows``, i.e. held out
    in full)."""
    n, rows = len(episode), np.asarray(rows)
    member = np.zeros(n + length, bool)
    member[rows] = True
    starts = rows[rows + length <= n]
    ok = np.array([episode[i] == episode[i + length - 1] and not terminated[i : i + length - 1].any()
                   and (not whole or member[i : i + length].all()) for i in starts], dtype=bool)  # fmt: skip
    return starts[ok] if len(starts) else starts


def segments(
    arrays: dict[str, np.ndarray], rows: np.ndarray, length: int, whole: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Real segments that start at ``rows`` and continue ``length`` ticks inside one episode
    (``whole``: only those held out in full, see :func:`segment_starts`).

    Returns ``obs0`` (N x S), the actions that really followed (N x length x A) and the
    observations they led to (N x length x S)."""
    ends = arrays["terminated"] | arrays["truncated"]  # (the buffer marks its chain breaks truncated)
    starts = segment_starts(arrays["episode_id"], ends, rows, length, whole)
    idx = starts[:, None] + np.arange(length)[None, :]
    return arrays["obs"][starts], arrays["act"][idx], arrays["next_obs"][idx]


def commission_windows(ref: dict[str, np.ndarray], k: int) -> tuple[np.ndarray, ...]:
    """Every ``k``-tick window of the commissioning run that stays inside one episode, in time
    order: ``obs0`` (M x S), the ``k`` actions applied (M x k x A), the observation after the last
    (M x S), and each window's episode id (M)."""
    obs, act, nxt, ep = (ref[f"commission_{key}"] for key in ("obs", "act", "next_obs", "episode"))
    ends = np.zeros(len(ep), bool)
    ends[:-1] = chain_breaks(obs, nxt, ep)  # (a tick the robot did not vouch for was left out)
    starts = segment_starts(ep, ends, np.arange(len(ep)), k)
    idx = starts[:, None] + np.arange(k)[None, :]
    return obs[starts], act[idx], nxt[starts + k - 1], ep[starts]


def pooled(ref: dict[str, np.ndarray], key: str) -> np.ndarray:
    """Held-out rows of ``key`` (obs / act / next_obs), plus the commissioning rows if any."""
    held = ref[f"holdout_{key}"]
    extra = ref.get(f"commission_{key}")
    return held if extra is None or len(extra) == 0 else np.concatenate([held, extra.astype(held.dtype)])


def commission(
    agent: MPCAgent, obs: np.ndarray, act: np.ndarray, next_obs: np.ndarray, episode: np.ndarray | None = None
) -> dict[str, Any]:
    """Phase-I calibration of the shift monitors on the deployed controller's own real
    transitions (``N x S``, ``N x A``, ``N x S``, from an in-control run of this checkpoint).

    The monitors are otherwise calibrated on held-out transitions of the training buffer, i.e.
    on the states the *learning* policies visited. The final controller goes further (a better
    swing-up reaches faster, higher states), where the model's residuals are larger and the
    inputs farther from the training data: on an unchanged robot that reads as a shift. As in
    statistical process control, an in-control Phase-I run of the deployed system sets the
    control limits: its transitions join the held-out set for the residual CUSUM's bias,
    whitening and variance model and for the OOD threshold, and their serial correlation scales
    the CUSUM's residuals (``monitor.autocorr_batch_ticks``; rows in time order, ``episode`` ``N``
    ids, default one episode). They never train the model or V, and
    the next retrain drops them (a new model needs a new commissioning run). Returns the
    thresholds before and after."""
    obs, act, nxt = (np.asarray(a, dtype=np.float32) for a in (obs, act, next_obs))
    if not (obs.ndim == nxt.ndim == act.ndim == 2 and len(obs) == len(act) == len(nxt)):
        raise ValueError(f"commission: expected N x S obs/next_obs and N x A act, got {obs.shape}, "
                         f"{act.shape}, {nxt.shape}")  # fmt: skip
    if agent.ood_reference is None:
        raise ValueError("commission: the agent has no held-out calibration data (train it first)")
    keep = np.all(np.isfinite(obs), 1) & np.all(np.isfinite(act), 1) & np.all(np.isfinite(nxt), 1)
    ep = np.zeros(len(obs), np.int64) if episode is None else np.asarray(episode, np.int64).reshape(-1)
    if len(ep) != len(obs):
        raise ValueError(f"commission: expected {len(obs)} episode ids, got {len(ep)}")
    for key in ("obs", "act", "next_obs", "episode"):  # a re-commissioning replaces the previous run
        agent.ood_reference.pop(f"commission_{key}", None)
    calibrate_monitor(agent, ShiftMonitor(agent.spec, agent.cfg.monitor))
    before = {k: agent.thresholds.get(k) for k in ("ood", "residual_bias")}
    agent.ood_reference.update(
        commission_obs=obs[keep],
        commission_act=act[keep],
        commission_next_obs=nxt[keep],
        commission_episode=ep[keep],
    )
    calibrate_monitor(agent, ShiftMonitor(agent.spec, agent.cfg.monitor))
    after = {k: agent.thresholds.get(k) for k in ("ood", "residual_bias")}
    agent.thresholds["commission_transitions"] = int(keep.sum())
    return {
        "transitions": int(keep.sum()),
        "dropped_non_finite": int((~keep).sum()),
        "before": before,
        "after": after,
    }
