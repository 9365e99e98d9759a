"""The MuJoCo cart-pole twin: config validation, determinism, clamping, end stops, schedule, physics."""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from robot_mbrl.hal import Fault, stop_on_signals
from robot_mbrl.sim.cartpole import CartpoleTwin, wrap_angle
from robot_mbrl.sim.params import ScheduleEvent, TwinConfig
from robot_mbrl.sim.schedule import Schedule
from robot_mbrl.typedconfig import ConfigError, build

QUIET = dict(init_x_std_m=0.0, init_theta_std_rad=0.0, init_xdot_std_m_s=0.0, init_thetadot_std_rad_s=0.0)


def rollout(twin: CartpoleTwin, actions: np.ndarray, seed: int) -> np.ndarray:
    """Observations (T+1 x 5) under a fixed action sequence (T x 1)."""
    obs = [twin.reset(seed=seed).values]
    for a in actions:
        twin.write(a)
        obs.append(twin.read().values)
    return np.array(obs)


# -- config ------------------------------------------------------------------------------------------
def test_build_rejects_negative_mass_and_bad_schedule():
    with pytest.raises(ConfigError, match="pole_mass_kg"):
        build(TwinConfig, {"pole_mass_kg": -0.2}, source="t.yaml", prefix="twin")
    with pytest.raises(ConfigError, match="schedule"):
        build(TwinConfig, {"schedule": [{"at_s": 1.0, "kind": "param_scale", "target": "nope", "value": 2}]})
    with pytest.raises(ConfigError, match="kind"):
        build(TwinConfig, {"schedule": [{"at_s": 1.0, "kind": "explode"}]})
    with pytest.raises(ConfigError):
        build(
            TwinConfig,
            {"schedule": [{"at_s": 0, "kind": "param_set", "target": "cart_mass_kg", "value": -1}]},
        )
    with pytest.raises(ConfigError, match="control_hz"):
        build(TwinConfig, {"control_hz": 33.0})
    with pytest.raises(ConfigError):
        build(TwinConfig, {"safe_x_m": 0.46})


def test_build_parses_schedule_from_plain_data():
    cfg = build(
        TwinConfig,
        {"task": "balance", "schedule": [{"at_s": 3, "kind": "sensor_bias", "target": "x_m", "value": 0.01}]},
    )
    assert cfg.schedule == (ScheduleEvent(at_s=3.0, kind="sensor_bias", target="x_m", value=0.01),)
    assert cfg.substeps == 10


