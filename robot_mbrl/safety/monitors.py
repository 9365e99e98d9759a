"""Distribution-shift monitors: residual CUSUM, input OOD score and the retrain val-loss signal.

:class:`ShiftMonitor` combines three detectors and turns their states into debounced alarm events:

* :class:`CusumMonitor` - two-sided CUSUM on one-step (or k-step, ``residual_horizon``)
  residuals ``z = (real next obs - ensemble mean) / predicted std``; detects the dynamics
  drifting away from the model.
* :class:`~robot_mbrl.safety.ood.OODMonitor` - how far the current input (s, a) lies from the
  training inputs (k-NN or Mahalanobis distance in normalized units), thresholded at a
  calibrated quantile.
* jump - a Shewhart check on the same residuals: the largest calibrated ``|z|`` of one tick above
  a tail-fitted threshold (a step change such as a sensor offset, which the clipped CUSUM counts
  as one ordinary tick); latched until the episode ends.
* :class:`ValLossMonitor` - the trainer's "loss on fresh data / loss on holdout" ratio.

Alarms clear on :meth:`ShiftMonitor.on_retrain` (the model has seen the new data).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from robot_mbrl.hal.robot import Observation, RobotSpec
from robot_mbrl.safety.calibration import calibrate_threshold, siegmund_arl, solve_cusum_h  # noqa: F401
from robot_mbrl.safety.cusum import CusumMonitor, VarianceCusum
from robot_mbrl.safety.ood import OODMonitor
from robot_mbrl.typedconfig import param, require_names

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShiftConfig:
    """Shift monitors (section ``safety.monitors``)."""

    arl0_ticks: float = param(10_000.0, "target in-control average run length of the residual CUSUM", gt=1)
    shift_sigma: float = param(1.0, "residual mean shift (in predicted std) the CUSUM is tuned for", gt=0)
    variance_ratio: float = param(
        0.0,
        "variance CUSUM tuned for a residual variance increase by this factor (<= 1: off; see RESULTS.md)",
        ge=0,
    )
    variance_aggregate: str = param(
        "sum", "variance CUSUM on the summed LLR of all channels, or one per channel", choices=("sum", "max")
    )
    aggregate: str = param(
        "max", "per-dim CUSUMs (max) or one on sum(z)/sqrt(S) (mean)", choices=("max", "mean")
    )
    z_clip: float = param(6.0, "clip |z| per tick so one sensor glitch cannot alarm alone", gt=0)
    cap_factor: float = param(2.0, "CUSUM statistics are capped at cap_factor*h (bounded recovery)", gt=1)
    min_std: float = param(1e-3, "floor on the predicted std used to normalize residuals", gt=0)
    residual_channels: tuple[str, ...] = param(
        (), "observation channels the residual CUSUMs watch (empty: all), e.g. leave out a command readback"
    )
    variance_model: bool = param(
        True,
        "residual variance = a * aleatoric + b * epistemic per channel, fitted on held-out data "
        "(false: the ensemble's own aleatoric + epistemic)",
    )
    whiten: bool = param(
        False, "decorrelate residuals too (full ZCA on held-out data); false: per-channel bias and scale"
    )
    residual_horizon: int = param(
        1,
        "ticks of open-loop prediction behind each residual (1: one-step; k > 1: the ensemble-mean "
        "prediction of s_t from s_(t-k) and the k actions really applied, which lets a dynamics "
        "change accumulate over k ticks; calibrated per channel on held-out real segments)",
        ge=1,
        le=10,
    )
    autocorr_batch_ticks: int = param(
        25,
        "with commissioning data (robot-mbrl commission): batch length of the long-run variance "
        "estimate that scales the CUSUM residuals for serial correlation (0: off)",
        ge=0,
    )
    ood_method: str = param("knn", "input OOD score", choices=("knn", "mahalanobis"))
    knn_k: int = param(5, "k of the k-NN distance", ge=1)
    ood_max_reference: int = param(20_000, "training inputs kept as k-NN reference (seeded subsample)", ge=10)
    ood_false_alarm_rate: float = param(1e-4, "per-tick false-alarm rate of the OOD threshold", gt=0, lt=1)
    ood_tail: str = param(
        "gpd",
        "OOD threshold below the rate n calibration scores certify (1/(n+1)): 'empirical' calibrates "
        "at 1/(n+1) instead (the largest score), 'gpd' extrapolates a generalized Pareto tail fit",
        choices=("empirical", "gpd"),
    )
    jump_false_alarm_rate: float = param(
        1e-6,
        "Shewhart check on the largest calibrated residual |z| of a tick (0: off): a step change (a "
        "sensor offset, a slipped encoder, a loose coupling) shows as one large residual that the "
        "clipped CUSUM counts as one ordinary tick; threshold from a GPD tail fit of the calibration "
        "residuals at this per-tick rate; the alarm holds until the episode ends or a retrain",
        ge=0,
        lt=1,
    )
    ood_persist_ticks: int = param(3, "OOD score must exceed its threshold this many ticks in a row", ge=1)
    val_loss_factor: float = param(2.0, "alarm when fresh loss / holdout loss exceeds this", gt=1)
    debounce_ticks: int = param(100, "an alarm re-fires only after it stayed clear this long", ge=0)
    reset_each_episode: bool = param(
        True,
        "CUSUM statistics and the OOD streak restart with every episode (a new start is not the "
        "continuation of the last episode's final, worst-modelled ticks); false: evidence carries over",
    )
    gate_while_learning: bool = param(
        False, "monitor alarms switch to the fallback in train's learning episodes too (else: logged only)"
    )
    seed: int = param(0, "seed of the k-NN reference subsample")


class ValLossMonitor:
    """Alarms when the trainer reports fresh-data loss above ``factor`` x its holdout loss."""

    def __init__(self, factor: float = 2.0):
        self.factor = factor
        self.ratio = 0.0
        self.alarm = False

    @property
    def threshold(self) -> float:
        return self.factor

    @property
    def score(self) -> float:
        return self.ratio

    def update(self, fresh_loss: float, holdout_loss: float) -> bool:
        ratio = fresh_loss / max(holdout_loss, 1e-12)
        self.ratio = ratio if math.isfinite(ratio) else math.inf
        self.alarm = self.ratio > self.factor
        return self.alarm

    def reset(self) -> None:
        self.ratio, self.alarm = 0.0, False


class _Debounce:
    """Rising-edge alarm events; an alarm re-fires only after it stayed clear ``ticks`` long."""

    def __init__(self, ticks: int):
        self.ticks = ticks
        self.latched = False
        self.clear_since: int | None = None

    def update(self, active: bool, tick: int) -> bool:
        if active:
            self.clear_since = None
            if not self.latched:
                self.latched = True
                return True
            return False
        if self.latched:
            self.clear_since = tick if self.clear_since is None else self.clear_since
            if tick - self.clear_since >= self.ticks:
                self.latched = False
        return False


def _values(x: Observation | np.ndarray) -> np.ndarray:
    return np.asarray(x.values if isinstance(x, Observation) else x, dtype=float).reshape(-1)


class ShiftMonitor:
    """The three shift detectors behind one per-tick call, with debounced alarm events.

    Event records: ``{"tick", "kind": "alarm", "trigger": "cusum"|"cusum_var"|"ood"|"val_loss", "reason",
    "score", "threshold"}``. :meth:`active_alarms` is what the gate reads before each write.
    """

    NAMES = ("cusum", "cusum_var", "ood", "jump", "val_loss")

    def __init__(self, spec: RobotSpec, cfg: ShiftConfig | None = None):
        self.spec = spec
        self.cfg = cfg = cfg or ShiftConfig()
        self.error: str | None = None  # why the last update failed (an alarm until the episode ends)
        # why the residuals cannot be judged (set by the agent's calibration; an alarm while set)
        self.uncalibrated: str | None = None
        require_names("monitor.residual_channels", cfg.residual_channels, spec.obs_names)
        # the observation channels whose residuals the CUSUMs watch (all when none are named)
        self.watched = np.array(
            [not cfg.residual_channels or n in cfg.residual_channels for n in spec.obs_names]
        )
        self.variance = (
            VarianceCusum(
                int(self.watched.sum()),
                cfg.arl0_ticks,
                cfg.variance_ratio,
                cfg.z_clip,
                cfg.cap_factor,
                cfg.variance_aggregate,
            )  # fmt: skip
            if cfg.variance_ratio > 1.0
            else None
        )
        self.cusum = CusumMonitor(
            int(self.watched.sum()),
            cfg.arl0_ticks,
            cfg.shift_sigma,
            cfg.aggregate,
            cfg.z_clip,
            cfg.cap_factor,
        )
        self.ood = OODMonitor(cfg.ood_method, cfg.knn_k, cfg.ood_max_reference, cfg.seed)
        self.val_loss = ValLossMonitor(cfg.val_loss_factor)
        self.ood_score = 0.0
        self._ood_streak = 0
        self.jump_threshold = math.inf  # set by calibration (set_jump_threshold)
        self.jump_score, self._jump_latched = 0.0, False
        self.residual_bias, self.residual_whiten = np.zeros(spec.obs_dim), np.eye(spec.obs_dim)
        self._debounce = {name: _Debounce(cfg.debounce_ticks) for name in self.NAMES}

    # -- inputs ----------------------------------------------------------------------------
    def features(self, obs: np.ndarray, act: np.ndarray) -> np.ndarray:
        """Model input (s, a) with angle channels as (sin, cos): ``... x S``, ``... x A`` ->
        ``... x (S + n_angles + A)``."""
        obs, act = np.asarray(obs, dtype=float), np.asarray(act, dtype=float)
        mask = self.spec.angle_mask
        parts = [obs[..., ~mask], np.sin(obs[..., mask]), np.cos(obs[..., mask]), act]
        return np.concatenate(parts, axis=-1)

    def fit_ood(
        self,
        train_obs: np.ndarray,
        train_act: np.ndarray,
        holdout_obs: np.ndarray,
        holdout_act: np.ndarray,
        false_alarm_rate: float | None = None,
    ) -> float:
        """Fit the OOD monitor on the model's training inputs; returns the calibrated threshold."""
        rate = self.cfg.ood_false_alarm_rate if false_alarm_rate is None else false_alarm_rate
        return self.ood.fit(
            self.features(train_obs, train_act),
            self.features(holdout_obs, holdout_act),
            rate,
            extrapolate=self.cfg.ood_tail == "gpd",
        )

    def set_ood_threshold(self, threshold: float) -> None:
        if not math.isfinite(threshold):
            raise ValueError(f"OOD threshold must be finite, got {threshold}")
        self.ood.threshold = float(threshold)

    def set_jump_threshold(self, threshold: float) -> None:
        """Threshold of the largest calibrated residual |z| of a tick (inf: off)."""
        if not threshold > 0:
            raise ValueError(f"jump threshold must be > 0, got {threshold}")
        self.jump_threshold = float(threshold)

    def set_residual_calibration(self, bias: np.ndarray, whiten: np.ndarray) -> None:
        """Held-out calibration of :meth:`residual_z`: ``bias`` ``S`` and whitening ``S x S``
        (:func:`~robot_mbrl.safety.calibration.residual_calibration`)."""
        S = self.spec.obs_dim
        bias, whiten = np.asarray(bias, dtype=float).reshape(-1), np.asarray(whiten, dtype=float)
        if (
            bias.shape != (S,)
            or whiten.shape != (S, S)
            or not (np.all(np.isfinite(bias)) and np.all(np.isfinite(whiten)))
        ):
            raise ValueError(
                f"residual calibration: expected {S} finite biases and a finite {S} x {S} whitening matrix"
            )
        self.residual_bias, self.residual_whiten = bias, whiten

    def residual_z(
        self, next_obs: np.ndarray, mean: np.ndarray, std: np.ndarray, calibrated: bool = True
    ) -> np.ndarray:
        """Standardized one-step residual (``... x S``), angle channels wrapped to (-pi, pi]:
        ``(r / std - bias) @ whiten.T`` (``calibrated=False``: ``r / std``)."""
        r = np.asarray(next_obs, dtype=float) - np.asarray(mean, dtype=float)
        mask = self.spec.angle_mask
        r[..., mask] = np.pi - np.mod(np.pi - r[..., mask], 2.0 * np.pi)
        z = r / np.maximum(np.asarray(std, dtype=float), self.cfg.min_std)
        return (z - self.residual_bias) @ self.residual_whiten.T if calibrated else z

    # -- per tick --------------------------------------------------------------------------
    def observe(
        self,
        obs: Observation | np.ndarray,
        act: np.ndarray,
        next_obs: Observation | np.ndarray,
        prediction_mean: np.ndarray,
        prediction_std: np.ndarray,
        tick: int,
    ) -> list[dict]:
        """One real transition and the model's prediction for it (ensemble mean and predictive
        std, S each). Returns the alarm events that fire on this tick."""
        s, s_next = _values(obs), _values(next_obs)
        a = np.asarray(act, dtype=float).reshape(-1)
        z = self.residual_z(s_next, prediction_mean, prediction_std)
        if np.all(np.isfinite(z)):
            self.jump_score = float(np.abs(z[self.watched]).max())
            self._jump_latched |= self.jump_score > self.jump_threshold
            self.cusum.update(z[self.watched])
            if self.variance is not None:
                self.variance.update(z[self.watched])
        else:
            log.debug("tick %d: non-finite residual, CUSUM not updated", tick)
        if (
            self.ood.fitted
            and self.ood.threshold is not None
            and np.all(np.isfinite(s))
            and np.all(np.isfinite(a))
        ):
            self.ood_score = float(self.ood.score(self.features(s, a)))
            self._ood_streak = self._ood_streak + 1 if self.ood_score > self.ood.threshold else 0
        return self._events(tick, ("cusum", "cusum_var", "ood", "jump"))

    def report_val_loss(self, fresh_loss: float, holdout_loss: float, tick: int) -> list[dict]:
        """The trainer's shift signal (loss of the current model on fresh data vs holdout)."""
        self.val_loss.update(fresh_loss, holdout_loss)
        return self._events(tick, ("val_loss",))

    def new_episode(self) -> None:
        """A new episode starts: the residual CUSUMs and the OOD streak restart (alarm debouncing
        and the val-loss signal carry on; ``reset_each_episode: false`` keeps them too). A jump alarm
        ends with its episode either way."""
        self.jump_score, self._jump_latched = 0.0, False
        self.error = None
        if not self.cfg.reset_each_episode:
            return
        self.cusum.reset()
        if self.variance is not None:
            self.variance.reset()
        self._ood_streak, self.ood_score = 0, 0.0

    def on_retrain(self) -> None:
        """The model was retrained on the new data: clear every alarm and debounce state.

        Refit the OOD monitor (:meth:`fit_ood`) with the new training inputs as well."""
        self.cusum.reset()
        if self.variance is not None:
            self.variance.reset()
        self.val_loss.reset()
        self._ood_streak, self.ood_score = 0, 0.0
        self.jump_score, self._jump_latched = 0.0, False
        self._debounce = {name: _Debounce(self.cfg.debounce_ticks) for name in self.NAMES}

    # -- state -----------------------------------------------------------------------------
    def state(self, name: str) -> tuple[bool, float, float]:
        """(in alarm, score, threshold) of one monitor."""
        if name == "cusum":
            return self.cusum.alarm, self.cusum.score, self.cusum.threshold
        if name == "cusum_var":
            v = self.variance
            return (False, 0.0, math.inf) if v is None else (v.alarm, v.score, v.threshold)
        if name == "ood":
            thr = self.ood.threshold if self.ood.threshold is not None else math.inf
            return self._ood_streak >= self.cfg.ood_persist_ticks, self.ood_score, thr
        if name == "jump":
            return self._jump_latched, self.jump_score, self.jump_threshold
        if name == "val_loss":
            return self.val_loss.alarm, self.val_loss.score, self.val_loss.threshold
        raise KeyError(name)

    def active_alarms(self) -> list[tuple[str, float, float]]:
        """(name, score, threshold) of every monitor in alarm now; a monitor that failed to update
        (:attr:`error`, until the episode ends) or cannot judge its residuals
        (:attr:`uncalibrated`) is in alarm: it cannot vouch for the model."""
        failed = [("monitor_error", 1.0, 0.0)] if self.error is not None else []
        failed += [("monitor_uncalibrated", 1.0, 0.0)] if self.uncalibrated is not None else []
        return failed + [(n, s, t) for n in self.NAMES for a, s, t in [self.state(n)] if a]

    def _events(self, tick: int, names: tuple[str, ...]) -> list[dict]:
        events = []
        for name in names:
            alarm, score, threshold = self.state(name)
            if self._debounce[name].update(alarm, tick):
                log.info("tick %d: %s alarm (score %.3g > %.3g)", tick, name, score, threshold)
                events.append(
                    {
                        "tick": tick,
                        "kind": "alarm",
                        "trigger": name,
                        "reason": f"{name} score {score:.3g} > threshold {threshold:.3g}",
                        "score": float(score),
                        "threshold": float(threshold),
                    }
                )
        return events
