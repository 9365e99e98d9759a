"""One episode on a robot through the fixed-rate loop: read, decide, write, record.

The loop reads at the start of each tick, so the transition (s_t, a_t, s_t+1) completes when the
next tick reads s_t+1. Only transitions whose both observations are valid (finite, no fault bits)
are handed to ``on_transition`` — the replay buffer never sees a corrupt reading.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from robot_mbrl.hal.robot import Fault, Observation, Robot
from robot_mbrl.runtime.deadline import short_switch_interval
from robot_mbrl.runtime.loop import RateLoop, SampleSync, Tick, frozen_heap
from robot_mbrl.runtime.rundir import Tally
from robot_mbrl.tasks.base import Task

log = logging.getLogger(__name__)


@dataclass
class Decision:
    """What a controller wants written this tick, and why."""

    action: np.ndarray
    source: str = "policy"  # "policy", "mpc" or "fallback"
    plan_s: float | None = None  # planner time this tick, if it planned
    events: list[dict] = field(default_factory=list)  # gate switches / alarms this tick
    late: bool = False  # the planner missed its budget (the fallback was written on time instead)


@dataclass(frozen=True)
class Transition:
    obs: np.ndarray
    act: np.ndarray
    reward: float
    next_obs: np.ndarray
    terminated: bool
    truncated: bool
    stamp_s: float
    episode: int


class Controller(Protocol):
    def reset(self, obs: Observation) -> None: ...

    def act(self, obs: Observation, tick: Tick, loop: RateLoop) -> Decision: ...

    def observe(self, transition: Transition) -> list[dict]:
        """Called with every valid real transition (monitors update here); returns alarm events."""
        ...

    # optional: ``finish(self) -> None``, called by the jobs after an episode and its record (a
    # controller that plans on a worker thread waits for it there; it may raise if the worker hangs)


class Judge(Protocol):
    """Scores real transitions: the task's known reward, or the environment's own.

    ``authoritative``: the judge's word is the environment's own (a gymnasium env's reward,
    termination and time limit), not a rule applied to a reading that may be a glitch: it ends the
    episode whatever the reading, its reward counts whatever the reading, and the step that ends
    the episode is learned even where its reading leaves the spec's range (an env leaving its
    declared Box as it terminates; mid-episode the range rule stands). ``truncated``: the
    environment's own time limit ended it. Both are optional (absent: False)."""

    authoritative: bool

    def reward(self, obs: np.ndarray, act: np.ndarray, next_obs: np.ndarray) -> float: ...

    def terminated(self, next_obs: np.ndarray) -> bool: ...

    def truncated(self, next_obs: np.ndarray) -> bool: ...


class TaskJudge:
    authoritative = False  # a rule on readings: a reading out of range (a glitch) ends nothing

    def __init__(self, task: Task):
        self.task = task

    def truncated(self, next_obs: np.ndarray) -> bool:
        return False  # the episode's length is the job's (task.episode_steps)

    def reward(self, obs: np.ndarray, act: np.ndarray, next_obs: np.ndarray) -> float:
        return self.task.reward_np(obs, act, next_obs)

    def terminated(self, next_obs: np.ndarray) -> bool:
        return self.task.terminated_np(next_obs)


class EnvJudge:
    """For gymnasium backends: the env's reward, termination and time limit of the last step."""

    authoritative = True

    def __init__(self, robot: Robot):
        self.robot = robot

    def truncated(self, next_obs: np.ndarray) -> bool:
        return bool(self.robot.last_step["truncated"])  # type: ignore[attr-defined]

    def reward(self, obs: np.ndarray, act: np.ndarray, next_obs: np.ndarray) -> float:
        return float(self.robot.last_step["reward"])  # type: ignore[attr-defined]

    def terminated(self, next_obs: np.ndarray) -> bool:
        return bool(self.robot.last_step["terminated"])  # type: ignore[attr-defined]


