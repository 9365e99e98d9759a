"""Run directories: resolved config, per-episode metrics, events and the summary.

Layout (DESIGN.md): ``config.yaml``, ``metrics.jsonl`` (one line per episode), ``events.jsonl``
(every gate switch and alarm), ``timing.jsonl`` (each episode's plan and tick times, ms),
``summary.json``, ``checkpoint/``, ``buffer/``, ``plots/``.
Every file is written atomically or appended line by line with fsync, so a killed run leaves
readable files behind and ``--resume`` can continue it.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

from robot_mbrl.data.buffer import MANIFEST
from robot_mbrl.errors import RunDirError
from robot_mbrl.runtime.files import (
    OrderedWriter,
    append_jsonl,
    append_line,
    atomic_write_json,
    atomic_write_text,
    jsonl_line,
    read_jsonl,
)
from robot_mbrl.runtime.loop import percentiles_ms

log = logging.getLogger(__name__)

SUMMARY_KEYS = (
    "real_steps",
    "episodes",
    "returns",
    "final_return",
    "solved_at_step",
    "violations",
    "fallback_ticks",
    "ticks",
    "alarms",
    "plan_ms",
    "tick_ms",
    "deadline_misses",
    "wall_s",
    "stopped_by",
)

TIMING = "timing.jsonl"  # one line per episode: {"episode", "kind", "plan_ms": [...], "tick_ms": [...]}


def default_run_path(command: str, root: str | Path = "runs") -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(root) / f"{command}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = Path(root) / f"{command}-{stamp}-{n}"
    return path


class RunDir:
    """One run's folder. ``RunDir(path)`` creates it (or reopens it for ``--resume``) and holds an
    exclusive lock on it (``.lock``, released by :meth:`close` or when the process ends): a second
    process writing the same run would interleave its episodes with this one's and lose data.
    ``new=True``: refuse a directory that already holds a run."""

    def __init__(self, path: str | Path, new: bool = False):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"{self.path}: expected a run directory, got a file")
        if new and holds_run(self.path):
            raise RunDirError(
                f"{self.path}: expected a new run directory, got an existing run (choose another --out)"
            )
        if new and (foreign := foreign_files(self.path)):
            raise RunDirError(
                f"{self.path}: expected an empty or new folder for the run, got one holding {foreign[0]}"
                f"{f' and {len(foreign) - 1} more files' if len(foreign) > 1 else ''} (choose another --out)"
            )
        self.created = not self.path.exists()  # abandon() removes only a folder this job created
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except (NotADirectoryError, FileExistsError):
            raise RunDirError(f"{self.path}: expected a run directory, got a file on its path") from None
        self._lock = _lock(self.path / ".lock")
        self._writer = OrderedWriter(f"run {self.path}")

    def close(self) -> None:
        """Finish the queued writes, then release the run's lock (the files stay)."""
        try:
            self._writer.close()
        finally:
            if self._lock is not None:
                self._lock.close()
                self._lock = None

    def abandon(self) -> None:
        """The job failed: release the lock, and remove the folder if this job created it and nothing
        but its lock, its config, an empty buffer's manifest and empty folders went in (a rejected
        config or an unreachable robot leaves no empty run behind). Anything else in it is kept."""
        try:
            self.close()
        except OSError as err:  # the job's own error is the one to raise
            log.error("%s", err)
        if not self.created or not self.path.is_dir():
            return
        bare = {self.path / ".lock", self.path / "config.yaml", self.buffer / MANIFEST}
        for root, _dirs, files in os.walk(self.path):
            if any(Path(root, f) not in bare for f in files):  # a buffer chunk, metrics, a checkpoint...
                return
        shutil.rmtree(self.path, ignore_errors=True)
        log.info("%s: removed (the job failed before it recorded anything)", self.path)

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint"

    @property
    def buffer(self) -> Path:
        return self.path / "buffer"

    @property
    def plots(self) -> Path:
        p = self.path / "plots"
        p.mkdir(exist_ok=True)
        return p

    def write_config(self, resolved: dict) -> None:
        atomic_write_text(self.path / "config.yaml", CONFIG_MARK + yaml.safe_dump(resolved, sort_keys=False))

    def metric(self, record: dict) -> None:
        """Written at once, after the queued events (between episodes: an episode's line never
        reaches the disk before its alarms)."""
        self._writer.drain()
        append_jsonl(self.path / "metrics.jsonl", record)

    def event(self, record: dict) -> None:
        """Appended by a background writer (the gate logs inside control ticks; see OrderedWriter);
        the record is encoded here, so the caller may reuse it."""
        self._writer.submit(append_line, self.path / "events.jsonl", jsonl_line(record))

    def timing(self, record: dict) -> None:
        """An episode's per-tick times, queued like :meth:`event` (before its metrics line)."""
        self._writer.submit(append_line, self.path / TIMING, jsonl_line(record))

    def metrics(self) -> list[dict]:
        return read_jsonl(self.path / "metrics.jsonl")

    def timings(self) -> list[dict]:
        self._writer.drain()
        return read_jsonl(self.path / TIMING)

    def events(self) -> list[dict]:
        self._writer.drain()
        return read_jsonl(self.path / "events.jsonl")

    def write_summary(self, summary: dict) -> None:
        missing = [k for k in SUMMARY_KEYS if k not in summary]
        if missing:
            raise ValueError(f"summary.json: expected keys {missing}, got only {sorted(summary)}")
        atomic_write_json(self.path / "summary.json", summary)


