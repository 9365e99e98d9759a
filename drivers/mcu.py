"""Generic MCU protocol v1 (the cart-pole rig): messages, their encoder and decoder.

Every message is ``type (u8) || body``, little-endian, carried in one frame of
:mod:`robot_mbrl.drivers.framing`. Byte layouts, the message table and test vectors are in
``drivers/PROTOCOL.md``. :func:`decode_message` raises only :class:`MessageError` (a
:class:`ProtocolError`); :class:`McuDecoder` turns a raw byte stream into messages and never raises.
"""

from __future__ import annotations

import enum
import logging
import math
import struct
from dataclasses import dataclass

from robot_mbrl.drivers.framing import FrameDecoder, MessageError, ProtocolError, encode_frame
from robot_mbrl.hal.robot import Fault

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
MAX_CHANNELS = 32
SEQ_MOD = 1 << 32


class VersionError(ProtocolError):
    """The device speaks another protocol version."""


class MsgType(enum.IntEnum):
    # host → device
    HELLO = 0x01
    COMMAND = 0x02
    HEARTBEAT = 0x03
    ESTOP = 0x04
    WATCHDOG_CONFIG = 0x05
    # device → host
    HELLO_ACK = 0x81
    STATE = 0x82
    HEARTBEAT_REPLY = 0x83
    FAULT = 0x84
    ACK = 0x85


class DeviceFault(enum.IntFlag):
    """Fault bits of the wire protocol (u16 in STATE and FAULT). Mapped to hal ``Fault`` by the host."""

    NONE = 0
    SENSOR = 0x0001  # a sensor read failed or is out of range
    DEVICE = 0x0002  # driver fault, over-temperature, brown-out
    ESTOP = 0x0004  # emergency stop engaged (latched until ESTOP release)
    WATCHDOG = 0x0008  # no valid COMMAND within the watchdog timeout: brake engaged
    LIMIT = 0x0010  # an end stop / limit switch is pressed
    OVERCURRENT = 0x0020  # motor current limit tripped
    CLAMPED = 0x0040  # the last command was outside the device limits and was clamped (info)


KNOWN_FAULT_BITS = sum({int(flag) for flag in DeviceFault.__members__.values()})  # single bits


_FAULT_MAP = {
    DeviceFault.SENSOR: Fault.SENSOR,
    DeviceFault.DEVICE: Fault.DEVICE,
    DeviceFault.OVERCURRENT: Fault.DEVICE,
    DeviceFault.ESTOP: Fault.ESTOP,
    DeviceFault.WATCHDOG: Fault.WATCHDOG,
    DeviceFault.LIMIT: Fault.LIMIT,
}  # CLAMPED is informational: the host already clamps, so it never invalidates an observation


def device_faults_to_hal(bits: int) -> Fault:
    """The hal faults of a device's fault bits. A bit this host does not know (a newer device's
    over-temperature, say) is a DEVICE fault: the reading is not trusted rather than trusted wrongly."""
    out = Fault.NONE
    for dev, hal in _FAULT_MAP.items():
        if bits & dev:
            out |= hal
    if bits & ~KNOWN_FAULT_BITS:
        out |= Fault.DEVICE
    return out


def fault_names(bits: int) -> str:
    """Fault bits for logs: ``"LIMIT|OVERCURRENT"``, ``"NONE"``; bits this host does not know in hex.

    (``str()`` of an ``IntFlag`` is just the number on Python >= 3.11.)
    """
    names = [name for name, flag in DeviceFault.__members__.items() if flag and bits & flag]
    unknown = bits & ~KNOWN_FAULT_BITS
    if unknown:
        names.append(f"{unknown:#06x}")
    return "|".join(names) or "NONE"


@dataclass(frozen=True)
class Hello:
    version: int = PROTOCOL_VERSION

    def encode(self) -> bytes:
        return struct.pack("<BB", MsgType.HELLO, self.version)


