"""The fixed-rate loop: absolute deadlines, overrun accounting, re-anchoring, lockstep."""

import time

import pytest

from robot_mbrl.runtime.loop import RateLoop, SampleSync


class FakeClock:
    """A manual clock: sleep() advances it exactly, work is simulated with advance()."""

    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, dt: float) -> None:
        self.t += dt

    def advance(self, dt: float) -> None:
        self.t += dt


def test_deliberately_slow_steps_are_counted_as_overruns():
    clock = FakeClock()
    loop = RateLoop(50.0, paced=True, clock=clock, sleep=clock.sleep, max_ticks=10)
    for tick in loop:
        clock.advance(0.030 if tick.index in (3, 7) else 0.005)  # 30 ms > 20 ms period
    st = loop.stats()
    assert st.ticks == 10
    assert st.overruns == 2
    assert st.step_ms["max"] == pytest.approx(30.0)
    assert st.slack_ms["min"] == pytest.approx(-10.0)


def test_absolute_deadlines_do_not_drift():
    clock = FakeClock()
    loop = RateLoop(100.0, paced=True, clock=clock, sleep=clock.sleep, max_ticks=50)
    starts = []
    for tick in loop:
        starts.append(tick.start_s)
        clock.advance(0.004 + 0.001 * (tick.index % 3))  # variable work, always < period
    assert loop.stats().overruns == 0
    # tick i starts exactly at t0 + i * period: no accumulated drift
    for i, s in enumerate(starts):
        assert s == pytest.approx(starts[0] + i * 0.01)


def test_long_overrun_reanchors_instead_of_bursting():
    clock = FakeClock()
    loop = RateLoop(50.0, paced=True, clock=clock, sleep=clock.sleep, max_ticks=6)
    starts = []
    for tick in loop:
        starts.append(tick.start_s)
        clock.advance(0.075 if tick.index == 1 else 0.001)  # a 75 ms stall
    st = loop.stats()
    assert st.overruns == 1
    assert st.skipped == 3  # 75 ms stall covers 3 whole further periods
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert min(gaps) >= 0.02 - 1e-9  # never two ticks back to back after the stall


def test_late_reports_a_missed_deadline_to_the_caller():
    clock = FakeClock()
    loop = RateLoop(50.0, paced=True, clock=clock, sleep=clock.sleep, max_ticks=2)
    seen = []
    for tick in loop:
        clock.advance(0.012 if tick.index == 0 else 0.025)
        seen.append((loop.late(0.5), loop.late()))
    assert seen == [(True, False), (True, True)]


def test_lockstep_never_sleeps_and_real_pacing_keeps_rate():
    slept = []
    loop = RateLoop(50.0, paced=False, sleep=slept.append, max_ticks=100)
    for _ in loop:
        pass
    assert slept == [] and loop.stats().ticks == 100
    loop = RateLoop(200.0, paced=True, max_ticks=40)
    t0 = time.monotonic()
    for _ in loop:
        pass
    elapsed = time.monotonic() - t0
    assert 0.19 <= elapsed < 0.5  # 40 ticks at 200 Hz = 0.195 s after the first


def test_shift_moves_the_current_deadline_and_the_later_ticks():
    clock = FakeClock()
    loop = RateLoop(100.0, paced=True, clock=clock, sleep=clock.sleep, max_ticks=3)
    starts = []
    for tick in loop:
        starts.append(clock.t)
        if tick.index == 1:
            loop.shift(0.003)
            assert loop.budget_left_s() == pytest.approx(0.013)  # the deadline moved with the schedule
            clock.advance(0.012)  # past the old deadline, before the moved one: no overrun
    assert starts[1] - starts[0] == pytest.approx(0.010)
    assert starts[2] - starts[1] == pytest.approx(0.013)
    assert loop.overruns == 0


