"""Device-side byte links (pty, TCP on 127.0.0.1) and seeded fault injection on their byte stream.

:class:`PtyLink` and :class:`SocketLink` are what an emulated device reads and writes; both can be
unplugged and replugged like a USB cable. :class:`FaultyLink` wraps any link and corrupts, drops or
stalls bytes with a seeded RNG, so a test can replay exactly the same faults.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
import tty
from dataclasses import dataclass
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)


class Link(Protocol):
    """Device side of a byte link: non-blocking read/write, unplug/replug, a fd to wait on."""

    port: str

    def fileno(self) -> int | None: ...
    def read(self, max_bytes: int = 4096) -> bytes: ...
    def write(self, data: bytes) -> int: ...
    def unplug(self) -> None: ...
    def replug(self) -> None: ...
    def close(self) -> None: ...


class PtyLink:
    """A pseudo-terminal; the host opens :attr:`port` with pyserial like a USB serial adapter.

    :attr:`port` is a symlink (like a udev rule's ``/dev/robot-mcu``) to the current pty slave, so
    :meth:`unplug` (the host sees EIO) and :meth:`replug` (a fresh pty, same path) behave like a
    USB cable. ``symlink=False`` serves the raw slave path instead (no replug).
    """

    def __init__(self, symlink: bool = True):
        self._dir = tempfile.mkdtemp(prefix="robot-mbrl-pty-") if symlink else None
        self._master: int | None = None
        self._slave: int | None = None
        self._lock = threading.RLock()  # unplug/replug come from other threads than read/write
        self.port = ""
        self.bytes_dropped = 0  # device output lost because the host was not reading (buffer full)
        self.replug()

    def replug(self) -> None:
        with self._lock:
            self._replug()

    def _replug(self) -> None:
        if self._master is not None:
            return
        master, slave = os.openpty()
        tty.setraw(slave)  # no echo, no CR/LF or flow-control translation before the host opens it
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        slave_path = os.ttyname(slave)
        if self._dir is None:
            self.port = slave_path
            return
        link = os.path.join(self._dir, "mcu")
        tmp = link + ".tmp"
        os.symlink(slave_path, tmp)
        os.replace(tmp, link)
        self.port = link

    def unplug(self) -> None:
        with self._lock:
            if self._dir is not None and self.port:
                try:
                    os.unlink(self.port)
                except FileNotFoundError:
                    pass
            for fd in (self._master, self._slave):
                if fd is not None:
                    os.close(fd)
            self._master = self._slave = None

    @property
    def plugged(self) -> bool:
        return self._master is not None

    def fileno(self) -> int | None:
        return self._master

    def read(self, max_bytes: int = 4096) -> bytes:
        with self._lock:
            if self._master is None:
                return b""
            try:
                return os.read(self._master, max_bytes)
            except (BlockingIOError, InterruptedError):
                return b""
            except OSError:  # EIO: nothing to read while no one holds the slave; we hold it, so rare
                return b""

    def write(self, data: bytes) -> int:
        with self._lock:
            if self._master is None:
                return 0
            try:
                n = os.write(self._master, data)
            except (BlockingIOError, InterruptedError):
                n = 0
            self.bytes_dropped += len(data) - n
            return n

    def close(self) -> None:
        self.unplug()
        if self._dir is not None:
            try:
                os.rmdir(self._dir)
            except OSError as err:
                log.debug("pty dir %s: %s", self._dir, err)


class SocketLink:
    """A TCP server on 127.0.0.1 for one client at a time (``socket://127.0.0.1:PORT``)."""

    def __init__(self, port: int = 0):
        self._server: socket.socket | None = None
        self._client: socket.socket | None = None
        self._tcp_port = port
        self._lock = threading.RLock()
        self.port = ""
        self.bytes_dropped = 0
        self.replug()

    def replug(self) -> None:
        with self._lock:
            self._replug()

    def _replug(self) -> None:
        if self._server is not None:
            return
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self._tcp_port))
        srv.listen(1)
        srv.setblocking(False)
        self._server, self._tcp_port = srv, srv.getsockname()[1]
        self.port = f"socket://127.0.0.1:{self._tcp_port}"

    def unplug(self) -> None:
        with self._lock:
            for s in (self._client, self._server):
                if s is not None:
                    s.close()
            self._client = self._server = None

    def _accept(self) -> None:
        if self._client is None and self._server is not None:
            try:
                client, _ = self._server.accept()
            except (BlockingIOError, InterruptedError):
                return
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._client = client

    def fileno(self) -> int | None:
        with self._lock:
            self._accept()
            s = self._client or self._server
            return s.fileno() if s is not None else None

    def _drop_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def read(self, max_bytes: int = 4096) -> bytes:
        with self._lock:
            return self._read(max_bytes)

    def _read(self, max_bytes: int) -> bytes:
        self._accept()
        if self._client is None:
            return b""
        try:
            data = self._client.recv(max_bytes)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError:
            data = b""
        if not data:
            self._drop_client()  # the host went away; wait for the next one
        return data

    def write(self, data: bytes) -> int:
        with self._lock:
            return self._write(data)

    def _write(self, data: bytes) -> int:
        self._accept()
        if self._client is None:
            return 0
        try:
            n = self._client.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self._drop_client()
            n = 0
        self.bytes_dropped += len(data) - n
        return n

    def close(self) -> None:
        self.unplug()


