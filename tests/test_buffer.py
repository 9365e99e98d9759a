"""Replay buffer: columns, sampling, holdout split, persistence and crash recovery (kill -9)."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from robot_mbrl.data.buffer import BufferConfig, BufferFileError, ReplayBuffer


def _fill(buf: ReplayBuffer, start: int, n: int) -> None:
    """Row i carries i in every column, so any torn or shuffled row is detectable."""
    for i in range(start, start + n):
        buf.add(
            np.full(3, i), np.full(1, -i), float(i), np.full(3, i + 0.5), i % 7 == 0, False, 0.01 * i, i // 10
        )


def _check_rows(buf: ReplayBuffer, n: int) -> None:
    a = buf.arrays()
    i = np.arange(n)
    assert len(buf) == n
    np.testing.assert_array_equal(a["obs"], np.repeat(i[:, None], 3, 1).astype(np.float32))
    np.testing.assert_array_equal(a["act"][:, 0], -i.astype(np.float32))
    np.testing.assert_array_equal(a["next_obs"][:, 2], (i + 0.5).astype(np.float32))
    np.testing.assert_array_equal(a["terminated"], i % 7 == 0)
    np.testing.assert_array_equal(a["episode_id"], i // 10)
    np.testing.assert_allclose(a["stamp_s"], 0.01 * i)


def test_columns_since_sample_split():
    buf = ReplayBuffer(3, 1, cfg=BufferConfig(initial_capacity=4))  # forces growth
    _fill(buf, 0, 50)
    _check_rows(buf, 50)
    fresh = buf.since(40)
    assert fresh["obs"].shape == (10, 3) and fresh["reward"][0] == 40.0
    with pytest.raises(ValueError):
        fresh["obs"][0, 0] = 1.0  # read-only views
    s1 = buf.sample(32, np.random.default_rng(0))
    s2 = buf.sample(32, np.random.default_rng(0))
    np.testing.assert_array_equal(s1["obs"], s2["obs"])
    assert np.all(s1["next_obs"][:, 0] == s1["obs"][:, 0] + 0.5)  # rows stay aligned
    tr, ho = buf.split_holdout(0.2, seed=1)
    assert len(ho) == 10 and len(tr) == 40 and not set(tr) & set(ho)
    tr2, ho2 = buf.split_holdout(0.2, seed=1, max_holdout=4)
    assert len(ho2) == 4 and len(tr2) == 46


def test_persist_reopen_and_append(tmp_path):
    d = tmp_path / "buf"
    with ReplayBuffer(3, 1, d, BufferConfig(flush_interval_s=1e9)) as buf:
        _fill(buf, 0, 25)
        buf.flush()
        _fill(buf, 25, 5)
    lines = (d / "manifest.jsonl").read_text().splitlines()  # the schema line, then one per chunk
    assert json.loads(lines[0])["schema"] == "robot_mbrl.buffer/2" and len(lines) == 3
    buf = ReplayBuffer.open(d)
    _check_rows(buf, 30)
    _fill(buf, 30, 10)
    buf.close()
    _check_rows(ReplayBuffer.open(d), 40)
    with pytest.raises(FileExistsError):
        ReplayBuffer(3, 1, d)


def test_corrupt_truncated_foreign_files_give_one_line_errors(tmp_path):
    d = tmp_path / "buf"
    with ReplayBuffer(3, 1, d) as buf:
        _fill(buf, 0, 10)
    chunk = d / "chunk_000000.npz"
    good = chunk.read_bytes()
    chunk.write_bytes(good[: len(good) // 2])
    with pytest.raises(BufferFileError, match="chunk_000000.npz: expected sha256") as err:
        ReplayBuffer.open(d)
    assert "\n" not in str(err.value)
    chunk.write_bytes(good)
    journal = d / "manifest.jsonl"
    head, entry = journal.read_text().splitlines()
    for text, needle in [
        ("", "manifest.jsonl: expected a buffer manifest journal (schema line first), got an empty file"),
        (f"{head}\n{{not json\n{entry}\n", "manifest.jsonl: expected line 2: a JSON object, got '{not json'"),
        (f'{head}\n{entry[:-1]}, "count": "ten"}}\n', "expected line 2: a chunk {file, count, sha256}"),
        (head.replace("/2", "/9") + "\n", "expected schema 'robot_mbrl.buffer/2', got 'robot_mbrl.buffer/9'"),
        (head.replace('"obs_dim": 3', '"obs_dim": 0') + "\n", "obs_dim: a positive integer, got 0"),
    ]:
        journal.write_text(text)
        with pytest.raises(BufferFileError, match=re.escape(needle)) as err:
            ReplayBuffer.open(d)
        assert "\n" not in str(err.value)
    journal.unlink()  # a buffer written by an earlier version: manifest.json, schema /1
    (d / "manifest.json").write_text('{"schema": "robot_mbrl.buff')
    with pytest.raises(BufferFileError, match="manifest.json: expected a JSON buffer manifest"):
        ReplayBuffer.open(d)
    for bad, needle in [
        ({"obs_dim": "five"}, "obs_dim: a positive integer, got 'five'"),
        ({"chunks": None}, "chunks: a list of {file, count, sha256}, got None"),
        ({"chunks": [{"file": "chunk_000000.npz", "count": 10}]}, "chunks: a list of {file, count, sha256}"),
    ]:
        manifest = {"schema": "robot_mbrl.buffer/1", "obs_dim": 3, "act_dim": 1, "chunks": [], **bad}
        (d / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(BufferFileError, match=re.escape(needle)):
            ReplayBuffer.open(d)
    (d / "manifest.json").write_text('{"schema": "something/else"}')
    with pytest.raises(BufferFileError, match="expected schema"):
        ReplayBuffer.open(d)
    with pytest.raises(BufferFileError, match="no such file"):
        ReplayBuffer.open(tmp_path / "nowhere")


def test_orphan_temp_and_chunk_files_are_ignored(tmp_path):
    d = tmp_path / "buf"
    with ReplayBuffer(3, 1, d) as buf:
        _fill(buf, 0, 10)
    (d / ".chunk_000001.npz.abc.tmp").write_bytes(b"half a chunk")
    (d / "chunk_000001.npz").write_bytes(b"written before the manifest was")
    buf = ReplayBuffer.open(d)
    _check_rows(buf, 10)
    _fill(buf, 10, 3)
    buf.close()  # the new chunk goes past the orphan's name
    _check_rows(ReplayBuffer.open(d), 13)
    assert (d / "chunk_000001.npz").read_bytes() == b"written before the manifest was"


def test_a_torn_journal_line_is_left_out_and_appending_goes_on(tmp_path, caplog):
    d = tmp_path / "buf"
    with ReplayBuffer(3, 1, d, BufferConfig(flush_interval_s=1e9)) as buf:
        for start in (0, 10):
            _fill(buf, start, 10)
            buf.flush()
    journal = d / "manifest.jsonl"
    journal.write_bytes(journal.read_bytes()[:-20])  # killed mid-append of the second chunk's line
    buf = ReplayBuffer.open(d)
    assert "torn last line" in caplog.text
    _check_rows(buf, 20)  # its line never completed, but its chunk did: recovered, not lost
    assert "chunk_000001.npz: recovered 10 rows" in caplog.text
    _fill(buf, 20, 5)
    buf.close()  # the journal is written anew first (it lists the recovered chunk), then the new rows
    caplog.clear()
    _check_rows(ReplayBuffer.open(d), 25)
    assert "recovered" not in caplog.text and "torn" not in caplog.text


def test_a_chunk_whose_journal_line_a_kill_prevented_is_recovered_and_a_broken_one_kept(tmp_path, caplog):
    d = tmp_path / "buf"
    with ReplayBuffer(3, 1, d, BufferConfig(flush_interval_s=1e9)) as buf:
        for start in (0, 10, 20):
            _fill(buf, start, 10)
            buf.flush()
    journal = d / "manifest.jsonl"
    journal.write_text("".join(journal.read_text().splitlines(keepends=True)[:-2]))  # the last 2 lines lost
    (d / "chunk_000002.npz").write_bytes((d / "chunk_000002.npz").read_bytes()[:100])  # and one chunk broken
    ReplayBuffer.open(d).close()  # only read: nothing written
    assert len(journal.read_text().splitlines()) == 2
    buf = ReplayBuffer.open(d)
    _check_rows(buf, 20)  # chunk 1 recovered; chunk 2 left out with a warning, kept on disk
    assert "chunk_000002.npz: not in the journal and unreadable" in caplog.text
    _fill(buf, 20, 5)
    buf.close()
    assert (d / "chunk_000002.npz").exists() and (d / "chunk_000003.npz").exists()
    _check_rows(ReplayBuffer.open(d), 25)


def test_a_buffer_written_by_the_previous_version_opens_and_is_converted(tmp_path):
    d = tmp_path / "buf"
    with ReplayBuffer(3, 1, d, BufferConfig(flush_interval_s=1e9)) as buf:
        for start in (0, 10):
            _fill(buf, start, 10)
            buf.flush()
    head, *entries = [json.loads(x) for x in (d / "manifest.jsonl").read_text().splitlines()]
    (d / "manifest.jsonl").unlink()  # as the previous version wrote it: one JSON document
    (d / "manifest.json").write_text(json.dumps({**head, "schema": "robot_mbrl.buffer/1", "chunks": entries}))
    ReplayBuffer.open(d).close()  # a job that only reads (run --checkpoint) writes nothing
    assert not (d / "manifest.jsonl").exists() and (d / "manifest.json").exists()
    buf = ReplayBuffer.open(d)
    _check_rows(buf, 20)
    _fill(buf, 20, 5)
    buf.close()  # the first rows added: the journal is written first, then their chunk
    assert (d / "manifest.jsonl").exists() and not (d / "manifest.json").exists()
    _check_rows(ReplayBuffer.open(d), 25)


def test_interval_flushes_do_not_wait_for_the_disk_and_their_errors_surface(tmp_path, monkeypatch):
    """The flush that add() makes inside a control tick only queues the write; flush() and close()
    wait for it; a failed background write is raised in the caller's thread, never lost."""
    import threading

    import robot_mbrl.data.buffer as mod

    gate, real = threading.Event(), mod.atomic_write_bytes

    def slow_disk(path, data):
        assert gate.wait(10)
        real(path, data)

    monkeypatch.setattr(mod, "atomic_write_bytes", slow_disk)
    d = tmp_path / "buf"
    buf = ReplayBuffer(3, 1, d, BufferConfig(flush_interval_s=0.0))
    adder = threading.Thread(target=_fill, args=(buf, 0, 5))
    adder.start()
    adder.join(5)
    assert not adder.is_alive()  # five interval flushes queued while the disk is stuck
    assert not (d / "chunk_000000.npz").exists()
    gate.set()
    buf.close()
    _check_rows(ReplayBuffer.open(d), 5)
    assert not [t for t in threading.enumerate() if t.name == f"writer:buffer {d}"]  # close() ends it

    def full_disk(path, data):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(mod, "atomic_write_bytes", full_disk)
    buf = ReplayBuffer.open(d, cfg=BufferConfig(flush_interval_s=0.0))
    _fill(buf, 5, 1)
    with pytest.raises(OSError, match="background write failed: .*No space left on device"):
        buf.flush()


