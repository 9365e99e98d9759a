"""An MCU device behind protocol v1, served on a pty or a TCP socket on 127.0.0.1.

The device runs in its own thread at real time: it reads commands as they arrive, clamps them to
its actuator limits, brakes (and raises the WATCHDOG bit) when no valid COMMAND came within its
watchdog timeout, steps the injected plant and streams STATE at ``control_hz``. Every command it
received is logged (:attr:`McuEmulator.commands`) for assertions.

The plant is any object with ``apply_command(u)``, ``advance(duration_s)``, ``read_sensors()`` and
``brake()`` (see :class:`Plant`).
"""

from __future__ import annotations

import logging
import select
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from robot_mbrl.drivers import mcu
from robot_mbrl.drivers.mcu import DeviceFault
from robot_mbrl.hil.device import ThreadedDevice
from robot_mbrl.hil.faults import FaultConfig, FaultyLink, Link, PtyLink, SocketLink

log = logging.getLogger(__name__)


class Plant(Protocol):
    def apply_command(self, u: np.ndarray) -> None: ...
    def advance(self, duration_s: float) -> None: ...
    def read_sensors(self) -> np.ndarray: ...
    def brake(self) -> None: ...


@dataclass(frozen=True)
class CommandRecord:
    """One COMMAND as the device received it: device monotonic time, seq, raw and applied values."""

    t_s: float
    seq: int
    values: tuple[float, ...]
    applied: tuple[float, ...]


