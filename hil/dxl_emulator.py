"""A Dynamixel Protocol 2.0 bus with a few emulated X-series servos, served on a pty.

Each servo has a control-table subset (model number 0, firmware 6, torque enable 64, hardware
error status 70, goal position 116, present position 132) and first-order position dynamics: with
torque on, present position approaches goal position with time constant ``tau_s``. The bus answers
ping, read, write, sync read (replies in the requested id order) and sync write; a servo whose
hardware error status is non-zero sets bit 7 (alert) in every status error byte.
"""

from __future__ import annotations

import logging
import math
import select
import struct
import threading
import time
from dataclasses import dataclass, field

from robot_mbrl.drivers import dynamixel as dxl
from robot_mbrl.hil.device import ThreadedDevice
from robot_mbrl.hil.faults import Link, PtyLink

log = logging.getLogger(__name__)

TABLE_BYTES = 256
_U32 = (dxl.Addr.GOAL_POSITION, dxl.Addr.PRESENT_POSITION)


@dataclass
class EmulatedServo:
    dxl_id: int
    model_number: int = 1030  # XM430-W210
    firmware: int = 0x26
    tau_s: float = 0.05
    table: bytearray = field(default_factory=lambda: bytearray(TABLE_BYTES))
    position: float = 2048.0
    fail_writes: bool = False  # answer every WRITE with "result fail" (tests the bus's error paths)

    def __post_init__(self) -> None:
        struct.pack_into("<H", self.table, dxl.Addr.MODEL_NUMBER, self.model_number)
        struct.pack_into("<i", self.table, dxl.Addr.GOAL_POSITION, int(self.position))
        self._sync_present()

    def _sync_present(self) -> None:
        struct.pack_into("<i", self.table, dxl.Addr.PRESENT_POSITION, int(round(self.position)))

    @property
    def torque(self) -> bool:
        return bool(self.table[dxl.Addr.TORQUE_ENABLE])

    @property
    def goal(self) -> int:
        return struct.unpack_from("<i", self.table, dxl.Addr.GOAL_POSITION)[0]

    @property
    def hardware_error(self) -> int:
        return self.table[dxl.Addr.HARDWARE_ERROR_STATUS]

    def advance(self, dt_s: float) -> None:
        if self.torque and not self.hardware_error:
            self.position += (self.goal - self.position) * (1.0 - math.exp(-dt_s / self.tau_s))
        self._sync_present()

    def error_byte(self, error: int = 0) -> int:
        return error | (dxl.ERROR_ALERT if self.hardware_error else 0)

    def read(self, address: int, length: int) -> bytes | None:
        if address + length > TABLE_BYTES:
            return None
        return bytes(self.table[address : address + length])

    def write(self, address: int, data: bytes) -> int:
        """Returns the status error code (0 = ok)."""
        if self.fail_writes:
            return 1
        if address + len(data) > TABLE_BYTES or address in (dxl.Addr.MODEL_NUMBER, dxl.Addr.PRESENT_POSITION):
            return 7  # access error (read-only or out of the table)
        if address == dxl.Addr.GOAL_POSITION and not self.torque:
            pass  # accepted; the servo only moves once torque is on
        self.table[address : address + len(data)] = data
        return 0


class DxlBusEmulator(ThreadedDevice):
    thread_name = "dxl-emulator"

    """The bus: a thread that answers instruction packets and integrates every servo."""

    def __init__(self, servos: list[EmulatedServo], link: Link | None = None, update_hz: float = 1000.0):
        self.servos = {s.dxl_id: s for s in servos}
        self.link = link or PtyLink(symlink=False)
        self.update_hz = update_hz
        self.parser = dxl.PacketParser()
        self.instructions: list[dxl.Packet] = []  # every instruction packet received
        self._lock = threading.Lock()
        ThreadedDevice.__init__(self)

    def _reply(self, servo: EmulatedServo, error: int = 0, data: bytes = b"") -> None:
        self.link.write(dxl.status_packet(servo.dxl_id, servo.error_byte(error), data))

    def handle(self, pkt: dxl.Packet) -> None:
        with self._lock:
            self.instructions.append(pkt)
        p = pkt.params
        if pkt.inst == dxl.Inst.SYNC_WRITE and len(p) >= 4:
            address, length = struct.unpack_from("<HH", p)
            for off in range(4, len(p) - length, length + 1):
                servo = self.servos.get(p[off])
                if servo is not None:
                    servo.write(address, p[off + 1 : off + 1 + length])
            return
        if pkt.inst == dxl.Inst.SYNC_READ and len(p) >= 4:
            address, length = struct.unpack_from("<HH", p)
            for dxl_id in p[4:]:
                servo = self.servos.get(dxl_id)
                data = servo.read(address, length) if servo is not None else None
                if servo is not None:
                    self._reply(servo, 0 if data is not None else 7, data or b"")
            return
        servo = self.servos.get(pkt.dxl_id)
        if servo is None:
            return  # nobody answers an absent id (or a broadcast we do not support)
        if pkt.inst == dxl.Inst.PING:
            self._reply(servo, 0, struct.pack("<HB", servo.model_number, servo.firmware))
        elif pkt.inst == dxl.Inst.READ and len(p) == 4:
            address, length = struct.unpack("<HH", p)
            data = servo.read(address, length)
            self._reply(servo, 0 if data is not None else 7, data or b"")
        elif pkt.inst == dxl.Inst.WRITE and len(p) >= 3:
            self._reply(servo, servo.write(p[0] | p[1] << 8, p[2:]))
        else:
            self._reply(servo, 2)  # instruction error

    def _run(self) -> None:
        last = time.monotonic()
        period = 1.0 / self.update_hz
        while not self._stop.is_set():
            fd = self.link.fileno()
            if fd is not None:
                try:
                    select.select([fd], [], [], period)
                except (OSError, ValueError):
                    time.sleep(period)
            else:
                time.sleep(period)
            now = time.monotonic()
            for servo in self.servos.values():
                servo.advance(now - last)
            last = now
            data = self.link.read()
            for pkt in self.parser.feed(data):
                if pkt.inst != dxl.Inst.STATUS:
                    self.handle(pkt)