@dataclass(frozen=True)
class HelloAck:
    """Handshake reply: protocol version, device id and per-channel limits (low, high)."""

    version: int
    device_id: int
    sensor_limits: tuple[tuple[float, float], ...]
    actuator_limits: tuple[tuple[float, float], ...]

    @property
    def n_sensors(self) -> int:
        return len(self.sensor_limits)

    @property
    def n_actuators(self) -> int:
        return len(self.actuator_limits)

    def encode(self) -> bytes:
        head = struct.pack(
            "<BBIBB", MsgType.HELLO_ACK, self.version, self.device_id, self.n_sensors, self.n_actuators
        )
        flat = [v for lim in self.sensor_limits + self.actuator_limits for v in lim]
        return head + struct.pack(f"<{len(flat)}f", *flat)


@dataclass(frozen=True)
class State:
    """Device state: its sequence number, device time (µs), last applied command seq, faults, sensors."""

    seq: int
    t_us: int
    cmd_seq: int
    faults: int
    values: tuple[float, ...]

    def encode(self) -> bytes:
        n = len(self.values)
        return struct.pack(
            f"<BIQIHB{n}f", MsgType.STATE, self.seq, self.t_us, self.cmd_seq, self.faults, n, *self.values
        )


@dataclass(frozen=True)
class Command:
    seq: int
    values: tuple[float, ...]

    def encode(self) -> bytes:
        n = len(self.values)
        return struct.pack(f"<BIB{n}f", MsgType.COMMAND, self.seq, n, *self.values)


@dataclass(frozen=True)
class Heartbeat:
    seq: int

    def encode(self) -> bytes:
        return struct.pack("<BI", MsgType.HEARTBEAT, self.seq)


@dataclass(frozen=True)
class HeartbeatReply:
    seq: int

    def encode(self) -> bytes:
        return struct.pack("<BI", MsgType.HEARTBEAT_REPLY, self.seq)


@dataclass(frozen=True)
class Estop:
    """engage=True: brake now and latch; engage=False: release the latch (actuation may resume)."""

    engage: bool

    def encode(self) -> bytes:
        return struct.pack("<BB", MsgType.ESTOP, int(self.engage))


@dataclass(frozen=True)
class WatchdogConfig:
    timeout_ms: int

    def encode(self) -> bytes:
        return struct.pack("<BH", MsgType.WATCHDOG_CONFIG, self.timeout_ms)


@dataclass(frozen=True)
class FaultReport:
    """Sent by the device when a fault bit rises; ``code`` is device specific detail."""

    faults: int
    code: int

    def encode(self) -> bytes:
        return struct.pack("<BHH", MsgType.FAULT, self.faults, self.code)


@dataclass(frozen=True)
class Ack:
    """Reply to ESTOP and WATCHDOG_CONFIG: the acknowledged type and a status (0 = ok)."""

    msg_type: int
    status: int = 0

    def encode(self) -> bytes:
        return struct.pack("<BBB", MsgType.ACK, self.msg_type, self.status)


Message = (
    Hello
    | HelloAck
    | State
    | Command
    | Heartbeat
    | HeartbeatReply
    | Estop
    | WatchdogConfig
    | FaultReport
    | Ack
)


def _unpack(fmt: str, payload: bytes, name: str) -> tuple:
    size = struct.calcsize(fmt)
    if len(payload) != size:
        raise MessageError(f"{name}: expected {size} bytes, got {len(payload)}")
    return struct.unpack(fmt, payload)


def _floats(payload: bytes, offset: int, n: int, name: str, max_n: int = MAX_CHANNELS) -> tuple[float, ...]:
    if n > max_n:
        raise MessageError(f"{name}: {n} channels exceeds the maximum {max_n}")
    if len(payload) - offset != 4 * n:
        raise MessageError(f"{name}: expected {offset + 4 * n} bytes, got {len(payload)}")
    return struct.unpack_from(f"<{n}f", payload, offset)


