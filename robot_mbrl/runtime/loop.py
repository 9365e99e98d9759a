"""A fixed-rate control loop on absolute deadlines (monotonic clock).

upkie-style: observe, act, log slack, write, sleep — the loop only does the timing::

    loop = RateLoop(50.0, paced=True)
    for tick in loop:
        obs = robot.read()
        action = controller(obs, missed=loop.late())
        robot.write(action)
    stats = loop.stats()  # overruns, slack, step-time percentiles

Deadlines are absolute (``next = start + i * period``), so sleep jitter never accumulates into drift.
A tick whose work ends after its deadline is an overrun; the loop counts it and the caller can ask
``late()`` before writing (the safety gate acts on it). When a tick overruns by more than a whole
period the schedule is re-anchored on the next future slot instead of bursting through the missed
ticks (counted in ``skipped``); a smaller overrun just starts the next tick late. With ``paced=False`` (lockstep with a twin) the loop never sleeps but still measures.

:func:`frozen_heap` keeps Python's cyclic garbage collector out of the ticks' time: a full
collection walks every tracked object (~310k in a `train` process: torch, MuJoCo, the model) and
takes 90-190 ms on this project's reference machine (up to ten control periods) whenever CPython's
heuristics pick a tick for it. Inside the scope the objects that existed on entry are frozen
(``gc.freeze``: moved out of the collector's generations, O(1)), so a collection during the loop
walks only what the loop itself allocated; on exit they are handed back and collected between
episodes as usual. Nothing is collected on entry (that would be the same pause, just earlier).
:func:`realtime` runs a rig's control thread at ``SCHED_FIFO`` (``loop.rt_priority``), so other
processes on the robot's computer cannot delay a tick.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from robot_mbrl.hal.robot import Observation, Robot


@dataclass(frozen=True)
class Tick:
    index: int
    scheduled_s: float  # when this tick should have started
    start_s: float  # when it did start
    deadline_s: float  # when its work must be done (scheduled + period)


@dataclass(frozen=True)
class LoopStats:
    ticks: int
    overruns: int  # ticks whose work ended after the deadline
    skipped: int  # whole periods dropped after long overruns
    step_ms: dict  # {"p50", "p99", "max"} of work time per tick
    slack_ms: dict  # {"p50", "p1", "min"} of deadline - end of work (negative = overrun)
    jitter_ms: dict  # {"p50", "p99", "max"} of |start - scheduled| (paced loops only)

    def as_dict(self) -> dict:
        return {
            "ticks": self.ticks,
            "overruns": self.overruns,
            "skipped": self.skipped,
            "step_ms": self.step_ms,
            "slack_ms": self.slack_ms,
            "jitter_ms": self.jitter_ms,
        }


P50_P99_MAX = {"p50": 50, "p99": 99, "max": 100}


def percentiles_ms(values: list[float], qs: dict[str, float] = P50_P99_MAX, scale: float = 1e3) -> dict:
    """Percentiles of ``values`` (seconds) in ms, by name (q 0 = min, 100 = max); zeros when empty."""
    if not values:
        return {k: 0.0 for k in qs}
    a = np.asarray(values) * scale
    return {
        k: float(np.min(a) if q == 0 else np.max(a) if q == 100 else np.percentile(a, q))
        for k, q in qs.items()
    }


log = logging.getLogger(__name__)

_frozen_depth = 0
_refused: set[int] = set()  # SCHED_FIFO priorities the OS refused (each warned about once)
_frozen_lock = threading.Lock()


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Freeze the garbage collector's view of the heap for a control loop (see the module docstring).

    Re-entrant, and safe from several threads: only the outermost scope freezes and unfreezes."""
    global _frozen_depth
    with _frozen_lock:
        if _frozen_depth == 0:
            gc.freeze()
        _frozen_depth += 1
    try:
        yield
    finally:
        with _frozen_lock:
            _frozen_depth -= 1
            if _frozen_depth == 0:
                gc.unfreeze()


@contextmanager
def realtime(priority: int) -> Iterator[bool]:
    """Run the calling thread at ``SCHED_FIFO`` ``priority`` inside the scope, then restore its
    policy; yields whether it did. 0 does nothing; a refusal (no CAP_SYS_NICE, no rtprio limit, not
    Linux) is one warning per priority and normal scheduling. Threads started inside inherit the
    policy: :func:`normal_priority` is for those that must not compete with the loop."""
    if priority <= 0:
        yield False
        return
    try:
        policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except (AttributeError, OSError) as err:  # not Linux; not permitted
        if priority not in _refused:  # once per process, not once per episode
            expected, got = (
                ("a platform with SCHED_FIFO", sys.platform)
                if isinstance(err, AttributeError)
                else (f"permission for SCHED_FIFO {priority} (CAP_SYS_NICE or an rtprio limit)", err.strerror)
            )
            log.warning(
                "loop.rt_priority: expected %s, got %s: the loop runs at normal priority", expected, got
            )
        _refused.add(priority)
        yield False
        return
    try:
        yield True
    finally:
        os.sched_setscheduler(0, policy, param)


