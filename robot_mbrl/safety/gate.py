"""The Simplex safety gate: every tick, before anything is written, MPC action or fallback.

Triggers (any one hands control to the fallback policy):

* the observation is invalid: non-finite, outside the spec's physical range, stale
  (``time_s - obs.stamp_s > max_obs_age_s``) or carrying fault bits;
* the planner failed: it raised (``plan_error``), returned no plan, missed its deadline or returned
  non-finite values;
* the plan is distrusted: worst-step ensemble disagreement above the calibrated threshold, or some
  member predicts a constraint violation within the horizon (``g(x) > -constraint_margin``);
* a shift monitor is in alarm (:meth:`ShiftMonitor.active_alarms`).

Return to the MPC needs every trigger clear for ``dwell_ticks`` consecutive ticks AND the
disagreement below ``reentry_fraction x threshold`` over those ticks (hysteresis).

The gate never fails open: :meth:`SafetyGate.decide` wraps everything; an exception anywhere
inside, a fallback returning non-finite values, or any final action that is not finite yields the
spec's stop action and a ``gate_error`` event. With ``no_gate`` the MPC action is passed through
(if finite) while the same state machine records, as ``alarm`` events, every switch it would have
made.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from robot_mbrl.hal.robot import Fault, Observation, RobotSpec
from robot_mbrl.planning.base import PlanInfo
from robot_mbrl.safety.fallback import FallbackPolicy
from robot_mbrl.safety.monitors import ShiftMonitor
from robot_mbrl.typedconfig import param

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateConfig:
    """Safety gate (section ``safety.gate``)."""

    no_gate: bool = param(
        False,
        "set by the job from run.gate / --no-gate (pass the MPC action through, only record what would "
        "have triggered); not a setting: true here is refused",
    )
    disagreement_threshold: float | None = param(
        None, "worst-step plan disagreement threshold; None = uncalibrated (the MPC is never trusted)", gt=0
    )
    reentry_fraction: float = param(0.8, "re-entry needs disagreement below this x threshold", gt=0, le=1)
    dwell_ticks: int = param(25, "ticks every trigger must stay clear before returning to the MPC", ge=1)
    constraint_margin: float = param(0.0, "trigger when some member predicts g(x) > -margin", ge=0)
    constraint_steps: int | None = param(
        None,
        "the constraint trigger looks at the first this many planned steps (None: the whole horizon); "
        "with a stopping-distance constraint (recoverable set) 1-2 steps suffice: the MPC may plan "
        "through states it will later avoid, only the states its action commits to must stay recoverable",
        ge=1,
    )
    max_obs_age_s: float = param(0.05, "an observation older than this (vs the tick time) is stale", gt=0)


@dataclass(frozen=True)
class Trigger:
    """One active trigger: its name and the score that crossed the threshold."""

    name: str
    score: float
    threshold: float

    def __str__(self) -> str:
        return f"{self.name} ({self.score:.3g} > {self.threshold:.3g})"


@dataclass(frozen=True)
class GateDecision:
    """What the gate decided on one tick, and why."""

    action: np.ndarray  # A, the action to write
    source: str  # "mpc" or "fallback"
    triggers: tuple[Trigger, ...]  # active triggers (empty when all clear)
    switched: bool  # the source changed on this tick
    events: list[dict] = field(default_factory=list)  # switch / alarm / gate_error records


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _jsonable(a: np.ndarray | None) -> list | None:
    if a is None:
        return None
    return [_finite(float(v)) for v in np.asarray(a, dtype=float).reshape(-1)]


#: fault flags that leave a reading's values true: the end stop is pressed, the device brakes on its own
TRUSTED_FAULTS = Fault.LIMIT | Fault.ESTOP | Fault.WATCHDOG


def judged_at(loop, obs: Observation) -> float:  # loop: runtime.loop.RateLoop
    """The time a reading's age is judged at: now on a paced loop; in lockstep (a twin that waits for
    us) the reading's own stamp, so that the host's speed never changes the run."""
    return loop.now() if loop.paced else obs.stamp_s


def observation_triggers(spec: RobotSpec, obs: Observation, time_s: float, max_age_s: float) -> list[Trigger]:
    """Why ``obs`` is not a valid reading at ``time_s`` (empty: it is): wrong shape, non-finite or
    out-of-range values, older than ``max_age_s`` (or stamped in the future, or not at all), fault
    flags. The gate's rule, and the exploration shield's and homing's."""
    v = np.asarray(obs.values, dtype=float)
    out = []
    if v.shape != (spec.obs_dim,):
        return [Trigger("obs_shape", float(v.size), float(spec.obs_dim))]
    bad = int(np.sum(~np.isfinite(v)))
    if bad:
        out.append(Trigger("obs_nonfinite", float(bad), 0.0))
    elif not spec.in_range(v):
        excess = np.maximum(spec.obs_low - v, v - spec.obs_high)
        out.append(Trigger("obs_out_of_range", float(excess.max()), 0.0))
    age = time_s - obs.stamp_s
    if not (-max_age_s <= age <= max_age_s):  # also a NaN or infinite stamp, or one from the future
        out.append(Trigger("obs_stale", age, max_age_s))
    if int(obs.faults) != 0:
        out.append(Trigger("obs_fault", float(int(obs.faults)), 0.0))
    return out


