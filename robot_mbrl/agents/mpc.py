"""The learning MPC agent: ensemble + value + k-step planner behind the Simplex gate.

``MPCAgent`` owns the learned parts and their retraining (model, value, calibrated thresholds);
``GatedMPC`` (:mod:`robot_mbrl.agents.gated`) is the per-tick controller the loop drives::

    plan  = planner.plan(obs, warm_start, disagreement_threshold)    # may raise / be non-finite
    gate  = gate.decide(tick, now, obs, plan, error, deadline_missed) # MPC action or fallback
    write gate.action; later observe(real transition) -> shift monitor -> alarms

Retraining (between episodes, on the configured schedule) runs: trainer on the whole buffer
(holdout, early stopping, elites) -> value function on the real transitions -> recalibration of the
gate's disagreement threshold and the OOD threshold on held-out in-distribution data.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robot_mbrl.agents.gated import GatedMPC
from robot_mbrl.agents.monitor_calibration import SEGMENT_TICKS, calibrate_monitor, commission, segments
from robot_mbrl.agents.planning_tasks import EnvRewardTask, ShieldedTask
from robot_mbrl.config import Config, is_paced, task_id
from robot_mbrl.data.buffer import ReplayBuffer
from robot_mbrl.data.symmetry import mirror_signs, with_mirror
from robot_mbrl.hal.robot import RobotSpec
from robot_mbrl.models.checkpoint import CheckpointError, load_checkpoint, one_line, save_checkpoint
from robot_mbrl.models.ensemble import ProbabilisticEnsemble
from robot_mbrl.models.trainer import EnsembleTrainer, TrainReport
from robot_mbrl.planning.mpc import MPCPlanner, ValueFn
from robot_mbrl.planning.terminal import TerminalValue, fit_terminal, lqr_policy
from robot_mbrl.planning.value import ValueConfig, ValueFitReport, ValueFunction
from robot_mbrl.planning.value_targets import logged_action_plans, planned_value_targets
from robot_mbrl.runtime.deadline import planner_worker
from robot_mbrl.safety.calibration import (
    calibrate_threshold,
    plan_disagreement_scores,
)
from robot_mbrl.safety.fallback import make_fallback
from robot_mbrl.safety.gate import SafetyGate
from robot_mbrl.safety.monitors import ShiftMonitor
from robot_mbrl.tasks.base import Task
from robot_mbrl.typedconfig import build, require_names, to_dict

log = logging.getLogger(__name__)
MODEL_FILE = "model.pt"


#: ValueConfig keys that define the learned V (network shapes, priors, discount): a checkpoint's win
VALUE_FUNCTION_KEYS = ("hidden", "layers", "heads", "prior_scale", "gamma", "seed")


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
        for key, names in (("model.control_channels", model_cfg.control_channels),
                           ("monitor.residual_channels", cfg.monitor.residual_channels)):  # fmt: skip
            require_names(key, names, spec.obs_names)  # before any robot time is spent
        self.model = ProbabilisticEnsemble(
            spec.obs_dim, spec.act_dim, spec.angle_mask, model_cfg, seed=self.seed,
            control_mask=np.array([n in model_cfg.control_channels for n in spec.obs_names]),
        )  # fmt: skip
        self.mirror = mirror_signs(spec, cfg.symmetry)  # before any robot time is spent
        self.trainer = EnsembleTrainer(self.model, cfg.trainer, seed=self.seed, mirror=self.mirror)
        self.value = ValueFunction(
            spec.obs_dim, spec.angle_mask, _with(cfg.value, gamma=cfg.planner.gamma), run_seed=self.seed
        )
        self.thresholds: dict[str, Any] = {"disagreement": None, "ood": None}  # + residual calibration
        self.ood_reference: dict[str, np.ndarray] | None = None
        self.variance_coef: np.ndarray | None = None  # residual variance model of the monitor (2 x S)
        self.terminal: TerminalValue | None = None  # LQR terminal value of the current model
        self.trained = False
        self.retrains = 0

    # -- learning --------------------------------------------------------------------------
    def retrain(self, buffer: ReplayBuffer, max_epochs: int | None = None) -> tuple[TrainReport, dict]:
        """Model, value and thresholds from the whole buffer. Returns the trainer's report and a
        record for metrics (losses, shift signal, thresholds)."""
        planner_worker().wait_idle(self.cfg.loop.plan_hang_s)  # no late plan reads what changes here
        report = self.trainer.train(buffer, max_epochs=max_epochs)
        data = buffer.arrays()
        self._calibrate(data, report.holdout_idx)  # the planned value targets truncate with it
        self._set_terminal(data)
        vdata = with_mirror(data, self.mirror)  # V learns the mirror images too (symmetry.negate)
        vrep = self.value.fit(
            vdata["obs"], vdata["reward"], vdata["next_obs"], vdata["terminated"], vdata["truncated"]
        )
        vrep = self._planned_value_rounds(vdata) or vrep
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

    def _set_terminal(self, data: dict[str, np.ndarray] | None) -> None:
        """Refresh V's LQR terminal value (``value.terminal``) from ``data`` (None: off)."""
        vcfg = self.value.cfg
        self.terminal = None
        if vcfg.terminal != "none" and data is not None:
            self.terminal = fit_terminal(
                self.task, self.model, data, self.spec.act_dim, self.spec.angle_mask,
                slope=vcfg.terminal == "lqr_model", rows=vcfg.terminal_rows, gamma=vcfg.gamma,
            )  # fmt: skip
        self.value.set_terminal(self.terminal)

    def _planned_value_rounds(self, data: dict[str, np.ndarray]) -> ValueFitReport | None:
        """``value.planned_rounds`` rounds of fitted value iteration on the real states, the
        planner (with its constraint shield and calibrated truncation) as the improvement step."""
        vcfg, pcfg = self.value.cfg, self.cfg.planner
        rep = None
        if vcfg.planned_rounds == 0 or len(data["obs"]) == 0:
            return rep
        planner = self.planner()
        logged = logged_action_plans(
            data["act"], data["terminated"], data["truncated"], pcfg.horizon, pcfg.action_repeat
        )
        for r in range(vcfg.planned_rounds):
            seed = self.seed * 7919 + self.retrains * 101 + r
            targets = planned_value_targets(
                planner, self.value, data["obs"], logged, self.thresholds["disagreement"], seed
            )
            rep = self.value.regress(data["obs"], targets, vcfg.planned_epochs, seed=seed)
        return rep

    def _calibrate(self, data: dict[str, np.ndarray], holdout: np.ndarray) -> None:
        """Gate thresholds from in-distribution real segments that start at a held-out transition.
        With ``trainer.holdout_block`` >= the plan's ticks the segments are held out whole; with
        single held-out rows (the default) the transitions after the first may have been trained on,
        which makes the threshold somewhat optimistic (commissioning recalibrates the monitors on
        fresh data; benchmarks/RESULTS.md)."""
        ticks = self.cfg.planner.horizon * self.cfg.planner.action_repeat
        whole = self.cfg.trainer.holdout_block >= ticks
        obs0, acts, _ = segments(data, holdout, ticks, whole)
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
        else:  # not the previous model's threshold: uncalibrated, the gate falls back until the next retrain
            log.warning("%d held-out segments: too few to calibrate the disagreement threshold", len(obs0))
            self.thresholds["disagreement"] = None
        train_mask = np.ones(len(data["obs"]), dtype=bool)
        train_mask[holdout] = False
        self.thresholds.pop("commission_transitions", None)  # a new model needs a new commissioning
        train = with_mirror({k: data[k][train_mask] for k in ("obs", "act")}, self.mirror)
        self.ood_reference = {  # the input OOD reference: what the model trained on, mirror images too
            "train_obs": train["obs"],
            "train_act": train["act"],
            "holdout_obs": data["obs"][holdout],
            "holdout_act": data["act"][holdout],
            "holdout_next_obs": data["next_obs"][holdout],  # residual calibration of the CUSUM
        }
        seg_obs0, seg_act, seg_next = segments(data, holdout, SEGMENT_TICKS, whole)  # k-step residuals
        self.ood_reference.update(segment_obs0=seg_obs0, segment_act=seg_act, segment_next_obs=seg_next)

    # -- control ---------------------------------------------------------------------------
    def planner(self, learning: bool = False) -> MPCPlanner:
        reward_source = "model" if isinstance(self.task, EnvRewardTask) else "task"
        task = self.task
        if self.cfg.explore.plan_shield and reward_source == "task":
            task = ShieldedTask(task, self.spec, self.cfg.explore)
        return MPCPlanner(
            self.model,
            task,
            self.spec.act_low,
            self.spec.act_high,
            value_fn=self._learning_value() if learning else self.value,
            config=_with(
                self.cfg.planner,
                seed=self.seed,
                exploration_bonus=self.cfg.planner.exploration_bonus if learning else 0.0,
            ),
            reward_source=reward_source,
            prior=lqr_policy(self.terminal, self.spec.angle_mask)
            if self.cfg.planner.policy_candidate
            else None,
        )

    def _learning_value(self) -> ValueFn:
        kappa = self.value.cfg.learning_pessimism
        if kappa is None:
            return self.value
        value = self.value
        return lambda states: value(states, pessimism=kappa)

    def controller(
        self, gate: bool = True, learning: bool = False, monitors_gate: bool | None = None
    ) -> GatedMPC:
        """The gated per-tick controller. ``learning=True`` (the learning episodes of ``train``):
        unless ``monitor.gate_while_learning``, the shift monitors still observe and log their alarms
        but do not switch to the fallback - learning visits states the model has not seen by design,
        where the disagreement trigger and the constraint shield protect the robot and the answer to
        a large residual is the next retrain. Deployment (``run``) and evaluation: monitors gate.
        ``monitors_gate`` overrides that choice (``commission`` runs with monitors observing only)."""
        monitor = ShiftMonitor(self.spec, self.cfg.monitor)
        self._calibrate_monitor(monitor)
        gate_cfg = _with(self.cfg.gate, no_gate=not gate)
        if monitors_gate is None:
            monitors_gate = not learning or self.cfg.monitor.gate_while_learning
        gating = monitor if monitors_gate else None
        safety = SafetyGate(self.spec, gate_cfg, make_fallback(self.cfg.fallback, self.spec), gating)
        if self.thresholds["disagreement"] is not None:
            safety.set_thresholds(disagreement=self.thresholds["disagreement"])
        loop = self.cfg.loop
        return GatedMPC(self, self.planner(learning), safety, monitor, loop.plan_budget_fraction,
                        loop.plan_hang_s, paced=is_paced(self.cfg), preempt=loop.preempt_planner)  # fmt: skip

    def _calibrate_monitor(self, monitor: ShiftMonitor) -> None:
        """OOD threshold and CUSUM residual calibration for the current model and monitor config
        (:func:`robot_mbrl.agents.monitor_calibration.calibrate_monitor`)."""
        calibrate_monitor(self, monitor)

    def commission(
        self, obs: np.ndarray, act: np.ndarray, next_obs: np.ndarray, episode: np.ndarray | None = None
    ) -> dict[str, Any]:
        """Phase-I calibration of the monitors on this controller's own in-control real transitions
        (:func:`robot_mbrl.agents.monitor_calibration.commission`)."""
        return commission(self, obs, act, next_obs, episode)

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
            "terminal": None if self.terminal is None else self.terminal.to_dict(),
            "task": task_id(self.cfg),
        }
        save_checkpoint(Path(directory) / MODEL_FILE, self.model, extra=extra, meta=meta)

    @classmethod
    def load(cls, directory: str | Path, cfg: Config, spec: RobotSpec, task: Task | None) -> MPCAgent:
        """Load from a checkpoint dir (or a run dir holding ``checkpoint/``)."""
        path = checkpoint_dir(directory)
        model, extra, meta = load_checkpoint(path / MODEL_FILE)
        learned_on = meta.get("task")  # (checkpoints from before it was recorded: not checked)
        if learned_on is not None and learned_on != task_id(cfg):
            raise CheckpointError(path / MODEL_FILE, f"a checkpoint of this config's task ({task_id(cfg)})",
                                  f"one of {learned_on}")  # fmt: skip
        if model.obs_dim != spec.obs_dim or model.act_dim != spec.act_dim:
            raise CheckpointError(
                path / MODEL_FILE,
                f"a model for {spec.obs_dim} obs / {spec.act_dim} act channels (this config's robot)",
                f"{model.obs_dim} / {model.act_dim}",
            )
        # the checkpoint's network shapes win over the run config (a run may use another config file)
        # (learn_reward is the backend's, not a setting: a task with no known reward learns it)
        expected = _with(cfg.model, learn_reward=task is None)
        if model.cfg != expected:
            differ = [k for k, v in vars(model.cfg).items() if getattr(expected, k, v) != v]
            log.warning(
                "%s: model.%s from the checkpoint, not the config", path / MODEL_FILE, ", model.".join(differ)
            )
        sections = {"model": model.cfg}
        if "value_config" in meta:
            # checkpoints from before the value ensemble hold one network
            vcfg = {"heads": 1, "prior_scale": 0.0, **meta["value_config"]}
            # what defines the learned function comes from the checkpoint; how the planner uses it
            # (pessimism, planned rounds, ...) from the run config
            vcfg = {**to_dict(cfg.value), **{k: vcfg[k] for k in VALUE_FUNCTION_KEYS if k in vcfg}}
            sections["value"] = build(ValueConfig, vcfg, source=str(path / MODEL_FILE), prefix="value")
        cfg = _with(cfg, **sections)
        agent = cls(cfg, spec, task, seed=int(meta.get("seed", cfg.seed)))
        agent.model.load_state_dict(model.state_dict())
        agent.model.set_elites(model.elites)
        try:
            if not isinstance(extra, dict):
                raise TypeError(f"{type(extra).__name__} where a mapping of value and trainer state belongs")
            agent.value.load_state_dict(extra["value"])
            agent.trainer.load_state_dict(extra["trainer"])
        except (KeyError, RuntimeError, TypeError, ValueError) as err:
            raise CheckpointError(path / MODEL_FILE, "value and trainer state", one_line(err)) from None
        if "ood_reference" in extra:
            agent.ood_reference = {k: v.numpy() for k, v in extra["ood_reference"].items()}
        agent.thresholds = dict(meta.get("thresholds", agent.thresholds))
        agent.retrains, agent.trained = int(meta.get("retrains", 0)), bool(meta.get("trained", False))
        # every retrain fits V: a trained agent's V keeps its normalizers (a resumed run continues it)
        agent.value.fitted = agent.trained
        # the run config decides whether V uses the terminal value; the checkpoint holds the one
        # its last retrain computed, used when it is of the configured kind (otherwise, and for
        # older checkpoints: fitted from the run's buffer, if it is there)
        stored = meta.get("terminal")
        stored_kind = meta.get("value_config", {}).get("terminal", cfg.value.terminal)
        if not agent.trained or cfg.value.terminal == "none":
            agent.value.set_terminal(None)
        elif stored is not None and stored_kind == cfg.value.terminal:
            agent.terminal = TerminalValue.from_dict(stored)
            agent.value.set_terminal(agent.terminal)
        else:
            buffer_dir = path.parent / "buffer"
            agent._set_terminal(ReplayBuffer.open(buffer_dir).arrays() if buffer_dir.is_dir() else None)
        return agent


def checkpoint_dir(directory: str | Path) -> Path:
    """The checkpoint folder of a run directory (``RUN/checkpoint``) or the folder itself."""
    path = Path(directory)
    if (path / MODEL_FILE).is_file() or not (path / "checkpoint").is_dir():
        return path
    return path / "checkpoint"  # a run directory (its model file may be missing: said on load)


def _with(section, **changes):
    import dataclasses

    return dataclasses.replace(section, **changes)
