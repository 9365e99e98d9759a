"""Cart-pole tasks on observations ``[x_m, theta_rad, xdot_m_s, thetadot_rad_s]``.

theta = 0 is upright, +-pi hanging. The reward is dense and bounded in [0, 1] per step (a product
of smooth terms in the style of dm_control's cartpole): upright, centred, small control, small
angular velocity. The track-limit constraint is g(x) = |x| - safe_x_m <= 0; touching an end stop
terminates the episode.
"""

from __future__ import annotations

import numpy as np
import torch

from robot_mbrl.tasks.base import Task

X, THETA, XDOT, THETADOT = 0, 1, 2, 3


class CartpoleTask(Task):
    """Swing-up (starts hanging) and balance (starts upright) share one reward."""

    max_step_reward = 1.0

    def __init__(self, name: str = "swingup", safe_x_m: float = 0.35, end_stop_x_m: float = 0.45):
        if name not in ("swingup", "balance"):
            raise ValueError(f"cartpole task: expected swingup or balance, got {name!r}")
        self.name = name
        self.safe_x_m = safe_x_m
        self.end_stop_x_m = end_stop_x_m

    def reward(self, obs: torch.Tensor, act: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
        x, theta, thetadot = next_obs[..., X], next_obs[..., THETA], next_obs[..., THETADOT]
        u = act[..., 0].clamp(-1.0, 1.0)
        upright = (1.0 + torch.cos(theta)) / 2.0
        centred = (1.0 + torch.exp(-0.5 * (x / 0.2) ** 2)) / 2.0
        small_control = (4.0 + (1.0 - u * u)) / 5.0
        small_velocity = (1.0 + torch.exp(-0.5 * (thetadot / 5.0) ** 2)) / 2.0
        return upright * centred * small_control * small_velocity

    def goal(self, obs_dim: int, act_dim: int) -> tuple[np.ndarray, np.ndarray]:
        """Upright, centred, at rest, no force (any extra channel, e.g. the echoed command, 0)."""
        return np.zeros(obs_dim), np.zeros(act_dim)

    def terminated(self, next_obs: torch.Tensor) -> torch.Tensor:
        return next_obs[..., X].abs() >= self.end_stop_x_m

    def constraints(self, obs: torch.Tensor) -> torch.Tensor:
        return (obs[..., X].abs() - self.safe_x_m).unsqueeze(-1)