class SamplingDevice:
    """A device that samples on its own clock: sample k at ``phase + k * period * (1 + drift)`` plus
    seeded jitter (k from -5: it was sampling before the host came), readable from then on; a read
    returns the newest (its index and age)."""

    streams_samples = True

    def __init__(self, clock, period, phase, drift, jitter, seed=0):
        import numpy as np

        rng = np.random.default_rng(seed)
        n = 5000
        self.t = phase + np.arange(-5, n - 5) * period * (1 + drift) + rng.uniform(-jitter, jitter, n)
        self.clock = clock
        self.read_idx = -1

    def newest(self) -> int:
        return int((self.t <= self.clock.t).sum()) - 1

    def await_sample(self, timeout_s, max_age_s=float("inf")):
        k = self.newest()
        if k > self.read_idx and self.clock.t - self.t[k] <= max_age_s:
            return 0.0
        wait = self.t[k + 1] - self.clock.t
        if wait <= timeout_s:
            self.clock.advance(wait)
            return wait
        self.clock.advance(timeout_s)
        return None

    def read(self):
        from types import SimpleNamespace

        self.read_idx = k = self.newest()
        return SimpleNamespace(k=k, info={"age_s": self.clock.t - self.t[k]})


@pytest.mark.parametrize("phase_ms", [0.05, 5.0, 12.0, 19.0])
@pytest.mark.parametrize("drift", [0.0, 2e-4, -2e-4])
def test_sample_sync_reads_the_sample_after_each_command_from_any_phase_and_under_drift(drift, phase_ms):
    """Whatever phase the host's ticks start at against the device's samples (0.05 ms before one:
    the knife edge a reset can leave) and with the device's clock 200 ppm off (0.4 periods over the
    run), every reading from the second on is the first sample taken after the previous command,
    read within a millisecond of its sampling. Without the sync the host at the knife edge reads the
    previous period's sample on most ticks."""
    import numpy as np

    period, n = 0.020, 2000
    for synced in (True, False):
        clock = FakeClock()
        dev = SamplingDevice(clock, period, clock.t + phase_ms * 1e-3, drift, jitter=0.0003)
        sync = SampleSync(period, 0.25 * period)
        loop = RateLoop(1 / period, paced=True, clock=clock, sleep=clock.sleep, max_ticks=n)
        written, good, age = None, [], []
        for tick in loop:
            k = (sync.read(dev, loop, first=tick.index == 0) if synced else dev.read()).k
            age.append(clock.t - dev.t[k])
            # the reading is the device's first sample after the command: vouched
            good.append(written is not None and dev.t[k - 1] < written < dev.t[k])
            clock.advance(0.006)  # plan
            written = clock.t
        if synced:
            assert sum(good[1:]) == n - 1, sum(good[1:])  # the first too: the first read waits for its sample
            assert np.percentile(age, 99) < 0.001
            assert sync.timeouts == 0
        elif drift >= 0 and phase_ms < 1:  # (a device clock running fast carries its samples off the edge)
            assert sum(good) < n // 2, sum(good)


@pytest.mark.parametrize("device_period_ms", [10.0, 17.0, 24.0])
def test_sample_sync_keeps_control_hz_when_the_device_streams_at_another_rate(device_period_ms, caplog):
    """A device that streams STATE faster or slower than control_hz: the ticks follow it only as far
    as clocks drift (one WARNING), not to its rate."""
    period, n = 0.020, 1000
    clock = FakeClock()
    dev = SamplingDevice(clock, device_period_ms * 1e-3, clock.t + 0.001, 0.0, jitter=0.0001)
    sync = SampleSync(period, 0.25 * period)
    loop = RateLoop(1 / period, paced=True, clock=clock, sleep=clock.sleep, max_ticks=n)
    starts = []
    with caplog.at_level("WARNING", logger="robot_mbrl.runtime.loop"):
        for tick in loop:
            starts.append(tick.start_s)
            sync.read(dev, loop)
            clock.advance(0.004)
    rate = (starts[-1] - starts[0]) / (n - 1)
    assert abs(rate - period) / period < 0.065, rate  # (within MAX_CLOCK_DRIFT and a period over the run)
    assert sync.held > 0 and len([r for r in caplog.records if "control_hz" in r.getMessage()]) == 1


