"""The emulated MCU seen from raw pyserial: watchdog, clamping, ESTOP latch, heartbeat, command log."""

from __future__ import annotations

import time

import numpy as np
import pytest
import serial

from robot_mbrl.drivers import mcu
from robot_mbrl.hil.emulator import McuEmulator, serve
from robot_mbrl.hil.faults import FaultConfig, FaultyLink, PtyLink


class Integrator:
    def __init__(self):
        self.x, self.u, self.brakes = 0.0, 0.0, 0

    def apply_command(self, u):
        self.u = float(u[0])

    def advance(self, duration_s):
        self.x += self.u * duration_s

    def read_sensors(self):
        return np.array([self.x])

    def brake(self):
        self.u = 0.0
        self.brakes += 1


class Host:
    """Raw protocol client on a real pyserial port."""

    def __init__(self, port: str):
        self.port = serial.serial_for_url(port, baudrate=1_000_000, timeout=0)
        self.dec = mcu.McuDecoder()
        self.msgs: list[mcu.Message] = []

    def send(self, msg):
        self.port.write(mcu.encode(msg))

    def pump(self, duration_s=0.0):
        end = time.monotonic() + duration_s
        while True:
            self.msgs += self.dec.feed(self.port.read(4096))
            if time.monotonic() >= end:
                return self.msgs
            time.sleep(0.001)

    def states(self):
        return [m for m in self.msgs if isinstance(m, mcu.State)]


@pytest.fixture(params=["pty", "socket"])
def served(request):
    plant = Integrator()
    emu, port = serve(plant, request.param, sensor_limits=((-100, 100),), actuator_limits=((-1, 1),),
                      control_hz=200, watchdog_ms=50)  # fmt: skip
    host = Host(port)
    yield emu, plant, host
    host.port.close()
    emu.stop()


def test_handshake_stream_rate_and_heartbeat(served):
    emu, _, host = served
    host.send(mcu.Hello())
    host.send(mcu.Heartbeat(77))
    host.pump(0.25)
    acks = [m for m in host.msgs if isinstance(m, mcu.HelloAck)]
    assert acks and acks[0].actuator_limits == ((-1.0, 1.0),) and acks[0].version == 1
    assert mcu.HeartbeatReply(77) in host.msgs
    seqs = [s.seq for s in host.states()]
    assert 35 <= len(seqs) <= 60  # 200 Hz for 0.25 s
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


def test_clamping_command_log_and_watchdog_brake(served):
    emu, plant, host = served
    for seq in range(1, 11):
        host.send(mcu.Command(seq, (3.0,)))
        host.pump(0.005)
    host.pump(0.02)
    log = emu.command_log()
    assert [c.seq for c in log] == list(range(1, 11))
    assert all(c.values == (3.0,) and c.applied == (1.0,) for c in log)
    assert plant.brakes == 0 and plant.x > 0
    s = host.states()[-1]
    assert s.cmd_seq == 10 and s.faults & mcu.DeviceFault.CLAMPED
    t_last = log[-1].t_s
    host.msgs.clear()
    host.pump(0.15)  # no commands: the 50 ms watchdog must trip
    tripped = [st for st in host.states() if st.faults & mcu.DeviceFault.WATCHDOG]
    assert tripped and plant.brakes > 0
    first = tripped[0].t_us * 1e-6
    assert 0.045 <= first - t_last <= 0.05 + 2 * 0.005 + 0.01  # within a tick or two of 50 ms
    x_braked = plant.x
    host.pump(0.05)
    assert plant.x == x_braked  # braked: no motion
    host.send(mcu.Command(11, (0.5,)))
    host.msgs.clear()
    host.pump(0.03)
    assert not host.states()[-1].faults & mcu.DeviceFault.WATCHDOG


def test_estop_latches_until_release_and_watchdog_config(served):
    emu, plant, host = served
    host.send(mcu.WatchdogConfig(500))
    host.send(mcu.Estop(True))
    host.send(mcu.Command(1, (1.0,)))
    host.pump(0.05)
    assert mcu.Ack(mcu.MsgType.ESTOP, 0) in host.msgs and mcu.Ack(mcu.MsgType.WATCHDOG_CONFIG, 0) in host.msgs
    assert emu.watchdog_ms == 500 and plant.x == 0.0  # command logged, not applied
    assert len(emu.command_log()) == 1 and host.states()[-1].faults & mcu.DeviceFault.ESTOP
    host.send(mcu.Estop(False))
    host.send(mcu.Command(2, (1.0,)))
    host.pump(0.05)
    assert plant.x > 0 and not host.states()[-1].faults & mcu.DeviceFault.ESTOP


