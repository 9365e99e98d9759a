"""Gymnasium adapters both ways (no mujoco import here).

* :class:`RobotEnv`: any :class:`Robot` + :class:`Task` as a ``gymnasium.Env`` (for RL libraries,
  ``check_env`` and benchmarks). Reward and termination come from the task, truncation from
  ``episode_steps``; ``info`` carries fault bits, constraint values and the action really applied.
  A robot that scores its own steps (a :class:`GymRobot`) needs no task: its env's reward,
  termination and time limit pass through.
* :class:`GymRobot`: any gymnasium env with Box spaces as a :class:`Robot` (e.g. to run the planner
  and gate on ``InvertedPendulum-v5``). The env is built by the caller and passed in.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

import gymnasium
import numpy as np
from gymnasium import spaces

from robot_mbrl.hal.robot import BoxConstraint, Channel, Fault, Observation, Robot, RobotSpec, monotonic_s

if TYPE_CHECKING:  # tasks import torch; the adapter itself does not need it
    from robot_mbrl.tasks.base import Task

log = logging.getLogger(__name__)


class RobotEnv(gymnasium.Env):
    """A robot and a task as a gymnasium env (float32 Box spaces from the robot's spec).

    Observations are the robot's readings clipped into the spec's physical ranges (NaN from a
    faulty sensor stays NaN; the unclipped reading is ``info["obs_raw"]``). The reward is
    ``task.reward_np(obs, applied_action, next_obs)`` (0.0 where it is not finite, flagged by
    ``info["reward_invalid"]``), ``terminated`` is ``task.terminated_np(next_obs)`` and
    ``truncated`` is set after ``episode_steps`` steps. The robot is connected (and, for a device
    with a separate actuation step such as a serial rig, activated) on the first reset and closed
    (with a safe stop) by :meth:`close`. ``paced`` (default: for such devices) makes ``step`` keep
    the robot's control period: an agent that answers faster waits, so each step sees the reading
    one period after its command, as the learning loop does.
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, robot: Robot, task: Task | None, episode_steps: int, paced: bool | None = None):
        if episode_steps < 1:
            raise ValueError(f"episode_steps must be >= 1, got {episode_steps}")
        if task is None and not hasattr(robot, "last_step"):
            raise ValueError(
                "RobotEnv: expected a task (reward and termination) for a robot that does not score its "
                f"own steps as a GymRobot does, got None for {type(robot).__name__}"
            )
        self.paced = callable(getattr(robot, "activate", None)) if paced is None else paced
        self._next_s: float | None = None  # when the next step may read (paced)
        self.robot = robot
        self.task = task
        self.episode_steps = episode_steps
        spec = robot.spec
        self._obs_low = spec.obs_low.astype(np.float32)
        self._obs_high = spec.obs_high.astype(np.float32)
        self.observation_space = spaces.Box(self._obs_low, self._obs_high, dtype=np.float32)
        self.action_space = spaces.Box(
            spec.act_low.astype(np.float32), spec.act_high.astype(np.float32), dtype=np.float32
        )
        self._obs: np.ndarray | None = None  # last raw reading, spec.obs order
        self._t = 0

    def _observe(self, obs: Observation) -> tuple[np.ndarray, dict[str, Any]]:
        raw = np.asarray(obs.values, dtype=float)
        clipped = np.clip(raw, self._obs_low, self._obs_high).astype(np.float32)
        info = {
            "faults": int(obs.faults),
            "fault_names": str(Fault(obs.faults)),
            "obs_raw": raw,
            "constraint_values": self.robot.spec.constraint_values(raw),
            "task_constraints": np.zeros(0) if self.task is None else self.task.constraints_np(raw),
        }
        info["violation"] = bool(
            np.any(info["constraint_values"] > 0) or np.any(info["task_constraints"] > 0)
        )
        return clipped, info

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self.robot.connect()
        activate = getattr(self.robot, "activate", None)
        if callable(activate) and not getattr(self.robot, "active", False):
            activate()
        obs = self.robot.reset(seed=seed)
        self._obs, self._t = np.asarray(obs.values, dtype=float), 0
        self._next_s = None
        return self._observe(obs)

    def step(self, action):
        if self._obs is None:
            raise RuntimeError("RobotEnv.step called before reset")
        applied = self.robot.write(np.asarray(action, dtype=float))
        if self.paced:  # read one control period after the command, not as fast as the agent asks
            now = time.monotonic()
            self._next_s = (
                now + self.robot.spec.dt_s if self._next_s is None else self._next_s + self.robot.spec.dt_s
            )
            if self._next_s > now:
                time.sleep(self._next_s - now)
            else:
                self._next_s = now  # late: do not try to catch up with a burst
        obs = self.robot.read()
        next_raw = np.asarray(obs.values, dtype=float)
        if self.task is None:  # the robot's own env: its reward, termination and time limit
            last = self.robot.last_step  # type: ignore[attr-defined]
            reward, terminated, own_limit = (
                float(last["reward"]),
                bool(last["terminated"]),
                bool(last["truncated"]),
            )
        else:
            reward = self.task.reward_np(self._obs, applied, next_raw)
            terminated, own_limit = self.task.terminated_np(next_raw), False
        self._obs, self._t = next_raw, self._t + 1
        truncated = (self._t >= self.episode_steps or own_limit) and not terminated
        out, info = self._observe(obs)
        info["applied_action"] = applied
        info["reward_invalid"] = not np.isfinite(reward)
        return out, float(reward) if np.isfinite(reward) else 0.0, terminated, truncated, info

    def close(self) -> None:
        self.robot.close()