_CHILD = textwrap.dedent(
    """
    import sys, numpy as np
    from robot_mbrl.data.buffer import BufferConfig, ReplayBuffer
    buf = ReplayBuffer(3, 1, sys.argv[1], BufferConfig(flush_interval_s=1e9))
    i = 0
    while True:
        for _ in range(int(sys.argv[2])):
            buf.add(np.full(3, i), np.full(1, -i), float(i), np.full(3, i + 0.5), i % 7 == 0, False, 0.01 * i, i // 10)
            i += 1
        buf.flush()
        sys.stdout.write(f"{i}\\n")
        sys.stdout.flush()
    """
)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_9_keeps_every_flushed_transition(tmp_path, seed):
    rng = np.random.default_rng(seed)
    d = tmp_path / "buf"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(d), str(int(rng.integers(1, 40)))],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    flushed = 0
    try:
        for _ in range(int(rng.integers(5, 60))):
            flushed = int(child.stdout.readline())
        time.sleep(float(rng.uniform(0, 0.02)))  # kill at a random point, likely mid-flush
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    buf = ReplayBuffer.open(d)
    assert len(buf) >= flushed > 0
    _check_rows(buf, len(buf))


_CHILD_INTERVAL = textwrap.dedent(
    """
    import sys, time, numpy as np
    from robot_mbrl.data.buffer import BufferConfig, ReplayBuffer
    buf = ReplayBuffer(3, 1, sys.argv[1], BufferConfig(flush_interval_s=0.002))
    i = 0
    while True:  # a control loop: the interval flushes run on the background writer
        buf.add(np.full(3, i), np.full(1, -i), float(i), np.full(3, i + 0.5), i % 7 == 0, False, 0.01 * i, i // 10)
        i += 1
        if i % 50 == 0:
            sys.stdout.write(f"{i}\\n")
            sys.stdout.flush()
        time.sleep(0.0002)
    """
)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_9_during_background_flushes_leaves_a_clean_prefix(tmp_path, seed):
    """Killed while the writer thread is mid-chunk or mid-journal-line: the buffer opens, every row
    read back is the row that was written (a prefix), and appending goes on."""
    rng = np.random.default_rng(seed)
    d = tmp_path / "buf"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD_INTERVAL, str(d)], stdout=subprocess.PIPE, text=True
    )
    try:
        for _ in range(int(rng.integers(4, 20))):
            child.stdout.readline()
        time.sleep(float(rng.uniform(0, 0.01)))
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    buf = ReplayBuffer.open(d)
    assert len(buf) > 0
    _check_rows(buf, len(buf))
    n = len(buf)
    _fill(buf, n, 3)
    buf.close()
    _check_rows(ReplayBuffer.open(d), n + 3)