class McuEmulator(ThreadedDevice):
    thread_name = "mcu-emulator"

    """The device. ``start()`` runs it in a thread; ``stop()`` joins it. Also a context manager."""

    def __init__(
        self,
        plant: Plant,
        link: Link,
        *,
        sensor_limits: tuple[tuple[float, float], ...],
        actuator_limits: tuple[tuple[float, float], ...],
        control_hz: float = 100.0,
        watchdog_ms: int = 100,
        device_id: int = 0xC0FFEE,
        version: int = mcu.PROTOCOL_VERSION,
    ):
        self.plant = plant
        self.link = link
        self.sensor_limits = tuple(sensor_limits)
        self.actuator_limits = tuple(actuator_limits)
        self.control_hz = control_hz
        self.watchdog_ms = watchdog_ms
        self.device_id = device_id
        self.version = version
        self.commands: list[CommandRecord] = []
        self.received: list[mcu.Message] = []  # every decoded message (commands included)
        self.decoder = mcu.McuDecoder()
        self.ticks = 0
        self.overruns = 0
        self._lo = np.array([lo for lo, _ in actuator_limits], dtype=float)
        self._hi = np.array([hi for _, hi in actuator_limits], dtype=float)
        self._u = np.zeros(len(actuator_limits))
        self._faults = DeviceFault.NONE
        self._injected = DeviceFault.NONE
        self._reported = DeviceFault.NONE  # fault bits of the last STATE: a FAULT report when one rises
        self._seq = 0
        self._cmd_seq = 0
        self._last_cmd_s: float | None = None  # watchdog armed by the first command
        self._t0 = time.monotonic()
        self._lock = threading.Lock()
        ThreadedDevice.__init__(self)

    # -- control from the test / CLI -------------------------------------------------------
    @property
    def faults(self) -> DeviceFault:
        with self._lock:
            return self._faults | self._injected

    def inject_fault(self, bits: DeviceFault) -> None:
        """Raise device fault bits (e.g. LIMIT, SENSOR) until :meth:`clear_fault`."""
        with self._lock:
            self._injected |= bits

    def press_estop(self) -> None:
        """The operator's e-stop button (or the firmware's own protection): brake and latch, as an
        ESTOP engage does, without any host asking. Only an ESTOP release clears it."""
        with self._lock:
            self._faults |= DeviceFault.ESTOP
            self._u = np.zeros_like(self._u)

    def clear_fault(self, bits: DeviceFault) -> None:
        with self._lock:
            self._injected &= ~bits

    def restart(self, default_watchdog_ms: int = 100) -> None:
        """An MCU reset behind a USB adapter that stays enumerated (brown-out, firmware watchdog): no
        link loss, but the STATE sequence, the device clock and the applied command start over, the
        watchdog setting is back to its default and the device boots with its e-stop latched."""
        with self._lock:
            self._seq, self._cmd_seq, self._t0, self._last_cmd_s = 0, 0, time.monotonic(), None
            self._faults = DeviceFault.ESTOP
            self._u = np.zeros_like(self._u)
            self.watchdog_ms = default_watchdog_ms

    def command_log(self) -> list[CommandRecord]:
        with self._lock:
            return list(self.commands)

    # -- device behaviour ------------------------------------------------------------------
    def _send(self, msg: mcu.Message) -> None:
        self.link.write(mcu.encode(msg))

    def _now_s(self) -> float:
        return time.monotonic() - self._t0

    def _handle(self, msg: mcu.Message, now_s: float) -> None:
        with self._lock:
            self.received.append(msg)
        if isinstance(msg, mcu.Command):
            if len(msg.values) != len(self._u):
                log.debug("command with %d values for %d actuators ignored", len(msg.values), len(self._u))
                return
            applied = np.clip(np.asarray(msg.values, dtype=float), self._lo, self._hi)
            with self._lock:
                self.commands.append(CommandRecord(now_s, msg.seq, msg.values, tuple(applied.tolist())))
                clamped = not np.array_equal(applied, np.asarray(msg.values))
                self._faults = (self._faults & ~DeviceFault.CLAMPED) | (
                    DeviceFault.CLAMPED if clamped else DeviceFault.NONE
                )
                if self._faults & DeviceFault.ESTOP:
                    return  # latched: commands are logged but not applied
                self._faults &= ~DeviceFault.WATCHDOG
                self._last_cmd_s, self._cmd_seq, self._u = now_s, msg.seq, applied
        elif isinstance(msg, mcu.Hello):
            self._send(mcu.HelloAck(self.version, self.device_id, self.sensor_limits, self.actuator_limits))
        elif isinstance(msg, mcu.Heartbeat):
            self._send(mcu.HeartbeatReply(msg.seq))
        elif isinstance(msg, mcu.Estop):
            with self._lock:
                if msg.engage:
                    self._faults |= DeviceFault.ESTOP
                    self._u = np.zeros_like(self._u)
                elif self._faults & DeviceFault.ESTOP:  # (not latched: a release changes nothing)
                    self._faults &= ~DeviceFault.ESTOP
                    self._u = np.zeros_like(self._u)  # nothing acts until a new command re-arms the watchdog
                    self._last_cmd_s = None
            self._send(mcu.Ack(mcu.MsgType.ESTOP, 0))
        elif isinstance(msg, mcu.WatchdogConfig):
            ok = msg.timeout_ms > 0
            if ok:
                self.watchdog_ms = msg.timeout_ms
            self._send(mcu.Ack(mcu.MsgType.WATCHDOG_CONFIG, 0 if ok else 1))

    def _step(self, dt_s: float, now_s: float) -> None:
        with self._lock:
            if self._last_cmd_s is not None and now_s - self._last_cmd_s > self.watchdog_ms / 1000.0:
                if not self._faults & DeviceFault.WATCHDOG:
                    log.info("device watchdog: no command for %.0f ms, braking", self.watchdog_ms)
                self._faults |= DeviceFault.WATCHDOG
            braking = bool(self._faults & (DeviceFault.WATCHDOG | DeviceFault.ESTOP))
            u = self._u.copy()
        if braking:
            self.plant.brake()
        else:
            self.plant.apply_command(u)
        self.plant.advance(dt_s)
        values = tuple(float(v) for v in np.asarray(self.plant.read_sensors(), dtype=float).ravel())
        plant_faults = getattr(self.plant, "device_faults", None)  # optional: end stops, sensor faults
        with self._lock:
            self._seq = (self._seq + 1) % mcu.SEQ_MOD
            faults = int(self._faults | self._injected) | (int(plant_faults()) if plant_faults else 0)
            rising = faults & ~int(self._reported) & ~int(DeviceFault.CLAMPED)  # CLAMPED: informational
            self._reported = DeviceFault(faults)
            state = mcu.State(self._seq, int(now_s * 1e6), self._cmd_seq, faults, values)
        if rising:  # sent by the device thread (one writer on the link), before the STATE that shows it
            self._send(mcu.FaultReport(faults, 0))
        self._send(state)

    def _run(self) -> None:
        period = 1.0 / self.control_hz
        next_tick = time.monotonic() + period
        while not self._stop.is_set():
            # wait for bytes until the next tick so that commands are handled as they arrive
            while True:
                left = next_tick - time.monotonic()
                fd = self.link.fileno()
                if left > 0 and fd is not None:
                    try:
                        select.select([fd], [], [], left)
                    except (OSError, ValueError):
                        time.sleep(min(left, 0.001))  # the fd went away (unplugged) under us
                elif left > 0:
                    time.sleep(left)
                data = self.link.read()
                if data:
                    now_s = self._now_s()
                    for msg in self.decoder.feed(data):
                        self._handle(msg, now_s)
                elif left > 0:
                    time.sleep(min(left, 0.0005))  # readable but nothing delivered (stall): don't spin
                if time.monotonic() >= next_tick or self._stop.is_set():
                    break
            self._step(period, self._now_s())
            self.ticks += 1
            next_tick += period
            if time.monotonic() > next_tick:
                self.overruns += 1
                next_tick = time.monotonic() + period  # do not burst to catch up