class GymRobot(Robot):
    """A gymnasium env with Box observation and action spaces, driven through the Robot interface.

    ``write`` clamps to the action space (and to ``act_rate_per_s`` if given), then calls
    ``env.step``; the env's reward and flags land in :attr:`last_step`
    (``{"reward", "terminated", "truncated", "info"}``) so a learning loop can use them. Infinite
    observation bounds are allowed. ``safe_stop`` cannot hold a simulated actuator: it records the
    safe action as the last command and steps nothing.
    """

    def __init__(
        self,
        env: gymnasium.Env,
        control_hz: float,
        *,
        obs_names: tuple[str, ...] | None = None,
        act_names: tuple[str, ...] | None = None,
        act_rate_per_s: tuple[float, ...] | None = None,
        constraints: tuple[BoxConstraint, ...] = (),
        safe_action: tuple[float, ...] | None = None,
        angles: tuple[str, ...] = (),
    ):
        self.env = env
        super().__init__(
            spec_from_spaces(
                env.observation_space,
                env.action_space,
                control_hz,
                obs_names=obs_names,
                act_names=act_names,
                act_rate_per_s=act_rate_per_s,
                constraints=constraints,
                safe_action=safe_action,
                angles=angles,
            )
        )
        self._angle = self.spec.angle_mask.copy()  # readings wrapped into (-pi, pi]
        self._obs: np.ndarray | None = None
        self._act_dtype = env.action_space.dtype
        self.last_step: dict[str, Any] = {"reward": 0.0, "terminated": False, "truncated": False, "info": {}}
        self.episode_return = 0.0

    def _wrap(self, obs: np.ndarray) -> np.ndarray:
        if self._angle.any():
            obs[self._angle] = np.pi - np.mod(np.pi - obs[self._angle], 2 * np.pi)  # (-pi, pi]
        return obs

    def _connect(self) -> None:
        log.debug("GymRobot connected to %s", self.env)

    def _disconnect(self) -> None:
        self.env.close()

    def _reset(self, seed: int | None) -> Observation:
        obs, info = self.env.reset(seed=seed)
        self._obs = self._wrap(np.asarray(obs, dtype=float).reshape(self.spec.obs_dim))
        self.last_step = {"reward": 0.0, "terminated": False, "truncated": False, "info": info}
        self.episode_return = 0.0
        return self._read()

    def _read(self) -> Observation:
        if self._obs is None:
            raise RuntimeError("GymRobot.read called before reset")
        return Observation(self._obs.copy(), monotonic_s(), Fault.NONE, {"last_step": dict(self.last_step)})

    def _send(self, action: np.ndarray) -> None:
        obs, reward, terminated, truncated, info = self.env.step(action.astype(self._act_dtype))
        self._obs = self._wrap(np.asarray(obs, dtype=float).reshape(self.spec.obs_dim))
        self.last_step = {
            "reward": float(reward),
            "terminated": bool(terminated),
            "truncated": bool(truncated),
            "info": info,
        }
        self.episode_return += float(reward)

    def _safe_stop(self) -> None:
        log.info(
            "GymRobot safe stop: last command set to %s (simulation: nothing to hold)",
            self.spec.stop_action(),
        )


def spec_from_spaces(
    observation_space: gymnasium.Space,
    action_space: gymnasium.Space,
    control_hz: float,
    *,
    obs_names: tuple[str, ...] | None = None,
    act_names: tuple[str, ...] | None = None,
    act_rate_per_s: tuple[float, ...] | None = None,
    constraints: tuple[BoxConstraint, ...] = (),
    safe_action: tuple[float, ...] | None = None,
    angles: tuple[str, ...] = (),
) -> RobotSpec:
    """RobotSpec from flat Box spaces; channels named ``obs_i`` / ``act_i`` unless names are given.
    ``angles``: observation channels that are angles (radians; range (-pi, pi], encoded as sin/cos
    by the models)."""
    for what, space in (("observation", observation_space), ("action", action_space)):
        if not isinstance(space, spaces.Box) or len(space.shape) != 1:
            raise TypeError(f"GymRobot needs a 1-D Box {what} space, got {space}")
    if not (np.all(np.isfinite(action_space.low)) and np.all(np.isfinite(action_space.high))):
        raise ValueError(f"GymRobot needs finite action bounds, got {action_space}")

    def channels(space: spaces.Box, names: tuple[str, ...] | None, prefix: str) -> tuple[Channel, ...]:
        names = names or tuple(f"{prefix}_{i}" for i in range(space.shape[0]))
        if len(names) != space.shape[0]:
            raise ValueError(f"{prefix}: {len(names)} names for {space.shape[0]} channels")
        return tuple(
            Channel(n, "rad", -math.pi, math.pi, angle=True)
            if prefix == "obs" and n in angles
            else Channel(n, "", float(lo), float(hi))
            for n, lo, hi in zip(names, space.low, space.high, strict=True)
        )

    obs = channels(observation_space, obs_names, "obs")
    unknown = sorted(set(angles) - {c.name for c in obs})
    if unknown:
        raise ValueError(f"angles: {unknown} are not observation channels ({[c.name for c in obs]})")
    return RobotSpec(
        obs=obs,
        act=channels(action_space, act_names, "act"),
        control_hz=control_hz,
        act_rate_per_s=act_rate_per_s,
        constraints=constraints,
        safe_action=safe_action,
    )