def normal_priority() -> None:
    """Put the calling thread back on normal scheduling (a helper thread started by a real-time one)."""
    if hasattr(os, "sched_getscheduler") and os.sched_getscheduler(0) != os.SCHED_OTHER:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


class RateLoop:
    """Yields :class:`Tick` objects at ``rate_hz``; the body of the ``for`` is the tick's work."""

    def __init__(
        self,
        rate_hz: float,
        paced: bool = True,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        max_ticks: int | None = None,
    ):
        if rate_hz <= 0:
            raise ValueError(f"rate_hz: expected > 0, got {rate_hz}")
        self.period_s = 1.0 / rate_hz
        self.paced = paced
        self.max_ticks = max_ticks
        self._clock, self._sleep = clock, sleep
        self._current: Tick | None = None
        self._shift_s = 0.0  # the schedule's total move by shift()
        self._next_s = self._clock()
        self.overruns = 0
        self.skipped = 0
        self._step_s: list[float] = []
        self._slack_s: list[float] = []
        self._jitter_s: list[float] = []

    def now(self) -> float:
        return self._clock()

    def elapsed_s(self) -> float:
        """Time spent in the current tick so far."""
        return 0.0 if self._current is None else self._clock() - self._current.start_s

    def late(self, budget_fraction: float = 1.0) -> bool:
        """True if the current tick can no longer finish within ``budget_fraction`` of its period
        (measured to its deadline, so a tick that started late has less budget)."""
        return self.budget_left_s(budget_fraction) < 0

    def budget_left_s(self, budget_fraction: float = 1.0) -> float:
        """Time left until ``budget_fraction`` of the current tick's period is used up (negative:
        overrun; a whole period outside a tick)."""
        if self._current is None:
            return self.period_s
        budget_end = self._current.deadline_s - (1.0 - budget_fraction) * self.period_s
        return budget_end - self._clock()

    def shift(self, delta_s: float, current: bool = True) -> None:
        """Move the schedule by ``delta_s`` (later where positive): every later tick's start and, with
        ``current``, the current tick's deadline, and its start where later (the time waited is not
        the tick's work). For following a device that samples on its own clock (:class:`SampleSync`)."""
        if not math.isfinite(delta_s):
            raise ValueError(f"shift: expected a finite number of seconds, got {delta_s}")
        self._shift_s += delta_s
        self._next_s += delta_s
        if current and self._current is not None:
            t = self._current
            start = t.start_s + max(0.0, delta_s)
            self._current = Tick(t.index, t.scheduled_s + delta_s, start, t.deadline_s + delta_s)

    @property
    def next_start_s(self) -> float:
        """When the tick after the current one (or the last one) is scheduled to start."""
        return self._next_s

    def __iter__(self) -> Iterator[Tick]:
        t0 = self._clock()
        i = 0  # schedule index (advances past skipped periods)
        n = 0  # ticks executed
        while self.max_ticks is None or n < self.max_ticks:
            scheduled = t0 + self._shift_s + i * self.period_s
            if self.paced:
                wait = scheduled - self._clock()
                if wait > 0:
                    self._sleep(wait)
            start = self._clock()
            if self.paced:
                self._jitter_s.append(abs(start - scheduled))
            # paced: absolute deadline on the schedule; lockstep: a work budget of one period
            deadline = (scheduled if self.paced else start) + self.period_s
            tick = Tick(index=n, scheduled_s=scheduled, start_s=start, deadline_s=deadline)
            self._current = tick
            self._next_s = scheduled + self.period_s
            try:
                yield tick
            finally:
                end = self._clock()
                tick = self._current or tick  # (moved by a shift() during the tick)
                deadline, start = tick.deadline_s, tick.start_s
                self._next_s = t0 + self._shift_s + (i + 1) * self.period_s
                self._step_s.append(end - start)
                self._slack_s.append(deadline - end)
                if end > deadline:
                    self.overruns += 1
                self._current = None
            n += 1
            i += 1
            if self.paced:
                lateness = self._clock() - (t0 + self._shift_s + i * self.period_s)
                if lateness >= self.period_s:  # re-anchor on the next future slot rather than burst
                    behind = math.ceil(lateness / self.period_s)
                    self.skipped += behind
                    i += behind
                    self._next_s = t0 + self._shift_s + i * self.period_s

    @property
    def step_s(self) -> list[float]:
        """Work time of every tick so far (seconds; start of the tick to the end of its work)."""
        return list(self._step_s)

    def stats(self) -> LoopStats:
        return LoopStats(
            ticks=len(self._step_s),
            overruns=self.overruns,
            skipped=self.skipped,
            step_ms=percentiles_ms(self._step_s),
            slack_ms=percentiles_ms(self._slack_s, {"p50": 50, "p1": 1, "min": 0}),
            jitter_ms=percentiles_ms(self._jitter_s),
        )


