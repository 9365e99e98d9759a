"""Safe exploration before any model exists: seeded colored noise inside a stopping-distance shield.

With no model there is no plan for the gate to judge, so the first episodes use a constraint-aware
rule instead: for every box constraint on a position channel with a matching velocity channel,
predict where the mechanism would stop if the fallback braked now,

    x_stop = x + v * t_react + v |v| / (2 a_brake)

and hand control to the fallback while ``x_stop`` (or ``x``) is beyond the constraint minus a margin.
``a_brake`` is the user's conservative braking estimate (a datasheet number, not a twin secret);
``t_react`` covers the actuation delay and motor lag. Every switch is an event, like the gate's.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np

from robot_mbrl.hal.robot import Observation, RobotSpec
from robot_mbrl.runtime.episode import Decision, Transition
from robot_mbrl.runtime.loop import RateLoop, Tick
from robot_mbrl.runtime.policies import RandomPolicy
from robot_mbrl.safety.gate import (
    FallbackReading,
    GateConfig,
    fallback_action,
    judged_at,
    observation_triggers,
)
from robot_mbrl.typedconfig import ConfigError, param, require_names

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExploreConfig:
    brake_decel_m_s2: float = param(
        3.0, "conservative braking deceleration of the fallback (units/s^2)", gt=0
    )
    react_s: float = param(0.1, "delay before braking acts (actuation delay + motor lag + one tick)", ge=0)
    margin: float = param(0.05, "extra distance kept from the constraint boundary", ge=0)
    plan_brake_decel_m_s2: float | None = param(
        None,
        "braking deceleration of the shield the MPC plans in and the gate checks (None: "
        "brake_decel_m_s2); the model-free exploration keeps brake_decel_m_s2",
        gt=0,
    )
    plan_react_s: float | None = param(
        None, "react_s of the planner's and gate's shield (None: react_s)", ge=0
    )
    plan_shield: bool = param(
        True,
        "also plan and gate inside the shield: the MPC treats a state whose stopping point is beyond "
        "the constraint minus margin as a constraint violation (planner penalty and gate trigger)",
    )
    velocity_channels: dict[str, str] = param(
        factory=lambda: {"x_m": "xdot_m_s"}, doc="position channel -> its velocity channel (for the shield)"
    )

    def plan_brake(self) -> tuple[float, float]:
        """(deceleration, reaction time) of the planner's and gate's shield: the ``plan_`` values
        where set, else the exploration's."""
        a = self.brake_decel_m_s2 if self.plan_brake_decel_m_s2 is None else self.plan_brake_decel_m_s2
        return a, self.react_s if self.plan_react_s is None else self.plan_react_s


def stopping_point(p, v, decel: float, react: float):
    """Where the brake stops a mechanism at position ``p`` moving at ``v`` (floats, arrays or tensors):
    ``p + v react + v |v| / (2 decel)`` — the shield's one model of the brake (exploration, planner,
    gate and ``benchmarks/bench_brake.py``)."""
    return p + v * react + v * abs(v) / (2 * decel)


def shield_pairs(spec: RobotSpec, cfg: ExploreConfig) -> list[tuple[int, int, float, float]]:
    """(position index, velocity index, low, high) of every constrained channel with a velocity in
    ``explore.velocity_channels``. A robot with constraints must name real channels there: a typo
    would silently remove the stopping-distance shield (one-line config error instead)."""
    if spec.constraints:
        require_names("explore.velocity_channels", [*cfg.velocity_channels, *cfg.velocity_channels.values()],
                      spec.obs_names)  # fmt: skip
        missing = sorted({c.channel for c in spec.constraints} - set(cfg.velocity_channels))
        if missing:  # its constraint would go unshielded
            raise ConfigError(
                "config",
                "explore.velocity_channels",
                "a velocity channel for every constrained channel",
                missing,
            )
    return [
        (spec.index(c.channel), spec.index(cfg.velocity_channels[c.channel]), c.low, c.high)
        for c in spec.constraints
    ]