def test_an_episode_cut_short_ends_where_the_next_begins():
    """A kill mid-episode leaves rows with no truncated flag; the next episode's first row must not
    become their successor in n-step or value targets."""
    buf = ReplayBuffer(3, 1)
    for ep, n in ((0, 4), (1, 3)):  # episode 0 killed after 4 rows: no end flag
        for i in range(n):
            z = np.full(3, float(i))
            buf.add(z, np.zeros(1), 0.0, z + 1, False, ep == 1 and i == n - 1, 0.0, ep)
    a = buf.arrays()
    assert a["truncated"].tolist() == [False, False, False, True, False, False, True]
    assert not a["truncated"].flags.writeable
    assert buf.since(4)["truncated"].tolist() == [False, False, True]


def test_a_tick_left_out_mid_episode_breaks_the_chain_for_returns_and_segments():
    """A tick the robot did not vouch for (a lost STATE frame) is left out: the rows on either side
    share an episode, but the second does not start where the first ended. n-step value targets
    summed across it (one reward missing, the discount a tick short) and the gate's calibration
    paired actions with the wrong states; the row before the gap is now truncated, as at a seam."""
    from robot_mbrl.agents.monitor_calibration import commission_windows, segments

    buf = ReplayBuffer(3, 1)
    for i in (0, 1, 2, 3, 5, 6, 7, 8):  # tick 4's transition (s4 -> s5) left out
        buf.add(
            np.full(3, float(i)),
            np.full(1, i / 10),
            float(i),
            np.full(3, float(i + 1)),
            False,
            i == 8,
            0.0,
            0,
        )
    a = buf.arrays()
    assert a["truncated"].tolist() == [False, False, False, True, False, False, False, True]
    obs0, act, nxt = segments(a, np.arange(len(buf)), 3)
    assert obs0[:, 0].tolist() == [0.0, 1.0, 5.0, 6.0]  # no window spans the gap
    assert np.all(nxt[:, -1, 0] == obs0[:, 0] + 3) and np.allclose(
        act[:, :, 0] * 10, obs0[:, :1] + np.arange(3)
    )
    ref = {f"commission_{k}": a[c] for k, c in (("obs", "obs"), ("act", "act"), ("next_obs", "next_obs"),
                                                ("episode", "episode_id"))}  # fmt: skip
    assert commission_windows(ref, 3)[0][:, 0].tolist() == [0.0, 1.0, 5.0, 6.0]


