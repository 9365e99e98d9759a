"""SerialRobot against the emulated MCU on a real pty (and TCP loopback), real pyserial."""

from __future__ import annotations

import time

import numpy as np
import pytest

from robot_mbrl.drivers import mcu
from robot_mbrl.drivers.config import SerialConfig
from robot_mbrl.drivers.serial_robot import HandshakeError, NotActive, SerialRobot
from robot_mbrl.drivers.transport import make_transport
from robot_mbrl.hal.robot import Channel, Fault, RobotSpec
from robot_mbrl.hil.emulator import serve
from robot_mbrl.hil.faults import FaultConfig

HZ = 100.0
SPEC = RobotSpec(
    obs=(Channel("x", "m", -10, 10), Channel("v", "m/s", -10, 10)),
    act=(Channel("a", "m/s2", -1, 1),),
    control_hz=HZ,
)


class DoubleIntegrator:
    """x'' = u; brake() stops it dead."""

    def __init__(self):
        self.x = np.zeros(2)
        self.u = 0.0
        self.braked = 0

    def apply_command(self, u):
        self.u = float(u[0])

    def advance(self, duration_s):
        self.x = self.x + duration_s * np.array([self.x[1] + 0.5 * duration_s * self.u, self.u])

    def read_sensors(self):
        return self.x.copy()

    def brake(self):
        self.u, self.x[1] = 0.0, 0.0
        self.braked += 1


def _serve(link="pty", **kw):
    return serve(DoubleIntegrator(), link, sensor_limits=((-10, 10), (-10, 10)), actuator_limits=((-2, 2),),
                 control_hz=HZ, **kw)  # fmt: skip


def _robot(port, **kw):
    cfg = SerialConfig(port=port, watchdog_ms=60, backoff_initial_s=0.02, backoff_max_s=0.1, **kw)
    return SerialRobot(SPEC, make_transport(cfg), cfg)


def _run(robot, n, u=0.5):
    obs, next_t = None, time.monotonic()
    for _ in range(n):
        obs = robot.read()
        if robot.active:
            robot.write(np.array([u]))
        next_t += 1.0 / HZ
        time.sleep(max(0.0, next_t - time.monotonic()))
    return obs


def _wait_until(cond, timeout_s=1.0):
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


@pytest.fixture
def emu():
    emulator, _ = _serve()
    yield emulator
    emulator.stop()


def test_configure_is_read_only_then_activate_commands_with_seq(emu):
    with _robot(emu.port) as robot:
        obs = robot.reset()
        assert obs.ok and obs.values.shape == (2,)
        assert robot.device.device_id == emu.device_id and robot.device.n_actuators == 1
        with pytest.raises(NotActive):
            robot.write(np.array([0.1]))
        assert emu.command_log() == []
        robot.activate()
        obs = _run(robot, 40, u=5.0)  # host clamps to 1.0
        time.sleep(0.02)
        log = emu.command_log()
        assert [c.seq for c in log] == list(range(1, len(log) + 1))
        assert all(c.values == (1.0,) for c in log) and len(log) == 40
        assert obs.ok and obs.values[1] > 0.2  # it really moved
        assert robot.transitions >= 15  # host and device both at 100 Hz: phase aliasing loses some
        assert obs.info["cmd_seq"] >= 38  # read before the 40th write: echoes the 39th (or 38th)
    assert _wait_until(lambda: emu.faults & mcu.DeviceFault.ESTOP)  # close() ended in ESTOP
    assert emu.command_log()[-1].values == (0.0,)  # preceded by the stop command


def test_stale_when_stream_stops_and_watchdog_brakes_device():
    emulator, _ = _serve(faults=FaultConfig())
    try:
        with _robot(emulator.port) as robot:
            robot.reset()
            robot.activate()
            _run(robot, 10)
            emulator.link.stall(0.3)  # nothing in or out for 300 ms
            time.sleep(0.05)
            obs = robot.read()
            assert obs.faults & Fault.STALE and not obs.ok
            time.sleep(0.3)
            obs = _run(robot, 5)
            assert obs.faults & Fault.WATCHDOG or emulator.plant.braked > 0
            obs = _run(robot, 10)
            assert obs.ok, obs  # next commands clear the watchdog
            assert robot.stats.frames_dropped >= 20 and robot.stats.seq_gaps == 1  # swallowed by the stall
    finally:
        emulator.stop()


@pytest.mark.parametrize("link", ["pty", "socket"])
def test_unplug_marks_comm_stale_then_reconnects_without_raising(link):
    emulator, port = _serve(link)
    try:
        with _robot(port) as robot:
            robot.reset()
            robot.activate()
            _run(robot, 10)
            emulator.link.unplug()
            obs = _run(robot, 20)
            assert obs.faults & Fault.COMM and obs.faults & Fault.STALE and np.isnan(obs.values).all()
            emulator.link.replug()
            deadline = time.monotonic() + 3.0
            while not (obs.ok and robot.active) and time.monotonic() < deadline:
                obs = _run(robot, 5)
            assert obs.ok and robot.active
            assert robot.stats.reconnects >= 1 and robot.stats.link_losses >= 1
    finally:
        emulator.stop()


def test_device_fault_bits_map_to_hal_faults(emu):
    with _robot(emu.port) as robot:
        robot.reset()
        emu.inject_fault(mcu.DeviceFault.LIMIT | mcu.DeviceFault.OVERCURRENT)
        time.sleep(0.05)
        obs = robot.read()
        assert obs.faults == Fault.LIMIT | Fault.DEVICE
        assert robot.device_fault_reports
        emu.clear_fault(mcu.DeviceFault.LIMIT | mcu.DeviceFault.OVERCURRENT)
        time.sleep(0.05)
        assert robot.read().ok


def test_channel_maps_and_handshake_checks(emu):
    with _robot(emu.port, obs_from_sensor=(1, 0)) as robot:
        robot.reset()
        robot.activate()
        obs = _run(robot, 20, u=1.0)
        assert obs.values[0] > 0 and obs.values[1] < obs.values[0] * 100  # v first, then x
        assert obs.values[0] == pytest.approx(emu.plant.x[1], abs=0.05)
    with pytest.raises(HandshakeError):
        _robot(emu.port, obs_from_sensor=(5, 0)).connect()  # device has 2 sensors


def test_version_mismatch_is_refused():
    plant = DoubleIntegrator()
    emulator, port = serve(
        plant, "pty", sensor_limits=((-1, 1),) * 2, actuator_limits=((-1, 1),), control_hz=HZ
    )
    emulator.version = 2
    try:
        with pytest.raises(mcu.VersionError):
            _robot(port).connect()
    finally:
        emulator.stop()


def test_corrupted_link_counts_errors_and_still_controls():
    emulator, port = _serve(faults=FaultConfig(corrupt_rate=0.004, directions=("tx",)), seed=3)
    try:
        with _robot(port) as robot:
            robot.reset()
            robot.activate()
            _run(robot, 60)
            s = robot.stats
            assert s.crc_errors + s.framing_errors + s.message_errors > 0
            assert s.frames_dropped > 0 and s.seq_gaps > 0
            assert robot.transitions > 20
    finally:
        emulator.stop()


def test_safe_stop_on_dead_link_does_not_raise(emu):
    robot = _robot(emu.port)
    robot.connect()
    robot.activate()
    emu.link.unplug()
    robot.close()  # logs, never raises
    assert not robot.connected
