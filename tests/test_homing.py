"""Homing: the reset of a rig without one, on the real MuJoCo twin."""

from __future__ import annotations

import dataclasses
import gc
import logging
from types import SimpleNamespace

import numpy as np
import pytest

from robot_mbrl.config import load_config
from robot_mbrl.factory import make_judge, make_robot, make_task
from robot_mbrl.hal.robot import Fault, Observation
from robot_mbrl.runtime.homing import Homing, HomingConfig, make_homing
from robot_mbrl.safety.fallback import BrakePolicy, FallbackConfig
from robot_mbrl.typedconfig import ConfigError


@pytest.fixture
def twin():
    robot = make_robot(load_config(None, []))
    robot.connect()
    yield robot
    robot.close()


def _knock(robot, ticks: int = 120) -> np.ndarray:
    """Leave the cart off centre with the pole swinging, as the end of an episode would."""
    robot.reset(0)
    for t in range(ticks):
        obs = robot.read()
        robot.write(np.array([0.4 * np.sign(np.sin(t / 9.0))]))
    return obs.values


class _Recording:
    """The twin with every reading and command recorded; the first ``faulty`` readings carry a
    device fault."""

    def __init__(self, robot, faulty: int = 0):
        self.robot, self.faulty, self.commands, self.readings = robot, faulty, [], []

    def read(self) -> Observation:
        assert gc.get_freeze_count() > 0  # homing ticks run with the heap frozen (loop.frozen_heap)
        obs = self.robot.read()
        if self.faulty > 0:
            self.faulty -= 1
            obs = dataclasses.replace(obs, faults=Fault.WATCHDOG)
        self.readings.append(obs.values.copy())
        return obs

    def write(self, action):
        self.commands.append(np.asarray(action, dtype=float).copy())
        return self.robot.write(action)


def _homing(spec, **kw) -> Homing:
    return Homing(
        spec,
        HomingConfig(mode="always", **kw),
        BrakePolicy(spec, FallbackConfig()),
        load_config(None, []).explore,
    )


def test_homing_brings_the_cart_back_and_the_pole_to_rest(twin):
    start = _knock(twin)
    assert abs(start[0]) > 0.3 and abs(start[3]) > 3.0  # near the end stop, swinging hard
    events = []
    result = _homing(twin.spec).home(_Recording(twin), paced=False, on_event=events.append)
    assert result.settled and result.ticks < 30 * 50 and result.shielded_ticks > 0  # it braked first
    # the shield's switches reach events.jsonl as an episode's do
    assert events and all(e["phase"] == "homing" and e["kind"] == "switch" for e in events)
    assert events[0]["to"] == "fallback" and events[0]["applied"] != events[0]["proposed"]
    end = twin.read().values
    assert abs(end[0]) <= 0.05 and abs(end[2]) <= 0.05 and abs(end[3]) <= 0.5, end
    assert result.record() == {"homing_ticks": result.ticks, "homing_s": round(result.seconds, 3),
                               "homing_settled": True, "homing_shielded_ticks": result.shielded_ticks,
                               "homing_sample_timeouts": 0}  # fmt: skip


def test_homing_is_gentle_and_a_faulted_reading_gets_the_fallback(twin):
    twin.reset(0)
    for t in range(150):  # a gentle shake at the pole's resonance: swinging, the cart within 0.17 m
        twin.read()
        twin.write(np.array([0.15 * np.sin(2 * np.pi * t / 55)]))
    assert abs(twin.read().values[3]) > 1.0
    homing = _homing(twin.spec)
    rig = _Recording(twin, faulty=3)
    result = homing.home(rig, paced=False)
    cmds = np.array(rig.commands)[:, 0]
    brake = BrakePolicy(twin.spec, FallbackConfig())
    for i in range(3):  # the watchdog flag: the fallback's command on that reading
        assert cmds[i] == pytest.approx(brake.act(rig.readings[i])[0])
    assert result.settled and result.shielded_ticks == 3
    assert np.max(np.abs(cmds[3:])) <= 0.3 + 1e-12 and np.max(np.abs(cmds[3:])) > 0.1  # the capped law
    assert cmds[-1] == 0.0  # it leaves the actuator at the stop command


def test_homing_gives_up_after_its_timeout_with_a_warning(twin, caplog):
    _knock(twin)
    homing = _homing(twin.spec, timeout_s=0.5)
    with caplog.at_level(logging.WARNING, logger="robot_mbrl.runtime.homing"):
        result = homing.home(_Recording(twin), paced=False)
    assert not result.settled and result.ticks == 25  # 0.5 s at 50 Hz
    assert any("not settled within 0.5 s" in r.message for r in caplog.records)


