"""Dynamixel Protocol 2.0: published packets byte for byte, stuffing, and a bus on a real pty."""

from __future__ import annotations

import struct
import time

import pytest

from robot_mbrl.drivers import dynamixel as dxl
from robot_mbrl.drivers.framing import CrcError
from robot_mbrl.drivers.transport import Transport
from robot_mbrl.hil.dxl_emulator import DxlBusEmulator, EmulatedServo

PUBLISHED = {
    "ping": ("FF FF FD 00 01 03 00 01 19 4E", lambda: dxl.ping_packet(1)),
    "ping_reply": (
        "FF FF FD 00 01 07 00 55 00 06 04 26 65 5D",
        lambda: dxl.status_packet(1, 0, b"\x06\x04\x26"),
    ),
    "read": ("FF FF FD 00 01 07 00 02 84 00 04 00 1D 15", lambda: dxl.read_packet(1, 132, 4)),
    "sync_read": (
        "FF FF FD 00 FE 09 00 82 84 00 04 00 01 02 CE FA",
        lambda: dxl.sync_read_packet([1, 2], 132, 4),
    ),
    "sync_write": (
        "FF FF FD 00 FE 11 00 83 74 00 04 00 01 96 00 00 00 02 AA 00 00 00 82 87",
        lambda: dxl.sync_write_packet(116, 4, {1: struct.pack("<I", 150), 2: struct.pack("<I", 170)}),
    ),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_packets_round_trip(name):
    hexstr, build = PUBLISHED[name]
    raw = bytes.fromhex(hexstr)
    assert build() == raw
    pkt = dxl.decode_packet(raw)
    assert pkt.encode() == raw
    assert dxl.PacketParser().feed(b"\x00\xff\xff" + raw) == [pkt]


def test_ping_reply_fields():
    pkt = dxl.decode_packet(bytes.fromhex(PUBLISHED["ping_reply"][0]))
    assert (pkt.dxl_id, pkt.inst, pkt.error, pkt.alert) == (1, dxl.Inst.STATUS, 0, False)
    assert struct.unpack("<HB", pkt.data) == (1030, 0x26)


def test_byte_stuffing_round_trip_and_length_counts_stuffed_bytes():
    data = b"\xff\xff\xfd\x01\xff\xff\xfd"
    raw = dxl.write_packet(3, 200, data)
    body = raw[7:-2]
    assert body.count(b"\xff\xff\xfd\xfd") == 2
    assert struct.unpack_from("<H", raw, 5)[0] == len(raw) - 7
    assert dxl.decode_packet(raw).params == struct.pack("<H", 200) + data


def test_crc_error_and_alert_bit():
    raw = bytearray(dxl.status_packet(2, 0x80, b"\x01"))
    assert dxl.decode_packet(bytes(raw)).alert
    raw[-1] ^= 0xFF
    with pytest.raises(CrcError):
        dxl.decode_packet(bytes(raw))


@pytest.mark.parametrize("between", [b"", b"corrupt"])
def test_a_header_whose_length_lies_does_not_hold_back_the_next_reply(between):
    """A corrupted LEN field claims ~500 bytes: the next status packet (after a corrupt one, too)
    is delivered at once, not once that many bytes have come."""
    lying = bytearray(dxl.status_packet(1, 0, b"\x05\x06"))
    lying[5:7] = struct.pack("<H", 500)
    corrupt = bytearray(dxl.status_packet(3, 0, b"\x07"))
    corrupt[-1] ^= 0xFF
    good = dxl.status_packet(2, 0, b"\x05\x06\x07\x08")
    parser = dxl.PacketParser()
    out = parser.feed(bytes(lying) + (bytes(corrupt) if between else b"") + good)
    assert [p.dxl_id for p in out] == [2] and parser.packet_errors >= 1


@pytest.fixture
def bus_emulator():
    servos = [EmulatedServo(1), EmulatedServo(2, tau_s=0.02)]
    with DxlBusEmulator(servos) as emu:
        yield emu


def test_bus_ping_read_write_sync(bus_emulator):
    with Transport(bus_emulator.port, 1_000_000) as t:
        bus = dxl.DynamixelBus(t, [1, 2])
        assert bus.ping(1) == (1030, 0x26)
        assert struct.unpack("<H", bus.read(2, dxl.Addr.MODEL_NUMBER, 2))[0] == 1030
        with bus:
            assert all(s.torque for s in bus_emulator.servos.values())
            bus.write_u32(dxl.Addr.GOAL_POSITION, {1: 3000, 2: 1000})
            time.sleep(0.3)
            pos = bus.read_u32(dxl.Addr.PRESENT_POSITION)
        assert abs(pos[1] - 3000) < 20 and abs(pos[2] - 1000) < 5
        assert not any(s.torque for s in bus_emulator.servos.values())
        with pytest.raises(dxl.DxlStatusError):
            bus.write(1, dxl.Addr.PRESENT_POSITION, b"\x00\x00\x00\x00")  # read-only: access error


def test_hardware_alert_is_reported_and_status_read(bus_emulator):
    bus_emulator.servos[2].table[dxl.Addr.HARDWARE_ERROR_STATUS] = 0x20  # overload
    with Transport(bus_emulator.port, 1_000_000) as t:
        bus = dxl.DynamixelBus(t, [1, 2])
        bus.ping(2)
        assert 2 in bus.alerts
        assert bus.hardware_error(2) == 0x20 and bus.alerts[2] == 0x20


def test_torque_disabled_on_every_servo_even_when_one_fails(bus_emulator):
    with Transport(bus_emulator.port, 1_000_000) as t:
        bus = dxl.DynamixelBus(t, [1, 2, 9], retries=0)  # servo 9 does not exist
        with pytest.raises(dxl.TorqueError) as err:
            bus.activate()
        assert set(err.value.errors) == {9}
        assert not any(s.torque for s in bus_emulator.servos.values())  # rolled back
        bus = dxl.DynamixelBus(t, [1, 2])
        with pytest.raises(dxl.TorqueError) as err, bus:
            assert bus_emulator.servos[1].torque
            bus_emulator.servos[1].fail_writes = True  # servo 1 will refuse torque off
            _ = 1 / 0
        assert set(err.value.errors) == {1}
        assert isinstance(err.value.__context__, ZeroDivisionError)  # the original error is chained
        assert not bus_emulator.servos[2].torque  # still switched off after servo 1 failed
