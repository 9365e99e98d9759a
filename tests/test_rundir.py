"""Run directories: one writer at a time, torn JSON lines repaired on the next append."""

from __future__ import annotations

import json
import math
import os

import pytest

from robot_mbrl.errors import RunDirError
from robot_mbrl.runtime.files import append_jsonl, atomic_write_bytes, read_jsonl
from robot_mbrl.runtime.rundir import RunDir, run_dir


def test_a_torn_last_line_is_cut_before_the_next_record(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"episode": 0})
    with open(path, "a") as f:  # a writer killed mid-line
        f.write('{"episode": 1, "ret')
    assert read_jsonl(path) == [{"episode": 0}]  # readers skip it
    append_jsonl(path, {"episode": 1})
    assert read_jsonl(path) == [{"episode": 0}, {"episode": 1}]
    assert "torn last line" in caplog.text
    path.write_text('{"only": "torn')  # no complete line at all
    append_jsonl(path, {"episode": 2})
    assert read_jsonl(path) == [{"episode": 2}]


def test_non_finite_numbers_are_written_as_null(tmp_path):
    path = tmp_path / "events.jsonl"
    append_jsonl(path, {"score": math.nan, "proposed": [1.0, math.inf], "nested": {"x": -math.inf}})
    line = path.read_text().strip()
    json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert read_jsonl(path) == [{"nested": {"x": None}, "proposed": [1.0, None], "score": None}]


def test_one_writer_per_run_directory(tmp_path):
    first = RunDir(tmp_path / "run")
    with pytest.raises(RunDirError, match="in use"):
        RunDir(tmp_path / "run")
    first.close()
    RunDir(tmp_path / "run").close()  # free again


def test_a_file_or_an_existing_run_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RunDirError, match="got a file"):
        RunDir(tmp_path / "afile")
    with pytest.raises(RunDirError, match="got a file"):
        RunDir(tmp_path / "afile" / "sub")
    run = RunDir(tmp_path / "run")
    run.write_config({"seed": 0})
    run.metric({"kind": "learn"})
    run.close()
    with pytest.raises(RunDirError, match="existing run"):
        RunDir(tmp_path / "run", new=True)
    # a job that died in its first homing left only its config and the homing's switches: a record too
    # (a new run appended its events to them)
    early = RunDir(tmp_path / "early")
    early.write_config({"seed": 0})
    early.close()
    RunDir(tmp_path / "early", new=True).close()  # a config alone: the job never started
    (tmp_path / "early" / "events.jsonl").write_text('{"kind": "switch", "phase": "homing"}\n')
    with pytest.raises(RunDirError, match="existing run"):
        RunDir(tmp_path / "early", new=True)


def test_a_new_run_never_overwrites_a_users_files(tmp_path):
    """--out into a folder of the user's replaced its hand-written config.yaml and plots; a folder a
    job left (its own config.yaml, a lock) is still reused."""
    mine = tmp_path / "myrig"
    (mine / "plots").mkdir(parents=True)
    (mine / "config.yaml").write_text("# hand tuned\nseed: 3\n")
    with pytest.raises(
        RunDirError, match=r"expected an empty or new folder for the run, got one holding config.yaml"
    ):
        RunDir(mine, new=True)
    (mine / "config.yaml").unlink()
    (mine / "plots" / "returns.png").write_bytes(b"png")
    with pytest.raises(RunDirError, match="holding plots/returns.png"):
        RunDir(mine, new=True)
    left = RunDir(tmp_path / "left")  # a job that failed to start: its config and lock
    left.write_config({"seed": 0})
    left.close()
    RunDir(tmp_path / "left", new=True).close()


def test_a_failed_job_removes_only_the_empty_folder_it_created(tmp_path):
    with pytest.raises(OSError), run_dir(tmp_path / "a" / "run") as run:
        run.write_config({"seed": 0})
        raise OSError("the robot did not answer")
    assert not (tmp_path / "a" / "run").exists()
    (tmp_path / "b").mkdir()  # the user's own folder: kept, empty or not
    with pytest.raises(OSError), run_dir(tmp_path / "b"):
        raise OSError("no")
    assert (tmp_path / "b").is_dir()
    with pytest.raises(KeyboardInterrupt), run_dir(tmp_path / "c") as run:  # something recorded: kept
        run.metric({"episode": 0})
        raise KeyboardInterrupt
    assert (tmp_path / "c" / "metrics.jsonl").is_file()
    RunDir(tmp_path / "c").close()  # and its lock was released


def test_events_are_queued_but_on_disk_before_the_episodes_metric_line(tmp_path, monkeypatch):
    """The gate's events leave the tick at once (a slow disk does not hold it); the episode's
    metrics line is written only after them, so a kill never keeps an episode and loses its alarms."""
    import threading
    import time

    import robot_mbrl.runtime.rundir as mod

    real = mod.append_line

    def slow_disk(path, line):
        time.sleep(0.05)
        real(path, line)

    monkeypatch.setattr(mod, "append_line", slow_disk)
    run = RunDir(tmp_path / "run")
    t0 = time.perf_counter()
    for i in range(5):
        run.event({"kind": "alarm", "tick": i})
    assert time.perf_counter() - t0 < 0.05  # not one of the five 50 ms writes waited for
    run.metric({"kind": "learn", "episode": 0})
    assert len(read_jsonl(tmp_path / "run" / "events.jsonl")) == 5  # already there when the metric is
    run.close()
    assert not [t for t in threading.enumerate() if t.name == f"writer:run {tmp_path / 'run'}"]


def test_atomic_writes_get_the_modes_open_would_give(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "summary.json", b"{}")
        assert (tmp_path / "summary.json").stat().st_mode & 0o777 == 0o644  # readable by the team, not 0600
    finally:
        os.umask(old)
