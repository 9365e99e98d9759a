"""Atomic file writes: a reader (or a restart after kill -9) sees the old file or the new one, never half."""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from robot_mbrl.runtime.loop import normal_priority

log = logging.getLogger(__name__)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync, rename, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)  # as open() would (mkstemp's is 0600)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it, and it changes it: once, at import (one thread)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(finite_json(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


def finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None: standard JSON has no NaN or Infinity,
    and strict parsers (not Python's) reject the bare tokens."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    return obj


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line and flush it to disk. A torn last line (a writer killed mid-line: no
    final newline) is cut off first, so the new record starts on a line of its own; readers skip a
    torn last line."""
    append_line(path, jsonl_line(record))


def jsonl_line(record: dict) -> bytes:
    return (json.dumps(finite_json(record), sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


def append_line(path: str | os.PathLike, line: bytes) -> None:
    """:func:`append_jsonl` for a line already encoded (one that ends in a newline)."""
    with open(path, "a+b") as f:
        _drop_torn_tail(f, path)
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _drop_torn_tail(f: Any, path: str | os.PathLike) -> None:
    """Truncate ``f`` (opened ``a+b``) after its last newline when it does not end in one."""
    size = f.seek(0, os.SEEK_END)
    if size == 0:
        return
    f.seek(size - 1)
    if f.read(1) == b"\n":
        return
    end = size
    while end > 0:  # back to the last complete line
        start = max(0, end - 4096)
        f.seek(start)
        nl = f.read(end - start).rfind(b"\n")
        if nl >= 0:
            end = start + nl + 1
            break
        end = start
    log.warning("%s: dropped a torn last line (%d bytes) left by an interrupted write", path, size - end)
    f.truncate(end)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file, ignoring a torn final line left by a crash."""
    out: list[dict] = []
    p = Path(path)
    if not p.exists():
        return out
    lines = p.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{p}: line {i + 1}: expected a JSON object, got {line[:40]!r}") from None
    return out


class OrderedWriter:
    """File writes in submission order on one daemon thread, off the control loop's tick.

    A write with fsync takes what the storage takes (~0.5 ms on this project's VM, tens of ms on an
    SD card), and a tick has 20 ms: the loop hands the bytes over (:meth:`submit`) and goes on.
    Order is kept, so a chunk is durable before the manifest line that lists it. A failed write
    stops the writer (later writes could depend on it) and its error is raised in the caller's
    thread by the next :meth:`submit` or :meth:`drain`; :meth:`drain` returns once everything
    submitted is on disk. A kill loses what is queued, as an unflushed buffer would.
    """

    def __init__(self, name: str):
        self.name = name
        self._q: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self._raise()
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=f"writer:{self.name}", daemon=True)
            self._thread.start()
        self._q.put((fn, args))

    def drain(self) -> None:
        """Wait until every submitted write is done; raise the first write error, if any."""
        if self._thread is not None:
            self._q.join()
        self._raise()

    def close(self) -> None:
        """:meth:`drain`, then end the thread (a later :meth:`submit` starts a new one)."""
        try:
            self.drain()
        finally:
            if self._thread is not None:
                self._q.put(None)
                self._thread.join()
                self._thread = None

    def _raise(self) -> None:
        if self._error is not None:
            raise OSError(f"{self.name}: a background write failed: {self._error}") from self._error

    def _work(self) -> None:
        normal_priority()  # started from a real-time control thread: never compete with it
        while (job := self._q.get()) is not None:
            try:
                if self._error is None:
                    job[0](*job[1])
            except BaseException as err:  # noqa: BLE001 - surfaced in the caller's thread
                self._error = err
                log.error("%s: background write failed: %s", self.name, err)
            finally:
                job = None  # the owner (a buffer and its columns) is not kept alive between jobs
                self._q.task_done()
        self._q.task_done()
