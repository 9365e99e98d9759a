"""COBS + CRC-16 framing: closed-form vectors, round trips, resync after garbage."""

from __future__ import annotations

import os

import pytest

from robot_mbrl.drivers.framing import (
    CrcError,
    FrameDecoder,
    FramingError,
    cobs_decode,
    cobs_encode,
    crc16_ccitt_false,
    decode_frame,
    encode_frame,
)


def test_crc_check_value():
    assert crc16_ccitt_false(b"123456789") == 0x29B1
    assert crc16_ccitt_false(b"") == 0xFFFF


@pytest.mark.parametrize(
    "raw, enc",
    [
        (b"\x00", b"\x01\x01"),
        (b"\x00\x00", b"\x01\x01\x01"),
        (b"\x11\x22\x00\x33", b"\x03\x11\x22\x02\x33"),
        (b"\x11\x22\x33\x44", b"\x05\x11\x22\x33\x44"),
        (b"\x11\x00\x00\x00", b"\x02\x11\x01\x01\x01"),
    ],
)
def test_cobs_wikipedia_vectors(raw, enc):
    assert cobs_encode(raw) == enc
    assert cobs_decode(enc) == raw


@pytest.mark.parametrize("n", [1, 2, 253, 254, 255, 508, 1000])
def test_cobs_round_trip_has_no_zero(n):
    data = os.urandom(n)
    enc = cobs_encode(data)
    assert 0 not in enc
    assert len(enc) <= n + 1 + n // 254 + 1
    assert cobs_decode(enc) == data


def test_cobs_rejects_invalid_blocks():
    for bad in (b"", b"\x05\x11", b"\x03\x00\x01", b"\x00"):
        with pytest.raises(FramingError):
            cobs_decode(bad)


def test_frame_round_trip_and_crc_detects_flip():
    frame = encode_frame(b"hello\x00world")
    assert frame.endswith(b"\x00") and frame.count(0) == 1
    assert decode_frame(frame) == b"hello\x00world"
    for i in range(len(frame) - 1):
        mangled = bytearray(frame)
        mangled[i] ^= 0x10
        with pytest.raises((CrcError, FramingError)):
            decode_frame(bytes(mangled))


def test_stream_decoder_resyncs_after_garbage_and_split_feeds():
    frames = [encode_frame(bytes([i]) * (i + 1)) for i in range(5)]
    stream = b"\x13\x37garbage" + frames[0] + b"\xff" * 20 + b"\x00" + b"".join(frames[1:])
    dec = FrameDecoder()
    out = []
    for i in range(0, len(stream), 3):  # fed in 3-byte chunks like a slow UART
        out += dec.feed(stream[i : i + 3])
    # garbage before frames[0] shares its delimiter span, so frame 0 is lost (and counted); the
    # 0xff run is its own bad span; every frame after it decodes
    assert out == [bytes([i]) * (i + 1) for i in range(1, 5)]
    assert dec.errors == 2


def test_stream_decoder_first_frame_after_leading_garbage_is_lost_then_resyncs():
    dec = FrameDecoder()
    good = encode_frame(b"\x42")
    assert dec.feed(b"\x99\x98" + good) == []  # garbage shares the first frame's span
    assert dec.framing_errors + dec.crc_errors == 1
    assert dec.feed(good + good) == [b"\x42", b"\x42"]


def test_stream_decoder_bounds_memory():
    dec = FrameDecoder(max_frame_bytes=64)
    dec.feed(b"\x01" * 1000)
    assert dec.overflows == 1
    assert dec.feed(b"\x01\x02\x00" + encode_frame(b"ok")) == [b"ok"]  # tail of the long run discarded


@pytest.mark.parametrize("split", [10_000, 600, 300, 1])
def test_an_oversize_frame_is_discarded_however_the_reads_split_it(split):
    big = encode_frame(bytes(range(1, 256)) * 4)  # ~1 KB, over the 512-byte maximum
    dec, out = FrameDecoder(max_frame_bytes=512), []
    for i in range(0, len(big), split):
        out += dec.feed(big[i : i + split])
    assert out == [] and dec.overflows == 1
    assert dec.feed(encode_frame(b"next")) == [b"next"]  # and the next frame is not lost


def test_stream_start_resync_is_not_an_error_after_reset():
    dec = FrameDecoder()
    good = encode_frame(b"\x42")
    dec.reset(resync=True)  # a port just opened: the first bytes may be the tail of a frame
    assert dec.feed(encode_frame(b"\x01\x02\x03")[3:] + good) == [b"\x42"]
    assert dec.errors == 0 and dec.resyncs == 1
    assert dec.feed(b"\x05\x01\x00" + good) == [b"\x42"]  # later garbage is an error again
    assert dec.framing_errors == 1
    dec.reset(resync=True)
    assert dec.feed(good) == [b"\x42"] and dec.resyncs == 1  # a whole first frame is kept
