"""The per-tick controller of the learning MPC agent: plan, let the Simplex gate decide, feed the
real transitions to the shift monitors (see :mod:`robot_mbrl.agents.mpc` for the agent)."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from robot_mbrl.agents.predictive import predictive, predictive_parts
from robot_mbrl.hal.robot import Observation
from robot_mbrl.planning.mpc import MPCPlanner
from robot_mbrl.runtime.deadline import Outcome, planner_worker
from robot_mbrl.runtime.episode import Decision, Transition
from robot_mbrl.runtime.loop import RateLoop, Tick
from robot_mbrl.safety.gate import SafetyGate, judged_at
from robot_mbrl.safety.monitors import ShiftMonitor

if TYPE_CHECKING:
    from robot_mbrl.agents.mpc import MPCAgent

log = logging.getLogger(__name__)


class GatedMPC:
    """The per-tick controller: plan, let the gate decide, feed real transitions to the monitor.

    On a paced loop the planner runs on the process's planner thread
    (:func:`~robot_mbrl.runtime.deadline.planner_worker`): the tick waits for the plan only
    until ``budget_fraction`` of the period is used, so a planner that hangs costs the tick its plan
    (the gate's ``deadline_missed``: the fallback is written on time), not its deadline. In lockstep
    the plan is computed in the tick's own thread (a twin that waits for us has no deadline).
    With ``preempt`` (``loop.preempt_planner``, on by default); without it the plan is computed in the
    tick's thread on a paced loop too (``benchmarks/bench_deadline.py`` compares the two)."""

    def __init__(self, agent: MPCAgent, planner: MPCPlanner, gate: SafetyGate, monitor: ShiftMonitor,
                 budget_fraction: float, hang_s: float = 2.0, paced: bool = False,
                 preempt: bool = False):  # fmt: skip
        self.agent, self.planner, self.gate, self.monitor = agent, planner, gate, monitor
        self.budget_fraction, self.hang_s = budget_fraction, hang_s
        self.paced = paced  # the job runs on the wall clock (with preempt: warm the planner thread now)
        self.preempt = preempt
        self.warm: torch.Tensor | None = None
        self._ticks_into_step = 0  # ticks since the warm start last moved on by a planned step
        self._open_loop: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None
        self.tick = 0  # ticks across episodes (events and monitors use one clock)
        self.trace: list[
            tuple
        ] = []  # (tick, disagreement, threshold, cusum, cusum_h, ood, ood_thr, fallback)
        if paced and preempt:
            self._warm_up()

    def reset(self, obs: Observation) -> None:
        self.gate.reset()
        self.monitor.new_episode()
        self.warm = None
        self._ticks_into_step = 0
        self._open_loop = None
        self.planner.disturbance = None  # a new episode starts without a disturbance estimate

    def _warm_start(self, actions):  # noqa: ANN001, ANN202 - k x A tensors
        """The next tick's warm start from this tick's plan: a planned step lasts
        ``planner.action_repeat`` ticks, so the plan moves on by one step every that many ticks
        (every tick at the default of 1)."""
        self._ticks_into_step += 1
        if self._ticks_into_step < self.planner.cfg.action_repeat:
            return actions
        self._ticks_into_step = 0
        return self.planner.shift(actions)

    def _warm_up(self) -> None:
        """Make the planner thread's first call (torch's first on a thread is slow: up to tens of ms)
        when the controller is built, not between a rig's reset and its first tick (a delay there
        moves the host's ticks against the device's STATE stream: up to all of an episode's readings
        then predate the command they should answer, and are not learned from). The plan (from the
        middle of the observation range) is discarded and the planner's random stream restored once
        it has returned (a warm-up that does not return within twice ``hang_s`` is :class:`PlannerHung`)."""
        worker = planner_worker()
        if worker.warmed:
            return
        worker.wait_idle(self.hang_s)
        spec = self.agent.spec
        mid = (np.asarray(spec.obs_low, dtype=float) + np.asarray(spec.obs_high, dtype=float)) / 2
        obs = np.where(np.isfinite(mid), mid, 0.0)
        gen = self.planner.gen.get_state()
        if worker.call(self.planner.plan, obs, None, None, timeout_s=self.hang_s)[0] is Outcome.LATE:
            worker.wait_idle(self.hang_s)  # one more chance, then PlannerHung
        self.planner.gen.set_state(gen)
        worker.warmed = True

    def act(self, obs: Observation, tick: Tick, loop: RateLoop) -> Decision:
        plan, error, given_up = None, None, False
        if obs.ok:
            args = (obs.values, self.warm, self.gate.disagreement_threshold)
            if loop.paced and self.preempt:
                outcome, value = planner_worker().call(
                    self.planner.plan, *args, timeout_s=loop.budget_left_s(self.budget_fraction)
                )
                plan, error = (value, None) if outcome is Outcome.DONE else (None, value)
                given_up = outcome in (Outcome.LATE, Outcome.BUSY)
            else:
                try:
                    plan = self.planner.plan(*args)
                except Exception as err:  # noqa: BLE001 - a planner failure is a gate trigger, never a crash
                    error = err
            if error is not None:
                log.warning("tick %d: planner raised %r; the gate falls back", self.tick, error)
        # real time: a late plan is a hazard -> gate trigger; a lockstep twin waits for us, so timing
        # must not change the run (misses are still counted by the episode runner)
        missed = loop.paced and (given_up or loop.late(self.budget_fraction))
        d = self.gate.decide(self.tick, judged_at(loop, obs), obs, plan, error, missed)
        try:  # bookkeeping after the decision: a failure here must not cost the tick its command
            if plan is None:
                self._ticks_into_step = 0  # (the next plan starts its planned steps afresh)
            self.warm = self._warm_start(plan.actions) if plan is not None else None
            cus, ood = self.monitor.state("cusum"), self.monitor.state("ood")
            thr = self.gate.disagreement_threshold
            self.trace.append((self.tick, plan.worst_disagreement if plan is not None else math.nan,
                               thr if thr is not None else math.nan, cus[1], cus[2], ood[1],
                               ood[2], d.source == "fallback"))  # fmt: skip
        except Exception as err:  # noqa: BLE001
            log.warning("tick %d: after the gate decided: %r (no warm start next tick)", self.tick, err)
            self.warm = None
        self.tick += 1
        return Decision(
            action=np.asarray(d.action, dtype=float),
            source=d.source,
            plan_s=plan.solve_time_s if plan is not None else None,
            events=[dict(e) for e in d.events],
            late=missed,
        )

    def finish(self) -> None:
        """After an episode (and its record): wait for a planner call still running, up to
        ``hang_s``; raises :class:`~robot_mbrl.runtime.deadline.PlannerHung` past it. (A retrain
        waits for it too: :meth:`MPCAgent.retrain`.)"""
        planner_worker().wait_idle(self.hang_s)

    def observe(self, tr: Transition) -> list[dict]:
        """Feed one real transition to the shift monitors. A monitor that raises is an alarm (and,
        where the monitors gate, a fallback until the episode ends), never a crash of the episode."""
        try:
            return self._observe(tr)
        except Exception as err:  # noqa: BLE001
            log.warning("tick %d: shift monitor update failed: %r; monitor in alarm", self.tick, err)
            first = self.monitor.error is None
            self.monitor.error = repr(err)[:200]
            return [{"tick": self.tick, "kind": "alarm", "trigger": "monitor_error", "reason": self.monitor.error,
                     "score": 1.0, "threshold": 0.0}] if first else []  # fmt: skip

    def _observe(self, tr: Transition) -> list[dict]:
        k, spec = self.monitor.cfg.residual_horizon, self.agent.spec
        mean = std = None
        if k == 1 or self.planner.cfg.disturbance_rate > 0:
            mean, std = predictive(self.agent.model, tr.obs[None], tr.act[None], spec.angle_mask,
                                   self.agent.variance_coef)  # fmt: skip
            if self.planner.cfg.disturbance_rate > 0:
                self.planner.observe_residual(tr.next_obs, mean[0])
        if k == 1:
            return self.monitor.observe(tr.obs, tr.act, tr.next_obs, mean[0], std[0], self.tick)
        # k open-loop predictions in flight, one started at each of the last k ticks, all advanced by
        # one batched model call with the action really applied; the oldest is compared with s_t+1
        # after k ticks. A gap in the valid transitions (or a new episode) restarts them.
        ol = self._open_loop
        if ol is None or not np.array_equal(ol[2], tr.obs):
            ol = (np.empty((0, spec.obs_dim)), np.empty(0, dtype=int), None)
        states = np.vstack([ol[0], np.asarray(tr.obs, dtype=float)[None]])
        ages = np.append(ol[1], 0) + 1
        acts = np.tile(np.asarray(tr.act, dtype=float).reshape(1, -1), (len(states), 1))
        states, _, _ = predictive_parts(self.agent.model, states, acts, spec.angle_mask)
        done = ages >= k
        pred = states[done][0] if done.any() else np.full(spec.obs_dim, np.nan)  # NaN: CUSUM waits
        self._open_loop = (states[~done], ages[~done], np.asarray(tr.next_obs, dtype=float))
        return self.monitor.observe(tr.obs, tr.act, tr.next_obs, pred, np.ones(spec.obs_dim), self.tick)
