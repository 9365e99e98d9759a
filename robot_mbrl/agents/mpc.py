"""The learning MPC agent: ensemble + value + k-step planner behind the Simplex gate.

``MPCAgent`` owns the learned parts and their retraining (model, value, calibrated thresholds);
``GatedMPC`` is the per-tick controller the loop drives::

    plan  = planner.plan(obs, warm_start, disagreement_threshold)    # may raise / be non-finite
    gate  = gate.decide(tick, now, obs, plan, error, deadline_missed) # MPC action or fallback
    write gate.action; later observe(real transition) -> shift monitor -> alarms

Retraining (between episodes, on the configured schedule) runs: trainer on the whole buffer
(holdout, early stopping, elites) -> value function on the real transitions -> recalibration of the
gate's disagreement threshold and the OOD threshold on held-out in-distribution data.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robot_mbrl.agents.planning_tasks import EnvRewardTask, ShieldedTask
from robot_mbrl.agents.predictive import open_loop, predictive, predictive_parts, predictive_std
from robot_mbrl.config import Config
from robot_mbrl.data.buffer import ReplayBuffer
from robot_mbrl.hal.robot import Observation, RobotSpec
from robot_mbrl.models.checkpoint import load_checkpoint, save_checkpoint
from robot_mbrl.models.ensemble import ProbabilisticEnsemble
from robot_mbrl.models.trainer import EnsembleTrainer, TrainReport
from robot_mbrl.planning.mpc import MPCPlanner
from robot_mbrl.planning.value import ValueConfig, ValueFunction
from robot_mbrl.runtime.episode import Decision, Transition
from robot_mbrl.runtime.loop import RateLoop, Tick
from robot_mbrl.safety.calibration import (
    calibrate_threshold,
    fit_variance_model,
    plan_disagreement_scores,
    residual_calibration,
)
from robot_mbrl.safety.fallback import make_fallback
from robot_mbrl.safety.gate import SafetyGate
from robot_mbrl.safety.monitors import ShiftMonitor
from robot_mbrl.tasks.base import Task
from robot_mbrl.typedconfig import build, to_dict

log = logging.getLogger(__name__)
MODEL_FILE = "model.pt"


#: length of the held-out real segments kept in the checkpoint for k-step residual calibration
#: (the largest ``monitor.residual_horizon``)
SEGMENT_TICKS = 10


def segments(
    arrays: dict[str, np.ndarray], rows: np.ndarray, length: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Real segments that start at ``rows`` and continue ``length`` ticks inside one episode.

    Returns ``obs0`` (N x S), the actions that really followed (N x length x A) and the
    observations they led to (N x length x S)."""
    n = len(arrays["obs"])
    ep = arrays["episode_id"]
    starts = rows[rows + length <= n]
    ok = np.array([ep[i] == ep[i + length - 1] and not arrays["terminated"][i : i + length - 1].any() for i in starts],
                  dtype=bool)  # fmt: skip
    starts = starts[ok] if len(starts) else starts
    idx = starts[:, None] + np.arange(length)[None, :]
    return arrays["obs"][starts], arrays["act"][idx], arrays["next_obs"][idx]


