"""The replay buffer's files: the chunk journal (``manifest.jsonl``, schema ``robot_mbrl.buffer/2``) and
the earlier one-document manifest (``manifest.json``, ``/1``), read and checked; see
:mod:`robot_mbrl.data.buffer` for how they are written.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

log = logging.getLogger("robot_mbrl.data.buffer")  # one logger for the buffer and its files

SCHEMA = "robot_mbrl.buffer/2"
MANIFEST = "manifest.jsonl"
SCHEMA_V1, MANIFEST_V1 = "robot_mbrl.buffer/1", "manifest.json"  # one JSON document, rewritten per flush
_ENTRY = {"file": str, "count": int, "sha256": str}


class BufferFileError(ValueError):
    """A buffer file is missing, truncated, corrupt or foreign. ``str(err)`` is one line."""

    def __init__(self, path: Path | str, expected: str, got: str):
        super().__init__(f"{path}: expected {expected}, got {got}")
        self.path, self.expected, self.got = path, expected, got


def chunk_index(name: str) -> int | None:
    m = re.fullmatch(r"chunk_(\d+)\.npz", name)
    return int(m.group(1)) if m else None


def check_header(path: Path, head: object, schema: str) -> dict:
    if not isinstance(head, dict) or head.get("schema") != schema:
        got = head.get("schema") if isinstance(head, dict) else type(head).__name__
        raise BufferFileError(path, f"schema {schema!r}", repr(got))
    for key in ("obs_dim", "act_dim"):
        if key not in head:
            raise BufferFileError(path, f"key {key}", "none")
        if not isinstance(head[key], int) or isinstance(head[key], bool) or head[key] < 1:
            raise BufferFileError(path, f"{key}: a positive integer", repr(head[key]))
    return head


def entry_ok(e: object) -> bool:
    return isinstance(e, dict) and all(isinstance(e.get(k), t) for k, t in _ENTRY.items())


def read_journal(path: Path) -> tuple[dict, list[dict]]:
    """(header, chunk entries) from the complete lines of a journal; a torn last line (a kill
    mid-append) is left out (the next append cuts it off)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise BufferFileError(path, "a buffer manifest", "no such file") from None
    *lines, tail = raw.split(b"\n")  # every complete line ends in a newline
    if tail:
        log.warning("%s: left out a torn last line (%d bytes) of an interrupted append", path, len(tail))
    rows: list[tuple[int, object]] = []  # (line number, parsed), blank lines skipped
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append((i, json.loads(line)))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BufferFileError(
                path, f"line {i}: a JSON object", repr(line[:40].decode(errors="replace"))
            ) from None
    if not rows:
        raise BufferFileError(path, "a buffer manifest journal (schema line first)", "an empty file")
    head = check_header(path, rows[0][1], SCHEMA)
    for i, e in rows[1:]:
        if not entry_ok(e):
            raise BufferFileError(path, f"line {i}: a chunk {{file, count, sha256}}", repr(e)[:80])
    return head, [e for _, e in rows[1:]]  # type: ignore[misc]


def read_manifest_v1(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BufferFileError(path, "a JSON buffer manifest", f"unparsable data ({err})") from None
    check_header(path, manifest, SCHEMA_V1)
    chunks = manifest.get("chunks")
    if not isinstance(chunks, list) or not all(entry_ok(e) for e in chunks):
        raise BufferFileError(path, "chunks: a list of {file, count, sha256}", repr(chunks)[:80])
    return manifest
