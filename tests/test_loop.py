"""The fixed-rate loop: absolute deadlines, overrun accounting, re-anchoring, lockstep."""

import time

import pytest

from robot_mbrl.runtime.loop import RateLoop


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
