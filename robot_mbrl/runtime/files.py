"""Atomic file writes: a reader (or a restart after kill -9) sees the old file or the new one, never half."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync, rename, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
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
    with open(path, "a+b") as f:
        _drop_torn_tail(f, path)
        f.write((json.dumps(finite_json(record), sort_keys=True, allow_nan=False) + "\n").encode("utf-8"))
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