class MPCAgent:
    """Everything learned from real data, plus the planner and the gate built around it."""

    def __init__(self, cfg: Config, spec: RobotSpec, task: Task | None, seed: int | None = None):
        self.cfg, self.spec = cfg, spec
        self.seed = cfg.seed if seed is None else seed
        learn_reward = task is None
        model_cfg = (
            cfg.model
            if cfg.model.learn_reward == learn_reward
            else _with(cfg.model, learn_reward=learn_reward)
        )
        g = cfg.gym
        self.task = (
            task
            if task is not None
            else EnvRewardTask(spec, g.terminal_channels, g.terminal_low, g.terminal_high)
        )
        self.model = ProbabilisticEnsemble(
            spec.obs_dim, spec.act_dim, spec.angle_mask, model_cfg, seed=self.seed
        )
        self.trainer = EnsembleTrainer(self.model, cfg.trainer, seed=self.seed)
        self.value = ValueFunction(spec.obs_dim, spec.angle_mask, _with(cfg.value, gamma=cfg.planner.gamma))
        self.thresholds: dict[str, Any] = {"disagreement": None, "ood": None}  # + residual calibration
        self.ood_reference: dict[str, np.ndarray] | None = None
        self.variance_coef: np.ndarray | None = None  # residual variance model of the monitor (2 x S)
        self.trained = False
        self.retrains = 0

    # -- learning --------------------------------------------------------------------------
    def retrain(self, buffer: ReplayBuffer, max_epochs: int | None = None) -> tuple[TrainReport, dict]:
        """Model, value and thresholds from the whole buffer. Returns the trainer's report and a
        record for metrics (losses, shift signal, thresholds)."""
        report = self.trainer.train(buffer, max_epochs=max_epochs)
        data = buffer.arrays()
        vrep = self.value.fit(
            data["obs"], data["reward"], data["next_obs"], data["terminated"], data["truncated"]
        )
        self._calibrate(data, report.holdout_idx)
        self.trained = True
        self.retrains += 1
        record = {
            "retrain": self.retrains,
            "transitions": len(buffer),
            "epochs": report.epochs,
            "stopped_early": report.stopped_early,
            "holdout_mse": report.holdout_mse,
            "holdout_nll": report.holdout_nll,
            "fresh_mse": report.fresh_mse,
            "reference_mse": report.reference_mse,
            "shift_alarm": report.shift_alarm,
            "elites": list(report.elites),
            "value_loss": vrep.loss_last,
            "disagreement_threshold": self.thresholds["disagreement"],
            "ood_threshold": self.thresholds["ood"],
            "train_s": round(report.wall_s, 3),
        }
        log.info("retrain %d: %s", self.retrains, record)
        return report, record

    def _calibrate(self, data: dict[str, np.ndarray], holdout: np.ndarray) -> None:
        """Gate thresholds from held-out, in-distribution real segments (never trained on)."""
        ticks = self.cfg.planner.horizon * self.cfg.planner.action_repeat
        obs0, acts, _ = segments(data, holdout, ticks)
        rate = self.cfg.calibration.disagreement_false_alarm_rate
        if len(obs0) >= 10:
            scores = plan_disagreement_scores(self.model, obs0, acts)
            # Early on there are too few held-out segments to certify the target rate; then the
            # threshold is the largest held-out score (the strictest rate n segments can certify).
            certifiable = max(rate, 1.0 / (len(scores) + 1))
            if certifiable > rate:
                log.info(
                    "%d held-out segments: calibrating at rate %.3g, not %.3g", len(scores), certifiable, rate
                )
            thr = float(calibrate_threshold(scores, certifiable))
            self.thresholds["disagreement"] = thr * self.cfg.calibration.margin
        train_mask = np.ones(len(data["obs"]), dtype=bool)
        train_mask[holdout] = False
        self.ood_reference = {
            "train_obs": data["obs"][train_mask],
            "train_act": data["act"][train_mask],
            "holdout_obs": data["obs"][holdout],
            "holdout_act": data["act"][holdout],
            "holdout_next_obs": data["next_obs"][holdout],  # residual calibration of the CUSUM
        }
        seg_obs0, seg_act, seg_next = segments(data, holdout, SEGMENT_TICKS)  # k-step residuals
        self.ood_reference.update(segment_obs0=seg_obs0, segment_act=seg_act, segment_next_obs=seg_next)

    # -- control ---------------------------------------------------------------------------
    def planner(self) -> MPCPlanner:
        reward_source = "model" if isinstance(self.task, EnvRewardTask) else "task"
        task = self.task
        if self.cfg.explore.plan_shield and reward_source == "task":
            task = ShieldedTask(task, self.spec, self.cfg.explore)
        return MPCPlanner(
            self.model,
            task,
            self.spec.act_low,
            self.spec.act_high,
            value_fn=self.value,
            config=_with(self.cfg.planner, seed=self.seed),
            reward_source=reward_source,
        )

    def controller(self, gate: bool = True, learning: bool = False) -> GatedMPC:
        """The gated per-tick controller. ``learning=True`` (the learning episodes of ``train``):
        unless ``monitor.gate_while_learning``, the shift monitors still observe and log their alarms
        but do not switch to the fallback - learning visits states the model has not seen by design,
        where the disagreement trigger and the constraint shield protect the robot and the answer to
        a large residual is the next retrain. Deployment (``run``) and evaluation: monitors gate."""
        monitor = ShiftMonitor(self.spec, self.cfg.monitor)
        self._calibrate_monitor(monitor)
        gate_cfg = _with(self.cfg.gate, no_gate=not gate)
        gating = monitor if (not learning or self.cfg.monitor.gate_while_learning) else None
        safety = SafetyGate(self.spec, gate_cfg, make_fallback(self.cfg.fallback, self.spec), gating)
        if self.thresholds["disagreement"] is not None:
            safety.set_thresholds(disagreement=self.thresholds["disagreement"])
        return GatedMPC(self, self.planner(), safety, monitor, self.cfg.loop.plan_budget_fraction)

    def _calibrate_monitor(self, monitor: ShiftMonitor) -> None:
        """OOD threshold and CUSUM residual calibration from the model's training and held-out
        data (kept in the checkpoint), for the current model and monitor config."""
        ref = self.ood_reference
        if ref is None or len(ref["holdout_obs"]) < 10:
            return
        n = len(ref["holdout_obs"])
        if self.cfg.monitor.ood_method == "knn":  # + leave-one-out scores of the reference
            n += min(len(ref["train_obs"]), self.cfg.monitor.ood_max_reference)
        rate = max(self.cfg.monitor.ood_false_alarm_rate, 1.0 / (n + 1))  # what n samples certify
        ood = monitor.fit_ood(
            ref["train_obs"], ref["train_act"], ref["holdout_obs"], ref["holdout_act"], rate
        )
        self.thresholds["ood"] = float(ood)
        k = self.cfg.monitor.residual_horizon
        if k > 1:
            self.variance_coef = None
            if len(ref.get("segment_obs0", ())) >= 2 * self.spec.obs_dim:
                pred = open_loop(
                    self.model, ref["segment_obs0"], ref["segment_act"][:, :k], self.spec.angle_mask
                )
                target = ref["segment_next_obs"][:, k - 1]
                z = monitor.residual_z(target, pred, np.ones_like(pred), calibrated=False)
                bias, whiten = residual_calibration(z, full=self.cfg.monitor.whiten)
                monitor.set_residual_calibration(bias, whiten)
                self.thresholds.update(residual_bias=bias.tolist(), residual_whiten=whiten.tolist())
            else:
                log.warning(
                    "monitor.residual_horizon=%d: the checkpoint holds no held-out %d-tick segments; "
                    "residual CUSUM uncalibrated", k, SEGMENT_TICKS,
                )  # fmt: skip
        elif "holdout_next_obs" in ref and len(ref["holdout_obs"]) >= 2 * self.spec.obs_dim:
            mean, ale, epi = predictive_parts(
                self.model, ref["holdout_obs"], ref["holdout_act"], self.spec.angle_mask
            )
            nxt = ref["holdout_next_obs"]
            self.variance_coef = None
            if self.cfg.monitor.variance_model:  # fitted on the raw (angle-wrapped) residuals
                raw = monitor.residual_z(nxt, mean, np.ones_like(mean), calibrated=False)
                self.variance_coef = fit_variance_model(raw, ale, epi)
            z = monitor.residual_z(nxt, mean, predictive_std(ale, epi, self.variance_coef), calibrated=False)
            bias, whiten = residual_calibration(z, full=self.cfg.monitor.whiten)
            monitor.set_residual_calibration(bias, whiten)
            self.thresholds.update(residual_bias=bias.tolist(), residual_whiten=whiten.tolist())

    # -- persistence -----------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        extra = {"value": self.value.state_dict(), "trainer": self.trainer.state_dict()}
        if self.ood_reference is not None:
            extra["ood_reference"] = {k: torch.as_tensor(v) for k, v in self.ood_reference.items()}
        meta = {
            "value_config": to_dict(self.value.cfg),
            "thresholds": self.thresholds,
            "retrains": self.retrains,
            "trained": self.trained,
            "seed": self.seed,
        }
        save_checkpoint(Path(directory) / MODEL_FILE, self.model, extra=extra, meta=meta)

    @classmethod
    def load(cls, directory: str | Path, cfg: Config, spec: RobotSpec, task: Task | None) -> MPCAgent:
        """Load from a checkpoint dir (or a run dir holding ``checkpoint/``)."""
        path = Path(directory)
        if (path / "checkpoint" / MODEL_FILE).is_file():
            path = path / "checkpoint"
        model, extra, meta = load_checkpoint(path / MODEL_FILE)
        if model.obs_dim != spec.obs_dim or model.act_dim != spec.act_dim:
            raise ValueError(
                f"{path / MODEL_FILE}: expected a model for {spec.obs_dim} obs / {spec.act_dim} act channels, "
                f"got {model.obs_dim} / {model.act_dim}"
            )
        # the checkpoint's network shapes win over the run config (a run may use another config file)
        sections = {"model": model.cfg}
        if "value_config" in meta:
            # checkpoints from before the value ensemble hold one network
            vcfg = {"heads": 1, **meta["value_config"]}
            sections["value"] = build(ValueConfig, vcfg, source=str(path / MODEL_FILE), prefix="value")
        cfg = _with(cfg, **sections)
        agent = cls(cfg, spec, task, seed=int(meta.get("seed", cfg.seed)))
        agent.model.load_state_dict(model.state_dict())
        agent.model.set_elites(model.elites)
        agent.value.load_state_dict(extra["value"])
        agent.trainer.load_state_dict(extra["trainer"])
        if "ood_reference" in extra:
            agent.ood_reference = {k: v.numpy() for k, v in extra["ood_reference"].items()}
        agent.thresholds = dict(meta.get("thresholds", agent.thresholds))
        agent.retrains, agent.trained = int(meta.get("retrains", 0)), bool(meta.get("trained", False))
        return agent


