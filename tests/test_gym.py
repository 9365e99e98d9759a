"""Gymnasium adapters both ways: registered twin envs and GymRobot over InvertedPendulum-v5."""

from __future__ import annotations

import subprocess
import sys

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import robot_mbrl
from robot_mbrl.hal import Fault
from robot_mbrl.hal.gym_backend import GymRobot, RobotEnv
from robot_mbrl.sim.cartpole import CartpoleTwin
from robot_mbrl.sim.params import TwinConfig
from robot_mbrl.tasks import CartpoleTask


@pytest.mark.parametrize("env_id", sorted(robot_mbrl.GYM_ENV_IDS))
def test_registered_envs_pass_check_env(env_id):
    env = gymnasium.make(env_id)
    check_env(env.unwrapped, skip_render_check=True)
    assert env.observation_space.dtype == np.float32 and env.action_space.dtype == np.float32
    assert env.observation_space.shape == (5,) and env.action_space.shape == (1,)
    env.close()


def test_import_robot_mbrl_does_not_import_mujoco():
    code = (
        "import sys, gymnasium, robot_mbrl, robot_mbrl.hal.gym_backend\n"
        "assert 'robot_mbrl/CartpoleSwingup-v0' in gymnasium.registry\n"
        "assert 'mujoco' not in sys.modules, 'mujoco imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_robot_env_rewards_truncation_and_info():
    cfg = TwinConfig(task="balance")
    env = RobotEnv(CartpoleTwin(cfg, seed=0), CartpoleTask("balance"), episode_steps=5)
    obs, info = env.reset(seed=4)
    assert env.observation_space.contains(obs)
    assert info["faults"] == 0 and info["constraint_values"].shape == (1,)
    flags = []
    for _ in range(5):
        obs, reward, terminated, truncated, info = env.step(np.array([2.0], dtype=np.float32))
        assert 0.5 < reward <= 1.0  # near upright: high reward
        flags.append((terminated, truncated))
    assert flags[-1] == (False, True) and not any(t for t, _ in flags[:-1])
    np.testing.assert_allclose(info["applied_action"], [1.0])  # clamped by the HAL
    assert env.robot.connected
    env.close()
    assert not env.robot.connected


def test_robot_env_terminates_at_end_stop():
    env = gymnasium.make("robot_mbrl/CartpoleSwingup-v0")
    env.reset(seed=0)
    steps, terminated = 0, False
    while not terminated and steps < 200:
        _, _, terminated, truncated, info = env.step(np.array([1.0], dtype=np.float32))
        steps += 1
    assert terminated and not truncated and steps < 100
    assert info["faults"] & Fault.LIMIT and info["violation"]
    env.close()


def test_env_seeding_is_deterministic():
    def run(seed):
        env = gymnasium.make("robot_mbrl/CartpoleSwingup-v0")
        obs = [env.reset(seed=seed)[0]]
        rng = np.random.default_rng(0)
        for _ in range(30):
            obs.append(env.step(rng.uniform(-1, 1, size=1).astype(np.float32))[0])
        env.close()
        return np.array(obs)

    np.testing.assert_array_equal(run(11), run(11))
    assert not np.allclose(run(11), run(12))


# -- GymRobot ------------------------------------------------------------------------------------------
@pytest.fixture
def pendulum_robot():
    robot = GymRobot(gymnasium.make("InvertedPendulum-v5"), control_hz=25.0)
    yield robot
    robot.close()


def test_gym_robot_spec_from_spaces(pendulum_robot):
    spec = pendulum_robot.spec
    assert spec.obs_dim == 4 and spec.act_dim == 1
    assert spec.obs_names == ("obs_0", "obs_1", "obs_2", "obs_3")
    assert np.all(np.isinf(spec.obs_low)) and np.all(np.isinf(spec.obs_high))
    np.testing.assert_allclose(spec.act_low, [-3.0])
    np.testing.assert_allclose(spec.act_high, [3.0])
    assert spec.control_hz == 25.0


def test_gym_robot_clamps_and_exposes_reward(pendulum_robot):
    with pendulum_robot as robot:
        robot.reset(seed=0)
        np.testing.assert_allclose(robot.write(np.array([10.0])), [3.0])
        assert robot.clamp_count == 1
        assert robot.last_step["reward"] == 1.0 and not robot.last_step["terminated"]
        steps = 1
        while not (robot.last_step["terminated"] or robot.last_step["truncated"]):
            robot.write(np.array([3.0]))  # pushing one way topples the pole
            steps += 1
            assert steps < 200
        assert robot.last_step["terminated"]
        assert robot.episode_return == pytest.approx(steps - 1)  # v5: reward 0 on the failing step
        obs = robot.read()
        assert obs.values.shape == (4,) and abs(obs.values[1]) > 0.2


def test_gym_robot_rate_limit_and_determinism():
    def run():
        robot = GymRobot(gymnasium.make("InvertedPendulum-v5"), control_hz=25.0, act_rate_per_s=(25.0,))
        with robot:
            robot.reset(seed=3)
            applied = [robot.write(np.array([a]))[0] for a in (0.0, 3.0, 3.0, -3.0)]
            return applied, robot.read().values

    applied, values = run()
    np.testing.assert_allclose(applied, [0.0, 1.0, 2.0, 1.0])  # at most 1.0 per 40 ms tick
    np.testing.assert_array_equal(values, run()[1])


def test_gym_robot_rejects_non_box_spaces():
    with pytest.raises(TypeError):
        GymRobot(gymnasium.make("CartPole-v1"), control_hz=50.0)


def test_env_termination_box_for_the_planner(pendulum_robot):
    """gym.terminal_*: the env's documented termination rule as a box on observation channels."""
    import torch

    from robot_mbrl.agents.planning_tasks import EnvRewardTask
    from robot_mbrl.config import load_config

    cfg = load_config("inverted_pendulum_gym")
    g = cfg.gym
    assert g.terminal_channels == ("obs_1",) and g.terminal_low == (-0.2,) and g.terminal_high == (0.2,)
    task = EnvRewardTask(pendulum_robot.spec, g.terminal_channels, g.terminal_low, g.terminal_high)
    obs = torch.tensor(
        [[0.0, 0.1, 0.0, 0.0], [0.0, -0.25, 0.0, 0.0], [0.5, 0.21, 0.0, 0.0], [0.0, float("nan"), 0, 0]]
    )
    assert task.terminated(obs).tolist() == [False, True, True, True]
    assert not EnvRewardTask().terminated(obs).any()  # no rule: never
    with pytest.raises(ValueError, match="gym.terminal_channels: expected observation channels"):
        EnvRewardTask(pendulum_robot.spec, ("hinge",), (-0.2,), (0.2,))


def test_env_termination_box_needs_one_bound_per_channel():
    from robot_mbrl.config import load_config
    from robot_mbrl.typedconfig import ConfigError

    with pytest.raises(
        ConfigError, match="terminal_low and terminal_high with one value per terminal channel"
    ):
        load_config("inverted_pendulum_gym", ["gym.terminal_low=[-0.2, -1]"])


def test_robot_env_over_a_serial_rig_activates_and_keeps_the_control_period():
    """RobotEnv on the serial driver against the emulated rig (the twin behind the wire protocol on
    a pty): reset activates actuation, each step reads one control period after its command."""
    import time

    from robot_mbrl.config import load_config
    from robot_mbrl.factory import make_robot
    from robot_mbrl.hil.emulator import serve_twin

    cfg = load_config(None, ["backend=serial"])
    twin = CartpoleTwin(cfg.twin, seed=0)
    twin.connect()
    twin.reset(0)
    emulator, port = serve_twin(twin, "pty", watchdog_ms=cfg.serial.watchdog_ms)
    env = RobotEnv(make_robot(cfg, port=port), CartpoleTask(), episode_steps=25)
    try:
        obs, _ = env.reset(seed=0)
        assert env.paced
        t0 = time.monotonic()
        xs = []
        for _ in range(25):
            obs, _, terminated, _, info = env.step(np.array([0.5], dtype=np.float32))
            assert info["faults"] == 0 and not terminated
            xs.append(float(obs[0]))
        elapsed = time.monotonic() - t0
    finally:
        env.close()
        emulator.stop()
        twin.close()
    dt = 1.0 / cfg.twin.control_hz
    assert elapsed >= 24 * dt  # paced, not as fast as the loop can spin
    assert len(set(xs)) >= 20  # a new device state almost every step: the cart moves under the push


class _Drift(gymnasium.Env):
    """A point pushed right that ends its episode as it leaves its declared Box [-1, 1] (a common
    hand-written pattern): the terminal observation is outside the observation space."""

    observation_space = gymnasium.spaces.Box(-1.0, 1.0, (1,), np.float32)
    action_space = gymnasium.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x = 0.0
        return np.array([self.x], np.float32), {}

    def step(self, action):
        self.x += 0.11
        return np.array([self.x], np.float32), 1.0, self.x > 1.0, False, {}


def _episode(env, max_steps):
    from types import SimpleNamespace

    from robot_mbrl.runtime.episode import EnvJudge, run_episode
    from robot_mbrl.runtime.policies import PolicyController
    from robot_mbrl.runtime.rundir import Tally

    robot = GymRobot(env, control_hz=20.0)
    got = []
    with robot:
        res = run_episode(robot, EnvJudge(robot), PolicyController(SimpleNamespace(act=lambda obs: np.zeros(1))),
                          episode=0, max_steps=max_steps, seed=3, paced=False, tally=Tally(),
                          on_transition=got.append)  # fmt: skip
    return res, got


def test_an_env_ends_its_episode_even_where_it_leaves_its_declared_box():
    res, got = _episode(_Drift(), max_steps=60)
    assert res.steps == 10 and res.terminated  # (it ran all 60 ticks, stepping an ended env)
    assert len(got) == 10 and got[-1].terminated and not got[-1].truncated  # the terminal step is learned
    assert res.ret == pytest.approx(10.0)  # the env's reward, the last step's too


def test_an_env_time_limit_ends_the_episode_as_truncation():
    res, got = _episode(gymnasium.make("Pendulum-v1"), max_steps=300)  # TimeLimit: 200 steps
    assert res.steps == 200 and not res.terminated
    assert got[-1].truncated and not got[-1].terminated and not any(t.truncated for t in got[:-1])


def test_gym_control_rate_defaults_to_the_env_step_and_a_mismatch_is_warned(caplog):
    from robot_mbrl.config import load_config
    from robot_mbrl.factory import make_robot

    robot = make_robot(load_config("inverted_pendulum_gym", ["gym.env_id=Pendulum-v1", "gym.control_hz=null",
                                                             "gym.terminal_channels=[]", "gym.terminal_low=[]",
                                                             "gym.terminal_high=[]"]))  # fmt: skip
    assert robot.spec.control_hz == pytest.approx(20.0)  # Pendulum-v1: dt 0.05 s
    with caplog.at_level("WARNING", logger="robot_mbrl.factory"):
        robot = make_robot(load_config("inverted_pendulum_gym", ["gym.control_hz=50"]))
    assert robot.spec.control_hz == 50.0 and any(
        "steps 0.04 s (25 Hz)" in r.getMessage() for r in caplog.records
    )


def test_a_gym_checkpoint_loads_without_a_warning_about_its_learned_reward(tmp_path, caplog):
    """The reward head is the backend's (no known reward), not a setting the config got wrong."""
    from robot_mbrl.agents.mpc import MPCAgent
    from robot_mbrl.config import load_config
    from robot_mbrl.factory import make_robot

    cfg = load_config("inverted_pendulum_gym")
    robot = make_robot(cfg)
    MPCAgent(cfg, robot.spec, None).save(tmp_path)
    with caplog.at_level("WARNING", logger="robot_mbrl.agents.mpc"):
        agent = MPCAgent.load(tmp_path, cfg, robot.spec, None)
    assert agent.model.cfg.learn_reward and not caplog.records, [r.getMessage() for r in caplog.records]
    with caplog.at_level("WARNING", logger="robot_mbrl.agents.mpc"):  # a real difference still is one
        MPCAgent.load(tmp_path, load_config("inverted_pendulum_gym", ["model.hidden=32"]), robot.spec, None)
    assert any("model.hidden from the checkpoint" in r.getMessage() for r in caplog.records)


def test_a_gym_robot_is_a_gymnasium_env_again_with_its_own_reward_and_limits():
    """Any robot as an env: a GymRobot (which scores its own steps) needs no task."""
    env = RobotEnv(GymRobot(gymnasium.make("Pendulum-v1"), control_hz=20.0), None, episode_steps=500)
    check_env(env, skip_render_check=True)
    ref = gymnasium.make("Pendulum-v1")
    obs, _ = env.reset(seed=5)
    ref_obs, _ = ref.reset(seed=5)
    assert np.allclose(obs, ref_obs)
    for t in range(200):
        a = np.array([np.sin(0.1 * t)], np.float32)
        obs, r, term, trunc, _ = env.step(a)
        ref_obs, ref_r, ref_term, ref_trunc, _ = ref.step(a)
        assert np.allclose(obs, ref_obs, atol=1e-6) and r == pytest.approx(ref_r) and term == ref_term
    assert trunc and ref_trunc  # the env's own time limit (200), before episode_steps (500)
    with pytest.raises(ValueError, match="expected a task"):
        RobotEnv(CartpoleTwin(TwinConfig()), None, episode_steps=10)


class _Spinner(gymnasium.Env):
    """A wheel turning 1 rad a step, reporting its angle unwrapped (as many envs do)."""

    observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (2,), np.float32)
    action_space = gymnasium.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.q = 0.0
        return np.array([self.q, 1.0], np.float32), {}

    def step(self, action):
        self.q += 1.0
        return np.array([self.q, 1.0], np.float32), 0.0, False, False, {}


