"""Apply a schedule of :class:`~robot_mbrl.sim.params.ScheduleEvent` at a given time.

Shared by the cart-pole twin and the HIL emulator: the caller owns the clocks and asks, at its own
rate, which parameters, actuator gain and sensor transforms are active.

* :meth:`Schedule.params` and :meth:`Schedule.actuator_gain` are pure functions of time;
* :meth:`Schedule.apply_sensors` holds the little state sensor faults need (the value a frozen
  channel keeps, which one-shot spikes have fired); :meth:`Schedule.reset_episode` clears the state
  of episode-clock events.

Example::

    sched = Schedule(cfg.schedule)
    p = sched.params(cfg.physical_params(), episode_s=t, total_s=T)   # {"pole_mass_kg": 0.46, ...}
    gain = sched.actuator_gain(t, T)                                   # e.g. -1.0 after a sign flip
    reading = sched.apply_sensors({"x_m": 0.1, ...}, t, T)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from robot_mbrl.sim.params import ACTUATOR_KINDS, PARAM_KINDS, ScheduleEvent

log = logging.getLogger(__name__)

#: times within this many seconds of an event boundary count as on it (0.4 + 0.2 != 0.6 in floats)
TIME_EPS_S = 1e-9


class Schedule:
    """Active effects of a tuple of events as a function of (episode time, total time) in seconds."""

    def __init__(self, events: Sequence[ScheduleEvent] = ()):
        # stable sort: events at the same time keep their configured order
        self.events: tuple[ScheduleEvent, ...] = tuple(sorted(events, key=lambda e: e.at_s))
        self._frozen: dict[int, float] = {}  # event index -> value the channel is frozen at
        self._spiked: set[int] = set()  # one-shot spikes that already fired
        self._was_active: set[int] = set()  # for logging transitions once

    def __len__(self) -> int:
        return len(self.events)

    # -- pure queries --------------------------------------------------------------------------
    @staticmethod
    def _clock(event: ScheduleEvent, episode_s: float, total_s: float) -> float:
        return episode_s if event.clock == "episode" else total_s

    def is_active(self, i: int, episode_s: float, total_s: float) -> bool:
        """True if event ``i`` is in its window ``[at_s, at_s + duration_s)`` now."""
        e = self.events[i]
        t = self._clock(e, episode_s, total_s)
        if t < e.at_s - TIME_EPS_S:
            return False
        return e.duration_s is None or t < e.at_s + e.duration_s - TIME_EPS_S

    def active(self, episode_s: float, total_s: float) -> list[ScheduleEvent]:
        """The events whose window contains the current time (sorted by ``at_s``)."""
        return [e for i, e in enumerate(self.events) if self.is_active(i, episode_s, total_s)]

    def params(self, base: Mapping[str, float], episode_s: float, total_s: float) -> dict[str, float]:
        """``base`` with every active param_set / param_scale applied, in ``at_s`` order."""
        out = dict(base)
        for e in self.active(episode_s, total_s):
            if e.kind == "param_set":
                out[e.target] = e.value
            elif e.kind == "param_scale":
                out[e.target] = out[e.target] * e.value
        return out

    def actuator_gain(self, episode_s: float, total_s: float) -> float:
        """Product of active actuator gains, negated once per active sign flip (1.0 when healthy)."""
        gain = 1.0
        for e in self.active(episode_s, total_s):
            if e.kind == "actuator_gain":
                gain *= e.value
            elif e.kind == "actuator_sign_flip":
                gain = -gain
        return gain

    def has_param_events(self) -> bool:
        return any(e.kind in PARAM_KINDS for e in self.events)

    def has_actuator_events(self) -> bool:
        return any(e.kind in ACTUATOR_KINDS for e in self.events)

    # -- stateful sensor transforms ------------------------------------------------------------
    def apply_sensors(
        self, reading: Mapping[str, float], episode_s: float, total_s: float
    ) -> dict[str, float]:
        """Return ``reading`` (channel -> value) as the faulty sensors would report it.

        Order per channel: freeze (holds the first value seen while frozen), then bias, spike and
        NaN. Call once per reading: one-shot spikes fire on the first call inside their window.
        """
        out = dict(reading)
        for i, e in enumerate(self.events):
            if not e.kind.startswith("sensor_") or e.target not in out:
                continue
            t = self._clock(e, episode_s, total_s)
            one_shot = e.kind == "sensor_spike" and e.duration_s is None
            active = (
                (t >= e.at_s and i not in self._spiked) if one_shot else self.is_active(i, episode_s, total_s)
            )
            self._log_transition(i, active)
            if not active:
                self._frozen.pop(i, None)
                continue
            if e.kind == "sensor_freeze":
                out[e.target] = self._frozen.setdefault(i, out[e.target])
            elif e.kind == "sensor_bias":
                out[e.target] += e.value
            elif e.kind == "sensor_spike":
                out[e.target] += e.value
                if one_shot:
                    self._spiked.add(i)
            elif e.kind == "sensor_nan":
                out[e.target] = float("nan")
        return out

    def reset_episode(self) -> None:
        """Forget the sensor state of episode-clock events (call on every episode reset)."""
        for i, e in enumerate(self.events):
            if e.clock == "episode":
                self._frozen.pop(i, None)
                self._spiked.discard(i)
                self._was_active.discard(i)

    def _log_transition(self, i: int, active: bool) -> None:
        if active and i not in self._was_active:
            self._was_active.add(i)
            log.info("schedule event started: %s", self.events[i])
        elif not active and i in self._was_active and self.events[i].duration_s is not None:
            self._was_active.discard(i)
            log.info("schedule event ended: %s", self.events[i])

    def log_param_transitions(self, episode_s: float, total_s: float) -> None:
        """Log (once) when non-sensor events start or end; the twin calls this per control period."""
        for i, e in enumerate(self.events):
            if not e.kind.startswith("sensor_"):
                self._log_transition(i, self.is_active(i, episode_s, total_s))