def test_salvage_leaves_out_only_the_corrupt_chunk_and_appends_safely(tmp_path, caplog):
    d = tmp_path / "buf"
    with ReplayBuffer(3, 1, d, cfg=BufferConfig(flush_interval_s=1e9)) as buf:
        for start in (0, 10, 20):  # three chunks of 10 rows
            _fill(buf, start, 10)
            buf.flush()
    middle = d / "chunk_000001.npz"
    middle.write_bytes(middle.read_bytes()[:100])
    with pytest.raises(BufferFileError, match="--salvage-buffer continues without its rows"):
        ReplayBuffer.open(d)
    buf = ReplayBuffer.open(d, salvage=True)
    assert len(buf) == 20 and "left out 10 rows" in caplog.text
    assert buf.arrays()["reward"].tolist() == [float(i) for i in (*range(10), *range(20, 30))]
    assert (d / "chunk_000001.npz.corrupt").exists()  # kept for a person to look at
    _fill(buf, 30, 5)
    buf.close()  # the new chunk must not overwrite chunk 2
    again = ReplayBuffer.open(d)
    assert again.arrays()["reward"].tolist() == [float(i) for i in (*range(10), *range(20, 35))]


def _three_chunks(d) -> list[str]:
    """A buffer of three 10-row chunks (rows 0-29) in ``d``; its journal's lines."""
    from robot_mbrl.data.buffer import MANIFEST

    with ReplayBuffer(3, 1, d, cfg=BufferConfig(flush_interval_s=1e9)) as buf:
        for start in (0, 10, 20):
            _fill(buf, start, 10)
            buf.flush()
    return (d / MANIFEST).read_text().splitlines()