@dataclass(frozen=True)
class FaultConfig:
    """Per-byte fault rates in each direction ("rx": host → device, "tx": device → host)."""

    corrupt_rate: float = 0.0  # probability that a byte gets one random bit flipped
    drop_rate: float = 0.0  # probability that a byte is lost
    chunk_drop_rate: float = 0.0  # probability that a whole write (one device frame) is lost
    directions: tuple[str, ...] = ("rx", "tx")


class FaultyLink:
    """Wraps a :class:`Link`; same interface. Faults are drawn from ``np.random.default_rng(seed)``.

    :meth:`stall` freezes the link for a while (nothing in, device output discarded, as a wedged USB
    adapter would); :meth:`unplug`/:meth:`replug` are passed to the wrapped link.
    """

    def __init__(self, link: Link, config: FaultConfig | None = None, seed: int = 0):
        self.inner = link
        self.config = config or FaultConfig()
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self._stall_until = 0.0
        self.bytes_corrupted = 0
        self.bytes_dropped = 0
        self.chunks_dropped = 0

    @property
    def port(self) -> str:
        return self.inner.port

    def set_config(self, config: FaultConfig) -> None:
        with self._lock:
            self.config = config

    def stall(self, duration_s: float) -> None:
        self._stall_until = time.monotonic() + duration_s

    @property
    def stalled(self) -> bool:
        return time.monotonic() < self._stall_until

    def _mangle(self, data: bytes, direction: str) -> bytes:
        with self._lock:
            cfg = self.config
            if not data or direction not in cfg.directions:
                return data
            if cfg.chunk_drop_rate and self._rng.random() < cfg.chunk_drop_rate:
                self.chunks_dropped += 1
                return b""
            buf = np.frombuffer(data, dtype=np.uint8).copy()
            if cfg.corrupt_rate:
                hit = self._rng.random(buf.size) < cfg.corrupt_rate
                bits = self._rng.integers(0, 8, size=buf.size).astype(np.uint8)
                buf[hit] ^= (np.uint8(1) << bits[hit]).astype(np.uint8)
                self.bytes_corrupted += int(hit.sum())
            if cfg.drop_rate:
                keep = self._rng.random(buf.size) >= cfg.drop_rate
                self.bytes_dropped += int(buf.size - keep.sum())
                buf = buf[keep]
            return buf.tobytes()

    def fileno(self) -> int | None:
        return self.inner.fileno()

    def read(self, max_bytes: int = 4096) -> bytes:
        if self.stalled:
            return b""  # bytes stay queued in the OS buffer until the stall ends
        return self._mangle(self.inner.read(max_bytes), "rx")

    def write(self, data: bytes) -> int:
        if self.stalled:
            return len(data)  # swallowed
        out = self._mangle(data, "tx")
        if out:
            self.inner.write(out)
        return len(data)

    def unplug(self) -> None:
        self.inner.unplug()

    def replug(self) -> None:
        self.inner.replug()

    def close(self) -> None:
        self.inner.close()