def serve(
    plant: Plant,
    link: str = "pty",
    *,
    sensor_limits: tuple[tuple[float, float], ...],
    actuator_limits: tuple[tuple[float, float], ...],
    control_hz: float = 100.0,
    watchdog_ms: int = 100,
    tcp_port: int = 0,
    faults: FaultConfig | None = None,
    seed: int = 0,
    start: bool = True,
) -> tuple[McuEmulator, str]:
    """Serve ``plant`` as a protocol-v1 device; returns (emulator, port string for pyserial).

    ``link="pty"``: the port is a path (a stable symlink to a pty slave); ``link="socket"``: the
    port is ``socket://127.0.0.1:PORT``. ``faults`` wraps the link in a seeded :class:`FaultyLink`
    (``emulator.link`` then offers ``stall``/``set_config``). Stop it with ``emulator.stop()``.
    """
    if link == "pty":
        dev_link: Link = PtyLink()
    elif link == "socket":
        dev_link = SocketLink(tcp_port)
    else:
        raise ValueError(f"serve: link must be 'pty' or 'socket', got {link!r}")
    if faults is not None:
        dev_link = FaultyLink(dev_link, faults, seed)
    emu = McuEmulator(
        plant,
        dev_link,
        sensor_limits=sensor_limits,
        actuator_limits=actuator_limits,
        control_hz=control_hz,
        watchdog_ms=watchdog_ms,
    )
    if start:
        emu.start()
    log.info("emulated MCU serving at %s", emu.port)
    return emu, emu.port


class TwinPlant:
    """Adapts :class:`robot_mbrl.sim.cartpole.CartpoleTwin` (or any twin :class:`Robot` with
    ``apply_command(float)``/``advance``) to the :class:`Plant` interface; end-stop contact → LIMIT."""

    def __init__(self, twin):
        self.twin = twin
        self._last: np.ndarray | None = None
        self._limit = False

    def apply_command(self, u: np.ndarray) -> None:
        self.twin.apply_command(float(np.asarray(u).ravel()[0]))

    def advance(self, duration_s: float) -> None:
        self.twin.advance(duration_s)

    def read_sensors(self) -> np.ndarray:
        obs = self.twin.read()
        self._limit = bool(obs.faults & obs.faults.LIMIT)
        return obs.values

    def brake(self) -> None:
        self.twin.safe_stop()  # motor command 0 now, bypassing the actuation delay

    def device_faults(self) -> DeviceFault:
        return DeviceFault.LIMIT if self._limit else DeviceFault.NONE


def serve_twin(twin, link: str = "pty", **kw) -> tuple[McuEmulator, str]:
    """:func:`serve` a twin :class:`Robot`: device limits are the twin spec's channel ranges and the
    device streams at the spec's control rate (override with ``control_hz=``)."""
    spec = twin.spec
    kw.setdefault("control_hz", spec.control_hz)
    return serve(
        TwinPlant(twin),
        link,
        sensor_limits=tuple((c.low, c.high) for c in spec.obs),
        actuator_limits=tuple((c.low, c.high) for c in spec.act),
        **kw,
    )
