"""`SerialRobot`: a :class:`Robot` over MCU protocol v1 on any :class:`Transport`.

Lifecycle: ``connect()`` opens the link, handshakes (HELLO → HELLO_ACK, version and channel counts
checked), configures the device watchdog and leaves the robot *configured*: it reads, but
``write`` raises :class:`NotActive`. ``activate()`` releases the device e-stop and allows
commands. ``safe_stop()`` (and so ``close()``) sends a stop command and ESTOP, best effort, and
drops back to *configured*.

``read()`` never blocks on the device: it drains whatever bytes arrived, keeps the newest STATE
(stamped with the host monotonic clock at receipt) and reports ``Fault.STALE`` when none arrived
within ``stale_periods`` control periods. A lost link is reopened with backoff from ``read()``;
meanwhile observations carry ``Fault.COMM | Fault.STALE`` and nothing raises.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from robot_mbrl.drivers import mcu
from robot_mbrl.drivers.config import SerialConfig
from robot_mbrl.drivers.transport import LinkDown, Transport
from robot_mbrl.hal.robot import Fault, Observation, Robot, RobotSpec

log = logging.getLogger(__name__)

_FAULT_MAP = {
    mcu.DeviceFault.SENSOR: Fault.SENSOR,
    mcu.DeviceFault.DEVICE: Fault.DEVICE,
    mcu.DeviceFault.OVERCURRENT: Fault.DEVICE,
    mcu.DeviceFault.ESTOP: Fault.ESTOP,
    mcu.DeviceFault.WATCHDOG: Fault.WATCHDOG,
    mcu.DeviceFault.LIMIT: Fault.LIMIT,
}  # CLAMPED is informational: the host already clamps, so it never invalidates an observation


def device_faults_to_hal(bits: int) -> Fault:
    out = Fault.NONE
    for dev, hal in _FAULT_MAP.items():
        if bits & dev:
            out |= hal
    return out


class NotActive(RuntimeError):
    """A command was written while the robot is not activated (configure-only mode)."""


class HandshakeError(ConnectionError):
    """The device did not answer HELLO, or its channels do not match the spec."""


class SerialRobot(Robot):
    """A real robot (or the emulator) behind protocol v1. The transport is built by the caller."""

    def __init__(
        self,
        spec: RobotSpec,
        transport: Transport,
        cfg: SerialConfig,
        clock: Callable[[], float] = time.monotonic,
    ):
        super().__init__(spec)
        self.transport = transport
        self.cfg = cfg
        self._clock = clock
        self._obs_idx = list(cfg.obs_from_sensor) or list(range(spec.obs_dim))
        self._act_idx = list(cfg.act_to_actuator) or list(range(spec.act_dim))
        if len(self._obs_idx) != spec.obs_dim or len(self._act_idx) != spec.act_dim:
            raise ValueError("SerialConfig channel maps must have one entry per spec channel")
        self.decoder = mcu.McuDecoder(cfg.max_frame_bytes * 2)
        self.device: mcu.HelloAck | None = None
        self.active = False
        self.transitions = 0  # transitions whose command the device confirmed between two fresh states
        self.heartbeats_answered = 0
        self.device_fault_reports: list[mcu.FaultReport] = []
        self._want_active = False  # restore after a reconnect
        self._handshake_due: float | None = None  # set while waiting for HELLO_ACK after a reconnect
        self._acks: list[mcu.Ack] = []
        self._state: mcu.State | None = None
        self._state_rx_s: float | None = None
        self._clock_offset_s: float | None = None  # host time - device time, lowest latency seen
        self._offset_at_s = 0.0
        self._prev_rx_s: float | None = None
        self._cmd_seq = 0
        self._cmds_since_read = 0
        self._prev_obs_ok = False
        self._prev_obs_seq: int | None = None

    @property
    def stats(self):  # the link counters (LinkStats)
        return self.transport.stats

    # -- lifecycle hooks --------------------------------------------------------------------
    def _connect(self) -> None:
        if not self.transport.reconnect_blocking(self.cfg.handshake_timeout_s * self.cfg.retries):
            raise LinkDown(f"cannot open {self.transport.url}")
        self._handshake_blocking()

    def _disconnect(self) -> None:
        self.active = self._want_active = False
        self.transport.close()

    def activate(self) -> SerialRobot:
        """Allow actuation: release the device e-stop (confirmed by ACK). Needs ``connect()`` first."""
        if not self.connected:
            raise NotActive("connect() before activate()")
        self._request(mcu.Estop(False), mcu.MsgType.ESTOP)
        self.active = self._want_active = True
        self._prev_obs_ok = False
        return self

    def deactivate(self) -> None:
        """Back to read-only; the device watchdog brakes once commands stop."""
        self.active = self._want_active = False

    def _reset(self, seed: int | None) -> Observation:  # noqa: ARG002 - a real rig cannot be seeded
        """Wait (bounded) for a fresh state; the physical reset is the operator's job."""
        deadline = self._clock() + max(self.cfg.handshake_timeout_s, 3 * self.spec.dt_s)
        self._state = None
        obs = self._read()
        while (obs.faults & Fault.STALE) or self._state is None:
            if self._clock() > deadline:
                break
            time.sleep(min(0.001, self.spec.dt_s / 10))
            obs = self._read()
        self._prev_obs_ok = False
        return obs

    # -- I/O hooks ----------------------------------------------------------------------------
    def _send(self, action: np.ndarray) -> None:
        if not self.active:
            if self._want_active:  # reconnecting: the device is braking on its watchdog meanwhile
                log.debug("command dropped: re-handshake in progress after a link loss")
                return
            raise NotActive("SerialRobot is configured read-only; call activate() to command")
        n_act = self.device.n_actuators if self.device else self.spec.act_dim
        values = [0.0] * n_act
        for i, j in enumerate(self._act_idx):
            values[j] = float(action[i])
        self._cmd_seq = (self._cmd_seq + 1) % mcu.SEQ_MOD
        try:
            self.transport.write(mcu.encode(mcu.Command(self._cmd_seq, tuple(values))))
            self._cmds_since_read += 1
        except LinkDown:
            log.debug("command %d not sent: link down", self._cmd_seq)

    def _read(self) -> Observation:
        self._poll()
        now = self._clock()
        faults = Fault.NONE
        if not self.transport.is_open or self._handshake_due is not None:
            faults |= Fault.COMM
        st = self._state
        if st is None or self._state_rx_s is None:
            values = np.full(self.spec.obs_dim, np.nan)
            self._prev_obs_ok = False
            return Observation(values, now, faults | Fault.STALE, {"age_s": float("inf"), "vouched": False})
        # A state can sit in an OS buffer: judge freshness by when the device sampled it (device
        # clock mapped to ours), never better than the receipt time.
        sampled_s = min(self._state_rx_s, st.t_us * 1e-6 + (self._clock_offset_s or 0.0))
        age = now - sampled_s
        if age > self.cfg.stale_periods * self.spec.dt_s:
            faults |= Fault.STALE
        faults |= device_faults_to_hal(st.faults)
        values = np.array([st.values[j] if j < len(st.values) else np.nan for j in self._obs_idx])
        ok = faults == Fault.NONE and bool(np.all(np.isfinite(values)))
        new = self._prev_obs_seq is None or 0 < mcu.seq_delta(st.seq, self._prev_obs_seq) < 1 << 31
        vouched = bool(
            ok
            and self._prev_obs_ok
            and new
            and self._cmds_since_read == 1
            and st.cmd_seq == self._cmd_seq
            and self.active
        )
        if vouched:
            self.transitions += 1
        self._prev_obs_ok, self._prev_obs_seq, self._cmds_since_read = ok, st.seq, 0
        info = {
            "seq": st.seq,
            "device_t_us": st.t_us,
            "cmd_seq": st.cmd_seq,
            "age_s": age,
            "vouched": vouched,
        }
        return Observation(values, self._state_rx_s, faults, info)

    def _safe_stop(self) -> None:
        """Stop command then ESTOP, best effort: a dead link is logged, never raised."""
        was_active, self.active, self._want_active = self.active, False, False
        if not self.transport.is_open:
            log.warning("safe stop: link down; the device watchdog brakes on its own")
            return
        try:
            if was_active:
                stop = self.spec.stop_action()
                values = [0.0] * (self.device.n_actuators if self.device else self.spec.act_dim)
                for i, j in enumerate(self._act_idx):
                    values[j] = float(stop[i])
                self._cmd_seq = (self._cmd_seq + 1) % mcu.SEQ_MOD
                self.transport.write(mcu.encode(mcu.Command(self._cmd_seq, tuple(values))))
            self.transport.write(mcu.encode(mcu.Estop(True)))
        except OSError as err:  # LinkDown and SerialException are OSErrors
            log.warning("safe stop: %s; the device watchdog brakes on its own", err)

    # -- internals ------------------------------------------------------------------------------
    def _poll(self) -> None:
        """Drain the link and dispatch messages; reconnect and re-handshake when needed."""
        if not self.transport.is_open:
            if not self.transport.try_reconnect():
                return
            self.decoder.reset()
            self._start_handshake()
        try:
            data = self.transport.read_available()
        except LinkDown:
            self._state = None
            return
        before = (self.decoder.crc_errors, self.decoder.framing_errors, self.decoder.message_errors)
        msgs = self.decoder.feed(data)
        st = self.transport.stats
        st.crc_errors += self.decoder.crc_errors - before[0]
        st.framing_errors += self.decoder.framing_errors - before[1]
        st.message_errors += self.decoder.message_errors - before[2]
        now = self._clock()
        for msg in msgs:
            self._dispatch(msg, now)
        if self._handshake_due is not None and now > self._handshake_due:
            self._start_handshake()  # HELLO lost: ask again (bounded by the caller's tick rate)

    def _dispatch(self, msg: mcu.Message, now: float) -> None:
        if isinstance(msg, mcu.State):
            self._on_state(msg, now)
        elif isinstance(msg, mcu.HelloAck):
            self._on_hello_ack(msg)
        elif isinstance(msg, mcu.Ack):
            self._acks.append(msg)
        elif isinstance(msg, mcu.HeartbeatReply):
            self.heartbeats_answered += 1
        elif isinstance(msg, mcu.FaultReport):
            self.device_fault_reports.append(msg)
            log.warning("device fault report: %s code %d", mcu.DeviceFault(msg.faults), msg.code)

    def _on_state(self, msg: mcu.State, now: float) -> None:
        st = self.transport.stats
        if self._state is not None:
            d = mcu.seq_delta(msg.seq, self._state.seq)
            if d == 0 or d >= 1 << 31:
                return  # duplicate or older than what we hold
            if d > 1:
                st.seq_gaps += 1
                st.frames_dropped += d - 1
        if self._prev_rx_s is not None and now - self._prev_rx_s > 1.5 * self.spec.dt_s:
            st.frames_late += 1
        self._prev_rx_s = now
        self._state, self._state_rx_s = msg, now
        # min-latency clock offset; it may grow 1 ms per s so device clock drift cannot pin it
        offset = now - msg.t_us * 1e-6
        if self._clock_offset_s is None:
            self._clock_offset_s = offset
        else:
            leak = 1e-3 * max(0.0, now - self._offset_at_s)
            self._clock_offset_s = min(self._clock_offset_s + leak, offset)
        self._offset_at_s = now

    def _check_device(self, ack: mcu.HelloAck) -> None:
        if ack.version != mcu.PROTOCOL_VERSION:
            raise mcu.VersionError(f"device speaks protocol v{ack.version}, host v{mcu.PROTOCOL_VERSION}")
        if max(self._obs_idx) >= ack.n_sensors or max(self._act_idx, default=-1) >= ack.n_actuators:
            raise HandshakeError(
                f"device has {ack.n_sensors} sensors / {ack.n_actuators} actuators; "
                f"config maps {self._obs_idx} / {self._act_idx}"
            )

    def _on_hello_ack(self, ack: mcu.HelloAck) -> None:
        if self._handshake_due is None:
            return  # a late duplicate
        try:
            self._check_device(ack)
        except (mcu.VersionError, HandshakeError) as err:
            log.error("re-handshake refused: %s", err)
            return  # stays COMM until a correct device answers
        self.device, self._handshake_due = ack, None
        self._acks.clear()
        try:
            self.transport.write(mcu.encode(mcu.WatchdogConfig(self.cfg.watchdog_ms)))
            if self._want_active:
                self.transport.write(mcu.encode(mcu.Estop(False)))
                self.active = True
        except LinkDown:
            return
        log.info("re-handshake with device %#x done (active=%s)", ack.device_id, self.active)

    def _start_handshake(self) -> None:
        self.active = False  # no commands until the device is known again
        self._clock_offset_s = None  # the device may have rebooted: its clock restarted
        self._handshake_due = self._clock() + self.cfg.handshake_timeout_s
        try:
            self.transport.write(mcu.encode(mcu.Hello()))
        except LinkDown:
            self._handshake_due = None

    def _handshake_blocking(self) -> None:
        self.decoder.reset()
        for attempt in range(self.cfg.retries):
            self._start_handshake()
            deadline = self._clock() + self.cfg.handshake_timeout_s
            while self._clock() < deadline:
                msgs = self.decoder.feed(self.transport.read(256, timeout_s=0.005))
                for msg in msgs:
                    if isinstance(msg, mcu.HelloAck):
                        self._check_device(msg)  # raises: a wrong device is not a transient error
                    self._dispatch(msg, self._clock())
                if self.device is not None and self._handshake_due is None:
                    self._request(mcu.WatchdogConfig(self.cfg.watchdog_ms), mcu.MsgType.WATCHDOG_CONFIG)
                    return
            self.transport.stats.timeouts += 1
            if attempt + 1 < self.cfg.retries:
                self.transport.stats.retries += 1
        raise HandshakeError(f"no HELLO_ACK from {self.transport.url} after {self.cfg.retries} attempts")

    def _request(self, msg: mcu.Message, acked: mcu.MsgType) -> None:
        """Send ``msg`` until an ACK for its type arrives (bounded retries)."""
        for attempt in range(self.cfg.retries):
            self._acks.clear()
            self.transport.write(mcu.encode(msg))
            deadline = self._clock() + self.cfg.handshake_timeout_s
            while self._clock() < deadline:
                self._poll()
                for ack in self._acks:
                    if ack.msg_type == acked:
                        if ack.status != 0:
                            raise HandshakeError(f"device rejected {acked.name} (status {ack.status})")
                        return
                time.sleep(0.0005)
            self.transport.stats.timeouts += 1
            if attempt + 1 < self.cfg.retries:
                self.transport.stats.retries += 1
        raise HandshakeError(f"no ACK for {acked.name} from {self.transport.url}")