def test_faulty_link_is_seeded_and_counts():
    def run(seed):
        inner = PtyLink(symlink=False)
        link = FaultyLink(inner, FaultConfig(corrupt_rate=0.05, drop_rate=0.01), seed=seed)
        out = [link._mangle(bytes(range(200)), "tx") for _ in range(5)]
        inner.close()
        return out, link.bytes_corrupted, link.bytes_dropped

    a, b = run(1), run(1)
    assert a == b and a[1] > 0 and a[2] > 0
    assert run(2)[0] != a[0]


def test_garbage_and_corruption_from_host_never_stop_the_device():
    plant = Integrator()
    link = FaultyLink(PtyLink(), FaultConfig(corrupt_rate=0.02, directions=("rx",)), seed=5)
    emu = McuEmulator(plant, link, sensor_limits=((-100, 100),), actuator_limits=((-1, 1),), control_hz=200)
    with emu:
        host = Host(emu.port)
        host.port.write(bytes(range(256)) * 4)
        for seq in range(1, 101):
            host.send(mcu.Command(seq, (0.25,)))
            time.sleep(0.001)
        host.pump(0.05)
        got = [c.seq for c in emu.command_log()]
        assert 40 < len(got) < 100 and got == sorted(got)  # corrupted ones dropped, the rest applied
        assert emu.decoder.crc_errors + emu.decoder.framing_errors > 0
        assert all(c.applied == (0.25,) for c in emu.command_log())  # never a corrupted value
        host.port.close()


def test_a_release_of_a_device_not_latched_keeps_its_watchdog_armed(served):
    """A host that re-sends a release after a link glitch must not disarm the watchdog of a device
    still applying its last command (that device would drive on with nobody commanding it)."""
    emu, plant, host = served
    host.send(mcu.Command(1, (1.0,)))
    host.pump(0.02)
    host.send(mcu.Estop(False))  # not latched: acknowledged, nothing else changes
    host.pump(0.15)  # no command for 3 watchdog timeouts
    assert mcu.Ack(mcu.MsgType.ESTOP, 0) in host.msgs
    assert host.states()[-1].faults & mcu.DeviceFault.WATCHDOG and plant.brakes > 0


def test_a_released_latch_applies_nothing_until_a_new_command(served):
    emu, plant, host = served
    host.send(mcu.Command(1, (1.0,)))
    host.pump(0.02)
    emu.press_estop()  # the operator's button: braked and latched, no host asked
    host.pump(0.02)
    assert host.states()[-1].faults & mcu.DeviceFault.ESTOP
    host.send(mcu.Estop(False))
    host.pump(0.02)
    x = plant.x
    host.pump(0.1)  # released, and no command since: the old command is not taken up again
    assert not host.states()[-1].faults & mcu.DeviceFault.ESTOP and plant.x == x and plant.u == 0.0
    host.send(mcu.Command(2, (1.0,)))
    host.pump(0.03)
    assert plant.x > x


def test_a_fault_report_is_sent_once_per_rising_fault(served):
    emu, plant, host = served
    host.send(mcu.Command(1, (0.5,)))
    host.pump(0.02)
    emu.inject_fault(mcu.DeviceFault.LIMIT)
    host.pump(0.02)
    emu.inject_fault(mcu.DeviceFault.LIMIT)  # already up: no second report
    host.pump(0.12)  # and the watchdog trips (no command): a report for WATCHDOG
    emu.press_estop()
    host.pump(0.02)
    reports = [m.faults for m in host.msgs if isinstance(m, mcu.FaultReport)]
    rises = [r & ~prev for prev, r in zip([0, *reports], reports, strict=False)]
    assert rises == [mcu.DeviceFault.LIMIT, mcu.DeviceFault.WATCHDOG, mcu.DeviceFault.ESTOP], reports
