"""Fallback policies: simple, verifiable controllers the gate switches to when it distrusts the MPC.

Every policy is a pure function of the current observation (``act(obs_values) -> action``), with
the robot spec injected, and clips its output to the spec's command limits:

* ``brake`` - stop the cart and keep it inside the safe zone, ignoring the pole:
  ``u = -kv * xdot - kx * barrier(x)``, where ``barrier`` is 0 inside ``|x| <= safe_x_m -
  barrier_width_m`` and grows linearly (1 per ``barrier_width_m``) beyond, pointing outward.
  While moving fast the command saturates at full braking force, the time-optimal stop (stopping
  distance ``v^2 / (2 a_max)``). ``kv`` is bounded by the loop latency: the velocity loop's
  crossover ``kv * max_force / mass`` times the latency (actuation delay + velocity filter + hold,
  ~40 ms on the twin) must stay well below 1 rad, or the cart limit-cycles (kv = 5 does on the
  twin's defaults; kv = 2 settles).
* ``hold`` - the spec's stop command (zero effort / hold position, whatever the device defines).
* ``pd`` / ``lqr`` - linear state feedback ``u = -K (x[channels] - target)`` on named observation
  channels (angle errors wrapped), with gains from config (LQR gains computed offline).

Build one with :func:`make_fallback` from a :class:`FallbackConfig`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from robot_mbrl.hal.robot import RobotSpec
from robot_mbrl.typedconfig import ConfigError, param, require_names


@dataclass(frozen=True)
class FallbackConfig:
    """Fallback policy (section ``safety.fallback``)."""

    kind: str = param("brake", "fallback policy", choices=("brake", "hold", "pd", "lqr"))
    # brake
    position_channel: str = param("x_m", "brake: observation channel of the cart position")
    velocity_channel: str = param("xdot_m_s", "brake: observation channel of the cart velocity")
    action_index: int = param(0, "brake: which action channel drives the cart", ge=0)
    kv: float = param(2.0, "brake: command per m/s of cart velocity (saturates at full braking)", ge=0)
    kx: float = param(1.0, "brake: command per barrier_width_m beyond the barrier start", ge=0)
    safe_x_m: float = param(0.35, "brake: edge of the safe zone |x| <= safe_x_m", gt=0)
    barrier_width_m: float = param(0.05, "brake: the barrier starts this far inside the safe edge", gt=0)
    # pd / lqr
    channels: tuple[str, ...] = param((), "pd/lqr: observation channels the gains act on")
    gains: tuple[float, ...] = param((), "pd/lqr: K, act_dim x len(channels), row-major; u = -K (x - target)")
    targets: tuple[float, ...] = param((), "pd/lqr: setpoint per channel (zeros if empty)")

    def validate(self) -> None:
        if self.kind in ("pd", "lqr"):
            if not self.channels:
                raise ValueError(f"{self.kind} fallback needs channels")
            if len(self.gains) % len(self.channels) != 0 or not self.gains:
                raise ValueError(f"gains must be act_dim x {len(self.channels)} values")
            if self.targets and len(self.targets) != len(self.channels):
                raise ValueError("targets must have one value per channel")
        if self.barrier_width_m >= self.safe_x_m:
            raise ValueError("barrier_width_m must be smaller than safe_x_m")


def _channel(spec: RobotSpec, name: str, key: str) -> int:
    require_names(f"fallback.{key}", [name], spec.obs_names)
    return spec.index(name)


class FallbackPolicy(Protocol):
    """What the gate needs from a fallback: a pure map from observation values to an action."""

    spec: RobotSpec

    def act(self, obs_values: np.ndarray) -> np.ndarray:
        """``S`` observation values (spec order) -> ``A`` action inside the command limits."""
        ...


class HoldPolicy:
    """The spec's stop command, whatever the state."""

    def __init__(self, spec: RobotSpec):
        self.spec = spec

    def act(self, obs_values: np.ndarray) -> np.ndarray:  # noqa: ARG002 (the state is ignored)
        return np.clip(self.spec.stop_action(), self.spec.act_low, self.spec.act_high)


class BrakePolicy:
    """Drive the cart velocity to zero and push back from the safe-zone edge; ignore the pole."""

    def __init__(self, spec: RobotSpec, cfg: FallbackConfig):
        self.spec, self.cfg = spec, cfg
        self._ix = _channel(spec, cfg.position_channel, "position_channel")
        self._iv = _channel(spec, cfg.velocity_channel, "velocity_channel")
        if cfg.action_index >= spec.act_dim:
            raise ConfigError(
                "config", "fallback.action_index", f"< {spec.act_dim} (the action channels)", cfg.action_index
            )

    def barrier(self, x: float) -> float:
        """0 inside the barrier start, else (|x| - start) / width with the sign of x."""
        start = self.cfg.safe_x_m - self.cfg.barrier_width_m
        return float(np.sign(x) * max(0.0, abs(x) - start) / self.cfg.barrier_width_m)

    def act(self, obs_values: np.ndarray) -> np.ndarray:
        v = np.asarray(obs_values, dtype=float)
        x, xdot = v[self._ix], v[self._iv]
        a = self.spec.stop_action().copy()
        a[self.cfg.action_index] = -self.cfg.kv * xdot - self.cfg.kx * self.barrier(x)
        return np.clip(a, self.spec.act_low, self.spec.act_high)


class LinearFeedbackPolicy:
    """``u = u_stop - K (x[channels] - target)``, angle errors wrapped to (-pi, pi]."""

    def __init__(self, spec: RobotSpec, cfg: FallbackConfig):
        self.spec = spec
        self._idx = np.array([_channel(spec, c, "channels") for c in cfg.channels], dtype=int)
        self._angle = spec.angle_mask[self._idx]
        n = len(cfg.channels)
        if len(cfg.gains) != spec.act_dim * n:
            raise ValueError(f"gains: expected {spec.act_dim} x {n} values, got {len(cfg.gains)}")
        self.K = np.asarray(cfg.gains, dtype=float).reshape(spec.act_dim, n)
        self.target = np.asarray(cfg.targets or (0.0,) * n, dtype=float)

    def act(self, obs_values: np.ndarray) -> np.ndarray:
        e = np.asarray(obs_values, dtype=float)[self._idx] - self.target
        e[self._angle] = np.pi - np.mod(np.pi - e[self._angle], 2.0 * np.pi)
        return np.clip(self.spec.stop_action() - self.K @ e, self.spec.act_low, self.spec.act_high)


_REGISTRY: dict[str, Callable[[RobotSpec, FallbackConfig], FallbackPolicy]] = {
    "brake": BrakePolicy,
    "hold": lambda spec, cfg: HoldPolicy(spec),
    "pd": LinearFeedbackPolicy,
    "lqr": LinearFeedbackPolicy,
}


def make_fallback(cfg: FallbackConfig, spec: RobotSpec) -> FallbackPolicy:
    """The fallback policy named by ``cfg.kind`` for ``spec``."""
    return _REGISTRY[cfg.kind](spec, cfg)