class FallbackReading:
    """What a state-feedback fallback may act on (a brake, a PD law): the reading when its values
    can be trusted (no trigger of :func:`observation_triggers` but fault flags in
    :data:`TRUSTED_FAULTS`); after a reading that cannot (a glitch, a frozen or stale value, a
    sensor fault), the last trusted one for at most ``max_age_s`` worth of control ticks; then None
    — the stop action. A law fed a wrong position or velocity pushes with full force in the wrong
    direction. Counted in ticks (one call per tick), not on a clock: a lockstep twin's readings are
    stamped with the host's clock, and the run must not depend on the host's speed."""

    def __init__(self, max_age_s: float, control_hz: float):
        self.max_ticks = max(1, int(max_age_s * control_hz + 1e-9))  # 0.05 s at 50 Hz: 2 ticks
        self._last: np.ndarray | None = None
        self._since = 0  # ticks since the last trusted reading

    def reset(self) -> None:
        self._last, self._since = None, 0

    def __call__(self, obs: Observation, triggers: list[Trigger]) -> np.ndarray | None:
        if all(t.name == "obs_fault" and not int(t.score) & ~int(TRUSTED_FAULTS) for t in triggers):
            self._last, self._since = np.asarray(obs.values, dtype=float).reshape(-1).copy(), 0
            return self._last
        self._since += 1
        return self._last if self._last is not None and self._since <= self.max_ticks else None


def fallback_action(fallback: FallbackPolicy, reading: np.ndarray | None, stop: np.ndarray) -> np.ndarray:
    """``fallback`` on ``reading``, ``stop`` without one; raises on anything but finite actions of
    ``stop``'s shape (the callers command the stop action then)."""
    if reading is None:
        return stop.copy()
    a = np.asarray(fallback.act(reading), dtype=float).reshape(-1)
    if a.shape != stop.shape or not np.all(np.isfinite(a)):
        raise FloatingPointError(f"fallback returned {a!r}")
    return a


