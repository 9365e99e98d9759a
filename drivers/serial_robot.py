"""`SerialRobot`: a :class:`Robot` over MCU protocol v1 on any :class:`Transport`.

Lifecycle: ``connect()`` opens the link, handshakes (HELLO → HELLO_ACK, version and channel counts
checked), configures the device watchdog and leaves the robot *configured*: it reads, but
``write`` raises :class:`NotActive`. ``activate()`` releases the device e-stop and allows
commands. ``safe_stop()`` (and so ``close()``) sends a stop command and ESTOP, best effort, and
drops back to *configured*.

Request/response exchanges (HELLO, WATCHDOG_CONFIG, ESTOP release) are re-sent every
``min(RESEND_S, handshake_timeout_s)`` until answered, so a corrupted or dropped frame costs one
resend interval, not a whole attempt. A blocking exchange gives up after
``handshake_timeout_s * retries`` (0.75 s by default): ``connect()`` takes at most twice that
(opening the port, then the handshake), ``activate()`` at most once.

``read()`` never blocks on the device: it drains whatever bytes arrived, keeps the newest STATE
(stamped with the host monotonic clock at receipt) and reports ``Fault.STALE`` when none arrived
within ``stale_periods`` control periods. A lost link is reopened with backoff from ``read()``;
meanwhile observations carry ``Fault.COMM | Fault.STALE`` and nothing raises. A device that
restarts while the link stays up (its STATE ``seq`` or clock goes backwards, see
:func:`restart_reason`) is logged, its
sequence/clock tracking is resynchronised and it is handshaken again like after a link loss;
observations carry ``Fault.COMM`` until it is configured (and released, if active) again.

Link counters: :attr:`SerialRobot.stats` (the transport's :class:`LinkStats`) and
:meth:`SerialRobot.link_stats` (a plain ``dict[str, int]`` for run summaries). Corrupt or lost
frames are logged at DEBUG one by one and summarised in at most one WARNING per
``LINK_WARN_INTERVAL_S``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import numpy as np

from robot_mbrl.drivers import mcu
from robot_mbrl.drivers.config import SerialConfig
from robot_mbrl.drivers.mcu import device_faults_to_hal
from robot_mbrl.drivers.session import (
    CLOCK_DRIFT_MAX,
    CLOCK_LAG_RESTART_S,
    LINK_WARN_INTERVAL_S,
    RESEND_S,
    DeviceSession,
    HandshakeError,
    LinkLost,
    Pending,
    restart_reason,
)
from robot_mbrl.drivers.transport import LinkDown, LinkStats, Transport
from robot_mbrl.hal.robot import Fault, Observation, Robot, RobotSpec

log = logging.getLogger(__name__)

__all__ = [
    "LINK_WARN_INTERVAL_S",
    "RESEND_S",
    "HandshakeError",
    "LinkLost",
    "NotActive",
    "SerialRobot",
    "device_faults_to_hal",
    "restart_reason",
]

HOST_AWAY_PERIODS = 10  # no read for this many control periods (a retrain): the backlog is stale


class NotActive(RuntimeError):
    """A command was written while the robot is not activated (configure-only mode)."""


class SerialRobot(DeviceSession, Robot):
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
        self.device_restarts = 0  # restarts detected while the link stayed up
        self.device_fault_reports: list[mcu.FaultReport] = []
        self._want_active = False  # restore after a reconnect / device restart
        self._resume_pending = False  # re-handshaken while active: the next STATE decides (_resume)
        self._release_ok = False  # a latch this host may clear: activate() asked, or a restart's boot latch
        self._estop_held = False  # the device latched on its own: commands stop until activate()
        self._handshake_due: float | None = None  # set while waiting for HELLO_ACK: next HELLO resend
        self._handshake_since = 0.0
        self._hello_warned = False
        self._pending: dict[int, Pending] = {}  # requests waiting for their ACK, by acked type
        self._blocking = False  # inside connect()/activate(): errors are raised, not logged
        self._error: Exception | None = None
        self._refused: str | None = None  # last re-handshake refusal (logged once)
        self._seen: mcu.State | None = None  # newest STATE accepted: ordering and restart detection
        self._seen_rx_s: float | None = None  # when it arrived
        self._state: mcu.State | None = None  # newest STATE reported by read()
        self._state_rx_s: float | None = None
        self._clock_offset_s: float | None = None  # host time - device time, lowest latency seen
        self._offset_at_s = 0.0
        self._prev_rx_s: float | None = None
        self._polled_s: float | None = None  # when the link was last drained
        self._skip_gap = False  # the backlog was discarded: the next STATE's seq jump is no loss
        self._cmd_seq = 0
        self._cmds_since_read = 0
        self._sent_s: float | None = None  # when the last COMMAND went out (our clock)
        self._prev_obs_ok = False
        self._prev_obs_seq: int | None = None
        self._link_warned_at: float | None = None
        self._unusable_since: float | None = None  # since when the device has been out of reach
        self._link_bad_reported = 0

    @property
    def stats(self) -> LinkStats:
        """The link counters (live object, survives reconnects)."""
        return self.transport.stats

    def link_stats(self) -> dict[str, int]:
        """Snapshot of the link counters for run summaries: every :class:`LinkStats` field
        (bytes, ``crc_errors``, ``framing_errors``, ``message_errors``, ``frames_dropped``,
        ``frames_late``, ``seq_gaps``, ``host_pauses``, ``frames_skipped``, ``timeouts``, ``retries``,
        reconnects, link losses) plus ``device_restarts``. All values are ints counted since the
        transport was created."""
        return {**self.transport.stats.as_dict(), "device_restarts": self.device_restarts}

    # -- lifecycle hooks --------------------------------------------------------------------
    def _connect(self) -> None:
        self._unusable_since = None
        if not self.transport.reconnect_blocking(self._exchange_budget_s):
            raise self.transport.last_error or LinkDown(f"cannot open {self.transport.url}")
        self._seen = self._state = self.device = None  # a new session: no ordering against an old one
        self._estop_held = self._release_ok = False
        try:
            self._handshake_blocking()
        except BaseException:
            self._disconnect()  # a later connect() starts from a closed port
            raise

    def _disconnect(self) -> None:
        self.active = self._want_active = False
        self._handshake_due = None
        self._pending.clear()
        self.transport.close()

    def activate(self) -> SerialRobot:
        """Allow actuation: release the device e-stop (confirmed by ACK). Needs ``connect()`` first."""
        if not self.connected:
            raise NotActive("connect() before activate()")
        self._want_active = True
        self._prev_obs_ok = False
        self._release_ok, self._estop_held = True, False  # a person's decision: whoever latched it
        try:
            if self._handshake_due is None and not self._resume_pending:  # else the re-handshake releases it
                self._send_acked(mcu.Estop(False), mcu.MsgType.ESTOP)
            self._wait_for(lambda: self.active)
        except BaseException:
            self._want_active = self._release_ok = False
            self._pending.pop(mcu.MsgType.ESTOP, None)  # never release later on our own
            raise
        return self

    def deactivate(self) -> None:
        """Back to read-only; the device watchdog brakes once commands stop."""
        self.active = self._want_active = self._release_ok = False
        self._pending.pop(mcu.MsgType.ESTOP, None)

    def _reset(self, seed: int | None) -> Observation:  # noqa: ARG002 - a real rig cannot be seeded
        """Wait (bounded) for the device's next state. The physical reset is the job's homing before
        the episode (``robot_mbrl/runtime/homing.py``) or the operator's. What is queued is drained
        first, so the episode starts as a sample arrives, and that arrival, seen as it happens, sharpens
        the mapping of the device's clock onto ours (a queued state received late looks younger)."""
        deadline = self._clock() + max(self.cfg.handshake_timeout_s, 3 * self.spec.dt_s)
        self._poll()
        self._state = None
        obs = self._read()
        while (obs.faults & Fault.STALE) or self._state is None:
            left = deadline - self._clock()
            if left <= 0:
                break
            self.transport.wait_readable(min(left, self.spec.dt_s))
            obs = self._read()
        return obs

    streams_samples = True  # the device samples and sends STATE on its own clock

    def await_sample(self, timeout_s: float, max_age_s: float = math.inf) -> float | None:
        """Wait at most ``timeout_s`` for a STATE newer than the last one read and sampled at most
        ``max_age_s`` ago (see :meth:`Robot.await_sample`); the link is drained meanwhile, as a read does."""
        start = self._clock()
        end, waited = start + timeout_s, False
        while True:
            self._poll()
            st = self._state
            if st is not None and self._unread(st) and self._clock() - self._sampled_s(st) <= max_age_s:
                return self._clock() - start if waited else 0.0
            left = end - self._clock()
            if left <= 0:
                return None
            self.transport.wait_readable(left)
            waited = True

    def _unread(self, st: mcu.State) -> bool:
        """``st`` is newer than the STATE the last read returned."""
        return self._prev_obs_seq is None or 0 < mcu.seq_delta(st.seq, self._prev_obs_seq) < 1 << 31

    def _sampled_s(self, st: mcu.State) -> float:
        """When the device sampled the newest STATE ``st``, on our clock: a state can sit in an OS
        buffer, so its device time mapped to ours, never later than its receipt."""
        rx = self._clock() if self._state_rx_s is None else self._state_rx_s
        return min(rx, st.t_us * 1e-6 + (self._clock_offset_s or 0.0))

    # -- I/O hooks ----------------------------------------------------------------------------
    def _send(self, action: np.ndarray) -> bool:
        if not self.active:
            if self._want_active:  # reconnecting, or e-stop held: the device brakes meanwhile
                log.debug("command dropped: re-handshake in progress, or the device's e-stop held")
                return False
            raise NotActive("SerialRobot is configured read-only; call activate() to command")
        try:
            self.transport.write(self._command(action))
            self._cmds_since_read += 1
            self._sent_s = self._clock()
            return True
        except LinkDown:
            log.debug("command %d not sent: link down", self._cmd_seq)
            return False

    def _command(self, action: np.ndarray) -> bytes:
        """The wire COMMAND for ``action`` (spec channels onto device actuators), with the next seq
        (1 … 2**32 - 1: a device reports 0 for "none applied yet", see :func:`restart_reason`)."""
        values = [0.0] * (self.device.n_actuators if self.device else self.spec.act_dim)
        for i, j in enumerate(self._act_idx):
            values[j] = float(action[i])
        self._cmd_seq = self._cmd_seq % (mcu.SEQ_MOD - 1) + 1
        return mcu.encode(mcu.Command(self._cmd_seq, tuple(values)))

    def _read(self) -> Observation:
        self._poll()
        now = self._clock()
        faults = Fault.NONE
        if not self.transport.is_open or self._handshake_due is not None or self._pending:
            faults |= Fault.COMM  # link down, or the device is not (re)configured yet
        if self._estop_held:
            faults |= Fault.ESTOP  # latched by the device on its own: invalid until activate()
        self._check_reach(now, faults)
        st = self._state
        if st is None or self._state_rx_s is None:
            values = np.full(self.spec.obs_dim, np.nan)
            self._prev_obs_ok = False
            return Observation(values, now, faults | Fault.STALE, {"age_s": float("inf"), "vouched": False})
        age = now - self._sampled_s(st)  # freshness: when the device sampled it
        if age > self.cfg.stale_periods * self.spec.dt_s:
            faults |= Fault.STALE
        faults |= device_faults_to_hal(st.faults)
        values = np.array([st.values[j] if j < len(st.values) else np.nan for j in self._obs_idx])
        ok = faults == Fault.NONE and bool(np.all(np.isfinite(values)))
        # the device's very next sample: one a period later (a host late by a period, or a lost
        # frame, would make the transition span two periods of the same command)
        next_sample = self._prev_obs_seq is not None and mcu.seq_delta(st.seq, self._prev_obs_seq) == 1
        vouched = bool(
            ok
            and self._prev_obs_ok
            and next_sample
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
        self._release_ok = self._resume_pending = False
        self._pending.pop(mcu.MsgType.ESTOP, None)  # a pending release must never follow the e-stop
        if not self.transport.is_open:
            log.warning("safe stop: link down; the device watchdog brakes on its own")
            return
        try:
            if was_active:
                self.transport.write(self._command(self.spec.stop_action()))
            self.transport.write(mcu.encode(mcu.Estop(True)))
        except OSError as err:  # LinkDown and SerialException are OSErrors
            log.warning("safe stop: %s; the device watchdog brakes on its own", err)

    # -- internals ------------------------------------------------------------------------------
    def _poll(self) -> None:
        """Drain the link and dispatch messages; reconnect, re-handshake and re-send when needed."""
        if not self.transport.is_open:
            if not self.transport.try_reconnect():
                return
            self.decoder.reset(resync=True)
            self._start_handshake()
        now = self._clock()
        try:
            if self._polled_s is not None and now - self._polled_s > HOST_AWAY_PERIODS * self.spec.dt_s:
                self._discard_backlog(now)
            data = self.transport.read_available()
        except LinkDown:
            self._state = None
            return
        self._polled_s = now = self._clock()
        for msg in self._decode(data):
            self._dispatch(msg, now)
        self._resend_due(now)
        self._warn_link_errors(now)

    def _dispatch(self, msg: mcu.Message, now: float) -> None:
        if isinstance(msg, mcu.State):
            self._on_state(msg, now)
        elif isinstance(msg, mcu.HelloAck):
            self._on_hello_ack(msg)
        elif isinstance(msg, mcu.Ack):
            self._on_ack(msg)
        elif isinstance(msg, mcu.HeartbeatReply):
            self.heartbeats_answered += 1
        elif isinstance(msg, mcu.FaultReport):
            self.device_fault_reports.append(msg)
            # the watchdog braking a rig the host stopped commanding (between episodes, a retrain
            # without homing) is what it is for: not a warning
            idle = self._sent_s is None or now - self._sent_s > self.cfg.watchdog_ms / 1e3
            expected = msg.faults == mcu.DeviceFault.WATCHDOG and idle
            log.log(
                logging.INFO if expected else logging.WARNING,
                "device fault report: %s (%#06x), code %d%s", mcu.fault_names(msg.faults), msg.faults, msg.code,
                " (no command sent for longer than serial.watchdog_ms: the device brakes, as configured)"
                if expected else "",
            )  # fmt: skip

    def _on_state(self, msg: mcu.State, now: float) -> None:
        st = self.transport.stats
        if self._seen is not None:
            elapsed = None if self._seen_rx_s is None else now - self._seen_rx_s
            # a STATE may wait unread up to HOST_AWAY_PERIODS (then the backlog is dropped): not a lag
            reason = restart_reason(
                self._seen, msg, elapsed, CLOCK_LAG_RESTART_S + HOST_AWAY_PERIODS * self.spec.dt_s
            )
            if reason is not None:
                self._on_device_restart(reason)
            else:
                d = mcu.seq_delta(msg.seq, self._seen.seq)
                if d == 0 or d >= 1 << 31:
                    log.debug("STATE %d dropped: duplicate or older than %d", msg.seq, self._seen.seq)
                    return
                if d > 1 and self._skip_gap:
                    st.frames_skipped += d - 1
                elif d > 1:
                    st.seq_gaps += 1
                    st.frames_dropped += d - 1
        if (
            self._prev_rx_s is not None
            and now - self._prev_rx_s > 1.5 * self.spec.dt_s
            and not self._skip_gap
        ):
            st.frames_late += 1
        self._skip_gap = False
        self._prev_rx_s = now
        self._seen = self._state = msg
        self._seen_rx_s = self._state_rx_s = now
        if self.active and msg.faults & mcu.DeviceFault.ESTOP:
            self._hold_estop("engaged while active")
        self._confirm_release(msg)
        self._resume(msg)
        # min-latency clock offset; it may grow faster than any device clock drifts behind ours
        # (CLOCK_DRIFT_MAX), or a slow device clock would make every state look older and older
        offset = now - msg.t_us * 1e-6
        if self._clock_offset_s is None:
            self._clock_offset_s = offset
        else:
            leak = CLOCK_DRIFT_MAX * max(0.0, now - self._offset_at_s)
            self._clock_offset_s = min(self._clock_offset_s + leak, offset)
        self._offset_at_s = now
