"""The hardware abstraction: one small `Robot` interface for physical actuators and twins.

A backend implements six hooks (``_connect``, ``_disconnect``, ``_reset``, ``_read``, ``_send``,
``_safe_stop``). The base class owns what every robot must do the same way:

* every command is clamped to the spec's limits and rate limits, and ``write`` returns the action
  really applied (never the raw request);
* ``close`` (normal exit, exception, SIGINT, SIGTERM) always ends in ``safe_stop``;
* non-finite commands are never sent: they are replaced by the spec's safe command.
"""

from __future__ import annotations

import enum
import logging
import math
import signal
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


class Fault(enum.IntFlag):
    """Fault bits carried by an :class:`Observation` (device-side or host-side)."""

    NONE = 0
    STALE = 1  # no fresh state within the allowed age (host side)
    SENSOR = 2  # the device reports a sensor fault
    DEVICE = 4  # generic device fault (over-temperature, driver error, ...)
    ESTOP = 8  # emergency stop engaged
    WATCHDOG = 16  # the device braked because commands stopped arriving
    COMM = 32  # link errors (CRC, reconnect in progress)
    LIMIT = 64  # an end stop / limit switch is pressed


@dataclass(frozen=True)
class Channel:
    """One named signal with its unit and physical range [low, high].

    For actions, [low, high] is the command limit. ``angle`` marks a wrapped angle (radians in
    (-pi, pi]); models encode such channels as sin/cos.
    """

    name: str
    unit: str
    low: float
    high: float
    angle: bool = False


@dataclass(frozen=True)
class BoxConstraint:
    """State constraint g(x) = max(low - x[c], x[c] - high) <= 0 on one observation channel."""

    name: str
    channel: str
    low: float
    high: float


@dataclass(frozen=True)
class RobotSpec:
    """What a robot is: its channels, limits, rate limits, control rate and constraints."""

    obs: tuple[Channel, ...]
    act: tuple[Channel, ...]
    control_hz: float
    act_rate_per_s: tuple[float, ...] | None = None  # max |da/dt| per action channel; None = no limit
    constraints: tuple[BoxConstraint, ...] = ()
    safe_action: tuple[float, ...] | None = None  # command meaning "stop" (zeros if None)

    @property
    def obs_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.obs)

    @property
    def act_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.act)

    @property
    def obs_dim(self) -> int:
        return len(self.obs)

    @property
    def act_dim(self) -> int:
        return len(self.act)

    @property
    def act_low(self) -> np.ndarray:
        return np.array([c.low for c in self.act])

    @property
    def act_high(self) -> np.ndarray:
        return np.array([c.high for c in self.act])

    @property
    def obs_low(self) -> np.ndarray:
        return np.array([c.low for c in self.obs])

    @property
    def obs_high(self) -> np.ndarray:
        return np.array([c.high for c in self.obs])

    @property
    def angle_mask(self) -> np.ndarray:
        return np.array([c.angle for c in self.obs], dtype=bool)

    @property
    def dt_s(self) -> float:
        return 1.0 / self.control_hz

    def stop_action(self) -> np.ndarray:
        if self.safe_action is None:
            return np.zeros(self.act_dim)
        return np.asarray(self.safe_action, dtype=float)

    def index(self, name: str) -> int:
        return self.obs_names.index(name)

    def constraint_values(self, x: np.ndarray) -> np.ndarray:
        """g(x) for every constraint; shape (..., n_constraints). Violated where > 0."""
        x = np.asarray(x, dtype=float)
        cols = [
            np.maximum(c.low - x[..., self.index(c.channel)], x[..., self.index(c.channel)] - c.high)
            for c in self.constraints
        ]
        return np.stack(cols, axis=-1) if cols else np.zeros(x.shape[:-1] + (0,))

    def in_range(self, x: np.ndarray) -> bool:
        """True if every observation value is finite and inside its physical range."""
        x = np.asarray(x, dtype=float)
        low, high = self.obs_low, self.obs_high
        slack = 1e-6 * (1.0 + np.abs(np.where(np.isfinite(low), low, 0.0)))  # float32 wire values (e.g. pi)
        return bool(np.all(np.isfinite(x)) and np.all(x >= low - slack) and np.all(x <= high + slack))

    def clamp(self, action: np.ndarray, previous: np.ndarray | None) -> np.ndarray:
        """Clamp to the command limits and, given the previous applied action, to the rate limits.

        A non-finite entry is replaced by the safe command for that channel before clamping.
        """
        a = np.asarray(action, dtype=float).reshape(self.act_dim)
        a = np.where(np.isfinite(a), a, self.stop_action())
        if previous is not None and self.act_rate_per_s is not None:
            step = np.asarray(self.act_rate_per_s) * self.dt_s
            a = np.clip(a, previous - step, previous + step)
        return np.clip(a, self.act_low, self.act_high)


