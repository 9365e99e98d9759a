"""Simple open-loop policies (zero, seeded random) and the adapter that makes any policy a controller."""

from __future__ import annotations

import numpy as np

from robot_mbrl.hal.robot import Observation, RobotSpec
from robot_mbrl.runtime.episode import Decision, Transition
from robot_mbrl.runtime.loop import RateLoop, Tick


class ZeroPolicy:
    """Always the spec's stop command."""

    def __init__(self, spec: RobotSpec):
        self.spec = spec

    def reset(self) -> None:
        pass

    def act(self, obs_values: np.ndarray) -> np.ndarray:
        return self.spec.stop_action()


class RandomPolicy:
    """Seeded, temporally correlated random actions (AR(1) "colored" noise) within the limits.

    White noise at 50 Hz averages out and barely moves a real mechanism; ``correlation`` close to 1
    gives slower, larger excursions (pink-ish exploration), 0 gives white noise.
    """

    def __init__(self, spec: RobotSpec, seed: int, correlation: float = 0.8, scale: float = 1.0):
        self.spec, self.correlation, self.scale = spec, correlation, scale
        self._seed = seed
        self.rng = np.random.default_rng(seed)
        self._u = np.zeros(spec.act_dim)

    def reset(self) -> None:
        self._u = np.zeros(self.spec.act_dim)

    def act(self, obs_values: np.ndarray) -> np.ndarray:
        lo, hi = self.spec.act_low, self.spec.act_high
        mid, half = (hi + lo) / 2, (hi - lo) / 2
        c = self.correlation
        self._u = c * self._u + np.sqrt(1 - c * c) * self.rng.standard_normal(self.spec.act_dim)
        return np.clip(mid + self.scale * half * self._u, lo, hi)


class PolicyController:
    """Controller protocol around a plain ``act(obs_values) -> action`` policy (no gate)."""

    def __init__(self, policy, source: str = "policy"):
        self.policy = policy
        self.source = source

    def reset(self, obs: Observation) -> None:
        reset = getattr(self.policy, "reset", None)
        if callable(reset):
            reset()

    def act(self, obs: Observation, tick: Tick, loop: RateLoop) -> Decision:
        values = np.nan_to_num(obs.values, nan=0.0, posinf=0.0, neginf=0.0)
        return Decision(action=np.asarray(self.policy.act(values), dtype=float), source=self.source)

    def observe(self, transition: Transition) -> list[dict]:
        return []
