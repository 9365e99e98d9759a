"""Builders keyed by config: the edge where backends (MuJoCo, pyserial, gymnasium) are constructed.

Core classes never construct their own backends; the CLI calls these and injects the results.
Heavy imports happen inside the builders so that choosing one backend never imports another.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from robot_mbrl.config import Config
from robot_mbrl.hal.robot import Robot
from robot_mbrl.runtime.episode import EnvJudge, Judge, TaskJudge
from robot_mbrl.tasks.base import Task
from robot_mbrl.tasks.cartpole import CartpoleTask

log = logging.getLogger(__name__)


def _twin(cfg: Config, port: str | None, seed: int) -> Robot:
    from robot_mbrl.sim.cartpole import CartpoleTwin

    return CartpoleTwin(cfg.twin, seed=seed)


def _gym(cfg: Config, port: str | None, seed: int) -> Robot:
    import gymnasium

    from robot_mbrl.hal.gym_backend import GymRobot
    from robot_mbrl.typedconfig import ConfigError, require_names

    try:
        env = gymnasium.make(cfg.gym.env_id, **cfg.gym.kwargs)
    except (gymnasium.error.Error, TypeError) as err:  # unknown id/version, missing extra, bad kwargs
        what = " ".join(str(err).split())
        raise ConfigError(
            "config", "gym.env_id/gym.kwargs", "an env gymnasium.make can build", what
        ) from None
    dt = getattr(env.unwrapped, "dt", None)  # MuJoCo and classic-control envs have it
    env_hz = 1.0 / dt if isinstance(dt, int | float) and dt > 0 else None
    hz = cfg.gym.control_hz or env_hz
    if hz is None:
        env.close()
        raise ConfigError(
            "config", "gym.control_hz", f"the control rate of {cfg.gym.env_id} (it has no dt)", None
        )
    if env_hz is not None and abs(hz - env_hz) > 0.01 * env_hz:
        log.warning("gym.control_hz %g, but %s steps %g s (%g Hz): pacing and deadlines follow %g Hz",
                    hz, cfg.gym.env_id, dt, env_hz, hz)  # fmt: skip
    try:
        robot = GymRobot(env, control_hz=hz)  # the env's own channels first
    except (TypeError, ValueError) as err:  # not a 1-D Box env, unbounded actions
        env.close()
        raise ConfigError(
            "config", "gym.env_id", "a 1-D Box env with finite action bounds", str(err)
        ) from None
    g, n = cfg.gym, robot.spec.obs_dim
    try:  # the config's channel names (checked for every job, a run without a planner too)
        if g.obs_names and len(set(g.obs_names)) != n:
            raise ConfigError(
                "config",
                "gym.obs_names",
                f"{n} distinct names (one per observation channel)",
                list(g.obs_names),
            )
        names = g.obs_names or robot.spec.obs_names
        require_names("gym.angle_channels", g.angle_channels, names)
        require_names("gym.terminal_channels", g.terminal_channels, names)
    except ConfigError:
        env.close()
        raise
    if g.obs_names or g.angle_channels:
        robot = GymRobot(env, control_hz=hz, obs_names=g.obs_names or None, angles=g.angle_channels)
    return robot


def _serial(cfg: Config, port: str | None, seed: int) -> Robot:
    """The physical cart-pole rig (or its emulator) over the MCU protocol.

    The rig's spec (channels, limits, constraints) is the one its twin is built from: the twin config
    describes the rig; only the link differs. ``connect()`` is read-only; the job calls activate().
    """
    import dataclasses

    from robot_mbrl.drivers.serial_robot import SerialRobot
    from robot_mbrl.drivers.transport import make_transport
    from robot_mbrl.sim.cartpole import make_spec

    serial_cfg = dataclasses.replace(cfg.serial, port=port) if port else cfg.serial
    return SerialRobot(make_spec(cfg.twin), make_transport(serial_cfg), serial_cfg)


ROBOTS: dict[str, Callable[[Config, str | None, int], Robot]] = {
    "twin": _twin,
    "gym": _gym,
    "serial": _serial,
}


def make_robot(
    cfg: Config, *, backend: str | None = None, port: str | None = None, seed: int | None = None
) -> Robot:
    return ROBOTS[backend or cfg.backend](cfg, port, cfg.seed if seed is None else seed)


def make_task(cfg: Config, backend: str | None = None) -> Task | None:
    """The known task for twin and serial cart-pole rigs; None for gym envs (reward from the env)."""
    if (backend or cfg.backend) == "gym":
        return None
    return CartpoleTask(cfg.twin.task, safe_x_m=cfg.twin.safe_x_m, end_stop_x_m=cfg.twin.end_stop_x_m)


def make_judge(task: Task | None, robot: Robot) -> Judge:
    return TaskJudge(task) if task is not None else EnvJudge(robot)
