"""Byte framing for the MCU protocol: COBS with a 0x00 delimiter and a CRC-16/CCITT-FALSE trailer.

On the wire one frame is ``COBS(payload || crc16_le(payload)) || 0x00``. COBS removes every zero
byte from the encoded body, so 0x00 only ever marks the end of a frame: a receiver that starts
mid-stream or sees garbage throws away bytes up to the next 0x00 and is back in sync.

Every decoding failure raises a :class:`ProtocolError` subclass and nothing else; the streaming
:class:`FrameDecoder` never raises, it counts what it threw away.
"""

from __future__ import annotations

import logging
import struct

log = logging.getLogger(__name__)

DELIMITER = 0x00
CRC_BYTES = 2


class ProtocolError(Exception):
    """Base of every error raised while decoding bytes from a device (framing, CRC, message)."""


class FramingError(ProtocolError):
    """The bytes between two delimiters are not a valid COBS block (or are empty/too long)."""


class CrcError(ProtocolError):
    """The frame decoded but its checksum does not match its payload."""


class MessageError(ProtocolError):
    """The payload is framed correctly but is not a valid message (type, length, values)."""


def _crc16_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return tuple(table)


_CRC16 = _crc16_table()


def crc16_ccitt_false(data: bytes, crc: int = 0xFFFF) -> int:
    """CRC-16/CCITT-FALSE: poly 0x1021, init 0xFFFF, no reflection, no final xor (check 0x29B1)."""
    for b in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[((crc >> 8) ^ b) & 0xFF]
    return crc


def cobs_encode(data: bytes) -> bytes:
    """Consistent Overhead Byte Stuffing: the result has no zero byte, overhead <= 1 + len/254."""
    out = bytearray([0])
    code_idx, code = 0, 1
    for b in data:
        if b == 0:
            out[code_idx] = code
            code_idx, code = len(out), 1
            out.append(0)
            continue
        out.append(b)
        code += 1
        if code == 0xFF:
            out[code_idx] = code
            code_idx, code = len(out), 1
            out.append(0)
    out[code_idx] = code
    return bytes(out)


def cobs_decode(data: bytes) -> bytes:
    """Inverse of :func:`cobs_encode`; raises :class:`FramingError` on an invalid block."""
    if not data:
        raise FramingError("empty COBS block")
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        code = data[i]
        if code == 0:
            raise FramingError(f"zero byte inside a COBS block at offset {i}")
        end = i + code
        if end > n:
            raise FramingError(f"COBS block truncated: code {code} at offset {i}, only {n - i} bytes left")
        chunk = data[i + 1 : end]
        if 0 in chunk:
            raise FramingError("zero byte inside a COBS block")
        out += chunk
        i = end
        if code != 0xFF and i < n:
            out.append(0)
    return bytes(out)


def encode_frame(payload: bytes) -> bytes:
    """Payload → wire bytes (COBS body with CRC trailer, terminated by 0x00)."""
    body = payload + struct.pack("<H", crc16_ccitt_false(payload))
    return cobs_encode(body) + b"\x00"


def decode_frame(frame: bytes) -> bytes:
    """Wire bytes of one frame (without or with its trailing 0x00) → payload.

    Raises :class:`FramingError` or :class:`CrcError`.
    """
    if frame.endswith(b"\x00"):
        frame = frame[:-1]
    body = cobs_decode(frame)
    if len(body) < CRC_BYTES + 1:
        raise FramingError(f"frame too short: {len(body)} bytes after COBS decoding")
    payload, (crc,) = body[:-CRC_BYTES], struct.unpack("<H", body[-CRC_BYTES:])
    want = crc16_ccitt_false(payload)
    if crc != want:
        raise CrcError(f"CRC mismatch: frame says {crc:#06x}, payload gives {want:#06x}")
    return payload


class FrameDecoder:
    """Streaming frame splitter: ``feed(bytes) -> [payload, ...]``. Never raises.

    Bytes up to each 0x00 form a candidate frame; one that fails COBS or CRC is counted and
    dropped. A run longer than ``max_frame_bytes`` without a delimiter is discarded up to the next
    delimiter (counted in ``overflows``), so memory stays bounded under any input.

    After ``reset(resync=True)`` (a port just opened: the first bytes may be the tail of a frame
    sent before) a first candidate frame that does not decode is the expected resync, counted in
    ``resyncs`` and not as an error.
    """

    def __init__(self, max_frame_bytes: int = 512):
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()
        self._discarding = False
        self._resync = False
        self.frames_ok = 0
        self.resyncs = 0
        self.crc_errors = 0
        self.framing_errors = 0
        self.overflows = 0

    @property
    def errors(self) -> int:
        return self.crc_errors + self.framing_errors + self.overflows

    def reset(self, resync: bool = False) -> None:
        """Forget a partial frame (after a reconnect the first bytes belong to a new stream).

        ``resync=True``: the stream may start mid-frame; a first candidate frame that fails is not
        an error (see the class docstring).
        """
        self._buf.clear()
        self._discarding = False
        self._resync = resync

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        self._buf += data
        while True:
            i = self._buf.find(0)
            if i < 0:
                if self._discarding:  # the rest of an overlong run: nothing to keep
                    self._buf.clear()
                elif len(self._buf) > self.max_frame_bytes:
                    self.overflows += 1
                    self._buf.clear()
                    self._discarding = True
                return out
            frame = bytes(self._buf[:i])
            del self._buf[: i + 1]
            if self._discarding:
                self._discarding = False
                continue
            if not frame:
                continue  # back-to-back delimiters are allowed (a sender may flush with 0x00)
            if len(frame) > self.max_frame_bytes:  # however the bytes were split across reads
                self.overflows += 1
                self._resync = False
                continue
            resync, self._resync = self._resync, False
            try:
                out.append(decode_frame(frame))
                self.frames_ok += 1
            except ProtocolError as err:
                if resync:
                    self.resyncs += 1
                    log.debug("discarded a partial frame at the start of the stream: %s", err)
                elif isinstance(err, CrcError):
                    self.crc_errors += 1
                    log.debug("dropped frame: %s", err)
                else:
                    self.framing_errors += 1
                    log.debug("dropped frame: %s", err)
