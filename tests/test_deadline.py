"""The planner's worker thread: waited for until the deadline, never twice at a time, late results
discarded, a hang reported (robot_mbrl/runtime/deadline.py)."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from robot_mbrl.runtime.deadline import DeadlineWorker, Outcome, PlannerHung, short_switch_interval


def test_a_call_that_returns_in_time_gives_its_value_and_one_that_raises_its_error():
    w = DeadlineWorker()
    assert w.call(lambda a, b: a + b, 2, 3, timeout_s=5.0) == (Outcome.DONE, 5)
    err = ValueError("bad state")

    def boom():
        raise err

    assert w.call(boom, timeout_s=5.0) == (Outcome.ERROR, err)
    w.wait_idle(1.0)


def test_the_caller_stops_waiting_at_the_deadline_and_the_late_result_is_never_used():
    w = DeadlineWorker()
    release = threading.Event()
    t0 = time.monotonic()
    assert w.call(lambda: release.wait(10.0) and "stale", timeout_s=0.05) == (Outcome.LATE, None)
    waited = time.monotonic() - t0
    assert waited < 5.0  # did not wait for the call (it blocks for up to 10 s)
    assert w.running
    assert w.call(lambda: "fresh", timeout_s=5.0) == (Outcome.BUSY, None)  # never two at a time
    release.set()
    for _ in range(500):
        if not w.running:
            break
        time.sleep(0.01)
    assert w.call(lambda: "fresh", timeout_s=5.0) == (Outcome.DONE, "fresh")  # not "stale"
    assert (w.late, w.busy) == (1, 1)
    w.wait_idle(1.0)


def test_no_time_left_means_the_call_is_not_started():
    w = DeadlineWorker()
    ran = []
    assert w.call(ran.append, 1, timeout_s=0.0) == (Outcome.LATE, None)
    time.sleep(0.05)
    assert ran == [] and not w.running
    w.wait_idle(1.0)


def test_wait_idle_waits_for_a_late_call_and_reports_one_that_hangs():
    w = DeadlineWorker()
    assert w.call(time.sleep, 0.2, timeout_s=0.01)[0] is Outcome.LATE
    w.wait_idle(5.0)  # returns once the call is done
    assert not w.running
    assert w.call(lambda: 1, timeout_s=5.0) == (Outcome.DONE, 1)
    release = threading.Event()
    assert w.call(release.wait, timeout_s=0.01)[0] is Outcome.LATE
    with pytest.raises(PlannerHung, match=r"planner has not returned for .* \(loop.plan_hang_s 0.1\)"):
        w.wait_idle(0.1)
    release.set()
    w.wait_idle(5.0)
    assert w.call(lambda: 2, timeout_s=5.0) == (Outcome.DONE, 2)  # the same thread, usable again


def test_a_planner_spinning_in_python_does_not_keep_the_caller_past_its_deadline():
    """A planner spinning in pure Python holds the GIL between switch intervals; the caller still
    stops waiting at its deadline. The episode's shorter interval is restored after."""
    old = sys.getswitchinterval()
    stop = threading.Event()

    def spin():
        n = 0
        while not stop.is_set():
            n += 1
        return n

    w = DeadlineWorker()
    with short_switch_interval(0.0005):
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        t0 = time.monotonic()
        assert w.call(spin, timeout_s=0.02)[0] is Outcome.LATE
        waited = time.monotonic() - t0
        stop.set()
    assert sys.getswitchinterval() == old
    w.wait_idle(5.0)
    assert waited < 1.0  # (about 20 ms; generous for a loaded CI host; the spin never ends by itself)


def test_the_worker_runs_one_realtime_priority_below_its_caller():
    import os

    from robot_mbrl.runtime.loop import realtime

    w = DeadlineWorker()
    with realtime(10) as granted:
        if not granted:
            pytest.skip("SCHED_FIFO not permitted here")
        assert w.call(lambda: os.sched_getparam(0).sched_priority, timeout_s=5.0) == (Outcome.DONE, 9)
    with realtime(1):  # one below 1 is normal scheduling: never the caller's own priority
        assert w.call(lambda: os.sched_getscheduler(0) == os.SCHED_OTHER, timeout_s=5.0) == (
            Outcome.DONE,
            True,
        )
    # a caller at normal priority: the worker is back on normal scheduling too
    assert w.call(lambda: os.sched_getscheduler(0) == os.SCHED_OTHER, timeout_s=5.0) == (Outcome.DONE, True)
