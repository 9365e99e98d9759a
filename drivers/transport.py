"""Byte transport over pyserial's ``serial_for_url``: device paths, ptys, ``socket://``, ``loop://``.

The transport owns the port and the link counters; it knows nothing about frames. Failures of the
underlying port become :class:`LinkDown` (an ``OSError``) after the port is closed, and
:meth:`Transport.try_reconnect` reopens it with exponential backoff without ever blocking longer
than one open attempt — so a control loop can call it every tick. The backoff starts over only
after a link that stayed up for ``backoff_max_s``: a device that accepts the open and then fails at
once (hung, not reading) is retried less and less often instead of flapping.

Ports are opened exclusively (pyserial's ``exclusive=True``, an advisory lock on POSIX): a second
process opening the same rig fails instead of interleaving its commands with ours.
"""

from __future__ import annotations

import logging
import os
import select
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import serial

from robot_mbrl.drivers.config import SerialConfig

log = logging.getLogger(__name__)

POLL_SLEEP_S = 0.0002  # a port without a descriptor to select on is polled this often while waiting


class LinkDown(ConnectionError):
    """The port is closed or failed; the caller may :meth:`Transport.try_reconnect`."""


@dataclass
class LinkStats:
    """Counters of one link since it was created (they survive reconnects)."""

    bytes_in: int = 0
    bytes_out: int = 0
    crc_errors: int = 0
    framing_errors: int = 0  # COBS / header errors and overflows
    message_errors: int = 0  # framed and checksummed, but not a valid message
    frames_dropped: int = 0  # frames lost: sequence numbers skipped
    frames_late: int = 0  # frames that arrived later than expected (interval > 1.5 periods)
    seq_gaps: int = 0  # number of gap events (each may lose several frames)
    host_pauses: int = 0  # reads after the host was away (a retrain): the stale backlog discarded
    frames_skipped: int = 0  # STATE frames skipped over that way (stale, not lost on the link)
    timeouts: int = 0  # request/response exchanges that got no answer in time
    retries: int = 0  # request/response re-sends
    reconnects: int = 0  # successful reopen after a loss
    reconnect_failures: int = 0
    link_losses: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def frame_time_s(n_bytes: int, baud: int, bits_per_byte: int = 10) -> float:
    """Seconds to clock ``n_bytes`` through a UART at ``baud`` (8N1: 10 bits per byte)."""
    return n_bytes * bits_per_byte / baud


Opener = Callable[..., Any]


