"""Hypothesis fuzzing of both decoders: only typed protocol errors, and resync after garbage."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from robot_mbrl.drivers import dynamixel as dxl
from robot_mbrl.drivers import mcu
from robot_mbrl.drivers.framing import ProtocolError, cobs_decode, decode_frame, encode_frame

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

VALID_MCU = [
    mcu.Hello(),
    mcu.HelloAck(1, 7, ((-1.0, 1.0),), ((-2.0, 2.0),)),
    mcu.State(1, 2, 3, 4, (0.5, -0.5, 2.0**100)),
    mcu.Command(9, (0.0, 1.0)),
    mcu.Heartbeat(3),
    mcu.Estop(False),
    mcu.WatchdogConfig(100),
    mcu.FaultReport(1, 2),
    mcu.Ack(4, 0),
]
VALID_DXL = [
    dxl.ping_packet(1),
    dxl.read_packet(1, 132, 4),
    dxl.sync_read_packet([1, 2], 132, 4),
    dxl.write_packet(7, 116, b"\xff\xff\xfd\x00"),
    dxl.status_packet(1, 0, b"\x06\x04\x26"),
]


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    buf = bytearray(data)
    for kind, pos, val in edits:
        if not buf:
            buf.append(val)
            continue
        i = pos % len(buf)
        if kind == 0:
            buf[i] = val
        elif kind == 1:
            del buf[i]
        else:
            buf.insert(i, val)
    return bytes(buf)


edits = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 1 << 16), st.integers(0, 255)), max_size=6)


@FUZZ
@given(st.binary(max_size=300))
def test_mcu_decoders_raise_only_protocol_errors(data):
    for fn in (cobs_decode, decode_frame, mcu.decode_message):
        try:
            fn(data)
        except ProtocolError:
            pass
    mcu.McuDecoder(max_frame_bytes=128).feed(data)  # never raises


@FUZZ
@given(st.sampled_from(VALID_MCU), edits)
def test_mutated_mcu_frames(msg, e):
    frame = _mutate(mcu.encode(msg), e)
    try:
        payload = decode_frame(frame)
        out = mcu.decode_message(payload)
    except ProtocolError:
        return
    values = getattr(out, "values", ())
    if all(v == v for v in values):  # NaN bit patterns need not survive float32 → float → float32
        assert out.encode() == payload  # what was accepted is exactly what the bytes said


@FUZZ
@given(st.binary(max_size=200), st.sampled_from(VALID_MCU), st.integers(1, 17))
def test_mcu_resyncs_after_garbage(garbage, msg, chunk):
    dec = mcu.McuDecoder()
    stream = garbage + b"\x00" + mcu.encode(msg) + mcu.encode(msg)
    out = []
    for i in range(0, len(stream), chunk):
        out += dec.feed(stream[i : i + chunk])
    assert out[-2:] == [msg, msg]


@FUZZ
@given(st.binary(max_size=300))
def test_dxl_decoders_raise_only_protocol_errors(data):
    try:
        dxl.decode_packet(data)
    except ProtocolError:
        pass
    try:
        dxl.decode_packet(dxl.HEADER + data)
    except ProtocolError:
        pass
    dxl.PacketParser().feed(data)


@FUZZ
@given(st.sampled_from(VALID_DXL), edits)
def test_mutated_dxl_packets(raw, e):
    mutated = _mutate(raw, e)
    try:
        pkt = dxl.decode_packet(mutated)
    except ProtocolError:
        return
    assert 0 <= pkt.dxl_id <= 0xFF and pkt.inst == mutated[7]


@FUZZ
@given(st.binary(max_size=200), st.sampled_from(VALID_DXL), st.integers(1, 17))
def test_dxl_resyncs_after_garbage(garbage, raw, chunk):
    parser = dxl.PacketParser()
    # a false header in the garbage may claim up to MAX_PACKET_BYTES: padding lets its CRC fail
    stream = garbage + raw + b"\x00" * (dxl.MAX_PACKET_BYTES + 8)
    out = []
    for i in range(0, len(stream), chunk):
        out += parser.feed(stream[i : i + chunk])
    assert dxl.decode_packet(raw) in out


@FUZZ
@given(st.binary(min_size=1, max_size=600))
def test_frame_round_trip(payload):
    frame = encode_frame(payload)
    assert frame.count(0) == 1 and decode_frame(frame) == payload