# -- determinism ------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["swingup", "balance"])
def test_same_seed_same_trajectory_different_seed_differs(task):
    actions = np.random.default_rng(123).uniform(-1, 1, size=(60, 1))
    cfg = TwinConfig(task=task)
    a = rollout(CartpoleTwin(cfg, seed=0), actions, seed=7)
    b = rollout(CartpoleTwin(cfg, seed=99), actions, seed=7)
    c = rollout(CartpoleTwin(cfg, seed=0), actions, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


# -- clamping through write ---------------------------------------------------------------------------
def test_write_clamps_to_limits_and_rate():
    twin = CartpoleTwin(TwinConfig(act_rate_per_s=10.0), seed=0)  # 0.2 per 20 ms tick
    twin.reset(seed=0)
    np.testing.assert_allclose(twin.write(np.array([5.0])), [0.2])  # from rest: at most 0.2 per tick
    np.testing.assert_allclose(twin.write(np.array([5.0])), [0.4])
    np.testing.assert_allclose(twin.write(np.array([-1.0])), [0.2])
    np.testing.assert_allclose(twin.write(np.array([np.nan])), [0.0])  # NaN -> safe 0, rate-limited
    assert twin.clamp_count == 4
    assert twin.read().values[4] == pytest.approx(0.0)  # u_applied: the command acting now


def test_command_acts_one_tick_later_through_motor_lag():
    twin = CartpoleTwin(TwinConfig(**QUIET, rail_coulomb_n=0.0), seed=0)
    twin.reset(seed=0)
    twin.write(np.array([1.0]))
    assert abs(twin.truth().state[2]) < 1e-9  # no force during the period the command was written in
    assert twin.read().values[4] == 1.0
    twin.write(np.array([1.0]))
    truth = twin.truth()
    assert 9.5 < truth.force_n < 10.0  # 5 ms lag nearly settled after 20 ms
    assert truth.state[2] > 0.1


# -- end stops -----------------------------------------------------------------------------------------
def test_end_stop_hit_sets_limit_fault_and_violation():
    twin = CartpoleTwin(TwinConfig(**QUIET), seed=0)
    twin.reset(seed=0)
    faults, violations = Fault.NONE, 0
    for _ in range(100):
        twin.write(np.array([1.0]))
        obs = twin.read()
        faults |= obs.faults
        violations += int(np.any(twin.spec.constraint_values(obs.values) > 0))
    assert Fault.LIMIT in faults
    assert twin.end_stop_hits >= 1
    assert violations > 0
    assert twin.truth().state[0] == pytest.approx(0.45, abs=0.01)  # held by the bumper, not the rail end


# -- schedule ------------------------------------------------------------------------------------------
def test_pole_mass_change_at_1s_changes_dynamics_after_not_before():
    actions = np.random.default_rng(5).uniform(-1, 1, size=(100, 1))
    shift = ScheduleEvent(at_s=1.0, kind="param_scale", target="pole_mass_kg", value=2.0)
    base = rollout(CartpoleTwin(TwinConfig(), seed=0), actions, seed=1)
    twin = CartpoleTwin(TwinConfig(schedule=(shift,)), seed=0)
    shifted = rollout(twin, actions, seed=1)
    np.testing.assert_array_equal(base[:51], shifted[:51])  # obs at t <= 1.0 s
    assert np.abs(base[60:] - shifted[60:]).max() > 1e-2
    assert twin.truth().params["pole_mass_kg"] == pytest.approx(0.46)
    twin.reset(seed=1)  # episode clock: back to nominal
    assert twin.truth().params["pole_mass_kg"] == pytest.approx(0.23)


def test_sensor_bias_shows_in_readings_only():
    actions = np.zeros((40, 1))
    bias = ScheduleEvent(at_s=0.4, kind="sensor_bias", target="x_m", value=0.1, duration_s=0.2)
    base = rollout(CartpoleTwin(TwinConfig(), seed=0), actions, seed=2)
    biased = rollout(CartpoleTwin(TwinConfig(schedule=(bias,)), seed=0), actions, seed=2)
    diff = biased - base
    np.testing.assert_allclose(diff[20:30, 0], 0.1, atol=1e-12)  # ticks 20..29 = [0.4, 0.6) s
    np.testing.assert_array_equal(diff[:20], 0.0)
    np.testing.assert_array_equal(diff[30:], 0.0)
    np.testing.assert_array_equal(diff[:, 1:], 0.0)


def test_actuator_sign_flip_flips_acceleration():
    def xdot_after_push(schedule):
        twin = CartpoleTwin(TwinConfig(**QUIET, schedule=schedule), seed=0)
        twin.reset(seed=0)
        for _ in range(3):
            twin.write(np.array([0.5]))
        return twin.truth().state[2]

    nominal = xdot_after_push(())
    flipped = xdot_after_push((ScheduleEvent(at_s=0.0, kind="actuator_sign_flip"),))
    assert nominal > 0.05
    assert flipped == pytest.approx(-nominal, rel=1e-6)


def test_schedule_freeze_nan_spike_and_clocks():
    events = (
        ScheduleEvent(at_s=1.0, kind="sensor_freeze", target="x_m", duration_s=1.0),
        ScheduleEvent(at_s=1.0, kind="sensor_nan", target="theta_rad", clock="total"),
        ScheduleEvent(at_s=0.5, kind="sensor_spike", target="xdot_m_s", value=3.0),
        ScheduleEvent(at_s=0.0, kind="actuator_gain", value=0.5, duration_s=2.0),
        ScheduleEvent(at_s=1.0, kind="actuator_sign_flip"),
    )
    s = Schedule(events)
    r = {"x_m": 0.1, "theta_rad": 0.2, "xdot_m_s": 0.0}
    assert s.apply_sensors(r, 0.5, 0.5)["xdot_m_s"] == 3.0
    assert s.apply_sensors(r, 0.6, 0.6)["xdot_m_s"] == 0.0  # one-shot spike
    assert s.apply_sensors(r, 1.0, 0.9)["x_m"] == 0.1
    frozen = s.apply_sensors({**r, "x_m": 0.3}, 1.5, 1.0)
    assert frozen["x_m"] == 0.1 and math.isnan(frozen["theta_rad"])
    assert s.apply_sensors({**r, "x_m": 0.3}, 2.0, 2.0)["x_m"] == 0.3  # window ended
    assert s.actuator_gain(0.5, 0.5) == 0.5
    assert s.actuator_gain(1.5, 1.5) == -0.5
    assert s.actuator_gain(2.5, 2.5) == -1.0
    s.reset_episode()
    assert s.apply_sensors(r, 0.5, 10.0)["xdot_m_s"] == 3.0  # episode spike fires again


# -- physics sanity --------------------------------------------------------------------------------------
def test_released_near_upright_falls():
    twin = CartpoleTwin(TwinConfig(task="balance", **{**QUIET, "init_theta_std_rad": 0.0}), seed=0)
    twin.reset(seed=0)
    twin.data.qpos[1] = 0.05
    thetas = []
    for _ in range(50):
        twin.write(np.zeros(1))
        thetas.append(twin.truth().state[1])
    assert thetas[0] > 0.05  # falls the way it leans
    assert max(thetas) > 1.5  # and is far from upright within 1 s


def test_hanging_with_zero_command_stays_hanging():
    twin = CartpoleTwin(TwinConfig(), seed=3)
    twin.reset(seed=3)
    for _ in range(250):
        twin.write(np.zeros(1))
        obs = twin.read()
    assert abs(wrap_angle(obs.values[1] - math.pi)) < 0.1
    assert abs(obs.values[0]) < 0.1
    assert abs(obs.values[3]) < 1.0


def test_encoder_quantization_and_velocity_estimate():
    cfg = TwinConfig(cart_encoder_m=1e-3, pole_encoder_counts_per_rev=512)
    twin = CartpoleTwin(cfg, seed=0)
    twin.reset(seed=0)
    xs, ths, vel_err = [], [], []
    for k in range(50):
        twin.write(np.array([0.6 * math.sin(0.3 * k)]))
        obs = twin.read()
        xs.append(obs.values[0])
        ths.append(obs.values[1])
        vel_err.append(obs.values[2] - twin.truth().state[2])
    counts_x = np.array(xs) / 1e-3
    counts_th = np.array(ths) / (2 * math.pi / 512)
    np.testing.assert_allclose(counts_x, np.round(counts_x), atol=1e-6)
    np.testing.assert_allclose(counts_th, np.round(counts_th), atol=1e-6)
    assert np.std(np.array(xs)) > 1e-3  # the cart did move across many counts
    assert 0 < np.max(np.abs(vel_err)) < 0.2  # an estimate: close to, never equal to the truth


def test_advance_steps_physics_by_duration_with_carry():
    twin = CartpoleTwin(TwinConfig(), seed=0)
    twin.reset(seed=0)
    twin.apply_command(0.5)
    twin.advance(0.05)
    assert twin.episode_time_s == pytest.approx(0.05)
    twin.advance(0.003)
    twin.advance(0.003)
    assert twin.episode_time_s == pytest.approx(0.056)
    assert twin.truth().u_acting == 0.5  # the delayed command acts after one control period


# -- safe stop ------------------------------------------------------------------------------------------
def test_safe_stop_on_exception():
    twin = CartpoleTwin(TwinConfig(), seed=0)
    with pytest.raises(RuntimeError), stop_on_signals(twin):
        twin.write(np.array([1.0]))
        twin.write(np.array([1.0]))
        assert twin.truth().u_acting == 1.0
        raise RuntimeError("planner blew up")
    assert not twin.connected
    assert twin.truth().u_acting == 0.0
    twin.advance(0.1)
    assert twin.truth().u_acting == 0.0  # the queued command was dropped, not applied later


SIGTERM_CHILD = textwrap.dedent(
    """
    import pathlib, sys
    import numpy as np
    from robot_mbrl.hal import stop_on_signals
    from robot_mbrl.sim.cartpole import CartpoleTwin
    from robot_mbrl.sim.params import TwinConfig

    marker, ready = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])

    class Marked(CartpoleTwin):
        def _safe_stop(self):
            super()._safe_stop()
            marker.write_text(f"u={self.truth().u_acting}")

    with stop_on_signals(Marked(TwinConfig(realtime=True))) as robot:
        ready.write_text("go")
        while True:
            robot.write(np.array([0.5]))
    """
)


def test_safe_stop_on_sigterm_in_subprocess(tmp_path):
    marker, ready = tmp_path / "stopped", tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_CHILD, str(marker), str(ready)])
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None, "child died before it was ready"
            assert time.monotonic() < deadline, "child never became ready"
            time.sleep(0.05)
        assert not marker.exists()
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    assert marker.read_text() == "u=0.0"


