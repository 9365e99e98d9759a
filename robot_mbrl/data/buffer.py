"""Replay buffer of real transitions, optionally persisted as append-only chunks that survive kill -9.

On disk (``directory``)::

    manifest.json          schema, dims, and the list of complete chunks {file, count, sha256}
    chunk_000000.npz ...   one .npz per flush with the rows added since the previous flush

Every file is written to a temp file, fsynced and renamed (``runtime.files``); a chunk is written
before the manifest that lists it, so after a crash the manifest only names complete chunks. Orphan
chunks (written, not yet listed) and temp files are ignored on :meth:`ReplayBuffer.open`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from robot_mbrl.runtime.files import atomic_write_bytes, atomic_write_json
from robot_mbrl.typedconfig import param

log = logging.getLogger(__name__)

SCHEMA = "robot_mbrl.buffer/1"
MANIFEST = "manifest.json"


class BufferFileError(ValueError):
    """A buffer file is missing, truncated, corrupt or foreign. ``str(err)`` is one line."""

    def __init__(self, path: Path | str, expected: str, got: str):
        super().__init__(f"{path}: expected {expected}, got {got}")
        self.path, self.expected, self.got = path, expected, got


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
    ):
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.cfg = cfg or BufferConfig()
        self._spec = _fields(obs_dim, act_dim)
        cap = self.cfg.initial_capacity
        self._cols = {k: np.zeros((cap,) + shape, dtype) for k, (shape, dtype) in self._spec.items()}
        self._n = 0
        self._flushed = 0
        self._chunks: list[dict] = []
        self._last_flush = time.monotonic()
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            if (self.directory / MANIFEST).exists():
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
            self.flush()

    def extend(self, batch: dict[str, np.ndarray]) -> None:
        """Append many rows at once (``N x ...`` columns; missing flag/stamp/id columns default to 0)."""
        n = len(batch["obs"])
        if self._n + n > len(self._cols["obs"]):
            self._grow(max(2 * self._n, self._n + n))
        for k, col in self._cols.items():
            col[self._n : self._n + n] = batch[k] if k in batch else 0
        self._n += n
        if self.directory is not None and time.monotonic() - self._last_flush >= self.cfg.flush_interval_s:
            self.flush()

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

        ``truncated`` also marks every row whose next row belongs to another episode (a copy): an
        episode cut short by a kill has no truncated row of its own, and returns summed across
        the seam would treat the next episode's first state as its successor."""
        out = {}
        for k, col in self._cols.items():
            v = col[index : self._n].view()
            v.flags.writeable = False
            out[k] = v
        ep, term = out["episode_id"], out["terminated"]
        seam = np.zeros(len(ep), bool)
        seam[:-1] = (ep[1:] != ep[:-1]) & ~term[:-1] & ~out["truncated"][:-1]
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
        """Write the rows added since the last flush as a new chunk, then the manifest listing it."""
        self._last_flush = time.monotonic()
        if self.directory is None or self._n == self._flushed:
            return
        k, listed = len(self._chunks), {c["file"] for c in self._chunks}
        while f"chunk_{k:06d}.npz" in listed or (self.directory / f"chunk_{k:06d}.npz.corrupt").exists():
            k += 1  # after a salvage the count no longer names a free file
        name = f"chunk_{k:06d}.npz"
        mem = io.BytesIO()
        np.savez(mem, **{k: col[self._flushed : self._n] for k, col in self._cols.items()})
        data = mem.getvalue()
        atomic_write_bytes(self.directory / name, data)
        self._chunks.append(
            {"file": name, "count": self._n - self._flushed, "sha256": hashlib.sha256(data).hexdigest()}
        )
        self._write_manifest()
        self._flushed = self._n
        log.debug("buffer flushed %d transitions to %s", self._chunks[-1]["count"], name)

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> ReplayBuffer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write_manifest(self) -> None:
        assert self.directory is not None
        atomic_write_json(
            self.directory / MANIFEST,
            {"schema": SCHEMA, "obs_dim": self.obs_dim, "act_dim": self.act_dim, "chunks": self._chunks},
        )

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
        path = directory / MANIFEST
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BufferFileError(path, "a buffer manifest", "no such file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BufferFileError(path, "a JSON buffer manifest", f"unparsable data ({err})") from None
        if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
            got = manifest.get("schema") if isinstance(manifest, dict) else type(manifest).__name__
            raise BufferFileError(path, f"schema {SCHEMA!r}", repr(got))
        missing = [k for k in ("obs_dim", "act_dim", "chunks") if k not in manifest]
        if missing:
            raise BufferFileError(path, "keys obs_dim, act_dim, chunks", f"no {', '.join(missing)}")
        for key in ("obs_dim", "act_dim"):
            if not isinstance(manifest[key], int) or isinstance(manifest[key], bool) or manifest[key] < 1:
                raise BufferFileError(path, f"{key}: a positive integer", repr(manifest[key]))
        chunks = manifest["chunks"]
        entry_ok = {"file": str, "count": int, "sha256": str}
        if not isinstance(chunks, list) or not all(
            isinstance(e, dict) and all(isinstance(e.get(k), t) for k, t in entry_ok.items()) for e in chunks
        ):
            raise BufferFileError(path, "chunks: a list of {file, count, sha256}", repr(chunks)[:80])
        buf = cls.__new__(cls)
        ReplayBuffer.__init__(buf, manifest["obs_dim"], manifest["act_dim"], None, cfg)
        dropped = []
        for entry in chunks:
            try:
                rows = buf._read_chunk(directory / entry["file"], entry)
            except BufferFileError as err:
                if not salvage:  # say how to go on without it
                    hint = "train --resume RUN --salvage-buffer continues without its rows"
                    raise BufferFileError(err.path, err.expected, f"{err.got}; {hint}") from None
                dropped.append((entry, err))
                continue
            buf.extend(rows)
            buf._chunks.append(entry)
        buf.directory = directory
        buf._flushed = buf._n
        for entry, err in dropped:
            bad = directory / entry["file"]
            if bad.exists():
                bad.rename(bad.with_name(bad.name + ".corrupt"))
            log.warning("buffer salvage: left out %d rows (%s)", entry["count"], err)
        if dropped:
            buf._write_manifest()
        return buf

    def _read_chunk(self, path: Path, entry: dict) -> dict[str, np.ndarray]:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BufferFileError(path, "a chunk listed in the manifest", "no such file") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"]:
            raise BufferFileError(
                path,
                f"sha256 {entry['sha256'][:12]}… ({len(data)} bytes)",
                f"{digest[:12]}… (corrupt or truncated)",
            )
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                cols = {k: z[k] for k in z.files}
        except (zipfile.BadZipFile, ValueError, OSError) as err:
            raise BufferFileError(path, "an .npz chunk", f"unreadable data ({err})") from None
        for k, (shape, dtype) in self._spec.items():
            want = (entry["count"],) + shape
            if k not in cols or cols[k].shape != want or cols[k].dtype != dtype:
                got = "missing" if k not in cols else f"{cols[k].shape} {cols[k].dtype}"
                raise BufferFileError(path, f"column {k} of shape {want} {np.dtype(dtype)}", got)
        return cols