@dataclass
class EpisodeResult:
    episode: int
    steps: int
    ret: float
    violations: int
    fallback_ticks: int
    deadline_misses: int
    end_stop_hits: int
    terminated: bool
    plan_ms_p50: float | None  # None: no plan this episode (a policy, the fallback throughout)
    tick_ms_p99: float = 0.0  # the tick's whole work: read, bookkeeping, decide, write
    tick_ms_max: float = 0.0
    plan_s: list[float] = field(default_factory=list)  # each plan's solve time (MPC ticks)
    tick_s: list[float] = field(default_factory=list)  # each tick's whole work
    vouched: int = 0  # valid transitions the robot vouched for (learned from where learning)
    sample_timeouts: int = 0  # reads whose sample did not come within the wait (SampleSync)


@frozen_heap()  # no full GC pass inside a tick (runtime/loop.py)
def run_episode(
    robot: Robot,
    judge: Judge,
    controller: Controller,
    *,
    episode: int,
    max_steps: int,
    seed: int | None,
    paced: bool,
    tally: Tally,
    on_transition: Callable[[Transition], None] | None = None,
    on_event: Callable[[dict], None] | None = None,
    on_tick: Callable[[int], None] | None = None,
    sample_wait_fraction: float = 0.25,
) -> EpisodeResult:
    """Run one episode; every tick is counted into ``tally`` and every event sent to ``on_event``.
    On the wall clock with a robot that samples on its own clock, each read first waits up to
    ``sample_wait_fraction`` of the period for the next sample (:class:`SampleSync`; 0: never)."""
    spec = robot.spec
    obs = robot.reset(seed)
    controller.reset(obs)
    loop = RateLoop(spec.control_hz, paced=paced, max_ticks=max_steps)
    sync = SampleSync.where_useful(robot, loop, sample_wait_fraction)
    ret, violations, fallback, misses, hits, learned = 0.0, 0, 0, 0, 0, 0
    plan_s: list[float] = []
    terminated = False
    steps = 0

    def emit(events: list[dict]) -> None:
        for ev in events:
            ev.setdefault("episode", episode)
            if ev.get("kind") == "alarm":
                ev.setdefault("run_tick", tally.ticks + steps)  # ticks of the whole run: a resume restores it
                tally.alarms.append({"tick": ev["run_tick"], "reason": ev.get("trigger", ev.get("reason"))})
            if on_event is not None:
                on_event(ev)

    prev: tuple[Observation, np.ndarray] | None = None  # (s_t, a_t) waiting for s_t+1

    def close(next_obs: Observation) -> tuple[bool, bool]:
        """Complete the pending transition with the reading s_t+1; (terminal, episode over)."""
        nonlocal ret, violations, hits, steps, prev, learned
        obs_t, applied = prev  # type: ignore[misc]
        prev = None
        steps += 1
        # valid = finite, no fault bits, inside the physical range (a spike the gate rejected is
        # not a transition to learn from, nor a reason to end the episode). An env's own word holds
        # whatever the reading: its reward, its end (and the step that ends it is learned, an env
        # leaving its declared Box as it terminates); mid-episode the range rule stands
        env = bool(getattr(judge, "authoritative", False))  # (a judge written before the attribute)
        term = bool((env or spec.in_range(next_obs.values)) and judge.terminated(next_obs.values))
        own_limit = getattr(judge, "truncated", None)  # the env's time limit
        env_trunc = env and not term and own_limit is not None and bool(own_limit(next_obs.values))
        in_range = spec.in_range(obs_t.values) and spec.in_range(next_obs.values)
        valid = obs_t.ok and next_obs.ok and (in_range or (env and (term or env_trunc)))
        r = judge.reward(obs_t.values, applied, next_obs.values) if valid or env else 0.0
        g = spec.constraint_values(next_obs.values)
        if (g.size and np.any(g > 0)) or (next_obs.faults & Fault.LIMIT):
            violations += 1
        if next_obs.faults & Fault.LIMIT:
            hits += 1
        ret += r
        # learned from only when the robot vouches that s_t+1 is a new reading caused by a_t (a
        # serial robot that lost a STATE frame re-serves the previous one: s_t+1 == s_t is not
        # physics, and as a residual it is a false alarm); backends without the notion always do
        if valid and next_obs.info.get("vouched", True):
            trunc = (steps >= max_steps or env_trunc) and not term
            tr = Transition(obs_t.values, applied, r, next_obs.values, term, trunc, obs_t.stamp_s, episode)
            learned += 1
            if on_transition is not None:
                on_transition(tr)
            emit(controller.observe(tr))
        if on_tick is not None:
            on_tick(steps)
        return term, term or env_trunc

    # a paced loop's control thread must get the GIL back from a planner thread (a controller that
    # plans on one: ``preempt``) within a fraction of a tick (runtime/deadline.py)
    planner_thread = paced and getattr(controller, "preempt", False)
    with short_switch_interval() if planner_thread else contextlib.nullcontext():
        # Read at the start of every tick (s_t+1 of the previous command), decide, write.
        for tick in loop:
            if prev is not None:
                obs = robot.read() if sync is None else sync.read(robot, loop)
                terminated, over = close(obs)
                if over:
                    break
            elif sync is not None:  # the reset's reading may be periods old by now: the newest sample
                obs = sync.read(robot, loop, first=True)
            decision = controller.act(obs, tick, loop)
            if decision.late or loop.late():  # the plan's budget, or the tick's deadline
                misses += 1
            applied = robot.write(decision.action)
            prev = (obs, applied)
            if decision.source == "fallback":
                fallback += 1
            if decision.plan_s is not None:
                plan_s.append(decision.plan_s)
            for ev in decision.events:  # what the robot applied (rate limit, clamp), not the request
                if "applied" in ev:
                    ev["commanded"], ev["applied"] = ev["applied"], np.asarray(applied, dtype=float).tolist()
            on_fallback = decision.source == "fallback"
            if (
                tick.index == 0
                and tally.on_fallback is not None
                and on_fallback != tally.on_fallback
                and not any(ev.get("kind") == "switch" for ev in decision.events)
            ):  # the last episode ended on the other side (a new controller, a reset gate): a switch too
                decision.events.insert(0, {
                    "tick": 0, "time_s": tick.start_s, "kind": "switch", "trigger": "episode_start",
                    "reason": f"a new episode starts on the {decision.source}", "to": decision.source,
                    "score": None, "threshold": None, "proposed": None,
                    "applied": np.asarray(applied, dtype=float).tolist(),
                })  # fmt: skip
            tally.on_fallback = on_fallback
            emit(decision.events)
        if prev is not None:  # the last command's reading: a streaming robot samples it a period on
            if sync is not None:
                time.sleep(max(0.0, loop.next_start_s - loop.now()))
            terminated = close(robot.read() if sync is None else sync.read(robot, loop))[0]
        if paced:  # on the wall clock the last command would act on until the next write (or the watchdog)
            robot.stop()  # (past the rate limit: ramped, a 100 Hz rig kept half its push)

    tally.real_steps += steps
    tally.ticks += steps
    tally.returns.append(ret)
    tally.violations += violations
    tally.fallback_ticks += fallback
    tally.deadline_misses += misses
    tally.end_stop_hits += hits
    tally.plan_s += plan_s
    step_s = loop.step_s  # (a copy)
    tally.tick_s += step_s
    tick_ms = loop.stats().step_ms
    return EpisodeResult(
        episode=episode,
        steps=steps,
        ret=ret,
        violations=violations,
        fallback_ticks=fallback,
        deadline_misses=misses,
        end_stop_hits=hits,
        terminated=terminated,
        plan_ms_p50=float(np.median(plan_s) * 1e3) if plan_s else None,
        tick_ms_p99=tick_ms["p99"],
        tick_ms_max=tick_ms["max"],
        plan_s=plan_s,
        tick_s=step_s,
        vouched=learned,
        sample_timeouts=0 if sync is None else sync.timeouts,
    )