def test_truth_is_not_the_observation():
    twin = CartpoleTwin(dataclasses.replace(TwinConfig(), pole_noise_std_rad=1e-3), seed=0)
    twin.reset(seed=0)
    for _ in range(10):
        twin.write(np.array([0.3]))
    obs, truth = twin.read(), twin.truth()
    assert not np.array_equal(obs.values[:4], truth.state)
    np.testing.assert_allclose(obs.values[:2], truth.state[:2], atol=0.01)


def _pendulum_period_s(twin: CartpoleTwin) -> float:
    """Small-oscillation period of the hanging pole from upward zero crossings over 4 s."""
    twin.reset(seed=0)
    twin.data.qpos[1] = math.pi - 0.05
    crossings, prev = [], -1.0
    for _ in range(2000):
        twin.advance(twin.cfg.physics_dt_s)
        dev = wrap_angle(twin.truth().state[1] - math.pi)
        if prev < 0 <= dev:
            crossings.append(twin.episode_time_s)
        prev = dev
    return float(np.mean(np.diff(crossings)))


@pytest.mark.parametrize("length_m", [0.64, 0.32])
def test_pendulum_period_matches_closed_form(length_m):
    """Heavy frictionless cart ~ fixed pivot: T = 2 pi sqrt(2 L / (3 g)) for a uniform rod."""
    frictionless = dict(QUIET, rail_coulomb_n=0.0, rail_viscous_n_s_m=0.0, hinge_damping_nm_s_rad=0.0)
    frictionless.update(cart_mass_kg=50.0, cart_noise_std_m=0.0, pole_noise_std_rad=0.0)
    # the length comes from a param_set at t = 0: exercises the runtime geometry update too
    shift = ScheduleEvent(at_s=0.0, kind="param_set", target="pole_length_m", value=length_m)
    twin = CartpoleTwin(TwinConfig(**frictionless, schedule=(shift,)), seed=0)
    expected = 2 * math.pi * math.sqrt(2 * length_m / (3 * 9.81))
    assert _pendulum_period_s(twin) == pytest.approx(expected, rel=0.01)


