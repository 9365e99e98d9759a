"""Serial link benchmark over a real pty: command → state round trip, and a sustained control loop.

Round trip: the host sends COMMAND(seq) and waits for the first STATE whose ``cmd_seq`` echoes it.
The emulated device streams at ``--device-hz`` (it applies commands as they arrive, so the round
trip is bounded by one device period plus the link). A pty has no baud rate of its own: the UART
wire time for the frame sizes at each baud is added as a modelled term and printed separately.

Usage: python benchmarks/bench_serial.py [--n 500] [--device-hz 1000] [--control-hz 500]
Prints markdown tables.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import numpy as np

from robot_mbrl.drivers import mcu
from robot_mbrl.drivers.config import SerialConfig
from robot_mbrl.drivers.serial_robot import SerialRobot
from robot_mbrl.drivers.transport import Transport, frame_time_s, make_transport
from robot_mbrl.hal.robot import Channel, RobotSpec
from robot_mbrl.hil.emulator import serve
from robot_mbrl.hil.faults import FaultConfig


class Plant:
    def __init__(self, n_sensors: int = 5):
        self.x = np.zeros(n_sensors)
        self.u = 0.0

    def apply_command(self, u: np.ndarray) -> None:
        self.u = float(u[0])

    def advance(self, duration_s: float) -> None:
        self.x[0] += self.u * duration_s

    def read_sensors(self) -> np.ndarray:
        return self.x.copy()

    def brake(self) -> None:
        self.u = 0.0


def _pct(a: np.ndarray, q: float) -> float:
    return float(np.percentile(a, q)) * 1e3


def round_trip(n: int, device_hz: float, baud: int) -> dict[str, float]:
    emu, port = serve(Plant(), "pty", sensor_limits=((-1e3, 1e3),) * 5, actuator_limits=((-1, 1),),
                      control_hz=device_hz, watchdog_ms=1000)  # fmt: skip
    rtts = []
    try:
        with Transport(port, baud) as t:
            dec = mcu.McuDecoder()
            for seq in range(1, n + 1):
                t0 = time.perf_counter()
                t.write(mcu.encode(mcu.Command(seq, (0.1,))))
                done = False
                while not done and time.perf_counter() - t0 < 0.5:
                    for m in dec.feed(t.read(256, timeout_s=0.0005)):
                        done = done or (isinstance(m, mcu.State) and m.cmd_seq == seq)
                rtts.append(time.perf_counter() - t0)
    finally:
        emu.stop()
    a = np.array(rtts)
    wire_ms = (
        frame_time_s(
            len(mcu.encode(mcu.Command(1, (0.1,)))) + len(mcu.encode(mcu.State(1, 1, 1, 0, (0.0,) * 5))), baud
        )
        * 1e3
    )
    return {"p50": _pct(a, 50), "p99": _pct(a, 99), "max": float(a.max()) * 1e3, "wire": wire_ms}


def control_loop(seconds: float, control_hz: float, device_hz: float, baud: int) -> dict[str, float]:
    emu, port = serve(Plant(), "pty", sensor_limits=((-1e3, 1e3),) * 5, actuator_limits=((-1, 1),),
                      control_hz=device_hz, watchdog_ms=100)  # fmt: skip
    spec = RobotSpec(obs=tuple(Channel(f"s{i}", "1", -1e3, 1e3) for i in range(5)),
                     act=(Channel("u", "1", -1, 1),), control_hz=control_hz)  # fmt: skip
    cfg = SerialConfig(port=port, baud=baud)
    robot = SerialRobot(spec, make_transport(cfg), cfg)
    period = 1.0 / control_hz
    ticks, stale, misses, intervals = 0, 0, 0, []
    try:
        with robot:
            robot.reset()
            robot.activate()
            t_end = time.monotonic() + seconds
            next_tick = time.monotonic()
            last = None
            while next_tick < t_end:
                now = time.monotonic()
                if last is not None:
                    intervals.append(now - last)
                last = now
                obs = robot.read()
                stale += not obs.ok
                robot.write(np.array([0.1]))
                ticks += 1
                next_tick += period
                slack = next_tick - time.monotonic()
                if slack < 0:
                    misses += 1
                else:
                    time.sleep(slack)
            transitions = robot.transitions
    finally:
        emu.stop()
    iv = np.array(intervals)
    return {"rate": ticks / seconds, "jitter_p99": _pct(np.abs(iv - period), 99), "jitter_std": float(iv.std()) * 1e3,
            "misses": misses, "invalid": stale, "vouched": transitions / max(1, ticks)}  # fmt: skip


def _spec(control_hz: float = 200.0) -> RobotSpec:
    return RobotSpec(obs=tuple(Channel(f"s{i}", "1", -1e3, 1e3) for i in range(5)),
                     act=(Channel("u", "1", -1, 1),), control_hz=control_hz)  # fmt: skip


def connect_trials(n: int, noisy: bool) -> dict[str, float]:
    """``n`` connect + activate attempts, each against a fresh emulated device (seeded faults)."""
    faults = (
        FaultConfig(corrupt_rate=0.01, chunk_drop_rate=0.05) if noisy else FaultConfig()
    )  # the HIL's noisy link
    ok, times = 0, []
    for seed in range(n):
        emu, port = serve(Plant(), "pty", sensor_limits=((-1e3, 1e3),) * 5, actuator_limits=((-1, 1),),
                          control_hz=200.0, faults=faults, seed=seed)  # fmt: skip
        cfg = SerialConfig(port=port)
        robot = SerialRobot(_spec(), make_transport(cfg), cfg)
        t0 = time.monotonic()
        try:
            robot.connect()
            robot.activate()
            ok += 1
            times.append(time.monotonic() - t0)
        except (ConnectionError, OSError, mcu.ProtocolError):
            pass
        finally:
            robot.close()
            emu.stop()
    t = np.array(times) * 1e3 if times else np.zeros(1)
    return {"ok": ok, "p50": float(np.median(t)), "max": float(t.max())}


def restart_recovery(n: int) -> dict[str, float]:
    """Device restarts behind a live link (:meth:`McuEmulator.restart`): time from the restart to
    the first fresh, fault-free reading, with the host reading at 200 Hz."""
    delays, restarts = [], 0
    emu, port = serve(
        Plant(), "pty", sensor_limits=((-1e3, 1e3),) * 5, actuator_limits=((-1, 1),), control_hz=200.0
    )
    cfg = SerialConfig(port=port)
    try:
        with SerialRobot(_spec(), make_transport(cfg), cfg) as robot:
            robot.activate()
            for _ in range(n):
                for _ in range(20):  # settle
                    robot.write(np.array([0.0]))
                    time.sleep(0.005)
                    robot.read()
                emu.restart()
                t0 = time.monotonic()
                while time.monotonic() - t0 < 5.0:
                    robot.write(np.array([0.0]))
                    time.sleep(0.005)
                    o = robot.read()
                    if o.ok and o.info.get("device_t_us", 1e12) * 1e-6 <= time.monotonic() - t0 + 0.005:
                        delays.append(time.monotonic() - t0)
                        break
            restarts = robot.device_restarts
    finally:
        emu.stop()
    d = np.array(delays) * 1e3 if delays else np.full(1, np.nan)
    return {"recovered": len(delays), "detected": restarts, "p50": float(np.median(d)), "max": float(d.max())}


def hung_device(seconds: float, control_hz: float = 50.0) -> dict[str, float]:
    """The device's firmware hangs with the link up (:meth:`ThreadedDevice.hang`): it no longer reads,
    so once the OS's queue towards it is full every write blocks. What the host's control loop pays:
    each tick's read + write time, and how often the link is declared lost and reopened."""
    emu, port = serve(Plant(), "pty", sensor_limits=((-1e3, 1e3),) * 5, actuator_limits=((-1, 1),),
                      control_hz=control_hz)  # fmt: skip
    cfg = SerialConfig(port=port)
    robot = SerialRobot(_spec(control_hz), make_transport(cfg), cfg)
    try:
        robot.connect()
        robot.reset()
        robot.activate()
        emu.hang()
        # Its side of the link is never drained: keep the OS's queue towards it full (a second open
        # of the port, held for the whole scenario so that the host's reopens do not flush it).
        fill = os.open(port, os.O_WRONLY | os.O_NONBLOCK)

        def top_up() -> None:
            try:
                while True:
                    os.write(fill, b"\x01" * 4096)
            except BlockingIOError:
                pass

        ticks, period = [], 1.0 / control_hz
        t_end = time.monotonic() + seconds
        try:
            while time.monotonic() < t_end:
                top_up()
                t0 = time.perf_counter()
                try:
                    robot.read()
                    robot.write(np.array([0.0]))
                except ConnectionError:  # serial.link_timeout_s: the job would end here
                    break
                ticks.append(time.perf_counter() - t0)
                time.sleep(max(0.0, period - ticks[-1]))
        finally:
            os.close(fill)
        st = robot.link_stats()
        t = np.array(ticks)
        return {"ticks": len(t), "p99": _pct(t, 99), "max": float(t.max()) * 1e3, "over": int((t > period).sum()),
                "losses": st["link_losses"], "reopens": st["reconnects"]}  # fmt: skip
    finally:
        robot.transport.close()
        emu.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    reduced = os.environ.get("ROBOT_MBRL_REDUCED") == "1"
    p.add_argument("--n", type=int, default=100 if reduced else 500)
    p.add_argument("--seconds", type=float, default=1.0 if reduced else 5.0)
    p.add_argument("--device-hz", type=float, default=1000.0)
    p.add_argument("--control-hz", type=float, default=500.0)
    p.add_argument("--connects", type=int, default=10 if reduced else 40, help="connect trials per link kind")
    p.add_argument(
        "--restarts", type=int, default=5 if reduced else 20, help="device restarts to recover from"
    )
    p.add_argument("--hung-seconds", type=float, default=2.0 if reduced else 4.0, help="hung-device scenario")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the driver's link warnings are expected here
    print(f"## Serial round trip over a pty (device streams at {args.device_hz:.0f} Hz, n={args.n})\n")
    print("| baud | RTT p50 ms | RTT p99 ms | RTT max ms | + modelled UART wire time ms |")
    print("|---|---|---|---|---|")
    for baud in (1_000_000, 115_200):
        r = round_trip(args.n, args.device_hz, baud)
        print(f"| {baud} | {r['p50']:.3f} | {r['p99']:.3f} | {r['max']:.3f} | {r['wire']:.3f} |")
    print(
        f"\n## Sustained control loop ({args.seconds:.0f} s, target {args.control_hz:.0f} Hz, SerialRobot)\n"
    )
    print("| baud | rate Hz | jitter p99 ms | interval std ms | deadline misses | invalid obs | vouched |")
    print("|---|---|---|---|---|---|---|")
    for baud in (1_000_000, 115_200):
        c = control_loop(args.seconds, args.control_hz, args.device_hz, baud)
        print(f"| {baud} | {c['rate']:.1f} | {c['jitter_p99']:.3f} | {c['jitter_std']:.3f} | {c['misses']} "
              f"| {c['invalid']} | {c['vouched']:.2f} |")  # fmt: skip
    n = args.connects
    print(
        f"\n## Connect + activate, {n} fresh devices each (noisy: 1 % of bytes corrupted, 5 % of writes dropped)\n"
    )
    print("| link | succeeded | time p50 ms | time max ms |")
    print("|---|---|---|---|")
    for noisy in (False, True):
        c = connect_trials(n, noisy)
        print(f"| {'noisy' if noisy else 'clean'} | {c['ok']}/{n} | {c['p50']:.1f} | {c['max']:.1f} |")
    r = restart_recovery(args.restarts)
    print(f"\n## Device restart behind a live link ({args.restarts} restarts, host reading at 200 Hz)\n")
    print("| restarts detected | recovered | first fresh reading after, p50 ms | max ms |")
    print("|---|---|---|---|")
    print(
        f"| {r['detected']}/{args.restarts} | {r['recovered']}/{args.restarts} | {r['p50']:.1f} | {r['max']:.1f} |"
    )

    h = hung_device(args.hung_seconds)
    print(
        f"\n## A device that hangs with the link up ({args.hung_seconds:.0f} s at 50 Hz after its queue filled)\n"
    )
    print("| ticks | tick p99 ms | tick max ms | ticks over the 20 ms period | link losses | reopens |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {h['ticks']} | {h['p99']:.2f} | {h['max']:.2f} | {h['over']} | {h['losses']} | {h['reopens']} |"
    )


if __name__ == "__main__":
    main()
