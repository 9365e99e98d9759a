"""Homing: the reset of a rig that has no ``reset()`` of its own.

A simulator starts every episode from its initial-state distribution; a physical rig starts where
the last one left it (the cart at the end of the rail, the pole swinging), and ``SerialRobot.reset``
only waits for a fresh reading. Before each episode on such a rig, :func:`home` drives it back to a
start state with a gentle linear feedback ``u = u_stop - K (s - target)`` on ``homing.channels``
(the cart position and velocity and, to damp the swing, the pole's angular velocity), each command
clipped to ``max_command``, until every channel stays within its ``tolerance`` of the target for
``settle_ticks`` ticks in a row or ``timeout_s`` passes (a WARNING: the episode then starts from
wherever the rig is; the gate and the shields protect it as on every tick). The law runs inside the
exploration's stopping-distance shield (:class:`~robot_mbrl.agents.explore.ShieldedExplorer`): a
cart heading for an end stop faster than the gentle law can stop it, and any reading that is not OK
(a fault flag, e.g. the device's watchdog after the pause of a retrain, a pressed end stop, a
non-finite value), gets the fallback (``brake``: full braking, pushed back from the safe edge). It is
the robot's own motion under a fixed controller, as an operator's reset would be: nothing is learned
from it, and no simulator state is touched.

``homing.mode``: ``auto`` homes on the serial backend only (twin and gym envs reset themselves),
``always``, ``never``. Task limits: homing brings the pole to hanging rest, so it resets swing-up rigs; a balance episode on a
rig (pole upright at the start) still needs an operator.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from robot_mbrl.agents.explore import ExploreConfig, ShieldedExplorer
from robot_mbrl.hal.robot import Robot, RobotSpec
from robot_mbrl.runtime.loop import RateLoop, SampleSync, frozen_heap
from robot_mbrl.safety.fallback import FallbackConfig, FallbackPolicy, LinearFeedbackPolicy, make_fallback
from robot_mbrl.safety.gate import GateConfig
from robot_mbrl.typedconfig import ConfigError, param, require_names

if TYPE_CHECKING:
    from robot_mbrl.config import Config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HomingConfig:
    mode: str = param(
        "auto",
        "home before every episode: always, never, or auto = on the serial backend only",
        choices=("auto", "always", "never"),
    )
    channels: tuple[str, ...] = param(
        ("x_m", "xdot_m_s", "thetadot_rad_s"), "observation channels the homing feedback acts on"
    )
    gains: tuple[float, ...] = param(
        (1.0, 1.0, 0.2),
        "K, act_dim x len(channels), row-major: u = u_stop - K (s - target) (the cart-pole twin after an "
        "episode: settled in 11-15 s with these, mostly not within 30 s without the pole term; RESULTS.md)",
    )
    targets: tuple[float, ...] = param((), "setpoint per channel (zeros if empty)")
    tolerance: tuple[float, ...] = param(
        (0.05, 0.05, 0.5),
        "settled when |s - target| <= this on every channel (the twin's own start: "
        "x 0.02 m, velocities 0.01 m/s and 0.05 rad/s std)",
    )
    max_command: float = param(
        0.3, "|command| cap while homing, fraction of the actuator's half range", gt=0, le=1
    )
    settle_ticks: int = param(
        50,
        "ticks in a row within tolerance to count as settled (longer than half the pole's swing period, "
        "so a turning point of the swing is not taken for rest)",
        ge=1,
    )
    timeout_s: float = param(30.0, "give up and start the episode anyway after this long", gt=0)

    def validate(self) -> None:
        n = len(self.channels)
        if not n:
            raise ConfigError("config", "homing.channels", "at least one channel", [])
        if len(self.tolerance) != n:
            raise ConfigError(
                "config", "homing.tolerance", f"{n} values (one per channel)", list(self.tolerance)
            )
        if self.targets and len(self.targets) != n:
            raise ConfigError("config", "homing.targets", f"{n} values (one per channel)", list(self.targets))
        if any(t <= 0 for t in self.tolerance):
            raise ConfigError("config", "homing.tolerance", "values > 0", list(self.tolerance))

    def enabled(self, backend: str) -> bool:
        return self.mode == "always" or (self.mode == "auto" and backend == "serial")


@dataclass(frozen=True)
class HomingResult:
    ticks: int
    seconds: float
    settled: bool
    shielded_ticks: int = 0  # ticks the fallback acted (the shield, or a reading that is not OK)
    sample_timeouts: int = 0  # reads whose sample did not come within the sync's wait (a rig)

    def record(self) -> dict:
        return {
            "homing_ticks": self.ticks,
            "homing_s": round(self.seconds, 3),
            "homing_settled": self.settled,
            "homing_shielded_ticks": self.shielded_ticks,
            "homing_sample_timeouts": self.sample_timeouts,
        }


class _Law:
    """The homing feedback with its command cap, as a shieldable ``act``/``reset`` policy."""

    def __init__(self, law: LinearFeedbackPolicy, low: np.ndarray, high: np.ndarray):
        self.law, self.low, self.high = law, low, high

    def reset(self) -> None:
        pass

    def act(self, obs_values: np.ndarray) -> np.ndarray:
        return np.clip(self.law.act(obs_values), self.low, self.high)


class Homing:
    """The homing feedback for ``spec`` inside the stopping-distance shield with ``fallback`` (channel
    names and gain shapes checked here, before any robot time is spent)."""

    def __init__(
        self,
        spec: RobotSpec,
        cfg: HomingConfig,
        fallback: FallbackPolicy,
        explore: ExploreConfig,
        max_obs_age_s: float = GateConfig().max_obs_age_s,
    ):
        require_names("homing.channels", cfg.channels, spec.obs_names)
        self.spec, self.cfg = spec, cfg
        try:
            law = LinearFeedbackPolicy(
                spec, FallbackConfig(kind="pd", channels=cfg.channels, gains=cfg.gains, targets=cfg.targets)
            )
        except ValueError as err:
            raise ConfigError(
                "config", "homing.gains", f"{spec.act_dim} x {len(cfg.channels)} values", list(cfg.gains)
            ) from err
        half = (spec.act_high - spec.act_low) / 2
        centre = (spec.act_high + spec.act_low) / 2
        self.law = _Law(law, centre - cfg.max_command * half, centre + cfg.max_command * half)
        self.shield = ShieldedExplorer(
            spec, fallback, explore, seed=0, correlation=0.0, policy=self.law, max_obs_age_s=max_obs_age_s
        )
        self._idx = np.array([spec.index(c) for c in cfg.channels], dtype=int)
        self._target = np.asarray(cfg.targets or (0.0,) * len(cfg.channels), dtype=float)
        self._tol = np.asarray(cfg.tolerance, dtype=float)

    def settled(self, values: np.ndarray) -> bool:
        err = np.asarray(values, dtype=float)[self._idx] - self._target
        return bool(np.all(np.abs(err) <= self._tol))

    @frozen_heap()  # no full GC pass inside a tick (runtime/loop.py)
    def home(
        self,
        robot: Robot,
        *,
        paced: bool,
        on_event: Callable[[dict], None] | None = None,
        sample_wait_fraction: float = 0.25,
    ) -> HomingResult:
        """Drive ``robot`` (connected and active) to the start state; see the module docstring.
        ``on_event`` gets the shield's switches (``"phase": "homing"``), as an episode's go to events.jsonl.
        The reads follow a streaming robot's samples as an episode's do (``loop.sample_wait_fraction``)."""
        cfg, spec = self.cfg, self.spec
        t0 = time.monotonic()
        loop = RateLoop(
            spec.control_hz, paced=paced, max_ticks=max(1, round(cfg.timeout_s * spec.control_hz))
        )
        sync = SampleSync.where_useful(robot, loop, sample_wait_fraction)
        self.shield.reset(None)  # type: ignore[arg-type]
        calm, ticks, shielded = 0, 0, 0
        for tick in loop:
            obs = robot.read() if sync is None else sync.read(robot, loop, first=tick.index == 0)
            ticks += 1
            calm = calm + 1 if obs.ok and self.settled(obs.values) else 0
            if calm >= cfg.settle_ticks:
                break
            decision = self.shield.act(obs, tick, loop)
            shielded += decision.source == "fallback"
            robot.write(decision.action)
            if on_event is not None:
                for ev in decision.events:
                    on_event({**ev, "phase": "homing"})
        robot.write(spec.stop_action())
        timeouts = 0 if sync is None else sync.timeouts
        result = HomingResult(ticks, time.monotonic() - t0, calm >= cfg.settle_ticks, shielded, timeouts)
        if not result.settled:
            log.warning(
                "homing: not settled within %.1f s (%s within %s of %s): the episode starts from where the rig is",
                cfg.timeout_s, ", ".join(cfg.channels), list(cfg.tolerance), self._target.tolist(),
            )  # fmt: skip
        else:
            log.info(
                "homing: settled after %d ticks (%.1f s), %d of them shielded",
                ticks,
                result.seconds,
                shielded,
            )
        return result


def make_homing(cfg: Config, spec: RobotSpec) -> Homing | None:
    """The homing for ``cfg.backend``, or None where the backend resets itself (``homing.mode``)."""
    if not cfg.homing.enabled(cfg.backend):
        return None
    return Homing(spec, cfg.homing, make_fallback(cfg.fallback, spec), cfg.explore, cfg.gate.max_obs_age_s)
