"""Tiny-budget smoke runs of every CLI command, as a user runs them (subprocesses)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from robot_mbrl.runtime.loop import percentiles_ms
from robot_mbrl.runtime.rundir import SUMMARY_KEYS

TINY = ["--set", "task.episode_steps=60", "--set", "retrain.min_transitions=50", "--set", "train.eval_episodes=1",
        "--set", "trainer.max_epochs=5", "--quiet"]  # fmt: skip


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "robot_mbrl.cli", *args], capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "train"
    r = cli("train", "--out", str(out), "--steps", "180", "--seed", "3", *TINY)
    assert r.returncode == 0, r.stderr[-2000:]
    return out, r


def test_train_writes_the_run_directory(trained):
    out, r = trained
    summary = json.loads((out / "summary.json").read_text())
    assert set(SUMMARY_KEYS) <= set(summary)
    assert summary["real_steps"] == 180 and summary["episodes"] == 3
    assert summary["retrains"] >= 1 and summary["buffer_transitions"] > 0
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "checkpoint/model.pt",
        "buffer/manifest.jsonl",
        "plots/returns.png",
        "plots/gate.png",  # the learning controllers' gate inputs, across retrains
    ):
        assert (out / name).exists(), name
    assert "run dir:" in r.stdout
    evals = [
        json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line
    ]
    assert evals and all(0.0 <= e["eval_mpc_fraction"] <= 1.0 for e in evals)


def test_solved_needs_the_threshold_and_the_learned_controller_in_charge():
    from robot_mbrl.runtime.train import is_solved

    assert is_solved(151.0, 150.0, 0.95, 0.9)
    assert not is_solved(149.0, 150.0, 1.0, 0.9)  # below the threshold
    assert not is_solved(200.0, 150.0, 0.0, 0.9)  # the fallback did the task (e.g. a balancing LQR)
    assert not is_solved(200.0, None, 1.0, 0.9)  # no threshold: never solved


def test_run_replays_the_checkpoint_gated(trained, tmp_path):
    out, _ = trained
    r = cli("run", "--checkpoint", str(out), "--episodes", "1", "--out", str(tmp_path / "run"), *TINY)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(SUMMARY_KEYS) <= set(summary) and summary["ticks"] == 60
    assert summary["plan_ms"]["p50"] > 0  # it planned
    # a tick's work holds its plan (and the read, the bookkeeping, the write)
    assert (
        summary["tick_ms"]["p50"] > summary["plan_ms"]["p50"]
        and summary["tick_ms"]["max"] >= summary["tick_ms"]["p99"]
    )
    assert (tmp_path / "run" / "plots" / "gate.png").exists()


def test_a_run_trained_with_no_gate_is_run_and_commissioned_gated_unless_asked(trained, tmp_path):
    """``train --no-gate`` (a comparison) records run.gate: false in its run's config.yaml; ``run
    --checkpoint RUN`` inherited it and drove the robot ungated without a word (and commission refused
    a run it had just been told to commission). A job inheriting it is gated, with a WARNING; --no-gate
    or --set run.gate=false still turn it off, with a WARNING that the gate is off."""
    out, _ = trained
    run = tmp_path / "nogate"
    shutil.copytree(out, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["run"]["gate"] = False
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))

    def gate_of(job_dir):
        return yaml.safe_load((job_dir / "config.yaml").read_text())["run"]["gate"]

    r = cli("run", "--checkpoint", str(run), "--episodes", "1", "--out", str(tmp_path / "a"), *TINY)
    assert r.returncode == 0, r.stderr[-2000:]
    assert gate_of(tmp_path / "a") is True and "trained with --no-gate; this job is gated" in r.stderr
    assert "gate is off" not in r.stderr
    r = cli(
        "run", "--checkpoint", str(run), "--episodes", "1", "--out", str(tmp_path / "b"), "--no-gate", *TINY
    )
    assert r.returncode == 0 and gate_of(tmp_path / "b") is False and "the safety gate is off" in r.stderr
    r = cli("run", "--checkpoint", str(run), "--episodes", "1", "--out", str(tmp_path / "c"),
            "--set", "run.gate=false", *TINY)  # fmt: skip
    assert r.returncode == 0 and gate_of(tmp_path / "c") is False and "the safety gate is off" in r.stderr
    r = cli("commission", "--checkpoint", str(run), "--episodes", "1", "--out", str(tmp_path / "d"), *TINY)
    assert r.returncode == 0, r.stderr[-2000:]
    assert gate_of(tmp_path / "d") is True


def test_evaluation_events_reach_events_jsonl_marked_and_are_not_the_runs_alarms(trained, tmp_path):
    """The evaluation's gate switches and alarms went nowhere (README: every switch is in
    events.jsonl); they are written marked ``"phase": "eval"``, and a resume does not count them
    among the run's alarms (its summary never did)."""
    from robot_mbrl.runtime.resume import restore_tally
    from robot_mbrl.runtime.rundir import RunDir
    from robot_mbrl.runtime.train import _EvalRun

    out, _ = trained
    run = tmp_path / "copy"
    shutil.copytree(out, run)
    seen = []
    _EvalRun(SimpleNamespace(event=seen.append)).event({"kind": "alarm", "trigger": "monitor:jump"})
    assert seen == [{"kind": "alarm", "trigger": "monitor:jump", "phase": "eval"}]
    with open(run / "events.jsonl", "w") as f:
        for rec in ({"kind": "alarm", "trigger": "monitor:cusum", "tick": 5},
                    {"kind": "alarm", "trigger": "monitor:jump", "tick": 7, "phase": "eval"}):  # fmt: skip
            f.write(json.dumps(rec) + "\n")
    rd = RunDir(run)
    try:
        tally = restore_tally(rd)[0]
    finally:
        rd.close()
    assert tally.alarms == [{"tick": 5, "reason": "monitor:cusum"}]


