"""Replay buffer of real transitions, optionally persisted as append-only chunks that survive kill -9.

On disk (``directory``)::

    manifest.jsonl         a journal: line 1 the schema and dims, then one line {file, count, sha256}
                           per complete chunk, appended (and fsynced) after the chunk itself is on disk
    chunk_000000.npz ...   one .npz per flush with the rows added since the previous flush

A chunk is written to a temp file, fsynced and renamed (``runtime.files``) before the journal line
that lists it, so after a crash the journal only names complete chunks; a torn last line (a kill
mid-append) is left out. A complete chunk past the journal's last entry (a kill between the chunk and
its line) is recovered by :meth:`ReplayBuffer.open`; temp files are ignored. The flushes that :meth:`ReplayBuffer.add` makes on its interval run on a
background writer (``runtime.files.OrderedWriter``): the control tick that adds a transition pays
for an in-memory ``.npz`` (~0.2 ms), not for the fsyncs; :meth:`flush` and :meth:`close` return
once everything is on disk. Appending a line keeps a flush O(1) however long the robot has run
(rewriting a whole manifest took 6 ms at 1,000 chunks, 16 ms at 3,000, inside a 20 ms tick).
Buffers written as ``manifest.json`` (schema ``robot_mbrl.buffer/1``) open; the first rows added (or a
salvage) convert them to the journal first, so a job that only reads (``run --checkpoint``) writes
nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from robot_mbrl.data.journal import (
    MANIFEST,
    MANIFEST_V1,
    SCHEMA,
    BufferFileError,
    chunk_index,
    read_journal,
    read_manifest_v1,
)
from robot_mbrl.runtime.files import OrderedWriter, append_jsonl, atomic_write_bytes, atomic_write_text
from robot_mbrl.typedconfig import param

log = logging.getLogger(__name__)

# a journal line's sha256 differing from its chunk's in at most this many hex digits is a damaged line
# (bit rot changes one or two); an unrelated digest agrees in ~4 of 64, so differs in ~60
SHA_MENDABLE = 4


@dataclass(frozen=True)
class BufferConfig:
    flush_interval_s: float = param(
        1.0, "write pending transitions to disk at most this often (wall time)", ge=0
    )
    initial_capacity: int = param(4096, "rows allocated up front (the buffer grows by doubling)", ge=1)


def _fields(obs_dim: int, act_dim: int) -> dict[str, tuple[tuple[int, ...], type]]:
    """Column name -> (shape of one row, dtype)."""
    return {
        "obs": ((obs_dim,), np.float32),
        "act": ((act_dim,), np.float32),
        "reward": ((), np.float32),
        "next_obs": ((obs_dim,), np.float32),
        "terminated": ((), np.bool_),
        "truncated": ((), np.bool_),
        "stamp_s": ((), np.float64),
        "episode_id": ((), np.int64),
    }


def chain_breaks(obs: np.ndarray, next_obs: np.ndarray, episode: np.ndarray) -> np.ndarray:
    """``N - 1`` flags for time-ordered rows: row ``i``'s next row is not its successor (another
    episode, or a reading other than the one row ``i`` ended on: a left-out tick between them)."""
    if len(obs) < 2:
        return np.zeros(max(len(obs) - 1, 0), bool)
    return (episode[1:] != episode[:-1]) | np.any(obs[1:] != next_obs[:-1], axis=tuple(range(1, obs.ndim)))


class JournalDamaged(BufferFileError):
    """The journal disagrees with a chunk whose checksum is good: the journal is what is damaged."""


class ReplayBuffer:
    """Growable columns of transitions (``obs``, ``act``, ``reward``, ``next_obs``, ``terminated``,
    ``truncated``, ``stamp_s``, ``episode_id``), persisted to ``directory`` when one is given.

    Arrays returned by :meth:`arrays` and :meth:`since` are read-only views of the first ``len(self)``
    rows: ``N x S`` observations, ``N x A`` actions, ``N`` for the scalar columns.
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        directory: str | Path | None = None,
        cfg: BufferConfig | None = None,
        task: str | None = None,
    ):
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.task = task  # what the rows were collected on (config.task_id), kept in the journal's header
        self.cfg = cfg or BufferConfig()
        self._spec = _fields(obs_dim, act_dim)
        cap = self.cfg.initial_capacity
        self._cols = {k: np.zeros((cap,) + shape, dtype) for k, (shape, dtype) in self._spec.items()}
        self._n = 0
        self._flushed = 0
        self._chunks: list[dict] = []
        self._next_chunk = 0  # the index of the next chunk file
        self._stale_journal = False  # rewrite the journal at the first write (old manifest, recovered chunks)
        self._mended = False  # a journal line's count corrected from its (checksum-good) chunk
        self._last_flush = time.monotonic()
        self.directory = Path(directory) if directory is not None else None
        self._writer = OrderedWriter(f"buffer {self.directory}")
        if self.directory is not None:
            if (self.directory / MANIFEST).exists() or (self.directory / MANIFEST_V1).exists():
                raise FileExistsError(f"{self.directory}: a buffer already exists; use ReplayBuffer.open")
            self.directory.mkdir(parents=True, exist_ok=True)
            self._write_manifest()

    # -- adding ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._n

    def add(
        self,
        obs: np.ndarray,
        act: np.ndarray,
        reward: float,
        next_obs: np.ndarray,
        terminated: bool = False,
        truncated: bool = False,
        stamp_s: float = 0.0,
        episode_id: int = 0,
    ) -> None:
        """Append one transition; flushes to disk when ``flush_interval_s`` has elapsed."""
        if self._n == len(self._cols["obs"]):
            self._grow(2 * self._n)
        i = self._n
        row = dict(
            obs=obs, act=act, reward=reward, next_obs=next_obs, terminated=terminated,
            truncated=truncated, stamp_s=stamp_s, episode_id=episode_id,
        )  # fmt: skip
        for k, v in row.items():
            self._cols[k][i] = v
        self._n += 1
        if self.directory is not None and time.monotonic() - self._last_flush >= self.cfg.flush_interval_s:
            self._flush(wait=False)

    def extend(self, batch: dict[str, np.ndarray]) -> None:
        """Append many rows at once (``N x ...`` columns; missing flag/stamp/id columns default to 0)."""
        n = len(batch["obs"])
        if self._n + n > len(self._cols["obs"]):
            self._grow(max(2 * self._n, self._n + n))
        for k, col in self._cols.items():
            col[self._n : self._n + n] = batch[k] if k in batch else 0
        self._n += n
        if self.directory is not None and time.monotonic() - self._last_flush >= self.cfg.flush_interval_s:
            self._flush(wait=False)

    def _grow(self, cap: int) -> None:
        for k, col in self._cols.items():
            new = np.zeros((cap,) + col.shape[1:], col.dtype)
            new[: self._n] = col[: self._n]
            self._cols[k] = new

    # -- reading ---------------------------------------------------------------------------
    def arrays(self) -> dict[str, np.ndarray]:
        """Read-only views of every column (``N x ...``)."""
        return self.since(0)

    def since(self, index: int) -> dict[str, np.ndarray]:
        """Read-only views of the rows added at or after ``index`` (fresh data since a retrain).

        ``truncated`` also marks (in a copy) every row whose next row is not its successor: one of
        another episode (an episode cut short by a kill has no truncated row of its own), or one
        that does not start where it ended (a tick between them the robot did not vouch for, e.g.
        a lost STATE frame, was left out). Returns summed across such a seam would treat a later
        state as the successor, one tick's reward missing and the discount one tick short."""
        out = {}
        for k, col in self._cols.items():
            v = col[index : self._n].view()
            v.flags.writeable = False
            out[k] = v
        term = out["terminated"]
        seam = np.zeros(len(term), bool)
        seam[:-1] = (
            chain_breaks(out["obs"], out["next_obs"], out["episode_id"]) & ~term[:-1] & ~out["truncated"][:-1]
        )
        if seam.any():
            trunc = out["truncated"] | seam
            trunc.flags.writeable = False
            out["truncated"] = trunc
        return out

    def sample(self, batch: int, generator: np.random.Generator) -> dict[str, np.ndarray]:
        """``batch`` rows drawn uniformly with replacement (copies)."""
        if self._n == 0:
            raise ValueError("sample: expected a non-empty buffer, got 0 transitions")
        idx = generator.integers(0, self._n, size=batch)
        return {k: col[idx] for k, col in self._cols.items()}

    def split_holdout(
        self, fraction: float, seed: int, max_holdout: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Random (train_idx, holdout_idx) partition of ``range(len(self))``; holdout has
        ``round(fraction * N)`` rows, capped at ``max_holdout``."""
        perm = np.random.default_rng(seed).permutation(self._n)
        n_hold = int(round(fraction * self._n))
        if max_holdout is not None:
            n_hold = min(n_hold, max_holdout)
        return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])

    # -- persistence -----------------------------------------------------------------------
    def flush(self) -> None:
        """Write the rows added since the last flush as a new chunk and list it in the journal;
        returns once every write so far is on disk (raises the error of one that failed)."""
        self._flush(wait=True)

    def _flush(self, wait: bool) -> None:
        self._last_flush = time.monotonic()
        if self.directory is None:
            return
        if self._n > self._flushed:
            if self._stale_journal:  # an earlier version's manifest, or chunks it missed: journal first
                self._writer.submit(self._convert, list(self._chunks))
                self._stale_journal = False
            mem = io.BytesIO()
            np.savez(mem, **{k: col[self._flushed : self._n] for k, col in self._cols.items()})
            data = mem.getvalue()
            entry = {
                "file": f"chunk_{self._next_chunk:06d}.npz",
                "count": self._n - self._flushed,
                "sha256": hashlib.sha256(data).hexdigest(),
            }
            self._writer.submit(self._persist, data, entry)  # queued first: an interrupt leaves it to retry
            self._next_chunk += 1
            self._chunks.append(entry)
            self._flushed = self._n
        if wait:
            self._writer.drain()

    def _persist(self, data: bytes, entry: dict) -> None:  # on the writer's thread
        assert self.directory is not None
        atomic_write_bytes(self.directory / entry["file"], data)
        append_jsonl(self.directory / MANIFEST, entry)
        log.debug("buffer flushed %d transitions to %s", entry["count"], entry["file"])

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._writer.close()

    def __enter__(self) -> ReplayBuffer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write_manifest(self, chunks: list[dict] | None = None) -> None:
        """The whole journal, written atomically (a new buffer, a salvage, a converted manifest)."""
        assert self.directory is not None
        head = {"schema": SCHEMA, "obs_dim": self.obs_dim, "act_dim": self.act_dim}
        if self.task is not None:
            head["task"] = self.task
        lines = [json.dumps(x, sort_keys=True) for x in (head, *(self._chunks if chunks is None else chunks))]
        atomic_write_text(self.directory / MANIFEST, "\n".join(lines) + "\n")

    def _convert(self, chunks: list[dict]) -> None:  # on the writer's thread, before the next chunk
        assert self.directory is not None
        self._write_manifest(chunks)
        if (self.directory / MANIFEST_V1).exists():
            (self.directory / MANIFEST_V1).unlink()
            log.info("%s: %s converted to %s (schema %s)", self.directory, MANIFEST_V1, MANIFEST, SCHEMA)

    @classmethod
    def open(
        cls, directory: str | Path, cfg: BufferConfig | None = None, salvage: bool = False
    ) -> ReplayBuffer:
        """Load every complete chunk listed in ``directory/manifest.json`` and keep appending there.

        Raises :class:`BufferFileError` (a ``ValueError``) naming the file on a missing, truncated,
        foreign or corrupt manifest or chunk. ``salvage``: a missing or corrupt chunk is left out
        instead (renamed ``*.corrupt``, never deleted; the manifest rewritten without it, a warning
        says how many rows went): the rest of the real data stays usable.
        """
        directory = Path(directory)
        if (directory / MANIFEST).exists() or not (directory / MANIFEST_V1).exists():
            manifest, chunks = read_journal(directory / MANIFEST)
            v1 = None
        else:  # written by an earlier version: converted to the journal when rows are added
            v1 = directory / MANIFEST_V1
            manifest = read_manifest_v1(v1)
            chunks = manifest["chunks"]
        buf = cls.__new__(cls)
        task = manifest.get("task")
        ReplayBuffer.__init__(
            buf, manifest["obs_dim"], manifest["act_dim"], None, cfg, task if isinstance(task, str) else None
        )
        dropped = []
        for entry in chunks:
            try:
                rows = buf._read_chunk(directory / entry["file"], entry)
            except JournalDamaged:
                raise  # never salvaged: its chunks are intact, leaving them out would lose real data
            except BufferFileError as err:
                if not salvage:  # say how to go on without it
                    hint = "train --resume RUN --salvage-buffer continues without its rows"
                    raise BufferFileError(err.path, err.expected, f"{err.got}; {hint}") from None
                dropped.append((entry, err))
                continue
            buf.extend(rows)
            buf._chunks.append(entry)
        buf.directory = directory
        buf._writer = OrderedWriter(f"buffer {directory}")
        buf._flushed = buf._n
        for entry, err in dropped:
            bad = directory / entry["file"]
            if bad.exists():
                bad.rename(bad.with_name(bad.name + ".corrupt"))
            log.warning("buffer salvage: left out %d rows (%s)", entry["count"], err)
        recovered = buf._recover_unlisted(directory, chunks)
        # past every chunk file there is (listed, orphan or set aside as corrupt): none is overwritten
        used = [
            int(m.group(1)) for p in directory.iterdir() if (m := re.fullmatch(r"chunk_(\d+)\.npz.*", p.name))
        ]
        buf._next_chunk = max(used, default=-1) + 1
        buf._stale_journal = v1 is not None or recovered or buf._mended
        if dropped:  # the journal without them (salvage is asked for by a job that writes: --resume)
            buf._convert(buf._chunks)
            buf._stale_journal = False
        return buf

    def _recover_unlisted(self, directory: Path, listed: list[dict]) -> bool:
        """Chunks past the journal's last entry: a kill came after a chunk's (atomic, fsynced) write
        and before its journal line. Complete ones are loaded (the journal gets them at the next
        write); an unreadable one is left where it is, with a warning. True if any was loaded."""
        last = max((chunk_index(e["file"]) for e in listed), default=-1)
        found = sorted(
            (i, p) for p in directory.iterdir() if (i := chunk_index(p.name)) is not None and i > last
        )  # fmt: skip
        recovered = 0
        for _, path in found:
            data = path.read_bytes()
            try:
                with np.load(io.BytesIO(data), allow_pickle=False) as z:
                    count = len(z["obs"])
            except (zipfile.BadZipFile, ValueError, OSError, KeyError) as err:
                log.warning("%s: not in the journal and unreadable (%s): left out, kept on disk", path, err)
                continue
            entry = {"file": path.name, "count": count, "sha256": hashlib.sha256(data).hexdigest()}
            try:
                rows = self._read_chunk(path, entry)
            except BufferFileError as err:
                log.warning("%s: not in the journal and %s: left out, kept on disk", path, err.got)
                continue
            if not self._continues(rows) or any(e["sha256"] == entry["sha256"] for e in self._chunks):
                log.warning("%s: not in the journal and its rows do not follow the buffer's last (a copy of "
                            "another chunk?): left out, kept on disk", path)  # fmt: skip
                continue
            self.extend(rows)
            self._chunks.append(entry)
            self._flushed = self._n
            recovered += 1
            log.warning(
                "%s: recovered %d rows written before a kill could list them in the journal", path, count
            )
        return recovered > 0

    def _continues(self, rows: dict[str, np.ndarray]) -> bool:
        """Whether ``rows`` come after the buffer's last row: a later episode, or later in the same
        one (rows are appended in time order)."""
        if self._n == 0 or len(rows["episode_id"]) == 0:
            return True
        last = (int(self._cols["episode_id"][self._n - 1]), float(self._cols["stamp_s"][self._n - 1]))
        first = (int(rows["episode_id"][0]), float(rows["stamp_s"][0]))
        return first > last

    def _read_chunk(self, path: Path, entry: dict) -> dict[str, np.ndarray]:
        """The chunk's columns, checked against its journal ``entry``. A sha256 that disagrees with a
        chunk that reads back whole (each ``.npz`` member's CRC-32) is the line's damage only when it
        is a near miss of the chunk's (``SHA_MENDABLE`` hex digits differ at most: a damaged line;
        another chunk's digest agrees in ~4 of 64) and the rest agrees: the line's count and rows that
        follow the buffer's so far. Another chunk of this or another buffer in its place stays corrupt."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BufferFileError(path, "a chunk listed in the manifest", "no such file") from None
        digest = hashlib.sha256(data).hexdigest()
        listed = str(entry.get("sha256"))
        corrupt = BufferFileError(
            path,
            f"sha256 {listed[:12]}…",
            f"{digest[:12]}… over its {len(data)} bytes (corrupt or truncated)",
        )
        try:  # (every member's zip CRC-32 is checked as it is read: a changed data byte fails here)
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                cols = {k: z[k] for k in z.files}
        except (zipfile.BadZipFile, ValueError, OSError) as err:
            if digest != listed:
                raise corrupt from None
            raise BufferFileError(path, "an .npz chunk", f"unreadable data ({err})") from None
        n = len(cols["obs"]) if "obs" in cols and cols["obs"].ndim else entry["count"]
        for k, (shape, dtype) in self._spec.items():
            want = (n,) + shape
            if k not in cols or cols[k].shape != want or cols[k].dtype != dtype:
                got = "missing" if k not in cols else f"{cols[k].shape} {cols[k].dtype}"
                if digest != listed:
                    raise corrupt
                if k in cols and cols[k].shape[1:] != shape and k in ("obs", "act", "next_obs"):
                    # its checksum is good: the chunk is as written, the journal's header is not
                    raise JournalDamaged(
                        path.parent / MANIFEST,
                        f"the header's dimensions in its chunks (obs_dim {self.obs_dim}, act_dim {self.act_dim})",
                        f"{path.name} (checksum good) with column {k} {cols[k].shape}: the journal's header line "
                        "is damaged (mend it; its chunks are intact)",
                    )
                raise BufferFileError(path, f"column {k} of shape {want} {np.dtype(dtype)}", got)
        if digest != listed:  # every column whole (zip CRCs) and of its shape: the journal line is damaged?
            near = len(listed) == len(digest) and sum(map(str.__ne__, listed, digest)) <= SHA_MENDABLE
            if not near or n != entry["count"] or not self._continues(cols):
                raise corrupt
            log.warning("%s: its journal line's sha256 %s… is not the chunk's %s…, whose own zip checksums and "
                        "columns are good: the line is damaged, the chunk kept", path, listed[:12], digest[:12])  # fmt: skip
            entry["sha256"] = digest
            self._mended = True  # the journal is rewritten at the next write
        if n != entry["count"]:  # (checksum good: the chunk is as written, its journal line is not)
            log.warning("%s: its journal line says %d rows, the chunk (checksum good) holds %d: counting %d",
                        path, entry["count"], n, n)  # fmt: skip
            entry["count"] = n
            self._mended = True  # the journal is rewritten at the next write
        return cols