def test_a_damaged_journal_line_never_costs_intact_chunks(tmp_path, caplog):
    """The journal disagreeing with a chunk whose checksum is good means the journal is damaged:
    a wrong count blamed the chunk and --salvage-buffer then set its rows aside; a wrong dimension
    in the header set every chunk aside (the whole buffer) and still refused. Now a count is taken
    from the chunk (WARNING, the journal mended at the next write), a header is blamed on itself
    and never salvaged; a stray copy of a chunk under the next name is not adopted as data."""
    import json as _json

    from robot_mbrl.data.buffer import MANIFEST, BufferFileError

    d = tmp_path / "buf"
    journal = _three_chunks(d)
    line = _json.loads(journal[2])
    (d / MANIFEST).write_text(
        "\n".join([*journal[:2], _json.dumps({**line, "count": 3}), *journal[3:]]) + "\n"
    )
    buf = ReplayBuffer.open(d)
    _check_rows(buf, 30)
    assert "says 3 rows, the chunk (checksum good) holds 10" in caplog.text
    _fill(buf, 30, 2)
    buf.close()
    _check_rows(ReplayBuffer.open(d), 32)  # mended
    head = _json.loads(journal[0])
    rest = (d / MANIFEST).read_text().splitlines()[1:]
    (d / MANIFEST).write_text("\n".join([_json.dumps({**head, "obs_dim": 7}), *rest]) + "\n")
    for salvage in (False, True):
        with pytest.raises(BufferFileError, match=r"manifest.jsonl: .*the journal's header line is damaged"):
            ReplayBuffer.open(d, salvage=salvage)
    assert not list(d.glob("*.corrupt"))  # nothing set aside
    (d / MANIFEST).write_text("\n".join([journal[0], *rest]) + "\n")
    last = sorted(d.glob("chunk_*.npz"))[-1]
    stray = d / f"chunk_{int(last.stem.split('_')[1]) + 1:06d}.npz"
    stray.write_bytes(last.read_bytes())
    caplog.clear()
    buf = ReplayBuffer.open(d)
    _check_rows(buf, 32)
    assert "do not follow the buffer's last" in caplog.text and stray.exists()


