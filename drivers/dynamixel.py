"""Dynamixel Protocol 2.0: packets, byte stuffing, CRC, and a `DynamixelBus` over a :class:`Transport`.

Packet: ``FF FF FD 00 | ID | LEN_L LEN_H | INST | params | CRC_L CRC_H``; LEN counts INST, the
(stuffed) params and the CRC. ``FF FF FD`` inside the params is stuffed to ``FF FF FD FD``. The CRC
is CRC-16 poly 0x8005, init 0, MSB first, over everything before it (stuffed bytes included).
Parsing raises only :class:`DxlPacketError` / :class:`CrcError` (both :class:`ProtocolError`).
"""

from __future__ import annotations

import enum
import logging
import struct
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from robot_mbrl.drivers.framing import CrcError, ProtocolError
from robot_mbrl.drivers.transport import Transport, frame_time_s

log = logging.getLogger(__name__)

HEADER = b"\xff\xff\xfd\x00"
BROADCAST_ID = 0xFE
MAX_ID = 0xFC
MAX_PACKET_BYTES = 1024


class Inst(enum.IntEnum):
    PING = 0x01
    READ = 0x02
    WRITE = 0x03
    REBOOT = 0x08
    STATUS = 0x55
    SYNC_READ = 0x82
    SYNC_WRITE = 0x83


class Addr(enum.IntEnum):
    """X-series control table (the subset we use)."""

    MODEL_NUMBER = 0  # u16
    TORQUE_ENABLE = 64  # u8
    HARDWARE_ERROR_STATUS = 70  # u8
    GOAL_POSITION = 116  # u32
    PRESENT_POSITION = 132  # u32


ERROR_ALERT = 0x80  # status error byte bit 7: hardware error, read HARDWARE_ERROR_STATUS
ERRORS = {1: "result fail", 2: "instruction error", 3: "CRC error", 4: "data range", 5: "data length",
          6: "data limit", 7: "access error"}  # fmt: skip


class DxlPacketError(ProtocolError):
    """Malformed Dynamixel packet (header, length, stuffing, unexpected id/instruction)."""


class DxlStatusError(ProtocolError):
    """A servo answered with a non-zero error code in its status packet."""

    def __init__(self, dxl_id: int, error: int):
        self.dxl_id, self.error = dxl_id, error
        super().__init__(f"servo {dxl_id}: {ERRORS.get(error & 0x7F, f'error {error & 0x7F}')}")


class DxlTimeout(TimeoutError):
    """No (valid) status packet within the timeout after the retries."""


class TorqueError(RuntimeError):
    """Torque enable/disable failed on some servos; ``errors`` maps servo id → its error."""

    def __init__(self, message: str, errors: dict[int, Exception]):
        self.errors = errors
        super().__init__(f"{message}: " + "; ".join(f"{i}: {e}" for i, e in errors.items()))


def _crc_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        crc = i << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return tuple(table)


_CRC = _crc_table()


def crc16_dxl(data: bytes, crc: int = 0) -> int:
    for b in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC[((crc >> 8) ^ b) & 0xFF]
    return crc


def stuff(data: bytes) -> bytes:
    return data.replace(b"\xff\xff\xfd", b"\xff\xff\xfd\xfd")


def unstuff(data: bytes) -> bytes:
    return data.replace(b"\xff\xff\xfd\xfd", b"\xff\xff\xfd")


@dataclass(frozen=True)
class Packet:
    """An instruction or status packet, params unstuffed. For status: ``params[0]`` is the error."""

    dxl_id: int
    inst: int
    params: bytes = b""

    @property
    def error(self) -> int:
        return self.params[0] if self.inst == Inst.STATUS and self.params else 0

    @property
    def alert(self) -> bool:
        return bool(self.error & ERROR_ALERT)

    @property
    def data(self) -> bytes:
        """Status payload after the error byte."""
        return self.params[1:] if self.inst == Inst.STATUS else self.params

    def encode(self) -> bytes:
        body = bytes([self.inst]) + stuff(self.params)
        head = HEADER + struct.pack("<BH", self.dxl_id, len(body) + 2)
        pkt = head + body
        return pkt + struct.pack("<H", crc16_dxl(pkt))


def decode_packet(raw: bytes) -> Packet:
    """Exactly one packet → :class:`Packet`. Raises :class:`DxlPacketError` or :class:`CrcError`."""
    if len(raw) < 10 or raw[:4] != HEADER:
        raise DxlPacketError(f"not a packet: {raw[:8].hex(' ')}")
    dxl_id, length = struct.unpack_from("<BH", raw, 4)
    if length < 3 or len(raw) != 7 + length:
        raise DxlPacketError(f"length field {length} does not match {len(raw)} bytes")
    (crc,) = struct.unpack_from("<H", raw, len(raw) - 2)
    if crc != crc16_dxl(raw[:-2]):
        raise CrcError(f"Dynamixel CRC mismatch ({crc:#06x})")
    return Packet(dxl_id, raw[7], unstuff(raw[8:-2]))


