"""The device session of :class:`~robot_mbrl.drivers.serial_robot.SerialRobot`: the handshake
(HELLO → HELLO_ACK, device checked), request/ACK exchanges re-sent every ``min(RESEND_S,
handshake_timeout_s)`` until answered, blocking waits bounded by ``handshake_timeout_s * retries``,
and detection of a device that restarted behind a live link (:func:`restart_reason`).

:class:`DeviceSession` is a mixin: it works on the robot's transport, decoder, config, clock and
session state, which :class:`SerialRobot` owns and documents.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from robot_mbrl.drivers import mcu
from robot_mbrl.drivers.transport import LinkDown
from robot_mbrl.hal.robot import Fault

log = logging.getLogger("robot_mbrl.drivers.serial_robot")  # one logger for the whole driver

RESEND_S = 0.05  # an unanswered HELLO / WATCHDOG_CONFIG / ESTOP release is re-sent this often
SEQ_RESTART_WINDOW = 16  # STATE seq going back by more than this: the device restarted
CLOCK_RESTART_TOLERANCE_US = 1_000  # device clock going back by more than this: the device restarted
CLOCK_DRIFT_MAX = 0.05  # device clocks (crystal, resonator, RC oscillator) are within 5 % of ours
CLOCK_LAG_RESTART_S = 0.5  # the device clock fell this far behind ours (plus the drift): it restarted


def restart_reason(
    held: mcu.State, new: mcu.State, elapsed_s: float | None = None, lag_s: float = CLOCK_LAG_RESTART_S
) -> str | None:
    """Why ``new`` must come from a restarted device (None: the same run of the device).

    ``held`` is the newest STATE accepted before, ``elapsed_s`` the host time between their receipts
    (None: unknown). The device restarted when

    * its STATE ``seq`` went back by more than :data:`SEQ_RESTART_WINDOW`, or its clock went back by
      more than :data:`CLOCK_RESTART_TOLERANCE_US` although ``seq`` did not just step back a little
      (a state at most that many steps older is dropped as a reordered/duplicate frame; if a restart
      hid behind it, the next states, whose ``seq`` moves forward again with the clock still behind,
      reveal it within that window);
    * or, with ``seq`` moving forward: the last applied command's ``cmd_seq`` fell back to 0 (the
      host never sends 0), or the device clock advanced less than the host's by more than ``lag_s``
      (at least the longest a STATE may wait unread) plus :data:`CLOCK_DRIFT_MAX` of the time between them — a restart
      while the host was away (a retrain, a link loss) long enough for the new run's ``seq`` and clock
      to pass the old ones.
    """
    back_seq = mcu.seq_delta(held.seq, new.seq)  # how far new is behind held (> 2**31: ahead)
    back_us = held.t_us - new.t_us
    reordered = 0 < back_seq <= SEQ_RESTART_WINDOW
    clock = f"device clock {held.t_us * 1e-6:.3f} s -> {new.t_us * 1e-6:.3f} s"
    if SEQ_RESTART_WINDOW < back_seq <= 1 << 31 or (back_us > CLOCK_RESTART_TOLERANCE_US and not reordered):
        return f"STATE seq {held.seq} -> {new.seq}, {clock}"
    if back_seq == 0 or reordered:
        return None
    if held.cmd_seq != 0 and new.cmd_seq == 0:
        return f"STATE seq {held.seq} -> {new.seq}, applied command {held.cmd_seq} -> none, {clock}"
    if elapsed_s is not None:
        behind_s = elapsed_s - (new.t_us - held.t_us) * 1e-6
        if behind_s > lag_s + CLOCK_DRIFT_MAX * elapsed_s:
            return f"STATE seq {held.seq} -> {new.seq}, {clock} in {elapsed_s:.3f} s of host time"
    return None


class LinkLost(ConnectionError):
    """The device has been out of reach (link down, not configured, e-stop held) for longer than
    ``SerialConfig.link_timeout_s``."""


class HandshakeError(ConnectionError):
    """The device did not answer HELLO, or its channels do not match the spec."""


@dataclass
class Pending:
    """A request waiting for its ACK; re-sent at ``resend_at_s``."""

    msg: mcu.Message
    since_s: float
    resend_at_s: float
    warned: bool = False
    acked: bool = False  # ESTOP release: an ACK came; the next STATE says whether it was this one's


LINK_WARN_INTERVAL_S = 10.0  # at most one WARNING about corrupt/lost frames per interval


class DeviceSession:
    """Handshake, acknowledged requests with resend, and blocking waits (see the module docstring)."""

    @property
    def _exchange_budget_s(self) -> float:
        return self.cfg.handshake_timeout_s * self.cfg.retries

    @property
    def _resend_s(self) -> float:
        return min(RESEND_S, self.cfg.handshake_timeout_s)

    def _check_device(self, ack: mcu.HelloAck) -> None:
        if ack.version != mcu.PROTOCOL_VERSION:
            raise mcu.VersionError(f"device speaks protocol v{ack.version}, host v{mcu.PROTOCOL_VERSION}")
        if max(self._obs_idx) >= ack.n_sensors or max(self._act_idx, default=-1) >= ack.n_actuators:
            raise HandshakeError(
                f"device has {ack.n_sensors} sensors / {ack.n_actuators} actuators; "
                f"config maps {self._obs_idx} / {self._act_idx}"
            )
        for ch, j in zip(self.spec.act, self._act_idx, strict=True):  # the spec's whole command range
            lo, hi = ack.actuator_limits[j]
            tol = 1e-6 * max(1.0, abs(ch.low), abs(ch.high))  # (limits travel as float32)
            if not (lo <= ch.low + tol and hi >= ch.high - tol):  # (NaN limits fail too)
                raise HandshakeError(
                    f"device actuator {j} takes [{lo:g}, {hi:g}], narrower than action {ch.name!r} "
                    f"[{ch.low:g}, {ch.high:g}]: it would clamp commands the host records as applied "
                    "(set the config's action range within the device's)"
                )
        known = self.device  # None in connect() (a new session); set from then on, activate() included
        if known is not None and ack != known:  # a re-handshake: the same device only
            # (USB re-enumeration can put another adapter behind the same port name)
            raise HandshakeError(
                f"another device answers on {self.transport.url}: id {ack.device_id:#x} with limits "
                f"{ack.sensor_limits} / {ack.actuator_limits}, expected {known.device_id:#x} with "
                f"{known.sensor_limits} / {known.actuator_limits} (connect() again to accept it)"
            )

    def _fail(self, err: Exception) -> None:
        """Inside connect()/activate() an error is raised by the waiting loop; otherwise logged."""
        if self._blocking:
            self._error = self._error or err
        else:
            log.error("%s", err)

    def _on_hello_ack(self, ack: mcu.HelloAck) -> None:
        if self._handshake_due is None:
            return  # a late duplicate
        try:
            self._check_device(ack)
        except (mcu.VersionError, HandshakeError) as err:
            if self._blocking:
                self._fail(err)  # a wrong device is not a transient error
            elif str(err) != self._refused:
                self._refused = str(err)
                log.error("re-handshake refused: %s", err)  # stays COMM until a correct device answers
            return
        self._refused = None
        self.device, self._handshake_due = ack, None
        # active before: the first STATE after the watchdog's ACK decides whether to release (_resume)
        self._resume_pending = self._want_active
        try:
            self._send_acked(mcu.WatchdogConfig(self.cfg.watchdog_ms), mcu.MsgType.WATCHDOG_CONFIG)
        except LinkDown:
            return  # reopening the link restarts the handshake
        if not self._blocking:
            log.info(
                "re-handshake with device %#x: restoring watchdog %d ms", ack.device_id, self.cfg.watchdog_ms
            )

    def _resume(self, state: mcu.State) -> None:
        """After a re-handshake of an active robot, the first STATE once the device is configured
        again: e-stop clear → commands resume; latched by a restart (the release this host gave was
        lost) or with activate() waiting → released again; latched otherwise (an operator, the
        device's own protection, while the link was down) → held: this host never clears it."""
        if not self._resume_pending or self._handshake_due is not None or self._pending:
            return
        self._resume_pending = False
        if not state.faults & mcu.DeviceFault.ESTOP:
            if not self._estop_held:
                self.active, self._prev_obs_ok = True, False
            return
        if not self._release_ok:
            self._hold_estop("found latched after the re-handshake")
            return
        try:
            self._send_acked(mcu.Estop(False), mcu.MsgType.ESTOP)
            log.info("ESTOP release re-sent to device %#x: the latch is its restart's", self.device.device_id)
        except LinkDown:
            return

    def _hold_estop(self, how: str) -> None:
        """The device latched its e-stop without this host asking: stop commanding and never release
        it on our own; :meth:`activate` (a person's decision) is the way back."""
        self.active, self._release_ok = False, False
        self._pending.pop(mcu.MsgType.ESTOP, None)
        if not self._estop_held:
            self._estop_held = True
            log.error(
                "device on %s: e-stop %s, not engaged by this host: commands stop and the e-stop stays "
                "latched until activate() is called again",
                self.transport.url, how,
            )  # fmt: skip

    def _on_ack(self, ack: mcu.Ack) -> None:
        pending = self._pending.get(ack.msg_type)
        if pending is None:
            return  # a duplicate, or the ACK of an ESTOP engage (not awaited)
        if ack.status != 0:
            del self._pending[ack.msg_type]
            self._fail(HandshakeError(f"device rejected {_type_name(ack.msg_type)} (status {ack.status})"))
            return
        if ack.msg_type == mcu.MsgType.ESTOP:
            # An ACK does not say whether it answers an engage or a release: a late ACK of an earlier
            # engage would pass for the release's. The device sends in order, so the next STATE tells
            # (see _confirm_release); the release stays pending, and is re-sent, until it does.
            pending.acked = True
            return
        del self._pending[ack.msg_type]

    def _confirm_release(self, state: mcu.State) -> None:
        """The first STATE after an ESTOP ACK: e-stop clear → the release took, actuation allowed;
        still latched → that ACK answered an earlier engage, the release stays pending."""
        pending = self._pending.get(mcu.MsgType.ESTOP)
        if pending is None or not pending.acked:
            return
        if state.faults & mcu.DeviceFault.ESTOP:
            pending.acked = False
            log.debug("ESTOP ACK followed by a latched STATE %d: the release is still pending", state.seq)
            return
        del self._pending[mcu.MsgType.ESTOP]
        self._release_ok = False  # released: a later latch is not ours to clear
        if self._want_active and self._handshake_due is None:
            self.active = True
            self._prev_obs_ok = False

    def _start_handshake(self) -> None:
        """(Re)start the handshake: HELLO now, re-sent every resend interval until HELLO_ACK."""
        self.active = False  # no commands until the device is known again
        self._resume_pending = False
        self._pending.clear()
        self._clock_offset_s = None  # the device may have rebooted: its clock restarted
        self._polled_s = None  # a new session: nothing queued before it to discard
        self._handshake_since = self._clock()
        self._hello_warned = False
        self._send_hello()

    def _send_hello(self) -> None:
        self._handshake_due = self._clock() + self._resend_s
        try:
            self.transport.write(mcu.encode(mcu.Hello()))
        except LinkDown:
            pass  # the link is closed: reopening it restarts the handshake

    def _send_acked(self, msg: mcu.Message, acked: mcu.MsgType) -> None:
        now = self._clock()
        self._pending[int(acked)] = Pending(msg, now, now + self._resend_s)
        self.transport.write(mcu.encode(msg))

    def _resend_due(self, now: float) -> None:
        """Re-send the HELLO or requests whose answer is overdue (lost or corrupted on the way)."""
        if not self.transport.is_open:
            return
        st, budget = self.transport.stats, self._exchange_budget_s
        try:
            if self._handshake_due is not None and now >= self._handshake_due:
                st.timeouts += 1
                st.retries += 1
                if not (self._blocking or self._hello_warned) and now - self._handshake_since > budget:
                    self._hello_warned = True
                    log.warning("no HELLO_ACK from %s for %.2f s; still asking", self.transport.url, budget)
                self._send_hello()
            for acked, p in list(self._pending.items()):
                if now >= p.resend_at_s:
                    st.timeouts += 1
                    st.retries += 1
                    if not (self._blocking or p.warned) and now - p.since_s > budget:
                        p.warned = True
                        log.warning(
                            "no ACK for %s from %s for %.2f s; still asking",
                            _type_name(acked), self.transport.url, budget,
                        )  # fmt: skip
                    p.resend_at_s = now + self._resend_s
                    self.transport.write(mcu.encode(p.msg))
        except LinkDown:
            return  # reopening the link restarts the handshake

    def _awaited(self) -> str:
        if not self.transport.is_open:
            return "open link"
        if self._handshake_due is not None:
            return "HELLO_ACK"
        return " and ".join(f"ACK for {_type_name(t)}" for t in self._pending) or "answer"

    def _wait_for(self, done: Callable[[], bool]) -> None:
        """Poll until ``done()``, re-sending what is unanswered; raise after the exchange budget."""
        budget = self._exchange_budget_s
        deadline = self._clock() + budget
        self._blocking, self._error = True, None
        try:
            while True:
                self._poll()
                if self._error is not None:
                    raise self._error
                if done():
                    return
                if self._clock() >= deadline:
                    raise HandshakeError(
                        f"no {self._awaited()} from {self.transport.url} within {budget:.2f} s "
                        f"(re-sent every {self._resend_s * 1e3:.0f} ms)"
                    )
                time.sleep(0.001)
        finally:
            self._blocking, self._error = False, None

    def _handshake_blocking(self) -> None:
        """HELLO → HELLO_ACK, then WATCHDOG_CONFIG → ACK, within ``handshake_timeout_s * retries``."""
        self.decoder.reset(resync=True)
        self._start_handshake()
        self._wait_for(lambda: self.transport.is_open and self._handshake_due is None and not self._pending)

    def _check_reach(self, now: float, faults: Fault) -> None:
        """Raise :class:`LinkLost` once the device has been out of reach for ``link_timeout_s``."""
        if not faults & (Fault.COMM | Fault.ESTOP) or (faults & Fault.ESTOP and not self._estop_held):
            self._unusable_since = None
            return
        if self._unusable_since is None:
            self._unusable_since = now
        limit = self.cfg.link_timeout_s
        if limit is not None and now - self._unusable_since > limit:
            if not self.transport.is_open:
                why = "the link is down"
            elif self._estop_held:
                why = "its e-stop was engaged on the device (not by this host) and is held"
            else:
                why = f"it does not answer ({self._awaited()})"
            self._unusable_since = None  # a caller that goes on gets another full period
            raise LinkLost(
                f"{self.transport.url}: {why} for {limit:g} s (serial.link_timeout_s); "
                "the robot's own watchdog brakes it"
            )

    def _on_device_restart(self, reason: str) -> None:
        """The device restarted behind a link that stayed up: start its tracking over, handshake again."""
        self.device_restarts += 1
        redo = (
            "HELLO, WATCHDOG_CONFIG and (if it booted latched) ESTOP release"
            if self._want_active
            else "HELLO and WATCHDOG_CONFIG"
        )
        log.warning(
            "device on %s restarted while the link stayed up (%s): sequence/clock tracking "
            "resynchronised; observations carry COMM until the device answers %s again",
            self.transport.url, reason, redo,
        )  # fmt: skip
        self._prev_rx_s = None
        self._prev_obs_seq, self._prev_obs_ok = None, False  # no transition spans the restart
        self._clock_offset_s = None  # its clock restarted
        # it lost the release this host gave it: its boot latch may be cleared again (not one held)
        self._release_ok = self._want_active and not self._estop_held
        if self._handshake_due is None:
            self._start_handshake()  # it lost its watchdog config and its e-stop release

    # -- link hygiene -----------------------------------------------------------------------
    def _discard_backlog(self, now: float) -> None:
        """The host was away (a retrain between episodes): what queued meanwhile is stale, and a
        buffer that overflowed holds cut frames. Drop it unparsed, so neither counts as a link error;
        the next STATE's sequence jump is counted as ``frames_skipped``, not as frames lost. Device
        restarts are still detected: the newest STATE seen is kept for the comparison."""
        dropped = self.transport.discard_input()
        self.decoder.reset(resync=True)
        self.transport.stats.host_pauses += 1
        self._skip_gap = True
        log.debug("host away for %.2f s: %d stale bytes discarded", now - (self._polled_s or now), dropped)

    def _decode(self, data: bytes) -> list[mcu.Message]:
        """Bytes → messages, adding the decoder's CRC/framing/message errors to the link counters."""
        dec, st = self.decoder, self.transport.stats
        before = (dec.crc_errors, dec.framing_errors, dec.message_errors)
        msgs = dec.feed(data)
        st.crc_errors += dec.crc_errors - before[0]
        st.framing_errors += dec.framing_errors - before[1]
        st.message_errors += dec.message_errors - before[2]
        return msgs

    def _warn_link_errors(self, now: float) -> None:
        """One WARNING with the counts so far when frames were corrupted or lost, rate-limited."""
        st = self.transport.stats
        bad = st.crc_errors + st.framing_errors + st.message_errors + st.frames_dropped
        if bad <= self._link_bad_reported:
            return
        if self._link_warned_at is not None and now - self._link_warned_at < LINK_WARN_INTERVAL_S:
            return
        self._link_warned_at, self._link_bad_reported = now, bad
        log.warning(
            "link %s: corrupt or lost frames so far: %d CRC errors, %d framing errors, "
            "%d invalid messages, %d STATE frames lost in %d gaps (next report in >= %.0f s)",
            self.transport.url, st.crc_errors, st.framing_errors, st.message_errors,
            st.frames_dropped, st.seq_gaps, LINK_WARN_INTERVAL_S,
        )  # fmt: skip


def _type_name(t: int) -> str:
    try:
        return mcu.MsgType(t).name
    except ValueError:
        return f"type {t:#04x}"