def test_sample_sync_moves_nothing_on_a_reading_of_unknown_age():
    """The link went down under the read: the reading is stale with an infinite age; no move."""
    from types import SimpleNamespace

    class LinkDropped:
        streams_samples = True

        def await_sample(self, timeout_s, max_age_s=float("inf")):
            return 0.0

        def read(self):
            return SimpleNamespace(info={"age_s": float("inf")})

    clock = FakeClock()
    sync = SampleSync(0.020, 0.005)
    loop = RateLoop(50.0, paced=True, clock=clock, sleep=clock.sleep, max_ticks=3)
    for _ in loop:
        sync.read(LinkDropped(), loop)
    assert sync.moved_s == 0.0 and loop.stats().ticks == 3
    with pytest.raises(ValueError, match="finite"):
        loop.shift(float("-inf"))


def test_bad_rate_is_rejected():
    with pytest.raises(ValueError, match="rate_hz"):
        RateLoop(0.0)


class _Cycle:
    """A reference cycle: only the cyclic collector frees it."""

    def __init__(self):
        self.me = self


def test_frozen_heap_keeps_the_collector_off_objects_made_before_the_loop():
    """A full collection inside the scope does not walk the objects that existed on entry (a cycle
    dropped inside survives gc.collect()); on exit they are handed back and collected."""
    import gc
    import weakref

    from robot_mbrl.runtime.loop import frozen_heap

    x = _Cycle()
    alive = weakref.ref(x)
    with frozen_heap():
        assert gc.get_freeze_count() > 0
        del x
        gc.collect()
        assert alive() is not None  # frozen: not walked by the full pass
        y = _Cycle()  # made inside the loop: collected as usual
        made_inside = weakref.ref(y)
        del y
        gc.collect()
        assert made_inside() is None
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert alive() is None  # nothing leaks past the scope


def test_frozen_heap_nests_and_unfreezes_on_an_exception():
    import gc

    from robot_mbrl.runtime.loop import frozen_heap

    with pytest.raises(RuntimeError):
        with frozen_heap():
            with frozen_heap():
                pass
            assert gc.get_freeze_count() > 0  # the inner exit leaves the outer scope frozen
            raise RuntimeError("boom")
    assert gc.get_freeze_count() == 0


class _StuckTerminal:
    """A text stream whose writes block until released (an operator's Ctrl-S, a stalled ssh)."""

    def __init__(self):
        import threading

        self.released = threading.Event()
        self.text: list[str] = []

    def write(self, s: str) -> int:
        assert self.released.wait(10)
        self.text.append(s)
        return len(s)

    def flush(self) -> None:
        pass


def _returns_promptly(fn) -> bool:
    import threading

    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(5)
    return not t.is_alive()


def test_a_stuck_terminal_never_blocks_a_tick_through_the_progress_bar_or_a_log_line():
    import logging

    from robot_mbrl.cli import queued_logging
    from robot_mbrl.runtime.progress import Progress

    term = _StuckTerminal()
    term.released.set()  # tqdm draws the empty bar on creation
    bar = Progress(500, "train", file=term, refresh_s=0.01)
    term.released.clear()
    assert _returns_promptly(lambda: [(bar.tick(i), time.sleep(0.002)) for i in range(1, 251)])  # an episode
    term.released.set()
    bar.__exit__(None, None, None)
    assert "250/500" in "".join(term.text)

    logger = logging.getLogger("test.stuck_terminal")
    logger.propagate = False
    term = _StuckTerminal()
    with queued_logging(logging.WARNING, stream=term, logger=logger):
        assert _returns_promptly(lambda: logger.warning("gate: fallback (disagreement)"))
        term.released.set()
    assert "WARNING test.stuck_terminal: gate: fallback (disagreement)" in "".join(term.text)
    assert not logger.handlers  # handed back as it was


def test_realtime_scope_sets_fifo_and_restores_or_warns_once_when_refused(monkeypatch, caplog):
    import os

    import robot_mbrl.runtime.loop as mod

    calls = []
    monkeypatch.setattr(mod, "_refused", set())
    monkeypatch.setattr(
        os, "sched_setscheduler", lambda pid, policy, param: calls.append((policy, param.sched_priority))
    )
    monkeypatch.setattr(os, "sched_getscheduler", lambda pid: os.SCHED_OTHER)
    monkeypatch.setattr(os, "sched_getparam", lambda pid: os.sched_param(0))
    with mod.realtime(0) as granted:
        assert not granted and not calls  # 0: nothing asked of the OS
    with mod.realtime(40) as granted:
        assert granted and calls == [(os.SCHED_FIFO, 40)]
    assert calls[-1] == (os.SCHED_OTHER, 0)  # restored on exit

    def refuse(pid, policy, param):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    for _ in range(3):
        with mod.realtime(40) as granted:
            assert not granted
    assert caplog.text.count("loop.rt_priority: expected permission for SCHED_FIFO 40") == 1
    monkeypatch.delattr(os, "sched_setscheduler")  # not Linux
    with mod.realtime(30) as granted:
        assert not granted
    assert "loop.rt_priority: expected a platform with SCHED_FIFO" in caplog.text