@contextmanager
def run_dir(path: str | Path, new: bool = False) -> Iterator[RunDir]:
    """A job's :class:`RunDir`: closed when the job ends, :meth:`~RunDir.abandon`-ed when it fails."""
    run = RunDir(path, new=new)
    try:
        yield run
    except BaseException:
        run.abandon()
        raise
    run.close()


CONFIG_MARK = "# the resolved config of a robot-mbrl job (written by it)\n"


def foreign_files(path: str | Path) -> list[str]:
    """Files in ``path`` a job did not leave (a folder of the user's: a new job must not overwrite
    its config.yaml or plots): anything but a lock, an empty run skeleton or a config.yaml a job
    wrote (a job that failed to start leaves one). Ordered, relative."""
    p, out = Path(path), []
    if not p.is_dir():
        return out
    for f in sorted(p.rglob("*")):
        if f.is_dir():
            continue
        rel = f.relative_to(p).as_posix()
        if rel == ".lock" or rel == "buffer/manifest.jsonl":
            continue
        if rel == "config.yaml":
            try:
                with open(f, encoding="utf-8") as fh:
                    if fh.readline() == CONFIG_MARK:
                        continue
            except (OSError, UnicodeDecodeError):
                pass
        out.append(rel)
    return out


def holds_run(path: str | Path) -> bool:
    """Whether ``path`` holds a run's results (not only a config left by a job that failed to start):
    also the events or timings of one that ended before its first metrics line (a homing's switches)."""
    p = Path(path)
    if any((p / name).exists() for name in ("metrics.jsonl", "summary.json", "buffer", "checkpoint")):
        return True
    return any(
        (p / name).is_file() and (p / name).stat().st_size > 0 for name in ("events.jsonl", "timing.jsonl")
    )


def _lock(path: Path):  # noqa: ANN202 - an open file object
    """An exclusive, non-blocking advisory lock on ``path`` (its file stays open while held)."""
    f = open(path, "a+")  # noqa: SIM115 - held for the run's lifetime
    if fcntl is None:  # no advisory locks on this platform: nothing to hold
        return f
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise RunDirError(
            f"{path.parent}: expected a run directory no other process is writing, got one in use (pid {pid})"
        ) from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f


def stop_reason(err: BaseException) -> str:
    """What ended a job early, for summary.json's ``stopped_by``: the signal by name (SIGTERM arrives as
    ``SystemExit(143)`` from ``robot_mbrl.hal.robot.stop_on_signals``), else the error and its message."""
    if isinstance(err, KeyboardInterrupt):
        return "SIGINT (Ctrl-C)"
    if isinstance(err, SystemExit) and err.code == 128 + signal.SIGTERM:
        return "SIGTERM"
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


@dataclass
class Tally:
    """Accumulates what summary.json reports, across episodes (and across a resume)."""

    real_steps: int = 0
    returns: list[float] = field(default_factory=list)
    solved_at_step: int | None = None
    violations: int = 0
    fallback_ticks: int = 0
    ticks: int = 0
    alarms: list[dict] = field(default_factory=list)
    plan_s: list[float] = field(default_factory=list)
    tick_s: list[float] = field(default_factory=list)  # each control tick's work (this process's)
    deadline_misses: int = 0
    end_stop_hits: int = 0
    wall_s: float = 0.0
    since_s: float | None = None  # monotonic start of this process's part of the job (None: not running)
    on_fallback: bool | None = None  # the last tick's command was the fallback's (None: no tick yet)

    def elapsed_s(self) -> float:
        """Wall time of the job so far: the parts before a resume plus this process's."""
        return self.wall_s + (0.0 if self.since_s is None else time.monotonic() - self.since_s)

    def stop_clock(self) -> None:
        self.wall_s, self.since_s = self.elapsed_s(), None

    def summary(self, **extra) -> dict:
        out = {
            "real_steps": self.real_steps,
            "episodes": len(self.returns),
            "returns": [round(r, 4) for r in self.returns],
            "final_return": self.returns[-1] if self.returns else None,
            "solved_at_step": self.solved_at_step,
            "violations": self.violations,
            "fallback_ticks": self.fallback_ticks,
            "ticks": self.ticks,
            "alarms": self.alarms,
            "plan_ms": percentiles_ms(self.plan_s) if self.plan_s else None,  # None: nothing planned
            "tick_ms": percentiles_ms(self.tick_s),
            "deadline_misses": self.deadline_misses,
            "end_stop_hits": self.end_stop_hits,
            "wall_s": round(self.wall_s, 3),
            "stopped_by": None,  # the error or interrupt that ended the job early (its summary so far)
        }
        out.update(extra)
        return out
