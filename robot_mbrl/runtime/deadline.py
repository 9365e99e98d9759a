"""A call the control thread waits for only until its deadline: the planner on a paced loop.

A planner that hangs (a stuck torch op, swapping, a pathological input) must not hold the tick: the
safety gate can only act on a missed deadline once it gets control back. :class:`DeadlineWorker`
runs one call at a time on its own thread; the control thread waits for the result until the
deadline and then goes on without it (``LATE``), so the fallback is written on time. While that
call is still running, the next tick's call is refused at once (``BUSY``): one planner, one model,
never two calls at a time. A late result is discarded when it arrives.

One worker thread serves the whole process (:func:`planner_worker`): torch's first call on a new
thread is slow (8-73 ms for the first plan on this project's reference machine, 3 ms after), so the
thread lives as long as the process and is warmed once. It runs each call one SCHED_FIFO priority
below the calling thread when that one is real-time (:func:`robot_mbrl.runtime.loop.realtime`; a
caller at priority 1 gets a planner at normal scheduling), so the control thread pre-empts the
planner at its deadline on a busy core.

Torch releases the GIL inside its kernels; a planner spinning in pure Python hands it over within
the interpreter's switch interval, which the paced episode shortens (:func:`short_switch_interval`),
but still competes with the control thread for it: the guarantee is for hangs that release the GIL
(a kernel, I/O, a page fault); a Python-bound one only shortens the damage.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from robot_mbrl.runtime.loop import normal_priority

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    DONE = "done"  # returned in time: the value is the result
    ERROR = "error"  # raised in time: the value is the exception
    LATE = "late"  # still running at the deadline: no value; its result will be discarded
    BUSY = "busy"  # the previous call is still running: this one was not started


class PlannerHung(RuntimeError):
    """A call did not return within ``hang_s`` after its caller stopped waiting for it."""


class DeadlineWorker:
    """One call at a time on a daemon thread, waited for until a deadline (see the module docstring).
    For one calling thread at a time (the control thread): a second caller could take the first's
    result."""

    def __init__(self, name: str = "planner"):
        self.name, self._clock = name, time.monotonic
        self._cv = threading.Condition()
        self._job: tuple[Callable[..., Any], tuple, int] | None = None
        self._running = False  # a call is in progress on the worker
        self._started_s = 0.0  # when it was handed over
        self._result: tuple[Outcome, Any] | None = None
        self._thread: threading.Thread | None = None
        self.warmed = False  # (set by the user once it has made the thread's first, slow call)
        self.late = 0  # calls given up on at their deadline
        self.busy = 0  # calls refused because the previous one was still running

    def call(self, fn: Callable[..., Any], *args: Any, timeout_s: float) -> tuple[Outcome, Any]:
        """Run ``fn(*args)`` on the worker and wait for it at most ``timeout_s`` (<= 0: not at all
        unless it is already done). Never raises what ``fn`` raises: that comes back as ``(ERROR, exc)``."""
        priority = _fifo_priority()
        with self._cv:
            deadline_s = self._clock() + timeout_s
            if self._running:
                self.busy += 1
                return Outcome.BUSY, None
            if timeout_s <= 0:  # no time left to plan in: not started
                self.late += 1
                return Outcome.LATE, None
            if self._thread is None:
                self._start()
            self._job, self._result, self._running = (fn, args, priority), None, True
            self._started_s = self._clock()
            self._cv.notify_all()  # (the job and its notify under one lock: no wakeup is lost)
            while self._result is None:
                left = deadline_s - self._clock()
                if left <= 0:
                    self.late += 1
                    return Outcome.LATE, None
                self._cv.wait(left)
            out, self._result = self._result, None
            return out

    @property
    def running(self) -> bool:
        """A call is still in progress (one the caller gave up on)."""
        with self._cv:
            return self._running

    def wait_idle(self, hang_s: float) -> None:
        """Wait up to ``hang_s`` for a call still in progress (one its caller gave up on); raises
        :class:`PlannerHung` if it is still running then (its result will never be used)."""
        with self._cv:
            end = self._clock() + hang_s
            while self._running and self._clock() < end:
                self._cv.wait(end - self._clock())
            if self._running:
                raise PlannerHung(
                    f"the {self.name} has not returned for {self._clock() - self._started_s:.1f} s "
                    f"(loop.plan_hang_s {hang_s:g}): every tick since its deadline fell back; the job "
                    "stops with the robot safe-stopped"
                )

    # -- the worker thread -------------------------------------------------------------------
    def _start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        priority = 0  # this thread's SCHED_FIFO priority (0: normal scheduling)
        while True:
            with self._cv:
                while self._job is None:
                    self._cv.wait()
                (fn, args, caller), self._job = self._job, None
            # below the caller, which waits for it; below priority 1 is normal scheduling (at the
            # caller's own priority a busy planner could not be pre-empted on its core)
            want = caller - 1 if caller > 1 else 0
            if want != priority:
                with contextlib.suppress(AttributeError, OSError):
                    if want:
                        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(want))
                    else:
                        normal_priority()
                    priority = want
            try:
                result: tuple[Outcome, Any] = (Outcome.DONE, fn(*args))
            except BaseException as err:  # noqa: BLE001 - handed to the caller; the thread lives on
                result = (Outcome.ERROR, err)
            with self._cv:
                self._running = False
                self._result = result  # a late one is overwritten by the next call before it is read
                self._cv.notify_all()


_shared: DeadlineWorker | None = None
_shared_lock = threading.Lock()


def planner_worker() -> DeadlineWorker:
    """The process's planner thread (started on first use; see the module docstring)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = DeadlineWorker("planner")
        return _shared


def _fifo_priority() -> int:
    """The calling thread's SCHED_FIFO priority, 0 when it is not real-time (or not on Linux)."""
    try:
        if os.sched_getscheduler(0) == os.SCHED_FIFO:
            return os.sched_getparam(0).sched_priority
    except (AttributeError, OSError):
        pass
    return 0


@contextlib.contextmanager
def short_switch_interval(seconds: float = 0.0005) -> Iterator[None]:
    """Let a waiting thread take the GIL from a Python-bound one within ``seconds`` (CPython's default
    is 5 ms, a quarter of a 50 Hz tick) inside the scope; the previous interval is restored after."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(min(old, seconds))
    try:
        yield
    finally:
        sys.setswitchinterval(old)