class PacketParser:
    """Byte stream → packets; skips garbage to the next header. Never raises."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.crc_errors = 0
        self.packet_errors = 0
        self.bytes_skipped = 0

    def reset(self) -> None:
        self._buf.clear()

    def feed(self, data: bytes) -> list[Packet]:
        """Packets completed by ``data``. A header whose length field lies (corrupted) is dropped as
        soon as a complete, CRC-valid packet starts after it: the next reply is not held back until
        the lying length's worth of bytes came. Linear in the bytes fed, whatever they are."""
        self._buf += data
        buf, out, pos = self._buf, [], 0
        while True:
            i = buf.find(HEADER, pos)
            if i < 0:
                keep = max(pos, len(buf) - 3)  # a header may straddle chunks
                self.bytes_skipped += keep - pos
                pos = keep
                break
            self.bytes_skipped += i - pos
            pos = i
            if len(buf) - pos < 7:
                break
            length = buf[pos + 5] | buf[pos + 6] << 8
            if length < 3 or length > MAX_PACKET_BYTES:
                self.packet_errors += 1
                pos += 1  # a false header; look for the next one
                continue
            if len(buf) - pos < 7 + length:
                j = self._complete_inside(pos)
                if j is not None:
                    self.packet_errors += 1  # this header's length lied: a whole packet starts inside it
                    pos = j
                    continue
                break
            try:
                out.append(decode_packet(bytes(buf[pos : pos + 7 + length])))
                pos += 7 + length
            except CrcError:
                self.crc_errors += 1
                pos += 1
            except DxlPacketError:
                self.packet_errors += 1
                pos += 1
        del buf[:pos]
        return out

    def _complete_inside(self, pos: int) -> int | None:
        """The first header after ``pos`` (within what is buffered) where a complete, CRC-valid packet
        starts, or None."""
        j = self._buf.find(HEADER, pos + 1)
        while j > 0:
            if self._complete_at(j):
                return j
            j = self._buf.find(HEADER, j + 1)
        return None

    def _complete_at(self, j: int) -> bool:
        """Whether a complete packet with a valid CRC starts at ``self._buf[j]``."""
        buf = self._buf
        if len(buf) - j < 7:
            return False
        length = buf[j + 5] | buf[j + 6] << 8
        if length < 3 or length > MAX_PACKET_BYTES or len(buf) - j < 7 + length:
            return False
        try:
            decode_packet(bytes(buf[j : j + 7 + length]))
        except (CrcError, DxlPacketError):
            return False
        return True


# -- instruction builders ---------------------------------------------------------------------
def ping_packet(dxl_id: int) -> bytes:
    return Packet(dxl_id, Inst.PING).encode()


def read_packet(dxl_id: int, address: int, length: int) -> bytes:
    return Packet(dxl_id, Inst.READ, struct.pack("<HH", address, length)).encode()


def write_packet(dxl_id: int, address: int, data: bytes) -> bytes:
    return Packet(dxl_id, Inst.WRITE, struct.pack("<H", address) + data).encode()


def sync_read_packet(ids: Iterable[int], address: int, length: int) -> bytes:
    return Packet(BROADCAST_ID, Inst.SYNC_READ, struct.pack("<HH", address, length) + bytes(ids)).encode()


def sync_write_packet(address: int, length: int, data: Mapping[int, bytes]) -> bytes:
    params = struct.pack("<HH", address, length)
    for dxl_id, chunk in data.items():
        if len(chunk) != length:
            raise ValueError(f"sync write: servo {dxl_id} data has {len(chunk)} bytes, expected {length}")
        params += bytes([dxl_id]) + chunk
    return Packet(BROADCAST_ID, Inst.SYNC_WRITE, params).encode()


def status_packet(dxl_id: int, error: int = 0, data: bytes = b"") -> bytes:
    return Packet(dxl_id, Inst.STATUS, bytes([error]) + data).encode()