MAX_CLOCK_DRIFT = 0.05  # a device's clock against ours: RC oscillators are within 5 %, as the driver allows


class SampleSync:
    """Keeps a paced loop's ticks just after the samples of a robot that samples on its own clock.

    A serial device samples and sends STATE every period on its clock; the host reads the latest at
    the start of each tick and writes its command some milliseconds later. A transition is vouched
    (learned from) only when the next reading is the device's next sample and carries that command
    (``drivers/serial_robot.py``). When the host's ticks start at about the moment the device samples
    (the two clocks' phase is wherever the episode's reset left it, and a reset waits for a fresh
    sample), sampling jitter decides on every tick whether the host reads this period's sample or the
    previous one, which predates the last command: the transition is lost, and so, the phase holding,
    is nearly every one of the episode.

    :meth:`read` waits (at most ``max_wait_s``) for a sample newer than the last one read and no older
    than ``period - max_wait_s`` (an older one means the next is due within the wait), and moves the
    schedule by the wait, so the next tick starts when the next sample arrives. When a fresh one was
    already there it moves the later ticks earlier by half its age (at least ``creep_s``, at most
    ``max_wait_s``), so the ticks find the samples again after either clock drifts. The host then
    reads each sample as it arrives and has nearly the whole period until the next. A sample that
    does not come (a lost frame, a silent device) costs the tick up to ``max_wait_s`` and moves
    nothing; the reading says what it is (stale, or not vouched).

    The schedule follows the device only as far as clocks drift: its total move stays within one
    period plus ``MAX_CLOCK_DRIFT`` of the time since the first read. A device that streams at
    another rate than ``control_hz`` would otherwise pull the loop to its rate (and the model's step,
    the brake's stopping distance with it); it gets one WARNING, and the ticks keep ``control_hz``.
    """

    def __init__(self, period_s: float, max_wait_s: float, creep_s: float | None = None):
        if not 0 < max_wait_s < period_s:
            raise ValueError(f"max_wait_s: expected 0 < max_wait_s < period ({period_s}), got {max_wait_s}")
        self.period_s, self.max_wait_s = period_s, max_wait_s
        self.creep_s = 0.02 * period_s if creep_s is None else creep_s
        self._since: float | None = None  # first read (the loop's clock)
        self._warned = False
        self.waits = 0  # reads that waited for their sample
        self.timeouts = 0  # reads whose sample did not come within max_wait_s
        self.held = 0  # moves refused: the schedule had followed the device as far as clocks drift
        self.moved_s = 0.0  # the schedule's total move

    @classmethod
    def where_useful(cls, robot: Robot, loop: RateLoop, wait_fraction: float) -> SampleSync | None:
        """A sync for ``loop`` on the wall clock with a ``robot`` that samples on its own clock (None
        elsewhere, or with ``wait_fraction`` 0: reads then take the latest sample)."""
        if not (loop.paced and robot.streams_samples and wait_fraction > 0):
            return None
        return cls(loop.period_s, wait_fraction * loop.period_s)

    def read(self, robot: Robot, loop: RateLoop, first: bool = False) -> Observation:
        """``robot``'s next sample (:meth:`Robot.await_sample`), ``loop`` moved to it.

        ``first``: the episode's first tick, at whatever phase the reset and the controller's reset
        left it (its last reading, the reset's, may be periods old by now). It takes a sample at
        most ``max_wait_s`` old or waits for the next, up to the tick's whole budget, so the episode
        starts locked and its first transition is learned from like the others."""
        if self._since is None:
            self._since = loop.now()
        budget = loop.budget_left_s()
        wait_s = max(0.0, budget if first else min(self.max_wait_s, budget))
        waited = robot.await_sample(
            wait_s, max_age_s=self.max_wait_s if first else self.period_s - self.max_wait_s
        )
        obs = robot.read()
        if waited is None:
            self.timeouts += 1
        elif waited > 0:
            self.waits += 1
            if self._may_move(waited, loop):
                loop.shift(waited)  # this tick's work began that much later, and so will the next
        else:
            age = float(obs.info.get("age_s", 0.0))
            if math.isfinite(age):  # (not where the link went down under the read)
                delta = -min(self.max_wait_s, max(self.creep_s, 0.5 * age))
                if self._may_move(delta, loop):
                    loop.shift(delta, current=False)  # (this tick keeps its whole budget)
        return obs

    def _may_move(self, delta: float, loop: RateLoop) -> bool:
        limit = self.period_s + MAX_CLOCK_DRIFT * (loop.now() - (self._since or 0.0))
        if abs(self.moved_s + delta) <= limit:
            self.moved_s += delta
            return True
        self.held += 1
        if not self._warned:
            self._warned = True
            log.warning(
                "the ticks would follow the device's samples further than clocks drift (a move of %+.1f ms "
                "refused, %+.1f ms so far): does it stream STATE at control_hz, or was the host late (load)? "
                "The ticks keep control_hz; readings may be up to a period old",
                delta * 1e3, self.moved_s * 1e3,
            )  # fmt: skip
        return False
