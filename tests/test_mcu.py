"""Protocol v1 messages: the test vectors in drivers/PROTOCOL.md, round trips, typed errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from robot_mbrl.drivers import mcu
from robot_mbrl.drivers.framing import MessageError, ProtocolError, decode_frame, encode_frame

PROTOCOL_MD = Path(__file__).resolve().parents[1] / "drivers" / "PROTOCOL.md"

VECTORS: dict[str, mcu.Message] = {
    "Hello(version=1)": mcu.Hello(),
    "HelloAck(1, 0xC0FFEE, ((-0.5, 0.5), (-4.0, 4.0)), ((-1.0, 1.0),))": mcu.HelloAck(
        1, 0xC0FFEE, ((-0.5, 0.5), (-4.0, 4.0)), ((-1.0, 1.0),)
    ),
    "State(7, 123456, 6, 0x0008, (0.25, -1.5))": mcu.State(7, 123456, 6, 0x0008, (0.25, -1.5)),
    "Command(6, (0.5,))": mcu.Command(6, (0.5,)),
    "Heartbeat(42)": mcu.Heartbeat(42),
    "HeartbeatReply(42)": mcu.HeartbeatReply(42),
    "Estop(True)": mcu.Estop(True),
    "WatchdogConfig(100)": mcu.WatchdogConfig(100),
    "FaultReport(0x10, 3)": mcu.FaultReport(0x10, 3),
    "Ack(0x04, 0)": mcu.Ack(0x04, 0),
}


def _doc_vectors() -> dict[str, tuple[bytes, bytes]]:
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    section = text.split("## Test vectors", 1)[1].split("# Dynamixel", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| `([0-9a-f ]+)` \| `([0-9a-f ]+)` \|$", section, re.M)
    return {name: (bytes.fromhex(p), bytes.fromhex(f)) for name, p, f in rows}


def test_protocol_md_lists_every_vector():
    assert set(_doc_vectors()) == set(VECTORS)


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_documented_vectors(name):
    payload, frame = _doc_vectors()[name]
    msg = VECTORS[name]
    assert msg.encode() == payload
    assert mcu.encode(msg) == frame
    assert mcu.decode_message(decode_frame(frame)) == msg


def test_every_type_has_a_vector():
    covered = {m.encode()[0] for m in VECTORS.values()}
    assert covered == {int(t) for t in mcu.MsgType}


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x7f",  # unknown type
        b"\x01",  # HELLO without version
        b"\x01\x01\x01",  # HELLO too long
        mcu.State(1, 2, 3, 0, (1.0, 2.0)).encode()[:-1],  # truncated value
        mcu.State(1, 2, 3, 0, (1.0,)).encode() + b"\x00\x00\x00\x00",  # n says 1, 2 values present
        bytes([0x82]) + b"\x00" * 18 + bytes([200]) + b"\x00" * 800,  # too many channels
        mcu.Command(1, (float("nan"),)).encode(),  # never actuate on NaN
        b"\x04\x02",  # ESTOP engage must be 0/1
        bytes([0x81, 1, 0, 0, 0, 0, 2, 1]),  # HELLO_ACK announces limits it does not carry
        mcu.HelloAck(1, 1, ((-1.0, 1.0),) * 20, ((-1.0, 1.0),) * 13).encode(),  # 33 channels
    ],
)
def test_invalid_payloads_raise_message_error(payload):
    with pytest.raises(MessageError):
        mcu.decode_message(payload)
    assert issubclass(MessageError, ProtocolError)


def test_a_hello_ack_carries_up_to_32_channels():
    ack = mcu.HelloAck(1, 7, ((-1.0, 1.0),) * 20, ((-2.0, 2.0),) * 12)  # (low, high) each: 64 floats
    assert mcu.decode_message(ack.encode()) == ack
    assert mcu.McuDecoder().feed(mcu.encode(ack)) == [ack]


def test_state_values_are_float32_and_seq_wraps():
    st = mcu.State(mcu.SEQ_MOD - 1, 2**63, 0, 0xFFFF, (0.1,))
    back = mcu.decode_message(st.encode())
    assert back.seq == mcu.SEQ_MOD - 1 and back.t_us == 2**63 and back.faults == 0xFFFF
    assert back.values[0] == pytest.approx(0.1, rel=1e-7) and back.values[0] != 0.1
    assert mcu.seq_delta(0, mcu.SEQ_MOD - 1) == 1
    assert mcu.seq_delta(5, 5) == 0 and mcu.seq_delta(4, 5) > 1 << 31


def test_stream_decoder_counts_each_error_kind_and_keeps_going():
    dec = mcu.McuDecoder()
    good = mcu.encode(mcu.Heartbeat(1))
    bad_crc = bytearray(good)
    bad_crc[1] ^= 0x04  # the type byte: still valid COBS, wrong CRC
    unknown = encode_frame(b"\x7e\x00")
    out = dec.feed(good + bytes(bad_crc) + unknown + b"\x05\x05\x00" + good)
    assert out == [mcu.Heartbeat(1), mcu.Heartbeat(1)]
    assert dec.crc_errors == 1 and dec.message_errors == 1 and dec.framing_errors == 1


def test_fault_names_for_logs():
    assert mcu.fault_names(0x20) == "OVERCURRENT"
    assert mcu.fault_names(int(mcu.DeviceFault.LIMIT | mcu.DeviceFault.OVERCURRENT)) == "LIMIT|OVERCURRENT"
    assert mcu.fault_names(0) == "NONE"
    assert mcu.fault_names(0x8001) == "SENSOR|0x8000"  # bits this host does not know stay visible