class ShieldedExplorer:
    """Controller: random exploration, switched to ``fallback`` whenever the shield predicts a violation."""

    def __init__(
        self,
        spec: RobotSpec,
        fallback,
        cfg: ExploreConfig,
        seed: int,
        correlation: float,
        policy=None,
        max_obs_age_s: float = GateConfig().max_obs_age_s,
    ):
        self.spec, self.fallback, self.cfg = spec, fallback, cfg
        self.max_obs_age_s = max_obs_age_s  # the gate's rule for an invalid reading (gate.max_obs_age_s)
        self._reading = FallbackReading(max_obs_age_s, spec.control_hz)
        self._stop = np.asarray(spec.stop_action(), dtype=float)
        # the shielded policy: seeded colored noise, or another ``act``/``reset`` policy (homing's law)
        self.policy = policy if policy is not None else RandomPolicy(spec, seed=seed, correlation=correlation)
        self._pairs = shield_pairs(spec, cfg)
        self._shielded = False

    def unsafe(self, x: np.ndarray) -> tuple[bool, float]:
        """(unsafe?, worst predicted excess over a constraint boundary incl. margin)."""
        worst = -np.inf
        for ip, iv, low, high in self._pairs:
            p, v = x[ip], x[iv]
            stop = stopping_point(p, v, self.cfg.brake_decel_m_s2, self.cfg.react_s)
            for q in (p, stop):
                worst = max(worst, q - (high - self.cfg.margin), (low + self.cfg.margin) - q)
        return bool(worst > 0), float(worst)

    def reset(self, obs: Observation) -> None:
        self.policy.reset()
        self._shielded = False
        self._reading.reset()

    def act(self, obs: Observation, tick: Tick, loop: RateLoop) -> Decision:
        x = obs.values
        invalid = observation_triggers(self.spec, obs, judged_at(loop, obs), self.max_obs_age_s)
        reading = self._reading(obs, invalid)  # what the fallback may act on
        if invalid:
            unsafe, score, reason = True, float("nan"), "invalid_observation"
        else:
            unsafe, score = self.unsafe(x)
            reason = "explore_shield"
        if unsafe:
            try:
                action = fallback_action(self.fallback, reading, self._stop)
            except Exception as err:  # noqa: BLE001 - as in the gate: the stop action, never a crash
                log.error("tick %d: fallback failed (%r): stop action", tick.index, err)
                action = self._stop.copy()
            source = "fallback"
        else:
            action, source = self.policy.act(x), "policy"
        events = []
        if unsafe != self._shielded:
            # what exploration would have written: a copy of the noise policy, so that logging the
            # switch leaves its random sequence (and the run) as it is
            proposed = copy.deepcopy(self.policy).act(x) if unsafe else action
            events.append(
                {
                    "tick": tick.index,
                    "time_s": tick.start_s,
                    "kind": "switch",
                    "trigger": reason if unsafe else "clear",
                    "to": "fallback" if unsafe else "explore",
                    "score": score,
                    "threshold": 0.0,
                    "proposed": np.asarray(proposed, dtype=float).tolist(),
                    "applied": np.asarray(action, dtype=float).tolist(),
                }
            )
            self._shielded = unsafe
        return Decision(action, source=source, events=events)

    def observe(self, transition: Transition) -> list[dict]:
        return []


class FallbackController:
    """Controller: the fallback policy alone (``run --policy safe``), acting only on readings it can
    trust, by the gate's rule: after an invalid reading (a glitch, a stale or faulted one) the last
    trusted reading for ``max_obs_age_s`` worth of ticks, then the stop action; a switch event each
    time what it acts on changes."""

    def __init__(self, spec: RobotSpec, fallback, max_obs_age_s: float = GateConfig().max_obs_age_s):
        self.spec, self.fallback, self.max_obs_age_s = spec, fallback, max_obs_age_s
        self._reading = FallbackReading(max_obs_age_s, spec.control_hz)
        self._stop = np.asarray(spec.stop_action(), dtype=float)
        self._to = "fallback"  # acting on: the current reading, the last trusted one, none (stop)

    def reset(self, obs: Observation) -> None:
        reset = getattr(self.fallback, "reset", None)
        if callable(reset):
            reset()
        self._reading.reset()  # (what it acted on last stays: the next episode's first change is logged)

    def act(self, obs: Observation, tick: Tick, loop: RateLoop) -> Decision:
        invalid = observation_triggers(self.spec, obs, judged_at(loop, obs), self.max_obs_age_s)
        reading = self._reading(obs, invalid)
        try:
            action = fallback_action(self.fallback, reading, self._stop)
        except Exception as err:  # noqa: BLE001 - as in the gate: the stop action, never a crash
            log.error("tick %d: fallback failed (%r): stop action", tick.index, err)
            action = self._stop.copy()
        to = "fallback" if not invalid else "fallback_last_reading" if reading is not None else "stop"
        events = []
        if to != self._to:
            trig = invalid[0] if invalid else None
            events.append({
                "tick": tick.index, "time_s": tick.start_s, "kind": "switch", "to": to,
                "trigger": trig.name if trig else "clear", "score": trig.score if trig else 0.0,
                "threshold": trig.threshold if trig else 0.0, "proposed": action.tolist(), "applied": action.tolist(),
            })  # fmt: skip
            self._to = to
        return Decision(action, source="fallback", events=events)

    def observe(self, transition: Transition) -> list[dict]:
        return []