class SafetyGate:
    """Simplex decision between the MPC proposal and a fallback policy; see the module docstring.

    Counters: ``ticks``, ``fallback_ticks`` (ticks whose written action was not the MPC's) and
    ``switches`` (source changes, or would-be switches in ``no_gate`` mode).
    """

    def __init__(
        self, spec: RobotSpec, cfg: GateConfig, fallback: FallbackPolicy, monitor: ShiftMonitor | None = None
    ):
        self.spec, self.fallback, self.monitor = spec, fallback, monitor
        self.cfg = cfg
        self._stop = np.clip(np.array(spec.stop_action(), dtype=float), spec.act_low, spec.act_high)
        if self._stop.shape != (spec.act_dim,) or not np.all(np.isfinite(self._stop)):
            raise ValueError(f"the spec's stop action must be {spec.act_dim} finite values")
        self.disagreement_threshold = cfg.disagreement_threshold
        self.mode = "mpc"  # every trigger is checked from the first tick on
        self._clear_ticks = 0
        self.ticks = self.fallback_ticks = self.switches = 0
        self._reading = FallbackReading(cfg.max_obs_age_s, spec.control_hz)

    def reset(self) -> None:
        """New episode: back to the initial state (MPC mode, no dwell progress); keeps counters. (A
        new episode starting on another source than the last ended on is logged by the episode runner.)"""
        self.mode, self._clear_ticks = "mpc", 0
        self._reading.reset()

    @property
    def reentry_threshold(self) -> float:
        thr = self.disagreement_threshold
        return -math.inf if thr is None else self.cfg.reentry_fraction * thr

    def set_thresholds(self, disagreement: float | None = None, ood: float | None = None) -> None:
        """Thresholds calibrated on held-out data (see :mod:`robot_mbrl.safety.calibration`)."""
        if disagreement is not None:
            if not (math.isfinite(disagreement) and disagreement > 0):
                raise ValueError(f"disagreement threshold must be finite and > 0, got {disagreement}")
            self.disagreement_threshold = float(disagreement)
        if ood is not None:
            if self.monitor is None:
                raise ValueError("an OOD threshold needs a ShiftMonitor")
            self.monitor.set_ood_threshold(ood)

    # -- the decision ----------------------------------------------------------------------
    def decide(
        self,
        tick: int,
        time_s: float,
        obs: Observation,
        plan: PlanInfo | None,
        plan_error: BaseException | None,
        deadline_missed: bool,
    ) -> GateDecision:
        """The action to write on this tick. Never raises (``Exception``), never non-finite.

        ``time_s`` is the tick time on the clock of ``obs.stamp_s`` (monotonic seconds); a plan that
        raised is passed as ``plan=None, plan_error=err``.
        """
        counts, mode = (self.ticks, self.fallback_ticks, self.switches), self.mode
        try:
            decision = self._decide(tick, time_s, obs, plan, plan_error, deadline_missed)
            action = np.asarray(decision.action, dtype=float)
            if action.shape != (self.spec.act_dim,) or not np.all(np.isfinite(action)):
                raise FloatingPointError(f"gate produced a bad action {action!r}")
            return decision
        except Exception as err:  # noqa: BLE001 - the gate must never fail open
            log.exception("tick %d: gate error, commanding the stop action", tick)
            self.ticks, self.fallback_ticks, self.switches = counts  # count this tick once
            self.mode = mode  # (and its switch)
            return self._fail_safe(tick, time_s, err, plan)

    def _fail_safe(self, tick: int, time_s: float, err: Exception, plan: PlanInfo | None) -> GateDecision:
        """Stop action + ``gate_error`` event; built only from values checked at construction."""
        switched = self.mode != "fallback"
        self.mode, self._clear_ticks = "fallback", 0
        self.ticks += 1
        self.fallback_ticks += 1
        self.switches += int(switched)
        try:
            proposed = _jsonable(getattr(plan, "action", None))
        except Exception:  # noqa: BLE001 - a broken plan must not block the stop
            log.exception("tick %d: unreadable proposed action", tick)
            proposed = None
        event = {
            "tick": tick,
            "time_s": time_s,
            "kind": "gate_error",
            "trigger": "gate_error",
            "reason": f"{type(err).__name__}: {err}",
            "score": None,
            "threshold": None,
            "proposed": proposed,
            "applied": self._stop.tolist(),
        }
        trig = (Trigger("gate_error", 1.0, 0.0),)
        return GateDecision(self._stop.copy(), "fallback", trig, switched, [event])

    def _decide(
        self,
        tick: int,
        time_s: float,
        obs: Observation,
        plan: PlanInfo | None,
        plan_error: BaseException | None,
        deadline_missed: bool,
    ) -> GateDecision:
        triggers = observation_triggers(self.spec, obs, time_s, self.cfg.max_obs_age_s)
        reading = self._reading(obs, triggers)  # what the fallback may act on
        triggers += self._plan_triggers(plan, plan_error, deadline_missed)
        if self.monitor is not None:
            triggers += [Trigger(f"monitor:{n}", s, t) for n, s, t in self.monitor.active_alarms()]
        triggers = tuple(triggers)

        # hysteresis state machine (identical in no_gate mode, where it only records)
        previous = self.mode
        worst = plan.worst_disagreement if plan is not None else math.nan
        if triggers:
            self.mode, self._clear_ticks = "fallback", 0
        elif self.mode == "fallback":
            calm = worst < self.reentry_threshold
            self._clear_ticks = self._clear_ticks + 1 if calm else 0
            if self._clear_ticks >= self.cfg.dwell_ticks:
                self.mode = "mpc"
        switched = self.mode != previous

        proposed = None if plan is None else np.asarray(plan.action, dtype=float).reshape(-1)
        mpc_ok = (
            proposed is not None
            and proposed.shape == (self.spec.act_dim,)
            and bool(np.all(np.isfinite(proposed)))
        )
        use_mpc = mpc_ok and (self.cfg.no_gate or self.mode == "mpc")
        action = proposed.copy() if use_mpc else self._fallback_action(reading)
        source = "mpc" if use_mpc else "fallback"

        self.ticks += 1
        self.fallback_ticks += int(source == "fallback")
        self.switches += int(switched)
        if switched:
            log.info(
                "tick %d: %s%s -> %s (%s)",
                tick,
                "[no_gate, would switch] " if self.cfg.no_gate else "",
                previous,
                self.mode,
                "; ".join(map(str, triggers)) or "re-entry",
            )
        events = []
        if switched and not self.cfg.no_gate:
            events.append(self._event(tick, time_s, "switch", triggers, worst, proposed, action))
        elif switched:  # no_gate: record the switches it would have made, both ways
            kind = "alarm" if self.mode == "fallback" else "clear"
            events.append(self._event(tick, time_s, kind, triggers, worst, proposed, action))
        return GateDecision(action, source, triggers, switched, events)

    # -- triggers --------------------------------------------------------------------------
    def _plan_triggers(
        self, plan: PlanInfo | None, plan_error: BaseException | None, deadline_missed: bool
    ) -> list[Trigger]:
        out = []
        if plan_error is not None:
            out.append(Trigger("plan_error", 1.0, 0.0))
        if deadline_missed:
            out.append(Trigger("deadline_missed", 1.0, 0.0))
        if plan is None:
            return out + ([] if plan_error is not None else [Trigger("plan_missing", 1.0, 0.0)])
        # every number the plan reports must be finite: a NaN return or predicted state means the
        # model or V broke and the action was not chosen on merit (all candidates scored -inf)
        parts = (
            np.asarray(plan.action, dtype=float).reshape(-1),
            *(np.asarray(t.detach().cpu().double(), dtype=float).reshape(-1)
              for t in (plan.disagreement, plan.constraint_margins, plan.predicted_obs, plan.actions)),
            np.asarray([plan.expected_return, plan.value_tail], dtype=float),
        )  # fmt: skip
        bad = sum(int(np.sum(~np.isfinite(p))) for p in parts)
        # the planning task's constraints (the robot's, and e.g. the stopping-distance shield's): none
        # where the robot has one would turn the constraint trigger off
        n_con = plan.constraint_margins.shape[-1] if plan.constraint_margins.dim() >= 1 else 0
        margins_ok = n_con >= 1 or not self.spec.constraints
        if bad or parts[0].shape != (self.spec.act_dim,) or parts[1].size == 0 or not margins_ok:
            # no step planned, or no margins for the robot's constraints: malformed
            return out + [Trigger("plan_nonfinite", float(bad), 0.0)]
        thr = self.disagreement_threshold
        worst = plan.worst_disagreement
        if thr is None:
            out.append(Trigger("uncalibrated", worst, math.inf))
        elif worst > thr:
            out.append(Trigger("disagreement", worst, thr))
        margins = plan.constraint_margins
        if self.cfg.constraint_steps is not None:
            margins = margins[: self.cfg.constraint_steps]
        margin = float(margins.max()) if margins.numel() else -math.inf
        if margin > -self.cfg.constraint_margin:
            out.append(Trigger("constraint", margin, -self.cfg.constraint_margin))
        return out

    def _fallback_action(self, reading: np.ndarray | None) -> np.ndarray:
        """The fallback on a trusted reading (:class:`FallbackReading`), the stop action without one;
        a fallback that returns anything but A finite values raises (-> stop action)."""
        return fallback_action(self.fallback, reading, self._stop)

    def _event(
        self,
        tick: int,
        time_s: float,
        kind: str,
        triggers: tuple[Trigger, ...],
        worst: float,
        proposed: np.ndarray | None,
        applied: np.ndarray,
    ) -> dict:
        if triggers:
            first = triggers[0]
            trigger, score, threshold = first.name, _finite(first.score), _finite(first.threshold)
            reason = "; ".join(str(t) for t in triggers)
        else:
            trigger, score = "reentry", _finite(worst)
            threshold = _finite(self.reentry_threshold)
            reason = f"all triggers clear for {self.cfg.dwell_ticks} ticks, disagreement below re-entry"
        return {
            "tick": tick,
            "time_s": time_s,
            "kind": kind,
            "trigger": trigger,
            "reason": reason,
            "score": score,
            "threshold": threshold,
            "to": self.mode,
            "proposed": _jsonable(proposed),
            "applied": _jsonable(applied),
        }