class Transport:
    """One serial link. Not thread-safe: one owner (the robot or the bus) drives it."""

    def __init__(
        self,
        url: str,
        baud: int = 1_000_000,
        *,
        read_timeout_s: float | None = None,
        write_timeout_s: float = 0.005,
        max_frame_bytes: int = 256,
        retries: int = 3,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 2.0,
        opener: Opener = serial.serial_for_url,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.url = url
        self.baud = baud
        self.read_timeout_s = (
            read_timeout_s if read_timeout_s is not None else 4 * frame_time_s(max_frame_bytes, baud) + 0.005
        )
        self.write_timeout_s = write_timeout_s
        self.max_frame_bytes = max_frame_bytes
        self.retries = retries
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.stats = LinkStats()
        self._opener = opener
        self._clock = clock
        self._port: Any = None
        self._timeout: float | None = None
        self._backoff_s = backoff_initial_s
        self._next_attempt_s = 0.0
        self._opened_s: float | None = None
        self._fd: int | None = None  # the open port's non-blocking descriptor (None: pyserial writes)
        self._ever_open = False
        self.last_error: LinkDown | None = None  # why the last open attempt failed

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self._port is not None

    def open(self) -> Transport:
        """Open the port now; raises :class:`LinkDown` when it cannot be opened."""
        if self._port is not None:
            return self
        try:
            port = self._opener(
                self.url, baudrate=self.baud, timeout=0, write_timeout=self.write_timeout_s, exclusive=True
            )
        except (OSError, ValueError) as err:  # SerialException is an OSError
            raise LinkDown(f"cannot open {self.url}: {err}") from err
        self._port, self._timeout, self._opened_s = port, 0.0, self._clock()
        self._fd = _nonblocking_fd(port)
        if self._ever_open:
            self.stats.reconnects += 1
            log.info("link %s reconnected", self.url)
        self._ever_open = True
        try:
            port.reset_input_buffer()
        except (OSError, AttributeError):
            pass  # socket:// and some adapters cannot flush; stale bytes are resynced by the framing
        return self

    def close(self) -> None:
        port, self._port, self._fd = self._port, None, None  # (a closed descriptor's number is reused)
        if port is not None:
            try:
                port.close()
            except OSError as err:
                log.debug("closing %s: %s", self.url, err)

    def _lost(self, err: BaseException) -> LinkDown:
        log.warning("link %s lost: %s", self.url, err)
        self.stats.link_losses += 1
        self.close()
        now = self._clock()
        if self._opened_s is not None and now - self._opened_s >= self.backoff_max_s:
            self._backoff_s = self.backoff_initial_s  # it had been up a while: a fresh loss
        else:  # lost again right after it was opened: back off further
            self._backoff_s = min(self._backoff_s * 2.0, self.backoff_max_s)
        self._next_attempt_s = now + self._backoff_s
        return LinkDown(f"{self.url}: {err}")

    def try_reconnect(self) -> bool:
        """One reopen attempt if the backoff delay has passed; True when the link is open."""
        if self._port is not None:
            return True
        now = self._clock()
        if now < self._next_attempt_s:
            return False
        try:
            self.open()
            return True
        except LinkDown as err:
            self.last_error = err
            self.stats.reconnect_failures += 1
            self._backoff_s = min(self._backoff_s * 2.0, self.backoff_max_s)
            self._next_attempt_s = now + self._backoff_s
            log.debug("reconnect failed (next in %.3f s): %s", self._backoff_s, err)
            return False

    def reconnect_blocking(self, timeout_s: float) -> bool:
        """Retry with backoff until open or ``timeout_s`` elapsed."""
        deadline = self._clock() + timeout_s
        while not self.try_reconnect():
            left = deadline - self._clock()
            if left <= 0:
                return False
            time.sleep(max(0.0, min(self._next_attempt_s - self._clock(), left)))
        return True

    # -- I/O -------------------------------------------------------------------------------
    def _require(self) -> Any:
        if self._port is None:
            raise LinkDown(f"{self.url}: not open")
        return self._port

    def _set_timeout(self, timeout_s: float) -> None:
        if self._timeout != timeout_s:
            self._port.timeout = timeout_s
            self._timeout = timeout_s

    def write(self, data: bytes) -> None:
        """All of ``data``, or :class:`LinkDown` once the port took none of the rest for
        ``write_timeout_s`` (a device that stopped reading): the caller's tick waits no longer."""
        port = self._require()
        try:
            if self._fd is None:  # loop:// and the like
                n = port.write(data)
            else:
                n = self._write_fd(data)
        except (OSError, ValueError) as err:  # SerialTimeoutException, EIO, closed socket
            raise self._lost(err) from err
        self.stats.bytes_out += n if n is not None else len(data)

    def _write_fd(self, data: bytes) -> int:
        """Write to the non-blocking descriptor; wait for room only while some is left over. (Not
        pyserial's write: it raises its timeout when the time ran out during a write that took
        everything, e.g. the process was preempted for longer than the timeout.)"""
        view, deadline = memoryview(data), None
        while view:
            try:
                view = view[os.write(self._fd, view) :]
            except BlockingIOError:
                pass
            if not view:
                break
            now = time.monotonic()
            deadline = deadline or now + self.write_timeout_s
            if now >= deadline or not select.select([], [self._fd], [], deadline - now)[1]:
                raise TimeoutError(
                    f"write timeout: the port took {len(data) - len(view)} of {len(data)} bytes "
                    f"in {self.write_timeout_s * 1e3:.0f} ms"
                )
        return len(data)

    def read_available(self, max_bytes: int = 4096) -> bytes:
        """Whatever has arrived, without waiting. A hung-up port raises :class:`LinkDown`."""
        port = self._require()
        try:
            self._set_timeout(0.0)
            data = port.read(max_bytes)  # timeout 0: returns what is there (posix, socket://, loop://)
        except (OSError, ValueError, TypeError) as err:
            raise self._lost(err) from err
        self.stats.bytes_in += len(data)
        return bytes(data)

    def wait_readable(self, timeout_s: float) -> None:
        """Return once bytes may have arrived, or after ``timeout_s``: ``select`` on the port's
        descriptor, else a short sleep (loop:// and the like). Never raises: the next read says
        whether the link is down."""
        if timeout_s <= 0:
            return
        if self._port is None:  # closed (link down): nothing can arrive before the next reconnect try
            time.sleep(timeout_s)
            return
        if self._fd is not None:
            try:
                select.select([self._fd], [], [], timeout_s)
                return
            except (OSError, ValueError):  # closed under us: the next read raises LinkDown
                pass
        time.sleep(min(timeout_s, POLL_SLEEP_S))

    def discard_input(self, max_bytes: int = 1 << 20) -> int:
        """Read and drop whatever has arrived (up to ``max_bytes``); the number of bytes dropped."""
        dropped = 0
        while dropped < max_bytes:
            chunk = self.read_available(65536)
            if not chunk:
                break
            dropped += len(chunk)
        return dropped

    def read(self, n: int, timeout_s: float | None = None) -> bytes:
        """Up to ``n`` bytes, waiting at most ``timeout_s`` (default: the derived read timeout)."""
        port = self._require()
        try:
            self._set_timeout(self.read_timeout_s if timeout_s is None else timeout_s)
            data = port.read(n)
        except (OSError, ValueError, TypeError) as err:
            raise self._lost(err) from err
        self.stats.bytes_in += len(data)
        return bytes(data)

    def __enter__(self) -> Transport:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _nonblocking_fd(port: Any) -> int | None:
    """The port's file descriptor where it is non-blocking (pyserial's POSIX serial ports and
    socket:// connections are), else None."""
    try:
        fd = port.fileno()
        return fd if isinstance(fd, int) and not os.get_blocking(fd) else None
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is both
        return None


def make_transport(cfg: SerialConfig, opener: Opener = serial.serial_for_url) -> Transport:
    """The edge factory: a (closed) :class:`Transport` from a :class:`SerialConfig`."""
    return Transport(
        cfg.port,
        cfg.baud,
        read_timeout_s=cfg.derived_read_timeout_s(),
        write_timeout_s=cfg.write_timeout_s,
        max_frame_bytes=cfg.max_frame_bytes,
        retries=cfg.retries,
        backoff_initial_s=cfg.backoff_initial_s,
        backoff_max_s=cfg.backoff_max_s,
        opener=opener,
    )