def test_files_of_another_task_are_refused_and_a_resume_keeps_what_its_files_were_made_under(
    trained, tmp_path
):
    """A checkpoint or buffer of another task has the same shapes: a balance checkpoint ran the
    swing-up task (and commission wrote its calibration back) without a word, a balance buffer was
    learned from in a swing-up run, --set twin.task on a resume mixed two jobs' data, and --set
    model.hidden on a resume was written to config.yaml while the checkpoint's network ran."""
    out, _ = trained
    r = cli("run", "cartpole_balance", "--checkpoint", str(out), "--episodes", "1", "--out", str(tmp_path / "a"),
            *TINY)  # fmt: skip
    assert r.returncode == 2 and "expected a checkpoint of this config's task (cartpole:balance), got one of " \
        "cartpole:swingup" in r.stderr, r.stderr[-1500:]  # fmt: skip
    r = cli("commission", "cartpole_balance", "--checkpoint", str(out), "--episodes", "1", "--out",
            str(tmp_path / "b"), *TINY)  # fmt: skip
    assert r.returncode == 2 and "cartpole:swingup" in r.stderr
    for key, value in (("twin.task", "balance"), ("model.hidden", "32"), ("value.heads", "2")):
        run = tmp_path / f"copy_{key}"
        shutil.copytree(out, run)
        r = cli("train", "--resume", str(run), "--set", f"{key}={value}", *TINY)
        assert (
            r.returncode == 2
            and f"config.yaml: {key}: expected" in r.stderr
            and "start a new run" in r.stderr
        ), r.stderr[-1500:]
    run = tmp_path / "edited"  # config.yaml edited by hand: the buffer says what it holds
    shutil.copytree(out, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["twin"]["task"] = "balance"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    r = cli("train", "--resume", str(run), *TINY)
    assert r.returncode == 2 and "expected transitions of this run's task (cartpole:balance), got " \
        "cartpole:swingup's" in r.stderr, r.stderr[-1500:]  # fmt: skip


def test_a_resume_says_when_timing_jsonl_lost_episodes_times(trained, tmp_path):
    """A garbage timing.jsonl (its one line dropped as a torn last line) reset the run's plan and
    tick percentiles without a word: the summary understated the worst case."""
    out, _ = trained
    run = tmp_path / "copy"
    shutil.copytree(out, run)
    (run / "timing.jsonl").write_text("nope\n")
    r = cli("train", "--resume", str(run), "--steps", "240", *TINY)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "timing.jsonl holds the times of 0 of the 3 recorded episodes" in r.stderr, r.stderr[-2000:]


def test_a_resume_adds_its_wire_counters_to_the_runs(trained, tmp_path):
    """A resumed rig run's summary showed only the resume's own link counters (its transport counts
    from zero); a no-op resume of a finished serial run wrote zeros over the run's."""
    from robot_mbrl.runtime.train import _whole_run_link

    assert _whole_run_link({"crc_errors": 2, "bytes_in": 10}, {"crc_errors": 1, "bytes_in": 5, "reconnects": 1}) == {
        "link": {"crc_errors": 3, "bytes_in": 15, "reconnects": 1}}  # fmt: skip
    assert _whole_run_link({"crc_errors": 2}, None) == {"link": {"crc_errors": 2}}
    assert _whole_run_link(None, None) == {}
    out, _ = trained
    run = tmp_path / "copy"
    shutil.copytree(out, run)
    summary = json.loads((run / "summary.json").read_text())
    summary["link"] = {"crc_errors": 4, "frames_dropped": 7}  # as a rig run's
    (run / "summary.json").write_text(json.dumps(summary))
    r = cli("train", "--resume", str(run), "--steps", "240", *TINY)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((run / "summary.json").read_text())["link"] == {"crc_errors": 4, "frames_dropped": 7}


def test_resume_continues_a_run(trained):
    out, _ = trained
    with open(out / "timing.jsonl", "a") as f:  # the times of an episode killed before its metrics line
        f.write(json.dumps({"episode": 3, "kind": "learn", "plan_ms": [999.0], "tick_ms": [999.0]}) + "\n")
    with open(out / "metrics.jsonl", "a") as f:  # the line a kill mid-append leaves
        f.write('{"kind": "learn", "episode": 3, "ret')
    r = cli("train", "--resume", str(out), "--steps", "240", *TINY)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["real_steps"] == 240 and summary["episodes"] == 4
    r = cli("train", "--resume", str(out), "--steps", "300", *TINY)  # episode 3 is twice in timing.jsonl now
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["real_steps"] == 300 and summary["episodes"] == 5
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    alarms = [e for e in events if e.get("kind") == "alarm" and e.get("phase") != "eval"]
    assert len(summary["alarms"]) == len(alarms)  # the alarms from before the resume count too
    # the plan and tick percentiles are the whole run's (the episodes before the resume count), and
    # the killed episode's times are not (its number came again after the resume)
    times = {
        (t["kind"], t["episode"]): t for t in map(json.loads, (out / "timing.jsonl").read_text().splitlines())
    }
    learn = [times["learn", e] for e in range(5)]
    evals = [t for (kind, _), t in times.items() if kind == "eval"]
    assert len(learn[0]["tick_ms"]) == 60 and len(evals) >= 2
    plan_ms = [ms for t in learn + evals for ms in t["plan_ms"]]
    tick_ms = [ms for t in learn for ms in t["tick_ms"]]
    assert max(plan_ms) < 999.0
    for got, want in ((summary["plan_ms"], plan_ms), (summary["tick_ms"], tick_ms)):
        assert got == pytest.approx(percentiles_ms(want, scale=1.0), abs=2e-3)


def test_resume_refuses_what_would_mix_or_lose_runs(trained, tmp_path):
    out, _ = trained
    run = tmp_path / "copy"
    shutil.copytree(out, run)
    before = (run / "summary.json").read_text()
    r = cli("train", "cartpole_balance", "--resume", str(run), *TINY)  # another job's config
    assert r.returncode == 2 and "expected no CONFIG" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (run / "metrics.jsonl").rename(
        tmp_path / "metrics.jsonl"
    )  # the record lost: summary.json is all there is
    r = cli("train", "--resume", str(run), "--steps", "400", *TINY)
    assert r.returncode == 2 and "summary.json reports" in r.stderr and "Traceback" not in r.stderr
    assert (run / "summary.json").read_text() == before  # not overwritten
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    r = cli("train", "--resume", str(run), "--steps", "400", *TINY)
    assert r.returncode == 2 and "line 2" in r.stderr and "Traceback" not in r.stderr
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    pendulum = ["backend=gym", "model.control_affine=false", "model.control_channels=[]", "monitor.residual_channels=[]",
                "symmetry.negate=[]", "fallback.position_channel=obs_0", "fallback.velocity_channel=obs_2",
                "explore.velocity_channels={obs_0: obs_2}"]  # fmt: skip
    r = cli("train", "--resume", str(run), *(a for v in pendulum for a in ("--set", v)), *TINY)
    assert r.returncode == 2 and "model.control_affine: expected True on --resume" in r.stderr, r.stderr[
        -500:
    ]
    # a buffer of another robot (from a version that did not record the task): its dimensions say so
    from robot_mbrl.data.buffer import ReplayBuffer

    other = tmp_path / "other"
    shutil.copytree(out, other)
    shutil.rmtree(other / "buffer")
    with ReplayBuffer(4, 1, other / "buffer") as buf:
        buf.add([0.0] * 4, [0.0], 0.0, [0.0] * 4, False, False, 0.0, 0)
    r = cli("train", "--resume", str(other), "--steps", "400", *TINY)
    assert r.returncode == 2 and "a run of another robot" in r.stderr, r.stderr[-500:]
    # both records lost: the checkpoint says episodes were run
    (run / "metrics.jsonl").unlink()
    (run / "summary.json").unlink()
    r = cli("train", "--resume", str(run), "--steps", "400", *TINY)
    assert (
        r.returncode == 2 and "expected the record of the episodes its checkpoint was trained on" in r.stderr
    )


def test_resume_runs_the_retrain_a_kill_interrupted_first_and_records_changed_settings(trained, tmp_path):
    out, _ = trained
    run = tmp_path / "copy"
    shutil.copytree(out, run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    last = max(i for i, x in enumerate(lines) if '"retrain"' in x)
    # killed during the last retrain: its record never written (the checkpoint is the one before)
    (run / "metrics.jsonl").write_text("\n".join(lines[:last]) + "\n")
    n = len(lines[:last])
    events = run / "events.jsonl"
    events_before = events.read_text().splitlines() if events.exists() else []
    old = yaml.safe_load((run / "config.yaml").read_text())
    del old["serial"]["link_timeout_s"]  # a run written before that setting existed: not a change
    (run / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    steps = json.loads(lines[-1])["real_steps"] + 25  # less than an episode (60): the last is cut short
    r = cli("train", "--resume", str(run), "--steps", str(steps), *TINY)
    assert r.returncode == 0, r.stderr[-2000:]
    new = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()[n:]]
    assert new[0]["kind"] == "retrain" and "learn" in [m["kind"] for m in new], new  # before the next episode
    assert [m["steps"] for m in new if m["kind"] == "learn"] == [25]  # robot time as asked, no more
    assert json.loads((run / "summary.json").read_text())["real_steps"] == steps
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["train"]["steps"] == steps  # the record says so
    assert "resumed with changed settings: train.steps" in r.stderr and "link_timeout_s" not in r.stderr
    # the resume's line in events.jsonl: what came before it was the killed job's
    after = [json.loads(x) for x in events.read_text().splitlines()[len(events_before) :]]
    learned = [json.loads(x) for x in lines[:last] if '"learn"' in x]
    assert after[0] == {
        "kind": "resume",
        "run_tick": sum(m["steps"] for m in learned),
        "episodes": len(learned),
        "real_steps": learned[-1]["real_steps"],
        "retrains": sum('"retrain"' in x for x in lines[:last]),
    }, after[:2]


def test_a_kill_during_the_last_retrain_is_mended_by_a_resume_without_the_robot(trained, tmp_path):
    """Killed in the retrain after the last episode: the resume runs that retrain and the evaluation
    after it, and needs no robot time for it (a rig that is off or unplugged is not asked for)."""
    out, _ = trained
    run = tmp_path / "copy"
    shutil.copytree(out, run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    last = max(i for i, x in enumerate(lines) if '"retrain"' in x)
    assert all('"learn"' not in x for x in lines[last:])  # (the retrain after the last episode)
    (run / "metrics.jsonl").write_text("\n".join(lines[:last]) + "\n")
    steps = json.loads((run / "summary.json").read_text())["real_steps"]
    events_before = (run / "events.jsonl").read_text().splitlines() if (run / "events.jsonl").exists() else []
    r = cli("train", "--resume", str(run), "--port", "/dev/ttyNOPE0", "--backend", "serial", *TINY)
    assert r.returncode == 0, r.stderr[-2000:]
    new = [json.loads(x)["kind"] for x in (run / "metrics.jsonl").read_text().splitlines()[last:]]
    assert new == ["retrain"], new  # (on the serial backend no evaluation: no twin to run it on)
    marks = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()[len(events_before) :]]
    assert [m["kind"] for m in marks] == ["resume"]  # (a resume without the robot marks its start too)
    assert json.loads((run / "summary.json").read_text())["real_steps"] == steps
    # on the twin: the retrain, then the evaluation it was owed
    shutil.rmtree(run)
    shutil.copytree(out, run)
    (run / "metrics.jsonl").write_text("\n".join(lines[:last]) + "\n")
    r = cli("train", "--resume", str(run), *TINY, "--set", "trainer.max_epochs=4")
    assert r.returncode == 0, r.stderr[-2000:]
    new = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()[last:]]
    assert [m["kind"] for m in new] == ["retrain", "eval"], new
    # ... under the settings it ran with, recorded as any resume's are
    assert new[0]["epochs"] <= 4 and "resumed with changed settings: trainer.max_epochs" in r.stderr
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["max_epochs"] == 4


def test_an_episode_data_reaches_the_disk_before_its_record(tmp_path):
    """A kill between the episode's metrics line and the buffer's flush lost real data the record
    counted (up to a whole episode): the flush now comes first."""
    from robot_mbrl.config import load_config
    from robot_mbrl.factory import make_judge, make_robot, make_task
    from robot_mbrl.runtime.jobs import run_episodes
    from robot_mbrl.runtime.policies import PolicyController, ZeroPolicy
    from robot_mbrl.runtime.progress import Progress
    from robot_mbrl.runtime.rundir import RunDir, Tally

    order = []

    class Recording(RunDir):
        def metric(self, record):
            order.append("metric")
            super().metric(record)

    cfg = load_config(None, ["task.episode_steps=5"])
    robot, task = make_robot(cfg), make_task(cfg)
    run = Recording(tmp_path / "run")
    with robot, Progress(10, "t", enabled=False) as bar:
        run_episodes(cfg, robot, make_judge(task, robot), PolicyController(ZeroPolicy(robot.spec)), run, Tally(),
                     episodes=2, first_episode=0, seed_offset=0, progress=bar, kind="learn",
                     on_end=lambda: order.append("flush"))  # fmt: skip
    run.close()
    assert order == ["flush", "metric"] * 2


@pytest.mark.parametrize(
    ("job", "stop"), [("run", "link"), ("train", "link"), ("run", "SIGTERM"), ("train", "SIGINT")]
)
def test_a_job_ended_by_a_lost_link_keeps_the_summary_of_the_episodes_done(tmp_path, monkeypatch, job, stop):
    """A run ended by a lost link (exit 2) wrote no summary.json: the episodes it finished lost their
    summary, plots and link counters. It is written with ``stopped_by``; one that finished no episode
    writes none (a run directory that never started is removed as before). A signal is named as such
    (SIGTERM read "_Terminated: 143")."""
    from robot_mbrl import factory
    from robot_mbrl.hal.robot import _Terminated

    ended = {
        "link": ConnectionError("the link is down for 5 s (serial.link_timeout_s)"),  # (LinkLost's base)
        "SIGTERM": _Terminated(143),  # what robot_session's handler raises
        "SIGINT": KeyboardInterrupt(),
    }[stop]
    from robot_mbrl.config import load_config
    from robot_mbrl.runtime.jobs import run_job
    from robot_mbrl.runtime.train import train_job

    real = factory.make_robot

    def dying(cfg, *a, after=25, **kw):
        robot = real(cfg, *a, **kw)
        read, n = robot.read, [0]

        def read_until_unplugged():
            n[0] += 1
            if n[0] > after:
                raise ended
            return read()

        robot.read = read_until_unplugged
        return robot

    from robot_mbrl.runtime import train as train_mod

    monkeypatch.setattr(factory, "make_robot", dying)
    monkeypatch.setattr(train_mod, "make_robot", dying)
    sets = [
        "task.episode_steps=10",
        "run.episodes=3",
        "run.policy=zero",
        "train.steps=40",
        "train.eval_episodes=0",
    ]
    cfg = load_config(None, sets)
    with pytest.raises(type(ended)):
        if job == "run":
            run_job(cfg, checkpoint=None, out=tmp_path / "r", progress=False)
        else:
            train_job(cfg, out=tmp_path / "r", resume=False, progress=False)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["episodes"] == 2
    assert (
        summary["stopped_by"]
        == {
            "link": "ConnectionError: the link is down for 5 s (serial.link_timeout_s)",
            "SIGTERM": "SIGTERM",
            "SIGINT": "SIGINT (Ctrl-C)",
        }[stop]
    )
    assert set(SUMMARY_KEYS) <= set(summary)
    assert job == "train" or (
        "clamped_commands" in summary and summary["checkpoint"] is None
    )  # run's own keys
    if job == "train":  # and a resume finishes the run, its summary written anew
        monkeypatch.setattr(train_mod, "make_robot", real)
        summary, _ = train_job(cfg, out=tmp_path / "r", resume=True, progress=False)
        assert summary["stopped_by"] is None and summary["real_steps"] == 40


def test_a_resume_runs_an_evaluation_a_kill_interrupted_and_says_when_data_never_reached_the_disk(
    trained, tmp_path
):
    out, _ = trained
    run = tmp_path / "copy"
    shutil.copytree(out, run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    last = max(i for i, x in enumerate(lines) if '"eval"' in x)
    assert last == len(lines) - 1 and '"retrain"' in lines[last - 1]  # the run's last evaluation
    learn = [i for i, x in enumerate(lines) if '"learn"' in x]
    rec = json.loads(lines[learn[-1]])
    rec["vouched"] += 7  # as if 7 of its transitions never reached the disk
    lines[learn[-1]] = json.dumps(rec)
    (run / "metrics.jsonl").write_text("\n".join(lines[:last]) + "\n")  # killed during the evaluation
    (run / "summary.json").unlink()  # (a killed job writes none)
    wall = json.loads(lines[last - 1])["wall_s"]  # the job's wall time as far as its last record
    assert wall > 0 and all("wall_s" in json.loads(x) for x in lines)
    r = cli("train", "--resume", str(run), *TINY)
    assert r.returncode == 0, r.stderr[-2000:]
    new = [json.loads(x)["kind"] for x in (run / "metrics.jsonl").read_text().splitlines()[last:]]
    assert new == ["eval"], new  # the model the run ended with is evaluated
    assert json.loads((run / "summary.json").read_text())["wall_s"] > wall  # (was the resume's alone)
    assert "7 transitions its metrics.jsonl records as learned from are not in the buffer" in r.stderr


def test_a_resume_after_a_skipped_episode_id_owes_no_evaluation_it_has(trained, tmp_path):
    """An episode killed mid-way leaves its id unused: the records then label episodes 0, 1, 3 and
    evaluations 2, 4. The evaluation owed is judged by the label, not the count (3 of them): no
    evaluation is run twice."""
    out, _ = trained
    run = tmp_path / "copy"
    shutil.copytree(out, run)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last_learn = max(i for i, m in enumerate(recs) if m["kind"] == "learn")
    for m in recs[last_learn:]:  # episode 2 becomes 3 (as if 2 was killed mid-way), its evaluation 4
        if "episode" in m:
            m["episode"] += 1
    text = "".join(json.dumps(m) + "\n" for m in recs)
    (run / "metrics.jsonl").write_text(text)
    r = cli("train", "--resume", str(run), *TINY)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (run / "metrics.jsonl").read_text() == text  # done, nothing owed: no evaluation again


def test_a_resume_that_cannot_reach_the_robot_changes_nothing(trained, tmp_path):
    out, _ = trained
    run = tmp_path / "copy"
    shutil.copytree(out, run)
    before = (run / "config.yaml").read_bytes()
    summary = (run / "summary.json").read_bytes()
    r = cli("train", "--resume", str(run), "--steps", "999", "--backend", "serial", "--port", "/dev/ttyNOPE0",
            *TINY)  # fmt: skip
    assert r.returncode != 0 and "/dev/ttyNOPE0" in r.stderr and "Traceback" not in r.stderr
    assert (run / "config.yaml").read_bytes() == before  # no steps, port or backend it never ran under
    assert (run / "summary.json").read_bytes() == summary  # (not a stopped_by, link or wall time of it)


def test_a_damaged_metrics_line_is_refused_in_one_line_and_a_torn_last_one_dropped(trained, tmp_path):
    out, _ = trained
    run = tmp_path / "copy"
    shutil.copytree(out, run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    r = cli("train", "--resume", str(run), *TINY)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.count("metrics.jsonl") == 1 and "line 2: expected a JSON object" in r.stderr
    # a kill in the middle of a write: the torn last line is dropped, the run goes on
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"kind": "learn", "epi')
    r = cli("train", "--resume", str(run), "--steps", str(json.loads(lines[-1])["real_steps"] + 10), *TINY)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "dropped a torn last line" in r.stderr
    assert all(json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines())


def test_resume_of_a_solved_run_leaves_it_as_it_is(tmp_path):
    run = tmp_path / "solved"
    easy = ["--set", "task.solved_return=-1000", "--set", "task.solved_min_mpc_fraction=0"]
    r = cli("train", "--out", str(run), "--steps", "600", "--seed", "1", *TINY, *easy)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["solved_at_step"] is not None and summary["real_steps"] < 600
    metrics = (run / "metrics.jsonl").read_text()
    checkpoint = (run / "checkpoint" / "model.pt").read_bytes()
    files = {p: p.read_bytes() for p in [run / "summary.json", *(run / "plots").iterdir()]}
    r = cli("train", "--resume", str(run), *TINY, *easy)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (run / "metrics.jsonl").read_text() == metrics  # no episode, no retrain
    assert (run / "checkpoint" / "model.pt").read_bytes() == checkpoint  # (nor a commissioning undone)
    assert all(p.read_bytes() == b for p, b in files.items())  # summary and plots as they were
    assert "the run is complete (solved): nothing to do" in r.stderr
    # solved but told to go on: a retrain a kill interrupted runs first, as for any run
    lines = metrics.splitlines()
    last = max(i for i, x in enumerate(lines) if '"retrain"' in x)
    (run / "metrics.jsonl").write_text("\n".join(lines[:last]) + "\n")
    r = cli("train", "--resume", str(run), "--steps", str(summary["real_steps"] + 60), *TINY, *easy,
            "--set", "train.stop_when_solved=false")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    new = [json.loads(x)["kind"] for x in (run / "metrics.jsonl").read_text().splitlines()[last:]]
    assert new[0] == "retrain" and "learn" in new, new


def test_run_simple_policies(tmp_path):
    for policy in ("random", "safe", "zero"):
        r = cli("run", "--policy", policy, "--episodes", "1", "--out", str(tmp_path / policy), *TINY)
        assert r.returncode == 0, r.stderr[-2000:]
        summary = json.loads((tmp_path / policy / "summary.json").read_text())
        assert summary["ticks"] == 60 and summary["real_steps"] == 60
        assert summary["end_stop_hits"] == 0  # random exploration runs inside the stopping shield
        # no planner: no plan times (they read 0.00 ms, as if plans took no time)
        assert summary["plan_ms"] is None and "no plans" in r.stdout and "plan ms" not in r.stdout
        metrics = [json.loads(x) for x in (tmp_path / policy / "metrics.jsonl").read_text().splitlines()]
        assert [m["plan_ms_p50"] for m in metrics] == [None]
    # a policy has no gate: run.gate false warns of no learned controller's actions going unchecked
    r = cli(
        "run",
        "--policy",
        "zero",
        "--set",
        "run.gate=false",
        "--episodes",
        "1",
        "--out",
        str(tmp_path / "g"),
        *TINY,
    )
    assert r.returncode == 0 and "safety gate is off" not in r.stderr, r.stderr[-800:]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run", "--set", "twin.pole_mass_kg=-1"], "twin.pole_mass_kg: expected a value >= 0.001, got -1.0"),
        (["run", "--set", "twin.pole_mas_kg=1"], "did you mean 'pole_mass_kg'"),
        (["run", "--checkpoint", "/nonexistent/run"], "expected an existing run or checkpoint directory"),
        (["train", "--resume", "/nonexistent/run"], "expected a run directory with config.yaml"),
        (
            ["run", "--port", "/dev/ttyNOPE", "--policy", "zero"],
            "--port /dev/ttyNOPE: expected --backend serial",
        ),
        (["run", "--policy", "random", "--checkpoint", "/x"], "expected either --checkpoint (the learned"),
        (["emulate", "--duration", "-1"], "--duration: expected seconds > 0"),
        (["emulate", "--drop-rate", "1.5"], "--drop-rate: expected a probability in [0, 1), got 1.5"),
        (["emulate", "--link", "socket", "--port-link", "/tmp/x"], "--port-link /tmp/x: expected --link pty"),
        (["train", "--steps", "-5"], "--steps -5: expected real steps >= 1"),
        (["train", "--seed", "-5"], "cartpole_swingup.yaml (--seed): seed: expected a value >= 0, got -5"),
        (["config", "--set", "symmetry.negate=[nope]"], "(--set): symmetry.negate: expected names from"),
        (
            ["config", "--set", "gate.no_gate=true"],
            "gate.no_gate: expected false (the gate is turned off by run.gate",
        ),
        (["run", "--policy", "zero", "--episodes", "0"], "--episodes 0: expected episodes >= 1"),
        (["run", "--policy", "zero", "--no-gate"], "--no-gate: expected --checkpoint (the gate guards"),
        (["commission", "--checkpoint", "/x", "--no-gate"], "commission: expected the gated controller"),
        (["emulate", "inverted_pendulum_gym", "--duration", "1"], "expected a cart-pole config"),
        (
            ["run", "inverted_pendulum_gym", "--policy", "random", "--set", "gym.terminal_channels=[theta]"],
            "gym.terminal_channels: expected names from ['obs_0'",
        ),  # a run without a planner too
        (
            ["run", "inverted_pendulum_gym", "--policy", "zero", "--set", "gym.obs_names=[x, x, a, b]"],
            "gym.obs_names: expected 4 distinct names",
        ),
        (
            ["run", "inverted_pendulum_gym", "--policy", "zero", "--set", "gym.angle_channels=[theta]"],
            "gym.angle_channels: expected names from ['obs_0'",
        ),
        (["config", "--set", "trainer.min_transitions=1000"], "trainer.min_transitions: expected <= retrain"),
        (["config", "--set", "fallback.safe_x_m=5"], "fallback.safe_x_m: expected < twin.end_stop_x_m"),
        (
            ["config", "--set", "backend=serial", "--set", "fallback.safe_x_m=0.5"],
            "expected < twin.end_stop_x_m",
        ),
        (["config", "--set", "twin.safe_x_m=0.2"], "fallback.safe_x_m: expected <= twin.safe_x_m (0.2)"),
        (["config", "--set", "seed=99999999999999999999"], "seed: expected a value <= 4294967295"),
        (
            ["run", "--policy", "safe", "--set", "fallback.position_channel=bogus"],
            "fallback.position_channel",
        ),
    ],
)
def test_user_errors_are_one_line_exit_2(args, needle):
    r = cli(*args)
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_file_system_error_is_one_line_exit_1():
    r = cli("run", "--policy", "zero", "--episodes", "1", "--out", "/sys/kernel/robot-mbrl-run", *TINY)
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "/sys/kernel/robot-mbrl-run" in r.stderr


@pytest.mark.parametrize(
    "sets, key",
    [
        (["model.control_affine=true", "model.control_channels=[bogus]"], "model.control_channels"),
        (["monitor.residual_channels=[x_m, bogus]"], "monitor.residual_channels"),
        (["symmetry.negate=[x_m, motor_u, bogus]"], "symmetry.negate"),
    ],
)
def test_unknown_channel_names_fail_before_any_robot_time(sets, key, tmp_path):
    r = cli("train", "--out", str(tmp_path / "run"), *(a for v in sets for a in ("--set", v)), *TINY)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"cartpole_swingup.yaml (--set): {key}: expected names from" in r.stderr and "'bogus'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1  # no progress bar: no robot time spent
    assert not (tmp_path / "run").exists()  # nor an empty run folder left behind


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--set", "gym.env_id=Nope-v0"], "Environment `Nope` doesn't exist"),
        (["--set", "gym.env_id=CartPole-v1"], "expected a 1-D Box env with finite action bounds"),
        (["--set", "gym.kwargs={bogus: 1}"], "unexpected keyword argument 'bogus'"),
    ],
)
def test_a_gym_env_that_cannot_be_built_is_one_line(args, needle, tmp_path):
    r = cli("train", "configs/inverted_pendulum_gym.yaml", "--out", str(tmp_path / "run"), *args, "--quiet")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_truncated_checkpoint_is_a_clear_error(trained, tmp_path):
    out, _ = trained
    bad = tmp_path / "ckpt"
    bad.mkdir()
    data = (out / "checkpoint" / "model.pt").read_bytes()
    (bad / "model.pt").write_bytes(data[: len(data) // 2])
    r = cli("run", "--checkpoint", str(bad), "--episodes", "1", "--out", str(tmp_path / "r"), *TINY)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "model.pt" in r.stderr
    # a bare checkpoint (no run's config.yaml beside it) runs under the default config: said so
    assert "no config.yaml of its run beside it: running under the default config" in r.stderr


def test_config_command_prints_resolved_yaml():
    r = cli("config", "--set", "seed=5")
    assert r.returncode == 0 and "seed: 5" in r.stdout and "planner:" in r.stdout


def test_emulate_serves_the_twin_and_run_drives_it_over_the_wire(tmp_path):
    emu = subprocess.Popen([sys.executable, "-m", "robot_mbrl.cli", "emulate", "--duration", "20"],
                           stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        line = emu.stdout.readline()
        assert " on " in line, line
        port = line.rsplit(" on ", 1)[1].strip()
        r = cli("run", "--backend", "serial", "--port", port, "--policy", "safe", "--episodes", "1",
                "--out", str(tmp_path / "serial"), *TINY)  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        summary = json.loads((tmp_path / "serial" / "summary.json").read_text())
        assert summary["ticks"] == 60 and summary["violations"] == 0
        assert summary["link"]["bytes_in"] > 0 and summary["link"]["crc_errors"] == 0  # the wire's record
        assert "link: 0 CRC / 0 framing errors" in r.stdout
    finally:
        emu.terminate()  # SIGTERM: cleans up as on Ctrl-C
        rest = emu.communicate(timeout=10)[0]
    assert emu.returncode == 0 and "device received" in rest
    assert not Path(port).exists()  # no link left pointing at a pty another program may get


def test_emulate_serves_a_faulty_link_at_a_fixed_port_name(tmp_path):
    """A user bringing a rig up wants the link's faults without a Python harness, and a port name
    that survives an emulator restart (a run's config.yaml keeps it)."""
    link = tmp_path / "robot-mcu"
    link.symlink_to(tmp_path / "gone")  # an old link from a killed emulator: replaced
    emu = subprocess.Popen([sys.executable, "-m", "robot_mbrl.cli", "emulate", "--duration", "20", "--port-link",
                            str(link), "--corrupt-rate", "0.003", "--frame-drop-rate", "0.02"],
                           stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        line = emu.stdout.readline()
        assert line.rsplit(" on ", 1)[1].strip() == str(link) and link.resolve().exists(), line
        assert "faulty link: --corrupt-rate 0.003, --frame-drop-rate 0.02" in emu.stdout.readline()
        r = cli("run", "--backend", "serial", "--port", str(link), "--policy", "safe", "--episodes", "1",
                "--out", str(tmp_path / "serial"), *TINY)  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        stats = json.loads((tmp_path / "serial" / "summary.json").read_text())["link"]
        assert stats["crc_errors"] + stats["framing_errors"] > 0 and stats["frames_dropped"] > 0, stats
        # the episode's own line says what its wire went through
        ep = json.loads((tmp_path / "serial" / "metrics.jsonl").read_text().splitlines()[0])["link"]
        assert 0 < ep["frames_dropped"] <= stats["frames_dropped"] and "bytes_in" not in ep, ep
    finally:
        emu.terminate()
        rest = emu.communicate(timeout=10)[0]
    assert emu.returncode == 0 and "link faults injected:" in rest and not link.is_symlink()


def test_train_learns_from_a_rig_over_the_wire_and_homes_it_before_each_episode(tmp_path):
    emu = subprocess.Popen([sys.executable, "-m", "robot_mbrl.cli", "emulate", "--duration", "60"],
                           stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        port = emu.stdout.readline().rsplit(" on ", 1)[1].strip()
        out = tmp_path / "rig"
        r = cli("train", "--backend", "serial", "--port", port, "--steps", "120", "--out", str(out), *TINY,
                "--set", "homing.timeout_s=8")  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
    finally:
        emu.terminate()
        emu.communicate(timeout=10)
    learn = [
        m
        for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if m.get("kind") == "learn"
    ]
    assert len(learn) == 2 and all(m["homing_ticks"] > 0 for m in learn), learn
    assert all(0 <= m["homing_sample_timeouts"] < m["homing_ticks"] for m in learn), learn
    # the emulated rig starts at rest: settled at once (50 ticks in a row within tolerance)
    assert learn[0]["homing_settled"] and learn[0]["homing_ticks"] <= 55, learn
    summary = json.loads((out / "summary.json").read_text())
    assert summary["real_steps"] == 120 and summary["violations"] == 0 and summary["end_stop_hits"] == 0, (
        summary
    )
    # learned from the wire (a transition is kept only when the device vouches for it); the ticks
    # follow the device's samples, so no episode loses most of its transitions to the phase the reset
    # left (as one in four did; a loaded machine can still cost some)
    assert all(m["vouched"] >= 0.7 * m["steps"] for m in learn), learn
    assert summary["buffer_transitions"] >= 90 and (out / "checkpoint").is_dir(), summary
    assert "homing" in (out / "config.yaml").read_text() and port in (out / "config.yaml").read_text()


def test_train_on_an_unreachable_rig_is_one_error_and_leaves_no_run_behind(tmp_path):
    r = cli(
        "train", "--backend", "serial", "--port", str(tmp_path / "ttyNOPE"), "--out", str(tmp_path / "rig")
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr and "cannot open" in r.stderr, r.stderr[-2000:]
    assert "step/s" not in r.stderr, r.stderr  # no progress bar is drawn for a job that never started
    assert not (tmp_path / "rig").exists()  # the same --out can be used once the rig is plugged in


def test_run_uses_the_runs_config_and_keeps_existing_runs(trained, tmp_path):
    out, _ = trained
    r = cli("run", "--checkpoint", str(out), "--episodes", "1", "--out", str(tmp_path / "r"), "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (
        json.loads((tmp_path / "r" / "summary.json").read_text())["ticks"] == 60
    )  # the run's episode length
    before = (out / "summary.json").read_bytes()
    for cmd in ("run", "commission"):
        r = cli(cmd, "--checkpoint", str(out), "--episodes", "1", "--out", str(out), "--quiet")
        assert r.returncode == 2 and "expected a new run directory, got an existing run" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert (out / "summary.json").read_bytes() == before
    r = cli("run", "inverted_pendulum_gym", "--checkpoint", str(out), "--episodes", "1",
            "--out", str(tmp_path / "gym"), "--quiet")  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "model.pt: expected a checkpoint of this config's task (gym:InvertedPendulum-v5), got one of " \
        "cartpole:swingup" in r.stderr  # fmt: skip


def test_checkpoint_shapes_win_over_the_run_config(trained, tmp_path):
    out, _ = trained
    r = cli("run", "--checkpoint", str(out), "--episodes", "1", "--out", str(tmp_path / "r"),
            "--set", "model.hidden=64", "--set", "value.hidden=16", *TINY)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]


def test_same_seed_same_run(trained, tmp_path):
    """Lockstep training is reproducible: timing (plan time, machine load) never changes decisions."""
    out, _ = trained
    r = cli("train", "--out", str(tmp_path / "again"), "--steps", "180", "--seed", "3", *TINY)
    assert r.returncode == 0, r.stderr[-2000:]
    a = json.loads((out / "summary.json").read_text())
    b = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert a["returns"][:3] == b["returns"] and a["eval_returns"][:2] == b["eval_returns"][:2]


def test_checkpoint_carries_residual_calibration_and_monitors_gate_outside_learning(trained):
    """The checkpoint keeps the held-out data that calibrates the CUSUM's residuals; monitors switch to the
    fallback in deployment, and in learning episodes only when monitor.gate_while_learning is set."""
    import dataclasses

    import numpy as np

    from robot_mbrl.agents.mpc import MPCAgent
    from robot_mbrl.config import load_config
    from robot_mbrl.factory import make_robot, make_task

    out, _ = trained
    cfg = load_config(None, ["task.episode_steps=60"])
    robot = make_robot(cfg)
    agent = MPCAgent.load(out, cfg, robot.spec, make_task(cfg))
    assert "holdout_next_obs" in agent.ood_reference
    deploy = agent.controller()
    bias, whiten = agent.thresholds["residual_bias"], np.asarray(agent.thresholds["residual_whiten"])
    assert len(bias) == robot.spec.obs_dim and whiten.shape == (robot.spec.obs_dim,) * 2
    assert not np.allclose(whiten, np.eye(robot.spec.obs_dim))  # calibrated, not the identity default
    assert deploy.gate.monitor is deploy.monitor
    np.testing.assert_allclose(deploy.monitor.residual_whiten, whiten)
    learning = agent.controller(learning=True)
    assert learning.gate.monitor is None and learning.monitor is not None  # observed and logged only
    agent.cfg = dataclasses.replace(cfg, monitor=dataclasses.replace(cfg.monitor, gate_while_learning=True))
    strict = agent.controller(learning=True)
    assert strict.gate.monitor is strict.monitor


def test_the_controller_moves_its_warm_start_on_once_per_planned_step(trained):
    """With planner.action_repeat R the controller shifts the plan once every R ticks (the warm start
    ran R - 1 ticks ahead per tick when it shifted every tick)."""
    from robot_mbrl.agents.mpc import MPCAgent
    from robot_mbrl.config import load_config
    from robot_mbrl.factory import make_judge, make_robot, make_task
    from robot_mbrl.runtime.episode import run_episode
    from robot_mbrl.runtime.rundir import Tally

    out, _ = trained
    for repeat, shifts in ((1, 12), (3, 4)):
        cfg = load_config(str(out / "config.yaml"), [f"planner.action_repeat={repeat}", "planner.horizon=4"])
        robot, task = make_robot(cfg), make_task(cfg)
        ctl = MPCAgent.load(out, cfg, robot.spec, task).controller()
        calls = []
        shift = ctl.planner.shift
        ctl.planner.shift = lambda a, calls=calls, shift=shift: calls.append(1) or shift(a)
        with robot:
            run_episode(robot, make_judge(task, robot), ctl, episode=0, max_steps=12, seed=1, paced=False,
                        tally=Tally())  # fmt: skip
        assert len(calls) == shifts, (repeat, len(calls))


def test_a_failing_monitor_or_warm_start_falls_back_instead_of_crashing(trained):
    """Faults after the planner (the monitors' update, the warm-start shift) cost the MPC its
    authority, never the episode: the monitor error is an alarm the gate acts on."""
    import numpy as np

    from robot_mbrl.agents.mpc import MPCAgent
    from robot_mbrl.config import load_config
    from robot_mbrl.factory import make_judge, make_robot, make_task
    from robot_mbrl.runtime.episode import run_episode
    from robot_mbrl.runtime.rundir import Tally

    out, _ = trained
    cfg = load_config(str(out / "config.yaml"), [])
    robot, task = make_robot(cfg), make_task(cfg)
    ctl = MPCAgent.load(out, cfg, robot.spec, task).controller()

    def broken(*args, **kwargs):
        raise RuntimeError("injected")

    ctl.monitor.observe = broken  # the residual update raises on every transition
    ctl.planner.shift = broken  # and so does the warm start after each decision
    events, tally = [], Tally()
    with robot:
        res = run_episode(robot, make_judge(task, robot), ctl, episode=0, max_steps=30, seed=1, paced=False,
                          tally=tally, on_event=events.append)  # fmt: skip
    assert res.steps == 30  # the episode ran to its end
    alarms = [e for e in events if e.get("trigger") == "monitor_error"]
    assert len(alarms) == 1 and "injected" in alarms[0]["reason"]
    assert res.fallback_ticks >= 28  # in fallback from the first failed update on
    assert any(e.get("kind") == "switch" and "monitor:monitor_error" in str(e.get("trigger")) for e in events)
    assert np.isfinite(res.ret)


def _hanging_planner(ctl, hang_at: int, hang_s: float) -> list[int]:
    """Make ``ctl``'s planner block for ``hang_s`` on its first call for a tick >= ``hang_at``;
    returns the list of the ticks it was called for, the hung one marked negative (-tick - 1)."""
    import time

    calls: list[int] = []
    plan = ctl.planner.plan

    def slow(*args, **kwargs):
        if ctl.tick >= hang_at and not any(c < 0 for c in calls):
            calls.append(-ctl.tick - 1)
            time.sleep(hang_s)
        else:
            calls.append(ctl.tick)
        return plan(*args, **kwargs)

    ctl.planner.plan = slow
    return calls


def test_a_hung_planner_costs_its_tick_the_plan_not_the_deadline(trained):
    """On a paced loop the tick stops waiting for the plan at its budget: the gate writes the
    fallback then (deadline_missed), the ticks while the planner is still busy fall back too, and the
    planner is called again once it returns. In lockstep the same hang is simply waited for."""
    from robot_mbrl.agents.mpc import MPCAgent
    from robot_mbrl.config import load_config
    from robot_mbrl.factory import make_judge, make_robot, make_task
    from robot_mbrl.runtime.deadline import planner_worker
    from robot_mbrl.runtime.episode import run_episode
    from robot_mbrl.runtime.rundir import Tally

    out, _ = trained
    cfg = load_config(str(out / "config.yaml"), ["gate.dwell_ticks=1", "loop.preempt_planner=true"])
    robot, task = make_robot(cfg), make_task(cfg)
    agent = MPCAgent.load(out, cfg, robot.spec, task)
    ctl = agent.controller(monitors_gate=False)
    ctl.gate.set_thresholds(disagreement=1e9)
    ctl.paced = True  # as on a rig: the planner thread is warmed at reset
    calls = _hanging_planner(ctl, hang_at=10, hang_s=0.4)  # 20 ticks
    events, tally = [], Tally()
    with robot:
        res = run_episode(robot, make_judge(task, robot), ctl, episode=0, max_steps=50, seed=1, paced=True,
                          tally=tally, on_event=events.append)  # fmt: skip
    assert res.steps == 50
    hung = -min(calls) - 1  # the tick whose plan hung (10, or the first after it that planned)
    assert res.tick_s[hung] < 0.3, res.tick_s[hung]  # did not wait out the 0.4 s hang (budget: 16 ms)
    on_fallback = {t[0]: t[-1] for t in ctl.trace}  # tick -> the fallback acted
    assert all(on_fallback[t] for t in range(hung, hung + 18))  # the hung tick and the busy ones after it
    assert 18 <= res.deadline_misses  # (a loaded host may add a few more)
    assert not [c for c in calls if hung < c < hung + 18]  # no plan was started while the hung one ran
    assert any(c > hung + 20 for c in calls)  # planning again once the hung call returned
    ctl.finish()  # (the jobs call it after the episode's record)
    assert not planner_worker().running

    # lockstep: the hang is waited for and its plan used (the overrun is counted, not acted on)
    ctl = agent.controller(monitors_gate=False)
    ctl.gate.set_thresholds(disagreement=1e9)
    _hanging_planner(ctl, hang_at=10, hang_s=0.4)
    events = []
    with robot:
        res = run_episode(robot, make_judge(task, robot), ctl, episode=0, max_steps=20, seed=1, paced=False,
                          tally=Tally(), on_event=events.append)  # fmt: skip
    assert res.tick_s[10] >= 0.4 and res.deadline_misses >= 1  # (counted: the tick overran)
    assert -11 in calls
    assert not [e for e in events if "deadline_missed" in str(e.get("trigger"))]


def test_warming_the_planner_thread_leaves_the_plans_unchanged(trained, monkeypatch):
    """On the wall clock the planner thread's first call (torch's first on a thread is slow) is made
    when the controller is built; it must not change the planner's random stream."""
    import numpy as np

    from robot_mbrl.agents.mpc import MPCAgent
    from robot_mbrl.config import load_config
    from robot_mbrl.factory import make_robot, make_task
    from robot_mbrl.runtime import deadline

    out, _ = trained
    cfg = load_config(str(out / "config.yaml"), ["loop.paced=true", "loop.preempt_planner=true"])
    robot, task = make_robot(cfg), make_task(cfg)
    agent = MPCAgent.load(out, cfg, robot.spec, task)
    with robot:
        obs = robot.reset(3)
    monkeypatch.setattr(deadline, "_shared", deadline.DeadlineWorker("planner"))  # not warmed yet
    calls = []
    real = deadline.DeadlineWorker.call
    monkeypatch.setattr(
        deadline.DeadlineWorker, "call", lambda self, *a, **k: calls.append(a) or real(self, *a, **k)
    )
    warmed = agent.controller()
    assert warmed.paced and deadline.planner_worker().warmed and len(calls) == 1
    plain = agent.controller()  # (the thread is warm: no second warm-up)
    assert len(calls) == 1
    for _ in range(3):
        a = warmed.planner.plan(obs.values, None, None).action
        b = plain.planner.plan(obs.values, None, None).action
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    lockstep = MPCAgent.load(out, load_config(str(out / "config.yaml"), []), robot.spec, task)
    assert not lockstep.controller().paced


def test_a_retrain_waits_for_a_plan_still_running_on_the_planner_thread(trained, monkeypatch):
    """A plan the tick gave up on may still be reading the model: the retrain starts only after it
    returned (and ends with PlannerHung where it never does within loop.plan_hang_s)."""
    import threading
    import time

    from robot_mbrl.agents.mpc import MPCAgent
    from robot_mbrl.config import load_config
    from robot_mbrl.data.buffer import ReplayBuffer
    from robot_mbrl.factory import make_robot, make_task
    from robot_mbrl.runtime import deadline

    out, _ = trained
    cfg = load_config(str(out / "config.yaml"), ["loop.plan_hang_s=0.3"])
    robot, task = make_robot(cfg), make_task(cfg)
    agent = MPCAgent.load(out, cfg, robot.spec, task)
    buffer = ReplayBuffer.open(out / "buffer")  # (nothing is added)
    monkeypatch.setattr(deadline, "_shared", deadline.DeadlineWorker("planner"))
    worker = deadline.planner_worker()
    release, returned_at, trained_at = threading.Event(), [], []

    def late_plan():
        release.wait(5)
        returned_at.append(time.monotonic())

    class Stop(Exception):
        pass

    def train(*args, **kwargs):
        trained_at.append(time.monotonic())
        raise Stop

    monkeypatch.setattr(agent.trainer, "train", train)
    assert worker.call(late_plan, timeout_s=0.01)[0] is deadline.Outcome.LATE
    threading.Timer(0.1, release.set).start()
    with pytest.raises(Stop):
        agent.retrain(buffer)
    assert trained_at[0] >= returned_at[0]
    release.clear()
    assert worker.call(late_plan, timeout_s=0.01)[0] is deadline.Outcome.LATE
    with pytest.raises(deadline.PlannerHung):  # never returns within plan_hang_s
        agent.retrain(buffer)
    release.set()
    worker.wait_idle(5)


def test_a_planner_that_never_returns_ends_the_job_with_planner_hung(trained, tmp_path):
    """Every tick falls back while the planner is stuck; after the episode is on record the job
    waits loop.plan_hang_s for it, then ends with PlannerHung (one line from the CLI)."""
    import json
    import threading

    from robot_mbrl.agents.mpc import MPCAgent
    from robot_mbrl.config import load_config
    from robot_mbrl.errors import USER_ERRORS
    from robot_mbrl.factory import make_judge, make_robot, make_task
    from robot_mbrl.runtime.deadline import PlannerHung
    from robot_mbrl.runtime.jobs import run_episodes
    from robot_mbrl.runtime.progress import Progress
    from robot_mbrl.runtime.rundir import Tally, run_dir

    out, _ = trained
    cfg = load_config(
        str(out / "config.yaml"),
        ["loop.plan_hang_s=0.2", "loop.paced=true", "task.episode_steps=10", "loop.preempt_planner=true"],
    )
    robot, task = make_robot(cfg), make_task(cfg)
    ctl = MPCAgent.load(out, cfg, robot.spec, task).controller()
    ctl.paced = False  # (no warm-up at reset: the planner stuck in the episode is the subject)
    release = threading.Event()
    plan = ctl.planner.plan
    ctl.planner.plan = lambda *a, **k: release.wait(30.0) and plan(*a, **k)
    tally = Tally()
    try:
        with (
            robot,
            run_dir(tmp_path / "run", new=True) as run,
            pytest.raises(PlannerHung, match="plan_hang_s 0.2"),
        ):
            run_episodes(cfg, robot, make_judge(task, robot), ctl, run, tally, episodes=2, first_episode=0,
                         seed_offset=0, progress=Progress(20, "run", enabled=False), kind="run")  # fmt: skip
    finally:
        release.set()
    assert (
        tally.real_steps == 10 and tally.fallback_ticks == 10 and tally.deadline_misses == 10
    )  # one episode
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["episode"] for r in records] == [0]  # on record before the job ended
    assert issubclass(PlannerHung, USER_ERRORS)  # one line from the CLI, no traceback


def test_monitors_that_cannot_be_calibrated_are_in_alarm(trained):
    from robot_mbrl.agents.mpc import MPCAgent
    from robot_mbrl.config import load_config
    from robot_mbrl.factory import make_robot, make_task

    out, _ = trained
    cfg = load_config(str(out / "config.yaml"), ["monitor.residual_horizon=3"])
    robot = make_robot(cfg)
    agent = MPCAgent.load(out, cfg, robot.spec, make_task(cfg))
    assert agent.controller().monitor.uncalibrated is None  # the checkpoint holds 3-tick segments
    for key in ("segment_obs0", "segment_act", "segment_next_obs"):  # an older checkpoint: none
        agent.ood_reference.pop(key)
    ctl = agent.controller()
    assert "residual_horizon=3" in ctl.monitor.uncalibrated
    assert ("monitor_uncalibrated", 1.0, 0.0) in ctl.monitor.active_alarms()  # the gate falls back


def test_k_step_residuals_follow_the_applied_actions_open_loop(trained):
    """monitor.residual_horizon = k: the residual at tick t compares s_t+1 with the ensemble-mean
    prediction from s_t-k+1 through the k actions really applied (the same numbers ``open_loop``
    gives on held-out segments, where it is calibrated); the first k-1 ticks and a gap give NaN."""
    import numpy as np

    from robot_mbrl.agents.mpc import MPCAgent
    from robot_mbrl.agents.predictive import open_loop
    from robot_mbrl.config import load_config
    from robot_mbrl.data.buffer import ReplayBuffer
    from robot_mbrl.factory import make_robot, make_task
    from robot_mbrl.runtime.episode import Transition

    out, _ = trained
    k = 3
    cfg = load_config(None, ["task.episode_steps=60", f"monitor.residual_horizon={k}"])
    robot = make_robot(cfg)
    agent = MPCAgent.load(out, cfg, robot.spec, make_task(cfg))
    one_step = np.asarray(agent.thresholds["residual_whiten"])
    ctl = agent.controller()
    assert not np.allclose(ctl.monitor.residual_whiten, one_step)  # calibrated for k = 3 instead
    seen: list[np.ndarray] = []
    real_observe = ctl.monitor.observe
    ctl.monitor.observe = lambda o, a, n, mean, std, tick: (
        seen.append(mean) or real_observe(o, a, n, mean, std, tick)
    )
    d = ReplayBuffer.open(out / "buffer").arrays()
    first = np.flatnonzero(d["episode_id"] == d["episode_id"][0])[:8]
    ctl.reset(None)

    def feed(i: int) -> None:
        ctl.observe(Transition(d["obs"][i], d["act"][i], 0.0, d["next_obs"][i], False, False, 0.0, 0))

    for i in first:
        feed(i)
    assert all(np.isnan(m).all() for m in seen[: k - 1])
    for j in range(k - 1, len(first)):
        start = first[j - k + 1]
        want = open_loop(
            agent.model, d["obs"][start][None], d["act"][start : start + k][None], robot.spec.angle_mask
        )
        np.testing.assert_allclose(seen[j], want[0], rtol=1e-5, atol=1e-6)
    feed(first[2])  # not the continuation of the last transition: the predictions restart
    assert np.isnan(seen[-1]).all()


def test_commission_recalibrates_the_monitors_on_the_controllers_own_run(trained, tmp_path):
    """`commission` runs the checkpoint's controller (monitors observing only), pools its real
    transitions with the held-out set, writes the checkpoint back, and `run` uses the result."""
    import shutil

    import numpy as np

    from robot_mbrl.agents.mpc import MPCAgent
    from robot_mbrl.config import load_config
    from robot_mbrl.factory import make_robot, make_task

    out = tmp_path / "ck"
    shutil.copytree(trained[0], out)
    r = cli("commission", "--checkpoint", str(out), "--episodes", "2", "--out", str(tmp_path / "c"), *TINY,
            "--set", "monitor.ood_tail=gpd", "--set", "monitor.ood_false_alarm_rate=1e-4")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "commissioned" in r.stdout
    assert "Warning" not in r.stderr, r.stderr[-2000:]  # e.g. an empty returns plot's legend
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["ticks"] == 120 and summary["commission"]["transitions"] == 120
    cfg = load_config(None, ["task.episode_steps=60", "monitor.autocorr_batch_ticks=20"])
    robot = make_robot(cfg)
    agent = MPCAgent.load(out, cfg, robot.spec, make_task(cfg))
    ref = agent.ood_reference
    assert len(ref["commission_obs"]) == 120 and set(np.unique(ref["commission_episode"])) == {0, 1}
    fresh = MPCAgent.load(trained[0], cfg, robot.spec, make_task(cfg))
    a, b = agent.controller().monitor, fresh.controller().monitor
    assert not np.allclose(a.residual_whiten, b.residual_whiten)  # pooled calibration + inflation
    assert all(x >= 1.0 for x in agent.thresholds["residual_inflation"])
    r = cli("run", "--checkpoint", str(out), "--episodes", "1", "--out", str(tmp_path / "run"), *TINY)
    assert r.returncode == 0, r.stderr[-2000:]
    steps = json.loads((out / "summary.json").read_text())["real_steps"]
    r = cli("train", "--resume", str(out), "--steps", str(steps + 60), *TINY)  # one more episode + retrain
    assert r.returncode == 0, r.stderr[-2000:]
    again = MPCAgent.load(out, cfg, robot.spec, make_task(cfg))
    assert (
        again.retrains > agent.retrains and "commission_obs" not in again.ood_reference
    )  # new model: dropped
    r = cli("commission", "--checkpoint", str(tmp_path / "missing"), *TINY)
    assert r.returncode == 2 and "--checkpoint" in r.stderr
    MPCAgent(cfg, robot.spec, make_task(cfg)).save(tmp_path / "untrained")  # no held-out data in it
    r = cli("commission", "--checkpoint", str(tmp_path / "untrained"), *TINY)
    assert r.returncode == 2 and "held-out calibration data" in r.stderr and "Traceback" not in r.stderr


def test_loaded_value_stays_fitted_and_learning_episodes_can_plan_optimistically(trained):
    """A loaded trained agent's V keeps its normalizers (a resumed run continues it instead of
    refitting them); value.learning_pessimism and planner.exploration_bonus change only the learning
    controller; planned
    value rounds run on the buffer's real states and keep the heads finite."""
    import dataclasses

    import torch

    from robot_mbrl.agents.mpc import MPCAgent
    from robot_mbrl.config import load_config
    from robot_mbrl.data.buffer import ReplayBuffer
    from robot_mbrl.factory import make_robot, make_task

    out, _ = trained
    cfg = load_config(None, ["task.episode_steps=60", "value.learning_pessimism=-1.0", "value.planned_rounds=1",
                             "value.planned_epochs=2", "planner.exploration_bonus=0.5"])  # fmt: skip
    robot = make_robot(cfg)
    agent = MPCAgent.load(out, cfg, robot.spec, make_task(cfg))
    assert agent.value.fitted
    s = torch.zeros(3, robot.spec.obs_dim)
    s[:, 3] = torch.tensor([0.0, 4.0, 8.0])
    learn_v = agent.controller(learning=True).planner.value_fn(s)
    deploy_v = agent.controller().planner.value_fn(s)
    torch.testing.assert_close(learn_v, agent.value(s, pessimism=-1.0))
    torch.testing.assert_close(deploy_v, agent.value(s))
    assert bool((learn_v >= deploy_v).all())
    assert agent.controller(learning=True).planner.cfg.exploration_bonus == 0.5
    assert agent.controller().planner.cfg.exploration_bonus == 0.0  # evaluation and deployment: none
    agent.value.cfg = dataclasses.replace(agent.value.cfg, planned_rounds=1, planned_epochs=2)
    data = ReplayBuffer.open(out / "buffer").arrays()
    rep = agent._planned_value_rounds(data)
    assert rep is not None and rep.epochs == 2
    assert bool(torch.isfinite(agent.value.head_values(torch.tensor(data["obs"]))).all())


def test_terminal_value_from_the_buffer_is_stored_and_the_run_config_switches_it(trained, tmp_path):
    """value.terminal=lqr on a checkpoint whose terminal value is of another kind (the default
    config's lqr_model) or missing: fitted from its run's buffer (a linear fit of the best real
    transitions), V at the goal is at least the LQR value, the planner gets the LQR candidate, a
    save/load keeps the same gains, and value.terminal=none turns all of it off."""
    import numpy as np
    import torch

    from robot_mbrl.agents.mpc import MPCAgent
    from robot_mbrl.config import load_config
    from robot_mbrl.factory import make_robot, make_task

    out, _ = trained
    cfg = load_config(None, ["task.episode_steps=60", "value.terminal=lqr"])
    robot = make_robot(cfg)
    agent = MPCAgent.load(out, cfg, robot.spec, make_task(cfg))
    assert agent.terminal is not None and agent.value.has_terminal
    goal = torch.zeros(robot.spec.obs_dim)
    assert float(agent.value(goal).detach()) >= agent.terminal.v0 - 1e-4
    assert agent.controller().planner.prior is not None
    agent.save(tmp_path)
    again = MPCAgent.load(tmp_path, cfg, robot.spec, make_task(cfg))
    np.testing.assert_allclose(again.terminal.K, agent.terminal.K)
    slope_cfg = load_config(None, ["task.episode_steps=60", "value.terminal=lqr_model"])
    slope = MPCAgent.load(out, slope_cfg, robot.spec, make_task(slope_cfg))  # the ensemble's slope
    assert slope.terminal is not None and not np.allclose(slope.terminal.K, agent.terminal.K)
    off_cfg = load_config(None, ["task.episode_steps=60"])
    off = MPCAgent.load(tmp_path, off_cfg, robot.spec, make_task(off_cfg))
    assert off.terminal is None and not off.value.has_terminal and off.controller().planner.prior is None


def test_controller_estimates_the_disturbance_from_one_step_residuals(trained):
    """planner.disturbance_rate: the controller averages (real next obs - model mean) into the
    planner's disturbance, clips a glitch to 3 x the model's per-tick scale, restarts per episode."""
    import numpy as np

    from robot_mbrl.agents.mpc import MPCAgent
    from robot_mbrl.agents.predictive import predictive
    from robot_mbrl.config import load_config
    from robot_mbrl.factory import make_robot, make_task
    from robot_mbrl.hal.robot import Observation
    from robot_mbrl.runtime.episode import Transition

    out, _ = trained
    cfg = load_config(None, ["task.episode_steps=60", "planner.disturbance_rate=0.5"])
    robot = make_robot(cfg)
    agent = MPCAgent.load(out, cfg, robot.spec, make_task(cfg))
    ctrl = agent.controller()
    obs, act = np.array([0.05, 3.0, 0.1, 0.2, 0.0]), np.array([0.3])
    mean, _ = predictive(agent.model, obs[None], act[None], robot.spec.angle_mask, agent.variance_coef)
    scale = agent.model.state_scale.detach().numpy()
    offset = 0.5 * scale * np.array([1, -1, 1, -1, 1])
    for _ in range(2):
        ctrl.observe(Transition(obs, act, 0.0, mean[0] + offset, False, False, 0.0, 0))
    np.testing.assert_allclose(ctrl.planner.disturbance.numpy(), 0.75 * offset, rtol=1e-3, atol=1e-5)
    ctrl.observe(Transition(obs, act, 0.0, mean[0] + 100 * scale, False, False, 0.0, 0))  # a glitch
    assert bool((ctrl.planner.disturbance.numpy() <= 0.375 * offset + 0.5 * 3 * scale + 1e-5).all())
    ctrl.reset(Observation(obs, 0.0))
    assert ctrl.planner.disturbance is None


def test_emulate_says_that_episode_clocks_count_from_its_start():
    shift = "twin.schedule=[{at_s: 3.0, kind: sensor_bias, target: theta_rad, value: 0.1}]"
    r = cli("emulate", "--duration", "0.3", "--set", shift, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "clock: episode count from the emulator's start" in r.stdout
    r = cli("emulate", "--duration", "0.3", "--set", shift.replace("}]", ", clock: total}]"), timeout=60)
    assert r.returncode == 0 and "clock: episode" not in r.stdout


def test_a_checkpoint_is_run_on_its_own_tasks_robot(trained, tmp_path):
    """``--backend twin`` on a gymnasium env's checkpoint failed on whichever of the run's settings the
    cart-pole rejected first (fallback.safe_x_m vs the twin's end stop): the mismatch is named, for
    ``--set backend=`` too (review)."""
    out, _ = trained
    a = tmp_path / "a"
    r = cli("run", "--checkpoint", str(out), "--backend", "gym", "--episodes", "1", "--out", str(a))
    said = "--backend gym: expected backend twin or serial, got gym"
    assert r.returncode == 2 and said in r.stderr, r.stderr[-800:]
    gym_run = tmp_path / "gym_run"
    (gym_run / "checkpoint").mkdir(parents=True)
    (gym_run / "config.yaml").write_text("backend: gym\n")
    for job, asked, said in (
        ("run", ["--backend", "twin"], "--backend twin: expected backend gym, got twin"),
        ("commission", ["--backend", "serial"], "--backend serial: expected backend gym, got serial"),
        ("run", ["--set", "backend=twin"], "--set backend twin: expected backend gym, got twin"),
    ):
        r = cli(job, "--checkpoint", str(gym_run), *asked, "--out", str(tmp_path / job))
        assert r.returncode == 2 and said in r.stderr, (job, r.stderr[-800:])
