"""What persisting real data costs the control tick that adds a transition.

    python benchmarks/bench_buffer.py [--chunks 10,1000,3000] [--flushes 20] [--dir DIR]

A buffer with N chunks on disk (one chunk per second of robot time at the default flush interval:
3,000 chunks is 50 minutes of data) gets ``--flushes`` more chunks of 50 rows (one second at
50 Hz). Rows, per N, ms per flush, p50 / max:

- ``previous: whole manifest`` (baseline, measured in the same run): what the previous version did
  inside the tick: the chunk written atomically, then the whole manifest (every chunk listed)
  rewritten atomically as one JSON document;
- ``journal, waited`` : :meth:`ReplayBuffer.flush` (chunk + one appended journal line, waiting for
  the disk; what ``flush()`` between episodes costs);
- ``journal, in the tick`` : the :meth:`ReplayBuffer.add` call that triggers an interval flush,
  which only queues the write on the background writer: the tick's cost.

Also an ``events.jsonl`` record: appended with fsync in the tick (previous) vs queued by
``RunDir.event``. ``--dir`` picks the storage to measure (default: a temp folder).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from robot_mbrl.data.buffer import BufferConfig, ReplayBuffer
from robot_mbrl.runtime.files import append_jsonl, atomic_write_bytes, atomic_write_json
from robot_mbrl.runtime.rundir import RunDir

ROWS = 50  # one second at 50 Hz


def _rows(buf: ReplayBuffer, n: int) -> None:
    o, a = np.zeros(6, np.float32), np.zeros(1, np.float32)
    for _ in range(n):
        buf.add(o, a, 0.0, o)


def _fill(directory: Path, chunks: int) -> ReplayBuffer:
    buf = ReplayBuffer(6, 1, directory, BufferConfig(flush_interval_s=1e9))
    for _ in range(chunks):
        _rows(buf, ROWS)
        buf.flush()
    return buf


def previous_flush(buf: ReplayBuffer, directory: Path, k: int) -> float:
    """The previous version's in-tick flush: chunk, then the whole manifest rewritten."""
    import io

    cols = buf.arrays()
    t0 = time.perf_counter()
    mem = io.BytesIO()
    np.savez(mem, **{c: v[-ROWS:] for c, v in cols.items()})
    atomic_write_bytes(directory / f"prev_{k:06d}.npz", mem.getvalue())
    manifest = {"schema": "robot_mbrl.buffer/1", "obs_dim": 6, "act_dim": 1, "chunks": buf._chunks}
    atomic_write_json(directory / "prev_manifest.json", manifest)
    return time.perf_counter() - t0


def bench(chunks: int, flushes: int, root: Path) -> dict[str, np.ndarray]:
    d = Path(tempfile.mkdtemp(dir=root))
    out: dict[str, list[float]] = {
        "previous: whole manifest": [],
        "journal, waited": [],
        "journal, in the tick": [],
    }
    buf = _fill(d / "buf", chunks)
    for k in range(flushes):
        out["previous: whole manifest"].append(previous_flush(buf, d, k))
        _rows(buf, ROWS)
        t0 = time.perf_counter()
        buf.flush()
        out["journal, waited"].append(time.perf_counter() - t0)
    o, a = np.zeros(6, np.float32), np.zeros(1, np.float32)
    for _ in range(flushes):
        buf.cfg = BufferConfig(flush_interval_s=1e9)
        _rows(buf, ROWS - 1)
        buf.cfg = BufferConfig(flush_interval_s=0.0)  # the next add() is the one that flushes
        t0 = time.perf_counter()
        buf.add(o, a, 0.0, o)
        out["journal, in the tick"].append(time.perf_counter() - t0)
        buf._writer.drain()  # the next flush is a second later on a robot: the disk is idle again
    buf.close()
    return {k: np.asarray(v) * 1e3 for k, v in out.items()}


def events(n: int, root: Path) -> dict[str, np.ndarray]:
    d = Path(tempfile.mkdtemp(dir=root))
    rec = {"kind": "switch", "tick": 1, "trigger": "disagreement", "score": 1.0, "applied": [0.1]}
    sync, queued = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        append_jsonl(d / "prev_events.jsonl", rec)
        sync.append(time.perf_counter() - t0)
    run = RunDir(d / "run")
    for _ in range(n):
        t0 = time.perf_counter()
        run.event(rec)
        queued.append(time.perf_counter() - t0)
        run._writer.drain()
    run.close()
    return {
        "previous: appended in the tick": np.asarray(sync) * 1e3,
        "queued (RunDir.event)": np.asarray(queued) * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", default="10,1000,3000")
    ap.add_argument("--flushes", type=int, default=20)
    ap.add_argument("--dir", default=None, help="where to write (the storage to measure)")
    args = ap.parse_args()
    try:
        counts = [int(x) for x in args.chunks.split(",")]
    except ValueError:
        ap.error(f"--chunks: expected comma-separated integers, got {args.chunks!r}")
    if args.flushes < 1 or any(n < 0 for n in counts):
        ap.error(f"--chunks / --flushes: expected >= 0 / >= 1, got {args.chunks!r} / {args.flushes}")
    root = Path(args.dir or tempfile.mkdtemp())
    root.mkdir(parents=True, exist_ok=True)
    print(f"## Persisting real data from the control tick ({platform.node()}, {time.strftime('%Y-%m-%d')}, "
          f"{root}, {args.flushes} flushes of {ROWS} rows per row)\n")  # fmt: skip
    print("| chunks on disk | previous: whole manifest (ms p50 / max) | journal, waited | journal, in the tick | "
          "tick: previous / now |")  # fmt: skip
    print("|---|---|---|---|---|")
    for n in counts:
        r = bench(n, args.flushes, root)
        cells = " | ".join(f"{np.median(v):.2f} / {v.max():.2f}" for v in r.values())
        ratio = np.median(r["previous: whole manifest"]) / np.median(r["journal, in the tick"])
        print(f"| {n} | {cells} | {ratio:.0f}x |")
    e = events(args.flushes, root)
    print("\n| events.jsonl record | ms p50 / max |\n|---|---|")
    for k, v in e.items():
        print(f"| {k} | {np.median(v):.3f} / {v.max():.3f} |")


if __name__ == "__main__":
    main()
