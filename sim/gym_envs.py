"""Gymnasium envs over the cart-pole twin: ``robot_mbrl/CartpoleSwingup-v0`` and ``-Balance-v0``.

``import robot_mbrl`` registers both ids with string entry points into this module, so mujoco is
imported only when an env is made::

    import gymnasium, robot_mbrl
    env = gymnasium.make("robot_mbrl/CartpoleSwingup-v0", seed=3, config=TwinConfig(pole_mass_kg=0.3))
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from robot_mbrl.hal.gym_backend import RobotEnv
from robot_mbrl.sim.cartpole import CartpoleTwin
from robot_mbrl.sim.params import TwinConfig
from robot_mbrl.tasks.cartpole import CartpoleTask

EPISODE_STEPS = 500  # 10 s at the default 50 Hz


class CartpoleEnv(RobotEnv):
    """The cart-pole twin with :class:`CartpoleTask` as a gymnasium env.

    ``config`` (default: ``TwinConfig()``) sets the rig; its ``task`` is replaced by ``task``.
    ``seed`` seeds the twin when ``reset`` is called without a seed.
    """

    def __init__(
        self,
        task: Literal["swingup", "balance"] = "swingup",
        episode_steps: int = EPISODE_STEPS,
        seed: int = 0,
        config: TwinConfig | None = None,
        render_mode: str | None = None,
    ):
        if render_mode is not None:
            raise ValueError("CartpoleEnv does not render")
        cfg = dataclasses.replace(config or TwinConfig(), task=task)
        super().__init__(
            CartpoleTwin(cfg, seed=seed),
            CartpoleTask(task, safe_x_m=cfg.safe_x_m, end_stop_x_m=cfg.end_stop_x_m),
            episode_steps,
        )
        self.metadata = {"render_modes": [], "render_fps": cfg.control_hz}