def test_a_writer_started_from_a_realtime_thread_runs_at_normal_priority(tmp_path):
    import os

    from robot_mbrl.runtime.files import OrderedWriter
    from robot_mbrl.runtime.loop import realtime

    seen = []
    with realtime(10) as granted:
        if not granted:
            pytest.skip("SCHED_FIFO not permitted here (no CAP_SYS_NICE)")
        assert os.sched_getscheduler(0) == os.SCHED_FIFO
        writer = OrderedWriter("test")
        writer.submit(lambda: seen.append(os.sched_getscheduler(0)))
        writer.close()
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    assert seen == [os.SCHED_OTHER]  # the thread inherited FIFO and lowered itself


@pytest.mark.parametrize("paced", [True, False])
def test_episodes_run_at_the_configured_rt_priority_only_on_the_wall_clock(tmp_path, paced):
    import os

    import numpy as np

    from robot_mbrl.config import load_config
    from robot_mbrl.factory import make_judge, make_robot, make_task
    from robot_mbrl.runtime.episode import Decision
    from robot_mbrl.runtime.jobs import run_episodes
    from robot_mbrl.runtime.loop import realtime
    from robot_mbrl.runtime.progress import Progress
    from robot_mbrl.runtime.rundir import RunDir, Tally

    with realtime(10) as granted:
        if not granted:
            pytest.skip("SCHED_FIFO not permitted here (no CAP_SYS_NICE)")
    cfg = load_config(
        None, [f"loop.paced={str(paced).lower()}", "loop.rt_priority=10", "task.episode_steps=5"]
    )
    seen = []

    class Record:
        def reset(self, obs):
            pass

        def observe(self, tr):
            return []

        def act(self, obs, tick, loop):
            seen.append(os.sched_getscheduler(0))
            return Decision(np.zeros(1))

    robot, task = make_robot(cfg), make_task(cfg)
    run = RunDir(tmp_path / "run")
    with robot, Progress(5, "t", enabled=False) as bar:
        run_episodes(cfg, robot, make_judge(task, robot), Record(), run, Tally(), episodes=1, first_episode=0,
                     seed_offset=0, progress=bar, kind="run")  # fmt: skip
    run.close()
    assert seen == [os.SCHED_FIFO if paced else os.SCHED_OTHER] * 5  # lockstep (a twin): no deadline to keep
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # back to normal between episodes


def test_next_start_follows_a_shift_inside_the_tick_and_a_re_anchor():
    """``next_start_s`` (where an episode's last reading waits for its slot) is the start the loop
    will actually use: moved by a shift inside the tick, and past the periods an overrun skipped."""
    clock = FakeClock()
    loop = RateLoop(50.0, paced=True, clock=clock, sleep=clock.sleep, max_ticks=3)
    starts, promised = [], []
    for tick in loop:
        starts.append(tick.start_s)
        if tick.index == 0:
            loop.shift(0.003)  # waited 3 ms for a sample
        if tick.index == 1:
            clock.advance(0.045)  # overruns by more than two periods: the loop re-anchors
        promised.append(loop.next_start_s)
        clock.advance(0.001)
    assert starts[1] == pytest.approx(promised[0])
    assert starts[2] == pytest.approx(loop.next_start_s - 0.020)  # (the last promise: after the loop)
    assert loop.skipped == 2
    # after the loop: the slot after the last tick, past anything skipped
    last = RateLoop(50.0, paced=True, clock=clock, sleep=clock.sleep, max_ticks=1)
    for _ in last:
        clock.advance(0.050)
    assert last.next_start_s > clock.t