def test_homing_first_read_waits_for_a_fresh_sample_like_an_episodes(twin, monkeypatch):
    """On a streaming rig the homing's first tick starts at whatever phase the episode before left:
    its read waits (up to the tick budget) for a fresh sample as an episode's first tick does
    (``SampleSync.read(first=True)``), the later ones only up to the sync's wait."""
    from robot_mbrl.runtime import homing as homing_mod

    firsts = []

    class Spy:
        timeouts = 0

        def read(self, robot, loop, first=False):
            firsts.append(first)
            return robot.read()

    monkeypatch.setattr(homing_mod.SampleSync, "where_useful", classmethod(lambda cls, r, lp, w: Spy()))
    _knock(twin, ticks=20)
    result = _homing(twin.spec, timeout_s=0.2).home(_Recording(twin), paced=False)
    assert result.ticks == len(firsts) >= 2
    assert firsts[0] is True and not any(firsts[1:]), firsts


def test_homing_is_on_for_rigs_only_and_checks_its_channels(twin):
    spec = twin.spec
    twin_cfg = load_config(None, [])
    assert make_homing(twin_cfg, spec) is None
    assert make_homing(load_config(None, ["backend=serial"]), spec) is not None
    assert make_homing(load_config(None, ["backend=serial", "homing.mode=never"]), spec) is None
    with pytest.raises(ConfigError, match="homing.channels: expected names from"):
        _homing(spec, channels=("x_m", "bogus"), tolerance=(0.1, 0.1))
    with pytest.raises(ConfigError, match=r"homing.gains: expected 1 x 3 values"):
        _homing(spec, gains=(1.0, 1.0))
    with pytest.raises(ConfigError, match="homing.tolerance: expected 3 values"):
        load_config(None, ["homing.tolerance=[0.1]"])


def test_train_homes_the_rig_while_the_model_retrains(tmp_path, monkeypatch):
    """The rig would stand still for the whole retrain and then home: the homing for the next
    episode runs during the retrain instead (and each learning episode is still homed once)."""
    import json
    import threading
    import time

    from robot_mbrl.agents.mpc import MPCAgent
    from robot_mbrl.cli import main

    retraining, seen = threading.Event(), []
    real_retrain, real_home = MPCAgent.retrain, Homing.home

    def retrain(self, buffer, *a, **kw):
        retraining.set()
        try:
            out = real_retrain(self, buffer, *a, **kw)
            time.sleep(0.3)  # a retrain that outlasts this twin's quick homing
            return out
        finally:
            retraining.clear()

    def home(self, robot, **kw):
        seen.append(retraining.is_set())
        return real_home(self, robot, **kw)

    monkeypatch.setattr(MPCAgent, "retrain", retrain)
    monkeypatch.setattr(Homing, "home", home)
    out = tmp_path / "run"
    rc = main(["train", "--out", str(out), "--steps", "180", "--quiet", "--set", "homing.mode=always",
               "--set", "task.episode_steps=60", "--set", "retrain.min_transitions=50",
               "--set", "train.eval_episodes=0", "--set", "trainer.max_epochs=5"])  # fmt: skip
    assert rc == 0
    learn = [
        m
        for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if m.get("kind") == "learn"
    ]
    assert len(learn) == 3 and all(m["homing_ticks"] > 0 for m in learn)
    assert seen == [False, True, True]  # the first before any model; the others during a retrain


def test_the_progress_bar_says_when_the_rig_is_homing(monkeypatch):
    """Homing takes seconds (up to homing.timeout_s): the bar sat at 0/750 meanwhile, like a hang."""
    import io

    from robot_mbrl.runtime import jobs
    from robot_mbrl.runtime.policies import PolicyController, ZeroPolicy
    from robot_mbrl.runtime.progress import Progress
    from robot_mbrl.runtime.rundir import Tally

    cfg = load_config(None, ["task.episode_steps=3"])
    robot = make_robot(cfg)
    seen = []
    monkeypatch.setattr(jobs, "home", lambda *a: seen.append(dict(bar._post)) or {})
    out = io.StringIO()
    with robot, Progress(6, "run", file=out) as bar:
        jobs.run_episodes(cfg, robot, make_judge(make_task(cfg), robot), PolicyController(ZeroPolicy(robot.spec)),
                          SimpleNamespace(event=None, timing=lambda r: None, metric=lambda r: None), Tally(),
                          episodes=2, first_episode=0, seed_offset=0, progress=bar, kind="run",
                          homing=object())  # fmt: skip
    assert [p.get("doing") for p in seen] == ["homing", "homing"] and bar._post["doing"] == "episode"
    assert "doing=homing" in out.getvalue()