@dataclass(frozen=True)
class Observation:
    """One reading: values in ``spec.obs`` order, acquisition time (monotonic seconds), fault bits."""

    values: np.ndarray
    stamp_s: float
    faults: Fault = Fault.NONE
    info: dict = field(default_factory=dict, compare=False)

    @property
    def ok(self) -> bool:
        return self.faults == Fault.NONE and bool(np.all(np.isfinite(self.values)))


class Robot(ABC):
    """A robot (or its twin). Use as a context manager: ``with robot: ...``.

    Subclasses implement the underscore hooks; they never clamp, the base class does.
    """

    def __init__(self, spec: RobotSpec):
        self._spec = spec
        self._last_applied: np.ndarray | None = None
        self._connected = False
        self.clamp_count = 0  # commands that had to be changed to respect the spec

    # -- hooks -----------------------------------------------------------------------------
    @abstractmethod
    def _connect(self) -> None: ...

    @abstractmethod
    def _disconnect(self) -> None: ...

    @abstractmethod
    def _reset(self, seed: int | None) -> Observation: ...

    @abstractmethod
    def _read(self) -> Observation: ...

    @abstractmethod
    def _send(self, action: np.ndarray) -> bool | None:
        """Command ``action`` (already clamped); False where it could not be sent (a link down):
        the actuator then rests at its stop, and the rate limit starts from there again."""

    @abstractmethod
    def _safe_stop(self) -> None: ...

    # -- public interface ------------------------------------------------------------------
    @property
    def spec(self) -> RobotSpec:
        return self._spec

    @property
    def connected(self) -> bool:
        return self._connected

    def connect(self) -> Robot:
        if not self._connected:
            self._connect()
            self._connected = True
        return self

    def close(self) -> None:
        """Command a safe stop, then release the link. Idempotent; never skips the stop."""
        if not self._connected:
            return
        try:
            self.safe_stop()
        finally:
            self._connected = False
            self._disconnect()

    def reset(self, seed: int | None = None) -> Observation:
        self._last_applied = self._spec.stop_action()  # the actuator rests at the stop command
        return self._reset(seed)

    def read(self) -> Observation:
        obs = self._read()
        if obs.faults & _NOT_ACTUATING:  # braking or e-stopped on its own, or the link down: the next
            self._last_applied = self._spec.stop_action()  # command ramps up from the stop again
        return obs

    def write(self, action: np.ndarray) -> np.ndarray:
        """Clamp ``action`` to limits and rate limits, send it, return what was applied."""
        requested = np.asarray(action, dtype=float).reshape(self._spec.act_dim)
        applied = self._spec.clamp(requested, self._last_applied)
        if not np.array_equal(applied, requested):
            self.clamp_count += 1
            log.debug("command %s clamped to %s", requested, applied)
        if self._send(applied) is False:  # not sent: nothing but the stop acts
            applied = self._spec.stop_action()
        self._last_applied = applied
        return applied

    #: The robot samples on its own clock and streams the readings (a serial device): a read returns the
    #: latest sample, which may predate the last command. False: every read samples now (a twin, gym).
    streams_samples: bool = False

    def await_sample(self, timeout_s: float, max_age_s: float = math.inf) -> float | None:
        """Wait at most ``timeout_s`` for a sample newer than the last one read and sampled at most
        ``max_age_s`` ago; the seconds waited (0.0: one is already there) or None when none came. A
        robot whose reads sample now has one at any time: 0.0. The control loop keeps its ticks just
        after the device's samples with it (:class:`robot_mbrl.runtime.loop.SampleSync`)."""
        return 0.0

    def stop(self) -> np.ndarray:
        """Command the stop action now, past the rate limit (a robot no controller drives must not
        ramp down over ticks nobody writes), and stay connected and active; what was applied."""
        stop = self._spec.stop_action()
        self._last_applied = stop
        self._send(stop)
        return stop

    def safe_stop(self) -> None:
        """Bring the robot to a safe state now (bypasses rate limits: braking must not wait)."""
        self._last_applied = self._spec.stop_action()
        self._safe_stop()

    def __enter__(self) -> Robot:
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_NOT_ACTUATING = Fault.WATCHDOG | Fault.ESTOP | Fault.COMM


class _Terminated(SystemExit):
    """Raised from the SIGTERM handler so that every ``finally`` and ``__exit__`` runs."""


@contextmanager
def stop_on_signals(robot: Robot) -> Iterator[Robot]:
    """Connect ``robot`` and guarantee ``safe_stop`` + close on exit, exception, SIGINT or SIGTERM.

    SIGINT raises KeyboardInterrupt (Python's default) and SIGTERM raises SystemExit(143); both unwind
    through this context manager's ``finally``. Handlers are installed only on the main thread.
    """
    previous = None
    main = threading.current_thread() is threading.main_thread()
    if main:

        def on_term(signum, frame):  # noqa: ARG001
            raise _Terminated(128 + signum)

        previous = signal.signal(signal.SIGTERM, on_term)
    robot.connect()
    try:
        yield robot
    finally:
        try:
            robot.close()
        finally:
            if main and previous is not None:
                signal.signal(signal.SIGTERM, previous)


def monotonic_s() -> float:
    return time.monotonic()