class DynamixelBus:
    """Half-duplex request/response on one bus. Torque is on only inside ``with bus:`` (or
    between :meth:`activate` and :meth:`deactivate`), and is switched off for every servo on every
    exit path, even when some servos fail (the errors are raised together afterwards).
    """

    def __init__(self, transport: Transport, ids: Iterable[int], *, retries: int = 2,
                 return_delay_s: float = 0.0005, latency_s: float = 0.01):  # fmt: skip
        self.transport = transport
        self.ids = tuple(ids)
        self.retries = retries
        self.return_delay_s = return_delay_s  # servo return delay time
        self.latency_s = latency_s  # USB adapter latency timer plus OS scheduling
        self.parser = PacketParser()
        self.alerts: dict[int, int] = {}  # servo id → last hardware error status seen

    def timeout_s(self, reply_bytes: int) -> float:
        """Reply timeout: request + reply wire time (at the baud rate), return delay, adapter latency."""
        return frame_time_s(reply_bytes + 14, self.transport.baud) + self.return_delay_s + self.latency_s

    def _transact(self, request: bytes, expect: list[int], reply_bytes: int) -> dict[int, Packet]:
        """Send ``request``; collect one status packet from each id in ``expect`` (retried)."""
        last: Exception | None = None
        for _attempt in range(self.retries + 1):
            self.parser.reset()
            self.transport.read_available()  # drop stale bytes from an earlier timed-out exchange
            self.transport.write(request)
            got: dict[int, Packet] = {}
            crc_before = self.parser.crc_errors
            deadline = time.monotonic() + self.timeout_s(reply_bytes * max(1, len(expect)))
            while len(got) < len(expect) and time.monotonic() < deadline:
                chunk = self.transport.read(256, timeout_s=0.001)
                for pkt in self.parser.feed(chunk):
                    if pkt.inst == Inst.STATUS and pkt.dxl_id in expect:
                        got[pkt.dxl_id] = pkt
            self.transport.stats.crc_errors += self.parser.crc_errors - crc_before
            if len(got) == len(expect):
                for pkt in got.values():
                    self._check(pkt)
                return got
            self.transport.stats.timeouts += 1
            last = DxlTimeout(f"no status from {sorted(set(expect) - set(got))}")
            self.transport.stats.retries += 1
        assert last is not None
        raise last

    def _check(self, pkt: Packet) -> None:
        if pkt.alert:
            log.warning("servo %d reports a hardware alert", pkt.dxl_id)
            self.alerts.setdefault(pkt.dxl_id, -1)
        if pkt.error & 0x7F:
            raise DxlStatusError(pkt.dxl_id, pkt.error)

    # -- instructions ---------------------------------------------------------------------------
    def ping(self, dxl_id: int) -> tuple[int, int]:
        """(model number, firmware version)."""
        pkt = self._transact(ping_packet(dxl_id), [dxl_id], 14)[dxl_id]
        if len(pkt.data) != 3:
            raise DxlPacketError(f"ping reply from {dxl_id} has {len(pkt.data)} bytes")
        return pkt.data[0] | pkt.data[1] << 8, pkt.data[2]

    def read(self, dxl_id: int, address: int, length: int) -> bytes:
        data = self._transact(read_packet(dxl_id, address, length), [dxl_id], 11 + length)[dxl_id].data
        if len(data) != length:
            raise DxlPacketError(f"read from {dxl_id}: {len(data)} bytes, expected {length}")
        return data

    def write(self, dxl_id: int, address: int, data: bytes) -> None:
        self._transact(write_packet(dxl_id, address, data), [dxl_id], 11)

    def sync_read(self, address: int, length: int, ids: Iterable[int] | None = None) -> dict[int, bytes]:
        ids = list(self.ids if ids is None else ids)
        got = self._transact(sync_read_packet(ids, address, length), ids, 11 + length)
        out = {i: got[i].data for i in ids}
        for i, d in out.items():
            if len(d) != length:
                raise DxlPacketError(f"sync read from {i}: {len(d)} bytes, expected {length}")
        return out

    def sync_write(self, address: int, length: int, data: Mapping[int, bytes]) -> None:
        """No status packets answer a broadcast: fire and forget."""
        self.transport.write(sync_write_packet(address, length, data))

    def read_u32(self, address: int) -> dict[int, int]:
        return {i: struct.unpack("<i", d)[0] for i, d in self.sync_read(address, 4).items()}

    def write_u32(self, address: int, values: Mapping[int, int]) -> None:
        self.sync_write(address, 4, {i: struct.pack("<i", int(v)) for i, v in values.items()})

    def hardware_error(self, dxl_id: int) -> int:
        """Hardware Error Status (address 70): bit 0 voltage, 2 overheating, 3 encoder, 4 shock,
        5 overload."""
        status = self.read(dxl_id, Addr.HARDWARE_ERROR_STATUS, 1)[0]
        self.alerts[dxl_id] = status
        return status

    # -- torque lifecycle -----------------------------------------------------------------------
    def _torque_all(self, on: bool) -> None:
        errors: dict[int, Exception] = {}
        for i in self.ids:
            try:
                self.write(i, Addr.TORQUE_ENABLE, bytes([int(on)]))
            except (OSError, ProtocolError) as err:  # DxlTimeout, LinkDown are OSErrors
                log.error("torque %s on servo %d failed: %s", "on" if on else "off", i, err)
                errors[i] = err
        if errors:
            raise TorqueError(f"torque {'enable' if on else 'disable'} failed", errors)

    def activate(self) -> DynamixelBus:
        try:
            self._torque_all(True)
        except BaseException:
            self.deactivate()
            raise
        return self

    def deactivate(self) -> None:
        """Torque off on every servo (all are tried; failures raised together afterwards)."""
        self._torque_all(False)

    @contextmanager
    def torque(self) -> Iterator[DynamixelBus]:
        self.activate()
        try:
            yield self
        finally:
            self.deactivate()

    def __enter__(self) -> DynamixelBus:
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.deactivate()