@pytest.mark.parametrize("paced", [True, False])
def test_an_episode_on_the_wall_clock_ends_with_the_stop_command(paced):
    """On a rig the episode's last command acted on after the episode (through its evaluation,
    retrain, homing) until the device's watchdog tripped; it now ends with the stop command. In
    lockstep nothing acts between episodes: nothing more is written."""
    from types import SimpleNamespace

    import numpy as np

    from robot_mbrl.config import load_config
    from robot_mbrl.factory import make_judge, make_robot, make_task
    from robot_mbrl.runtime.episode import run_episode
    from robot_mbrl.runtime.policies import PolicyController
    from robot_mbrl.runtime.rundir import Tally

    cfg = load_config(None, ["twin.control_hz=100"])  # a rate limit of 0.5 per tick: a ramp would not stop
    robot, task = make_robot(cfg), make_task(cfg)
    sent = []
    send = robot._send
    robot._send = lambda a: sent.append(np.asarray(a, dtype=float).tolist()) or send(a)
    push = PolicyController(SimpleNamespace(act=lambda obs: np.array([1.0])))
    with robot:
        res = run_episode(robot, make_judge(task, robot), push, episode=0, max_steps=4, seed=0, paced=paced,
                          tally=Tally())  # fmt: skip
    assert res.steps == 4
    assert sent == [[0.5], [1.0], [1.0], [1.0]] + ([robot.spec.stop_action().tolist()] if paced else [])


def test_a_new_episode_starting_on_the_other_side_of_the_fallback_is_logged():
    """train builds a new controller after a retrain (and a new explorer per episode), and a gate's
    reset starts on the MPC: an episode that ended on the fallback was followed by one on the MPC
    with no switch in events.jsonl. The runner logs it (trigger episode_start) unless the new
    controller's first decision is a logged switch itself."""

    import numpy as np

    from robot_mbrl.config import load_config
    from robot_mbrl.factory import make_judge, make_robot, make_task
    from robot_mbrl.runtime.episode import Decision, run_episode
    from robot_mbrl.runtime.rundir import Tally

    class Scripted:
        def __init__(self, sources):
            self.sources = sources

        def reset(self, obs):
            pass

        def act(self, obs, tick, loop):
            return Decision(np.zeros(1), source=self.sources[tick.index])

        def observe(self, tr):
            return []

    cfg = load_config(None, [])
    robot, task = make_robot(cfg), make_task(cfg)
    tally, events = Tally(), []
    with robot:
        for ep, sources in enumerate(
            (["policy", "fallback"], ["mpc", "mpc"], ["mpc", "fallback"], ["fallback"] * 2)
        ):
            run_episode(robot, make_judge(task, robot), Scripted(sources), episode=ep, max_steps=2, seed=0,
                        paced=False, tally=tally, on_event=events.append)  # fmt: skip
    got = [(e["episode"], e["tick"], e["trigger"], e["to"]) for e in events]
    assert got == [(1, 0, "episode_start", "mpc")], got  # ep 3 starts where ep 2 ended: nothing


def test_an_alarms_run_tick_is_its_own_tick_not_its_episodes_start():
    """summary.json's alarms all carried the run tick at their episode's start."""
    import numpy as np

    from robot_mbrl.config import load_config
    from robot_mbrl.factory import make_judge, make_robot, make_task
    from robot_mbrl.runtime.episode import Decision, run_episode
    from robot_mbrl.runtime.rundir import Tally

    class Alarming:
        def reset(self, obs):
            pass

        def act(self, obs, tick, loop):
            events = (
                [{"tick": tick.index, "kind": "alarm", "trigger": "cusum"}] if tick.index in (3, 7) else []
            )
            return Decision(np.zeros(1), source="mpc", events=events)

        def observe(self, tr):
            return []

    cfg = load_config(None, [])
    robot, task = make_robot(cfg), make_task(cfg)
    tally, events = Tally(ticks=100), []
    with robot:
        run_episode(robot, make_judge(task, robot), Alarming(), episode=0, max_steps=10, seed=0, paced=False,
                    tally=tally, on_event=events.append)  # fmt: skip
    assert [a["tick"] for a in tally.alarms] == [e["run_tick"] for e in events] == [103, 107]
