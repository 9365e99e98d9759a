"""HIL suite: the full host stack drives the emulated cart-pole over a real pty at 50 Hz (wall clock)
while faults are injected. Every scenario asserts the common invariants (:func:`check_common`):

* no command outside the spec's command and rate limits reached the device (its command log);
* the host never crashed: every tick ran and the final safe stop reached the device;
* the gate fell back on every tick whose observation was invalid;
* every transition the robot vouched for is in the replay buffer, and the buffer holds no NaN.

ROBOT_MBRL_REDUCED=1 runs the same scenarios shorter (CI: the whole suite < 90 s on 2 cores).
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from robot_mbrl.hal.robot import Fault
from robot_mbrl.hil.faults import FaultConfig
from robot_mbrl.hil.scenarios import Injection, Scenario, ScenarioResult, run_scenario
from robot_mbrl.sim.params import ScheduleEvent

log = logging.getLogger(__name__)

pytestmark = pytest.mark.hil

REDUCED = os.environ.get("ROBOT_MBRL_REDUCED") == "1"
T = 150 if REDUCED else 400  # ticks per scenario at 50 Hz (3 s / 8 s)
DT = 0.02
WATCHDOG_S = 0.1
NOISY = FaultConfig(corrupt_rate=0.01, chunk_drop_rate=0.05)  # 1 % of bytes, 5 % of frames
# a loaded 2-core machine delays the device thread: allow two device periods and 60 ms of jitter
BRAKE_SLACK_S = 2 * DT + 0.06


def check_common(res: ScenarioResult, min_vouched_fraction: float = 0.2) -> None:
    sc = res.scenario
    log.info(
        "%s: %.1f s, %d ticks, %d invalid, %d fallback, %d vouched, %d in buffer, loop %s, link %s",
        sc.name, res.wall_s, res.episode.steps, len(res.invalid_ticks()), res.episode.fallback_ticks,
        len(res.vouched_keys()), len(res.buffer), res.loop_stats.as_dict() if res.loop_stats else None,
        res.link_stats,
    )  # fmt: skip
    assert res.episode.steps == sc.ticks, "the host stopped early"
    assert res.commands_outside_limits() == []
    assert res.commands and res.commands[-1].values == tuple(res.spec.stop_action()), "no final safe stop"
    assert res.invalid_ticks_not_fallback() == []
    assert res.vouched_missing_from_buffer() == set()
    # ... and nothing else: at most the transition closed after the last tick, which vouched_keys
    # cannot see (a re-served reading, s_t+1 == s_t, is not a transition)
    assert len(res.buffer_keys() - res.vouched_keys()) <= 1
    assert res.buffer_rows_not_finite() == 0
    # data keeps flowing: not a vacuous pass because nothing was vouched
    assert len(res.vouched_keys()) >= min_vouched_fraction * sc.ticks


def vouched_after(res: ScenarioResult, t_s: float) -> int:
    return sum(1 for o in res.reads if o.info.get("vouched") and o.stamp_s > t_s)


def test_clean_link_baseline():
    res = run_scenario(Scenario("clean", ticks=T))
    check_common(res, min_vouched_fraction=0.8)
    assert res.device_crc_errors == 0 and res.link_stats["crc_errors"] == 0


def test_corrupted_and_dropped_frames():
    inj = (Injection(5, "link_faults", config=NOISY),)
    res = run_scenario(Scenario("noisy_link", ticks=T, injections=inj, seed=1))
    check_common(res)
    assert res.link_stats["crc_errors"] > 0, "host saw no corrupted frame"
    assert res.device_crc_errors > 0, "device saw no corrupted command"
    assert res.link_stats["frames_dropped"] > 0
    assert res.invalid_ticks(), "lost frames never made an observation stale"


def test_host_stall_device_watchdog_brakes():
    k = T // 2
    res = run_scenario(Scenario("host_stall", ticks=T, injections=(Injection(k, "host_stall", 0.2),)))
    check_common(res)
    stall_at = res.injected_at["host_stall"][0]
    latency = res.brake_latency_s(stall_at)
    assert WATCHDOG_S - 0.002 < latency <= WATCHDOG_S + BRAKE_SLACK_S, (
        f"braked {latency * 1e3:.0f} ms after silence"
    )
    # it kept braking while the host was silent and let go once commands came back
    braked = [t for t in res.brake_times_s if t > stall_at]
    assert len(braked) >= 2, f"braked only {len(braked)} device steps during a 200 ms silence"
    assert braked[-1] < stall_at + 0.2 + BRAKE_SLACK_S, "still braking after the host came back"
    assert vouched_after(res, stall_at + 0.5) > 0, "control did not resume after the stall"


def test_unplug_and_replug():
    k = T // 3
    inj = (Injection(k, "unplug"), Injection(k + 15, "replug"))
    res = run_scenario(Scenario("unplug", ticks=T, injections=inj))
    check_common(res)
    assert res.link_stats["link_losses"] >= 1 and res.link_stats["reconnects"] >= 1
    unplug_at, replug_at = res.injected_at["unplug"][0], res.injected_at["replug"][0]
    latency = res.brake_latency_s(unplug_at)
    assert latency <= WATCHDOG_S + DT + BRAKE_SLACK_S, f"braked {latency * 1e3:.0f} ms after unplug"
    down = [r for r in res.ticks if unplug_at < r.t_s < replug_at]
    assert down and all(r.obs.faults & (Fault.COMM | Fault.STALE) for r in down)
    assert vouched_after(res, replug_at) > 0, "no valid transition after the replug"


def test_sensor_spike_and_nan():
    spike_s, nan_s = T // 3 * DT, 2 * T // 3 * DT
    schedule = (
        ScheduleEvent(
            at_s=spike_s, kind="sensor_spike", target="thetadot_rad_s", value=100.0, duration_s=0.1
        ),
        ScheduleEvent(at_s=nan_s, kind="sensor_nan", target="theta_rad", duration_s=0.1),
    )
    res = run_scenario(Scenario("sensors", ticks=T, schedule=schedule))
    check_common(res)
    seen = [r.obs.values for r in res.ticks]
    assert any(np.isnan(v[1]) for v in seen), "the NaN reading never reached the host"
    assert any(abs(v[3]) > 30.0 for v in seen if np.isfinite(v[3])), "the spike never reached the host"


def test_actuator_saturation():
    schedule = (ScheduleEvent(at_s=0.4, kind="actuator_gain", target="motor_u", value=0.5),)
    res = run_scenario(Scenario("saturation", ticks=T, schedule=schedule, proposer_gain=8.0))
    check_common(res)
    assert res.clamp_count > 0.3 * T, "the proposer did not ask for saturated commands"
    assert any(abs(c.values[0]) == 1.0 for c in res.commands), "no command reached the limit"


def test_dynamics_shift():
    at = T // 2 * DT
    schedule = (
        ScheduleEvent(at_s=at, kind="param_scale", target="pole_mass_kg", value=2.0),
        ScheduleEvent(at_s=at, kind="param_scale", target="rail_viscous_n_s_m", value=3.0),
    )
    res = run_scenario(Scenario("shift", ticks=T, schedule=schedule))
    check_common(res)
    assert res.twin_params["pole_mass_kg"] == pytest.approx(0.46)
    assert res.twin_params["rail_viscous_n_s_m"] == pytest.approx(3.0)


@pytest.mark.slow
def test_everything_at_once():
    n = T + 100
    schedule = (
        ScheduleEvent(
            at_s=n // 5 * DT, kind="sensor_spike", target="thetadot_rad_s", value=100.0, duration_s=0.1
        ),
        ScheduleEvent(at_s=2 * n // 5 * DT, kind="sensor_nan", target="theta_rad", duration_s=0.1),
        ScheduleEvent(at_s=n // 2 * DT, kind="param_scale", target="pole_mass_kg", value=2.0),
        ScheduleEvent(at_s=0.4, kind="actuator_gain", target="motor_u", value=0.5),
    )
    inj = (
        Injection(5, "link_faults", config=NOISY),
        Injection(n // 4, "host_stall", 0.2),
        Injection(3 * n // 5, "link_stall", 0.2),  # a link stall here; unplug/replug has its own test
    )
    res = run_scenario(Scenario("everything", ticks=n, schedule=schedule, injections=inj, proposer_gain=3.0))
    check_common(res, min_vouched_fraction=0.1)
    assert res.link_stats["crc_errors"] > 0
    # with corruption a command may be lost just before the stall: bound from the host side only
    assert res.brake_latency_s(res.injected_at["host_stall"][0]) <= WATCHDOG_S + BRAKE_SLACK_S


def test_cli_run_against_the_emulator(tmp_path):
    """`robot-mbrl run --backend serial` as a subprocess against an emulator served in-process."""
    import json
    import subprocess
    import sys

    from robot_mbrl.hil.emulator import serve_twin
    from robot_mbrl.sim.cartpole import CartpoleTwin
    from robot_mbrl.sim.params import TwinConfig

    emu, port = serve_twin(CartpoleTwin(TwinConfig(), seed=0), "pty")
    try:
        cmd = [
            sys.executable, "-m", "robot_mbrl.cli", "run", "--backend", "serial", "--port", port,
            "--policy", "safe", "--episodes", "1", "--set", "task.episode_steps=50",
            "--out", str(tmp_path / "run"), "--quiet",
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        log.info("cli stdout: %s\nstderr: %s", proc.stdout[-2000:], proc.stderr[-2000:])
        assert proc.returncode == 0, proc.stderr[-2000:]
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert summary["real_steps"] == 50
        log_ = emu.command_log()
        assert len(log_) >= 50, f"the device received {len(log_)} commands"
        assert all(abs(c.values[0]) <= 1.0 and c.applied == c.values for c in log_)
        assert log_[-1].values == (0.0,), "the CLI did not end with a safe stop"
    finally:
        emu.stop()


def test_a_job_terminated_mid_episode_stops_the_rig_and_keeps_its_summary(tmp_path):
    """`kill PID` (SIGTERM: a service manager, an operator) on a job driving the rig mid-episode: the
    device gets the stop command and an ESTOP before the process exits 143, and the summary of the
    episodes done says what ended the job."""
    import signal
    import subprocess
    import sys
    import time

    from robot_mbrl.drivers import mcu
    from robot_mbrl.hil.emulator import serve_twin
    from robot_mbrl.sim.cartpole import CartpoleTwin
    from robot_mbrl.sim.params import TwinConfig

    emu, port = serve_twin(CartpoleTwin(TwinConfig(), seed=0), "pty")
    out = tmp_path / "run"
    try:
        cmd = [
            sys.executable, "-m", "robot_mbrl.cli", "run", "--backend", "serial", "--port", port,
            "--policy", "random", "--episodes", "100", "--set", "task.episode_steps=50",
            "--set", "homing.timeout_s=8", "--out", str(out), "--quiet",
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        metrics = out / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1) and time.monotonic() < deadline:
            time.sleep(0.05)
        n = len(emu.command_log())
        while len(emu.command_log()) < n + 10 and time.monotonic() < deadline:  # into the next episode
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
        assert stderr.strip().splitlines()[-1] == "robot-mbrl run: terminated (robot safe-stopped)", stderr[
            -800:
        ]
        commands = emu.command_log()
        assert commands[-1].values == (0.0,), "the job did not end with the stop command"
        estops = [m for m in emu.received if isinstance(m, mcu.Estop)]
        assert estops and estops[-1].engage, "the job did not engage the device's ESTOP"
        summary = json.loads((out / "summary.json").read_text())
        assert summary["stopped_by"] == "SIGTERM" and summary["episodes"] >= 1, summary
    finally:
        emu.stop()


def test_cli_ends_with_one_line_when_the_device_goes_away(tmp_path):
    """The rig vanishes mid-run (its emulator stops): the job ends with one line and a non-zero exit
    after serial.link_timeout_s, instead of counting ticks without a robot and exiting 0."""
    import subprocess
    import sys
    import threading

    from robot_mbrl.hil.emulator import serve_twin
    from robot_mbrl.sim.cartpole import CartpoleTwin
    from robot_mbrl.sim.params import TwinConfig

    emu, port = serve_twin(CartpoleTwin(TwinConfig(), seed=0), "pty")
    gone = threading.Event()

    def vanish() -> None:  # once the CLI commands the rig (however long its start-up took)
        while not emu.command_log() and not gone.wait(0.05):
            pass
        if not gone.wait(0.5):
            emu.stop()

    threading.Thread(target=vanish, daemon=True).start()
    try:
        cmd = [
            sys.executable, "-m", "robot_mbrl.cli", "run", "--backend", "serial", "--port", port,
            "--policy", "safe", "--episodes", "1", "--set", "task.episode_steps=2000",
            "--set", "serial.link_timeout_s=1", "--out", str(tmp_path / "run"), "--quiet",
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        log.info("cli stdout: %s\nstderr: %s", proc.stdout[-2000:], proc.stderr[-2000:])
        assert proc.returncode == 2, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("robot-mbrl run: ") and "for 1 s (serial.link_timeout_s)" in last, last
        assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "summary.json").exists()
    finally:
        gone.set()
        emu.stop()


@pytest.fixture(scope="module")
def learned_checkpoint(tmp_path_factory):
    """A small gated-MPC checkpoint learned on the twin through the real train job."""
    from robot_mbrl.config import load_config
    from robot_mbrl.runtime.train import train_job

    cfg = load_config(None, ["task.episode_steps=100", "train.steps=300", "train.eval_episodes=0",
                             "retrain.min_transitions=80", "trainer.max_epochs=30"])  # fmt: skip
    _, out = train_job(cfg, out=tmp_path_factory.mktemp("hil") / "run", progress=False)
    return cfg, out


def test_full_stack_learned_mpc_under_faults(learned_checkpoint):
    """Trained ensemble + k-step MPC + gate over the pty, with link noise, a NaN reading and a shift."""
    from robot_mbrl.agents.mpc import MPCAgent
    from robot_mbrl.tasks.cartpole import CartpoleTask

    cfg, ckpt = learned_checkpoint
    controllers = []

    def make(spec, scenario):
        agent = MPCAgent.load(
            ckpt, cfg, spec, CartpoleTask("swingup", cfg.twin.safe_x_m, cfg.twin.end_stop_x_m)
        )
        controllers.append(agent.controller(gate=True))
        return controllers[-1]

    n = T
    schedule = (
        ScheduleEvent(at_s=n // 3 * DT, kind="sensor_nan", target="theta_rad", duration_s=0.1),
        ScheduleEvent(at_s=n // 2 * DT, kind="param_scale", target="pole_mass_kg", value=2.0),
    )
    res = run_scenario(
        Scenario(
            "full-stack", ticks=n, schedule=schedule, injections=(Injection(5, "link_faults", config=NOISY),)
        ),
        make_controller=make,
    )
    check_common(res)
    trace = controllers[0].trace
    planned = [t for t in trace if np.isfinite(t[1])]
    assert len(planned) > 0.5 * n, "the MPC did not plan on most ticks"
    assert res.episode.end_stop_hits == 0


def test_train_learns_over_a_noisy_link_through_a_device_restart(tmp_path):
    """The real train job on the emulated rig: 1 % corrupted bytes and 5 % dropped frames, the MCU
    restarting after the first episode (during the second homing or episode), homing before every
    episode, a retrain between them. It must learn from what the device vouches for, home the rig,
    stay in limits and leave the device braking."""
    import threading
    import time

    from robot_mbrl.config import load_config
    from robot_mbrl.data.buffer import ReplayBuffer
    from robot_mbrl.drivers.mcu import DeviceFault
    from robot_mbrl.hil.emulator import serve_twin
    from robot_mbrl.runtime.train import train_job
    from robot_mbrl.sim.cartpole import CartpoleTwin
    from robot_mbrl.sim.params import TwinConfig

    emu, port = serve_twin(CartpoleTwin(TwinConfig(), seed=0), "pty", faults=NOISY)
    cfg = load_config(None, [f"serial.port={port}", "backend=serial", "task.episode_steps=75", "train.steps=150",
                             "retrain.min_transitions=50", "trainer.max_epochs=5", "homing.timeout_s=6"])  # fmt: skip
    restart = threading.Event()

    def restart_mid_episode() -> None:  # after the first episode (75 ticks) and the homing before it
        while not restart.wait(0.05):
            if emu.command_log() and len(emu.command_log()) > 75 + 150:
                emu.restart()
                restart.set()

    watcher = threading.Thread(target=restart_mid_episode, daemon=True)
    watcher.start()
    try:
        summary, out = train_job(cfg, out=tmp_path / "rig", progress=False)
        # it ends braked: the safe stop's ESTOP, or (if the noise ate it) the device's own watchdog
        deadline = time.monotonic() + 1.0
        while not emu.faults & (DeviceFault.ESTOP | DeviceFault.WATCHDOG) and time.monotonic() < deadline:
            time.sleep(0.01)
        braked = emu.faults & (DeviceFault.ESTOP | DeviceFault.WATCHDOG)
    finally:
        restart.set()
        emu.stop()
    assert braked, "the device was not braking after train ended"
    assert summary["real_steps"] == 150 and summary["violations"] == 0 and summary["end_stop_hits"] == 0
    link = summary["link"]
    assert link["crc_errors"] > 0 and link["device_restarts"] >= 1, link
    learn = [
        m
        for m in (json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines())
        if m.get("kind") == "learn"
    ]
    assert len(learn) == 2 and all(m["homing_ticks"] > 0 for m in learn)
    buf = ReplayBuffer.open(out / "buffer", cfg.buffer)
    # vouched transitions only: each frame lost to the noise costs two (the next reading is the
    # device's second sample since the last: two periods of one command), and the restart some
    assert 0.15 * 150 < len(buf) < 150, len(buf)
    assert np.all(np.isfinite(buf.arrays()["obs"]))
    assert all(abs(c.applied[0]) <= 1.0 for c in emu.command_log())
