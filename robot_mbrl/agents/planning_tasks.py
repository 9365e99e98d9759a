"""The planner's view of a task: the env-reward task of gym backends (learned reward, optional
termination box) and the shielded task (a task's constraints plus the brake's stopping distance)."""

from __future__ import annotations

import torch

from robot_mbrl.agents.explore import shield_pairs, stopping_point
from robot_mbrl.hal.robot import RobotSpec
from robot_mbrl.tasks.base import Task
from robot_mbrl.typedconfig import ConfigError


class EnvRewardTask(Task):
    """For backends whose reward is only known from the environment: the planner uses the
    ensemble's learned reward head; no constraints. Termination: the env's documented rule as a box
    on observation channels (``gym.terminal_*``), else never (the value function alone must learn
    where episodes end)."""

    name = "env"

    def __init__(self, spec: RobotSpec | None = None, channels=(), low=(), high=()):
        unknown = [c for c in channels if spec is None or c not in spec.obs_names]
        if unknown:
            names = list(spec.obs_names) if spec is not None else []
            raise ConfigError(
                "config", "gym.terminal_channels", f"observation channels of the env {names}", unknown
            )
        self.idx = torch.as_tensor([spec.index(c) for c in channels], dtype=torch.long) if channels else None
        self.low = torch.as_tensor(low, dtype=torch.float32)
        self.high = torch.as_tensor(high, dtype=torch.float32)

    def reward(self, obs, act, next_obs):  # pragma: no cover - the planner uses the model's reward
        raise NotImplementedError("EnvRewardTask has no known reward; plan with reward_source='model'")

    def terminated(self, next_obs):
        if self.idx is None:
            return super().terminated(next_obs)
        x = next_obs[..., self.idx]
        return ((x < self.low) | (x > self.high) | ~torch.isfinite(x)).any(-1)


class ShieldedTask(Task):
    """Planning view of a task: its reward and termination, its constraints plus one stopping-distance
    constraint per box constraint on a position channel with a velocity channel (the explorer's
    shield, :class:`~robot_mbrl.agents.explore.ShieldedExplorer`)::

        g_stop(s) = max(x_stop - (high - margin), (low + margin) - x_stop),
        x_stop = x + v t_react + v |v| / (2 a_brake)

    so the planner avoids, and the gate refuses, plans that reach a state the brake fallback can no
    longer stop inside the constraint (the gate's own constraint check only sees k ticks ahead).
    ``a_brake`` / ``t_react``: ``explore.plan_brake_decel_m_s2`` / ``plan_react_s`` where set, else
    the explorer's. Only the learning stack's view: violations are still judged on the spec's
    constraints."""

    def __init__(self, task: Task, spec: RobotSpec, cfg):
        self.inner = task
        self.name, self.max_step_reward = task.name, task.max_step_reward
        (self.a, self.react), self.margin = cfg.plan_brake(), cfg.margin
        self.pairs = shield_pairs(spec, cfg)

    def reward(self, obs, act, next_obs):
        return self.inner.reward(obs, act, next_obs)

    def terminated(self, next_obs):
        return self.inner.terminated(next_obs)

    def constraints(self, obs):
        g = self.inner.constraints(obs)
        extra = []
        for ip, iv, low, high in self.pairs:
            p, v = obs[..., ip], obs[..., iv]
            stop = stopping_point(p, v, self.a, self.react)
            extra.append(torch.maximum(stop - (high - self.margin), (low + self.margin) - stop))
        return torch.cat([g, torch.stack(extra, -1)], -1) if extra else g