def test_a_damaged_checksum_in_the_journal_keeps_its_intact_chunk(tmp_path, caplog):
    """A journal line whose sha256 was damaged blamed its intact chunk: --salvage-buffer set its rows
    aside (kill trials). A chunk whose every column reads back whole (each .npz member carries its
    own CRC-32, checked as it is read) and has its shapes and count is kept and the line mended
    (WARNING) when the line's sha256 is a near miss of the chunk's; a copy of another chunk in its
    place, a chunk of another buffer, or a chunk with a changed data byte still fails its checksum and
    only a salvage leaves it out (review: another buffer's chunk was adopted)."""
    import json as _json

    from robot_mbrl.data.buffer import MANIFEST, BufferFileError

    d = tmp_path / "buf"
    journal = _three_chunks(d)
    line = _json.loads(journal[2])
    damaged = line["sha256"][:20] + ("0" if line["sha256"][20] != "0" else "1") + line["sha256"][21:]
    (d / MANIFEST).write_text(
        "\n".join([*journal[:2], _json.dumps({**line, "sha256": damaged}), *journal[3:]]) + "\n"
    )
    buf = ReplayBuffer.open(d)
    _check_rows(buf, 30)
    assert "the line is damaged, the chunk kept" in caplog.text
    _fill(buf, 30, 2)
    buf.close()
    assert _json.loads((d / MANIFEST).read_text().splitlines()[2])["sha256"] == line["sha256"]  # mended
    caplog.clear()
    _check_rows(ReplayBuffer.open(d), 32)
    assert "damaged" not in caplog.text
    chunk = d / line["file"]
    good = chunk.read_bytes()
    # a copy of the next chunk in its place: whole, but not what was written
    chunk.write_bytes((d / _json.loads(journal[3])["file"]).read_bytes())
    with pytest.raises(BufferFileError, match=rf"{line['file']}: expected sha256"):
        ReplayBuffer.open(d)
    chunk.write_bytes(good)
    # a chunk of another buffer (a wrong backup restored) in the first one's place: whole, its count, and
    # a first chunk always "follows"; its digest is nowhere near the line's
    other = tmp_path / "other"
    with ReplayBuffer(3, 1, other, cfg=BufferConfig(flush_interval_s=1e9)) as b:
        _fill(b, 1000, 10)
    first = d / _json.loads(journal[1])["file"]
    kept = first.read_bytes()
    first.write_bytes((other / "chunk_000000.npz").read_bytes())
    with pytest.raises(BufferFileError, match=rf"{first.name}: expected sha256"):
        ReplayBuffer.open(d)
    first.write_bytes(kept)
    with np.load(io.BytesIO(good)) as z:  # a byte of the stored observations, changed
        needle = z["obs"][3].tobytes()
    at = good.index(needle)
    bad = bytearray(good)
    bad[at] ^= 0x40
    chunk.write_bytes(bytes(bad))
    with pytest.raises(BufferFileError, match=rf"{line['file']}: expected sha256"):
        ReplayBuffer.open(d)
    buf = ReplayBuffer.open(d, salvage=True)
    kept = np.r_[0:10, 20:32]
    np.testing.assert_array_equal(buf.arrays()["obs"][:, 0], kept.astype(np.float32))
    assert (d / (line["file"] + ".corrupt")).exists()