class GatedMPC:
    """The per-tick controller: plan, let the gate decide, feed real transitions to the monitor."""

    def __init__(self, agent: MPCAgent, planner: MPCPlanner, gate: SafetyGate, monitor: ShiftMonitor,
                 budget_fraction: float):  # fmt: skip
        self.agent, self.planner, self.gate, self.monitor = agent, planner, gate, monitor
        self.budget_fraction = budget_fraction
        self.warm: torch.Tensor | None = None
        self._open_loop: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None
        self.tick = 0  # ticks across episodes (events and monitors use one clock)
        self.trace: list[
            tuple
        ] = []  # (tick, disagreement, threshold, cusum, cusum_h, ood, ood_thr, fallback)

    def reset(self, obs: Observation) -> None:
        self.gate.reset()
        self.monitor.new_episode()
        self.warm = None
        self._open_loop = None

    def act(self, obs: Observation, tick: Tick, loop: RateLoop) -> Decision:
        plan, error = None, None
        if obs.ok:
            try:
                plan = self.planner.plan(obs.values, self.warm, self.gate.disagreement_threshold)
            except Exception as err:  # noqa: BLE001 - a planner failure is a gate trigger, never a crash
                log.warning("tick %d: planner raised %r; the gate falls back", self.tick, err)
                error = err
        if loop.paced:  # real time: a late plan or an old reading is a hazard -> gate triggers
            missed, now = loop.late(self.budget_fraction), loop.now()
        else:  # lockstep twin: it waits for us, so timing must not change the run (reproducibility);
            missed, now = False, obs.stamp_s  # misses are still counted by the episode runner
        d = self.gate.decide(self.tick, now, obs, plan, error, missed)
        self.warm = self.planner.shift(plan.actions) if plan is not None else None
        cus = self.monitor.state("cusum")
        ood = self.monitor.state("ood")
        thr = self.gate.disagreement_threshold
        self.trace.append((self.tick, plan.worst_disagreement if plan is not None else math.nan,
                           thr if thr is not None else math.nan, cus[1], cus[2], ood[1],
                           ood[2], d.source == "fallback"))  # fmt: skip
        self.tick += 1
        return Decision(
            action=np.asarray(d.action, dtype=float),
            source=d.source,
            plan_s=plan.solve_time_s if plan is not None else None,
            events=[dict(e) for e in d.events],
        )

    def observe(self, tr: Transition) -> list[dict]:
        k, spec = self.monitor.cfg.residual_horizon, self.agent.spec
        if k == 1:
            mean, std = predictive(self.agent.model, tr.obs[None], tr.act[None], spec.angle_mask,
                                   self.agent.variance_coef)  # fmt: skip
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


def _with(section, **changes):
    import dataclasses

    return dataclasses.replace(section, **changes)
