"""Tasks: batched reward, termination and constraints g(x) <= 0 over observations.

All methods take torch tensors with arbitrary leading batch dimensions (``... x S`` observations,
``... x A`` actions) so the planner can score ``E x N x k`` imagined steps in one call; numpy
callers go through :meth:`Task.reward_np`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch


class Task(ABC):
    """What the controller should achieve on a robot with a given observation layout."""

    name: str = "task"
    max_step_reward: float = 1.0  # upper bound of reward per step (bounded rewards only)

    @abstractmethod
    def reward(self, obs: torch.Tensor, act: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
        """r(s, a, s'): ``... x S``, ``... x A``, ``... x S`` -> ``...``."""

    def goal(self, obs_dim: int, act_dim: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The equilibrium the task asks for, ``(s*, a*)`` (``S``, ``A``): a reward maximum the robot
        can stay at. None (default): no single goal state (no LQR terminal value)."""
        return None

    def terminated(self, next_obs: torch.Tensor) -> torch.Tensor:
        """True where the episode must end (``... x S`` -> ``...`` bool). Default: never."""
        return torch.zeros(next_obs.shape[:-1], dtype=torch.bool, device=next_obs.device)

    def constraints(self, obs: torch.Tensor) -> torch.Tensor:
        """g(x) for each constraint (``... x S`` -> ``... x C``); violated where > 0."""
        return obs.new_zeros(obs.shape[:-1] + (0,))

    # numpy conveniences for the real-time loop (one sample at a time)
    def reward_np(self, obs: np.ndarray, act: np.ndarray, next_obs: np.ndarray) -> float:
        t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))  # noqa: E731
        return float(self.reward(t(obs), t(act), t(next_obs)))

    def terminated_np(self, next_obs: np.ndarray) -> bool:
        return bool(self.terminated(torch.as_tensor(np.asarray(next_obs, dtype=np.float32))))

    def constraints_np(self, obs: np.ndarray) -> np.ndarray:
        return self.constraints(torch.as_tensor(np.asarray(obs, dtype=np.float32))).numpy()