def decode_message(payload: bytes) -> Message:
    """Payload of one frame → message. Raises :class:`MessageError` (and nothing else)."""
    if not payload:
        raise MessageError("empty payload")
    t = payload[0]
    if t == MsgType.STATE:
        if len(payload) < 20:
            raise MessageError(f"STATE: expected >= 20 bytes, got {len(payload)}")
        _, seq, t_us, cmd_seq, faults, n = struct.unpack_from("<BIQIHB", payload)
        return State(seq, t_us, cmd_seq, faults, _floats(payload, 20, n, "STATE"))
    if t == MsgType.COMMAND:
        if len(payload) < 6:
            raise MessageError(f"COMMAND: expected >= 6 bytes, got {len(payload)}")
        _, seq, n = struct.unpack_from("<BIB", payload)
        values = _floats(payload, 6, n, "COMMAND")
        if not all(math.isfinite(v) for v in values):
            raise MessageError("COMMAND: non-finite value")
        return Command(seq, values)
    if t == MsgType.HELLO:
        return Hello(_unpack("<BB", payload, "HELLO")[1])
    if t == MsgType.HELLO_ACK:
        if len(payload) < 8:
            raise MessageError(f"HELLO_ACK: expected >= 8 bytes, got {len(payload)}")
        _, version, device_id, ns, na = struct.unpack_from("<BBIBB", payload)
        if ns + na > MAX_CHANNELS:
            raise MessageError(f"HELLO_ACK: {ns + na} channels exceeds the maximum {MAX_CHANNELS}")
        flat = _floats(payload, 8, 2 * (ns + na), "HELLO_ACK", max_n=2 * MAX_CHANNELS)  # (low, high) each
        pairs = tuple((flat[2 * i], flat[2 * i + 1]) for i in range(ns + na))
        return HelloAck(version, device_id, pairs[:ns], pairs[ns:])
    if t == MsgType.HEARTBEAT:
        return Heartbeat(_unpack("<BI", payload, "HEARTBEAT")[1])
    if t == MsgType.HEARTBEAT_REPLY:
        return HeartbeatReply(_unpack("<BI", payload, "HEARTBEAT_REPLY")[1])
    if t == MsgType.ESTOP:
        engage = _unpack("<BB", payload, "ESTOP")[1]
        if engage not in (0, 1):
            raise MessageError(f"ESTOP: engage must be 0 or 1, got {engage}")
        return Estop(bool(engage))
    if t == MsgType.WATCHDOG_CONFIG:
        return WatchdogConfig(_unpack("<BH", payload, "WATCHDOG_CONFIG")[1])
    if t == MsgType.FAULT:
        _, faults, code = _unpack("<BHH", payload, "FAULT")
        return FaultReport(faults, code)
    if t == MsgType.ACK:
        _, acked, status = _unpack("<BBB", payload, "ACK")
        return Ack(acked, status)
    raise MessageError(f"unknown message type {t:#04x}")


def encode(msg: Message) -> bytes:
    """Message → wire bytes (one complete frame including its delimiter)."""
    return encode_frame(msg.encode())


def seq_delta(new: int, old: int) -> int:
    """Forward distance from ``old`` to ``new`` modulo 2**32 (0 = same, > 2**31 = went backwards)."""
    return (new - old) % SEQ_MOD


class McuDecoder:
    """Byte stream → messages. Never raises; counts CRC, framing and message errors."""

    def __init__(self, max_frame_bytes: int = 512):
        self.frames = FrameDecoder(max_frame_bytes)
        self.message_errors = 0

    @property
    def crc_errors(self) -> int:
        return self.frames.crc_errors

    @property
    def framing_errors(self) -> int:
        return self.frames.framing_errors + self.frames.overflows

    def reset(self, resync: bool = False) -> None:
        """Forget a partial frame; ``resync=True`` when the stream may start mid-frame (port just
        opened): a first undecodable frame is then not counted as an error."""
        self.frames.reset(resync)

    def feed(self, data: bytes) -> list[Message]:
        out: list[Message] = []
        for payload in self.frames.feed(data):
            try:
                out.append(decode_message(payload))
            except MessageError as err:
                self.message_errors += 1
                log.debug("dropped message: %s", err)
        return out