def test_realtime_write_does_not_outrun_the_wall_clock():
    twin = CartpoleTwin(TwinConfig(realtime=True), seed=0)
    with twin:
        twin.reset(seed=0)
        t0 = time.monotonic()
        for _ in range(5):
            twin.write(np.zeros(1))
        assert time.monotonic() - t0 >= 0.09  # 5 periods of 20 ms


def test_an_unstable_simulation_stops_the_run_and_absurd_sizes_are_refused():
    """A 1e-300 kg pole flooded stderr with MuJoCo's BADQACC warnings while MuJoCo reset the state
    every few steps, and the run reported a return of 165 from that void simulation."""
    import mujoco

    from robot_mbrl.config import load_config
    from robot_mbrl.sim.cartpole import CartpoleTwin
    from robot_mbrl.typedconfig import ConfigError

    for key, value in (("pole_mass_kg", "1e-300"), ("pole_length_m", "1e-9"), ("cart_mass_kg", "0")):
        with pytest.raises(ConfigError, match=f"twin.{key}: expected a value >="):
            load_config(None, [f"twin.{key}={value}"])
    twin = CartpoleTwin(load_config(None, []).twin, seed=0)
    with twin:
        twin.reset(0)
        twin.read()
        twin.write(np.array([0.5]))
        twin.read()
        twin.data.warning[mujoco.mjtWarning.mjWARN_BADQACC].number = 1  # as MuJoCo counts one
        with pytest.raises(ConfigError, match="twin: expected physical parameters MuJoCo can simulate"):
            twin.write(np.array([0.5]))
            twin.read()
