"""Transport over real pyserial URLs: loop://, a real pty, socket:// on 127.0.0.1; reconnect backoff."""

from __future__ import annotations

import os
import socket
import time
import tty

import pytest

from robot_mbrl.drivers.config import SerialConfig
from robot_mbrl.drivers.framing import encode_frame
from robot_mbrl.drivers.transport import LinkDown, Transport, frame_time_s, make_transport
from robot_mbrl.typedconfig import ConfigError, build


def test_timeouts_derive_from_baud_and_frame_size():
    assert frame_time_s(100, 1_000_000) == pytest.approx(1e-3)
    slow = SerialConfig(baud=115_200, max_frame_bytes=64)
    fast = SerialConfig(baud=1_000_000, max_frame_bytes=64)
    assert slow.derived_read_timeout_s() > fast.derived_read_timeout_s() > 0.005
    assert make_transport(fast).read_timeout_s == fast.derived_read_timeout_s()
    assert SerialConfig(read_timeout_s=0.5).derived_read_timeout_s() == 0.5


def test_config_is_validated():
    with pytest.raises(ConfigError):
        build(SerialConfig, {"baud": 0})
    with pytest.raises(ConfigError):
        build(SerialConfig, {"backoff_initial_s": 1.0, "backoff_max_s": 0.5})
    with pytest.raises(ConfigError):
        build(SerialConfig, {"obs_from_sensor": [1, 1]})
    assert build(SerialConfig, {"port": "loop://", "obs_from_sensor": [2, 0]}).obs_from_sensor == (2, 0)


def test_loop_url_echoes_and_counts_bytes():
    with Transport("loop://", 115_200) as t:
        frame = encode_frame(b"abc")
        t.write(frame)
        assert t.read(len(frame), timeout_s=0.1) == frame
        assert t.read_available() == b""
        assert t.stats.bytes_out == t.stats.bytes_in == len(frame)


def test_real_pty_both_directions_and_hangup_is_link_down():
    master, slave = os.openpty()
    tty.setraw(slave)
    t = Transport(os.ttyname(slave), 1_000_000).open()
    try:
        t.write(b"\x00\x11\x13hello")  # 0x11/0x13 = XON/XOFF: must pass untouched
        time.sleep(0.01)
        assert os.read(master, 100) == b"\x00\x11\x13hello"
        os.write(master, b"\x00world\r\n")
        assert t.read(8, timeout_s=0.2) == b"\x00world\r\n"
        os.close(slave)
        os.close(master)  # the cable is pulled
        with pytest.raises(LinkDown):
            for _ in range(100):
                t.read_available()
                time.sleep(0.001)
        assert not t.is_open and t.stats.link_losses == 1
    finally:
        t.close()


def test_socket_url_on_loopback():
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    with Transport(f"socket://127.0.0.1:{port}") as t:
        conn, _ = srv.accept()
        t.write(b"ping")
        assert conn.recv(10) == b"ping"
        conn.sendall(b"pong")
        assert t.read(4, timeout_s=0.5) == b"pong"
        conn.close()  # peer goes away
        with pytest.raises(LinkDown):
            for _ in range(200):
                t.read_available()
                time.sleep(0.001)
    srv.close()


def test_reconnect_uses_exponential_backoff_and_never_blocks():
    now = [0.0]
    t = Transport("/nonexistent/robot-mcu", backoff_initial_s=0.1, backoff_max_s=0.4, clock=lambda: now[0])
    delays = []
    for _ in range(5):
        assert not t.try_reconnect()
        delays.append(round(t._next_attempt_s - now[0], 6))
        assert not t.try_reconnect()  # again at once: inside the backoff window, no attempt
        now[0] = t._next_attempt_s
    assert delays == [0.2, 0.4, 0.4, 0.4, 0.4]
    assert t.stats.reconnect_failures == 5
    t0 = time.monotonic()
    for _ in range(1000):
        t.try_reconnect()  # inside the backoff window: returns at once
    assert time.monotonic() - t0 < 0.1


def test_reconnect_succeeds_when_device_returns():
    master, slave = os.openpty()
    tty.setraw(slave)
    link = f"/tmp/robot-mbrl-test-{os.getpid()}"
    try:
        t = Transport(link, backoff_initial_s=0.01)
        with pytest.raises(LinkDown):
            t.open()
        os.symlink(os.ttyname(slave), link)
        assert t.reconnect_blocking(1.0)
        assert t.is_open
    finally:
        os.unlink(link)
        t.close()
        os.close(master)
        os.close(slave)


def test_a_device_that_stopped_reading_costs_a_write_timeout_not_a_control_period():
    master, slave = os.openpty()  # nobody reads the master: the pty's buffer fills, then writes block
    tty.setraw(slave)
    t = Transport(os.ttyname(slave), write_timeout_s=0.005).open()
    try:
        worst = 0.0
        with pytest.raises(LinkDown, match="write timeout"):
            for _ in range(100_000):
                t0 = time.monotonic()
                try:
                    t.write(b"\x55" * 64)
                finally:
                    worst = max(worst, time.monotonic() - t0)
        assert worst < 0.1  # the 5 ms timeout plus scheduling slack on a loaded machine (was 50 ms a write)
        assert t.stats.link_losses == 1 and not t.is_open
    finally:
        t.close()
        os.close(master)
        os.close(slave)


def test_backoff_grows_while_the_link_fails_right_after_opening_and_restarts_after_a_good_run():
    now = [0.0]
    master, slave = os.openpty()
    tty.setraw(slave)
    t = Transport(os.ttyname(slave), backoff_initial_s=0.1, backoff_max_s=0.4, clock=lambda: now[0])
    try:
        delays = []
        for _ in range(4):  # opens, then fails at once (a hung device): no reset on open
            assert t.try_reconnect()
            t._lost(OSError("write timeout (test)"))
            delays.append(round(t._next_attempt_s - now[0], 6))
            now[0] = t._next_attempt_s
        assert delays == [0.2, 0.4, 0.4, 0.4]
        assert t.try_reconnect()
        now[0] += 0.5  # up for longer than backoff_max_s: the next loss is a fresh one
        t._lost(OSError("EIO (test)"))
        assert round(t._next_attempt_s - now[0], 6) == 0.1
    finally:
        t.close()
        os.close(master)
        os.close(slave)


def test_a_second_process_cannot_open_the_same_port():
    master, slave = os.openpty()
    tty.setraw(slave)
    first = Transport(os.ttyname(slave)).open()
    try:
        with pytest.raises(LinkDown, match="lock"):
            Transport(os.ttyname(slave)).open()  # another host on the same rig: refused
        first.write(b"ok")
    finally:
        first.close()
        os.close(master)
        os.close(slave)


def test_a_write_the_port_took_whole_never_times_out():
    """However late the writer runs (preempted on a loaded machine), a write the OS took whole is
    done: the timeout only bounds the wait for room (pyserial's own write raises it here)."""
    master, slave = os.openpty()
    tty.setraw(slave)
    t = Transport(os.ttyname(slave), write_timeout_s=1e-9).open()  # expired before the write returns
    try:
        for _ in range(100):
            t.write(b"0123456789")
        assert t.is_open and t.stats.link_losses == 0
        got, deadline = b"", time.monotonic() + 2.0
        while len(got) < 1000 and time.monotonic() < deadline:  # a pty hands it over in pieces
            got += os.read(master, 4096)
        assert len(got) == 1000
    finally:
        t.close()
        os.close(master)
        os.close(slave)