def test_gym_channels_can_be_named_and_marked_as_angles():
    robot = GymRobot(_Spinner(), control_hz=10.0, obs_names=("wheel", "speed"), angles=("wheel",))
    assert robot.spec.obs_names == ("wheel", "speed") and list(robot.spec.angle_mask) == [True, False]
    with robot:
        robot.reset(seed=0)
        for _ in range(7):
            robot.write(np.zeros(1))
        q = robot.read().values[0]
    assert q == pytest.approx(7.0 - 2 * np.pi, abs=1e-5) and robot.spec.in_range(np.array([q, 1.0]))
    with pytest.raises(ValueError, match="not observation channels"):
        GymRobot(_Spinner(), control_hz=10.0, angles=("wheel",))  # named obs_0, obs_1


class _Excursion(_Drift):
    """Leaves its declared Box for a few steps mid-episode and comes back; never terminates."""

    def step(self, action):
        self.t = getattr(self, "t", 0) + 1
        x = 1.5 if 5 <= self.t % 20 < 8 else 0.0
        return np.array([x], np.float32), 1.0, False, False, {}


def test_mid_episode_an_env_reading_outside_its_box_is_not_learned_but_its_reward_counts():
    res, got = _episode(_Excursion(), max_steps=20)
    assert res.steps == 20 and res.ret == pytest.approx(20.0)  # the env's reward, every step
    assert len(got) == 20 - 4  # the 3 steps into and the 1 out of the excursion are not transitions
    assert all(abs(t.next_obs[0]) <= 1.0 and abs(t.obs[0]) <= 1.0 for t in got)


def test_a_judge_written_before_authoritative_and_truncated_still_works():
    from types import SimpleNamespace

    from robot_mbrl.runtime.episode import run_episode
    from robot_mbrl.runtime.policies import PolicyController
    from robot_mbrl.runtime.rundir import Tally

    class OldJudge:  # only what the protocol asked for before
        def reward(self, obs, act, next_obs):
            return 1.0

        def terminated(self, next_obs):
            return False

    robot = GymRobot(gymnasium.make("Pendulum-v1"), control_hz=20.0)
    with robot:
        res = run_episode(robot, OldJudge(), PolicyController(SimpleNamespace(act=lambda obs: np.zeros(1))),
                          episode=0, max_steps=30, seed=1, paced=False, tally=Tally())  # fmt: skip
    assert res.steps == 30 and res.ret == 30.0
