"""The `train` job: learn on the configured backend from little real data.

    explore (shielded random) -> retrain (model, value, thresholds) -> gated MPC episodes
        -> retrain on schedule -> evaluate -> ... until train.steps real steps or solved.

Real transitions go to the persisted buffer as they happen; the checkpoint is replaced atomically
after each retrain; metrics.jsonl gets one line per episode and per retrain. ``resume=True``
reopens the run directory, the buffer (everything flushed survives a kill -9) and the latest
checkpoint, and continues where the metrics stop.

Evaluation episodes run on a separate twin instance and are measurement only: their steps are not
counted as real steps and their transitions are not learned from (``eval_*`` in metrics). On the
serial backend there is no second robot, so evaluation is skipped and learning episodes count.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import numpy as np
import torch

from robot_mbrl.agents.explore import ShieldedExplorer
from robot_mbrl.agents.mpc import MODEL_FILE, MPCAgent
from robot_mbrl.config import Config, config_to_dict, task_id
from robot_mbrl.data.buffer import ReplayBuffer
from robot_mbrl.errors import RunDirError
from robot_mbrl.factory import make_judge, make_robot, make_task
from robot_mbrl.models.trainer import RetrainSchedule
from robot_mbrl.runtime.episode import Transition
from robot_mbrl.runtime.homing import Homing, make_homing
from robot_mbrl.runtime.jobs import home, link_record, robot_session, run_episodes, timing_record
from robot_mbrl.runtime.plots import write_plots
from robot_mbrl.runtime.progress import Progress
from robot_mbrl.runtime.resume import check_fixed, record_changes, restore_tally
from robot_mbrl.runtime.rundir import (
    SUMMARY_KEYS,
    RunDir,
    Tally,
    default_run_path,
    holds_run,
    run_dir,
    stop_reason,
)
from robot_mbrl.safety.fallback import make_fallback

log = logging.getLogger(__name__)


def solved_threshold(cfg: Config, max_step_reward: float | None) -> float | None:
    if cfg.task.solved_return is not None:
        return cfg.task.solved_return
    if max_step_reward is None:
        return None
    return cfg.task.solved_fraction * cfg.task.episode_steps * max_step_reward


def train_job(
    cfg: Config, *, out: Path | None, resume: bool = False, progress: bool = True, salvage: bool = False
) -> tuple[dict, Path]:
    torch.set_num_threads(1)  # the onboard CPU budget; also keeps runs reproducible
    torch.manual_seed(cfg.seed)
    if not resume and out is not None and holds_run(out):
        raise RunDirError(f"{out}: expected a new run directory, got an existing run (use --resume {out})")
    with run_dir(out or default_run_path("train"), new=not resume) as run:  # locked: one writer per run
        return _train(cfg, run, resume=resume, progress=progress, salvage=salvage)


def _train(cfg: Config, run: RunDir, *, resume: bool, progress: bool, salvage: bool) -> tuple[dict, Path]:
    robot = make_robot(cfg)
    homing = make_homing(cfg, robot.spec)  # the rig's reset; its channel names checked before any robot time
    task = make_task(cfg)
    judge = make_judge(task, robot)
    spec = robot.spec
    agent = MPCAgent(cfg, spec, task)
    schedule = RetrainSchedule(cfg.retrain)
    if resume:
        check_fixed(run, config_to_dict(cfg))
        buffer = ReplayBuffer.open(run.buffer, cfg.buffer, salvage=salvage)
        if buffer.task is not None and buffer.task != task_id(cfg):  # (older buffers do not say)
            raise RunDirError(f"{run.buffer}: expected transitions of this run's task ({task_id(cfg)}), "
                              f"got {buffer.task}'s: a buffer of another run")  # fmt: skip
        if (buffer.obs_dim, buffer.act_dim) != (spec.obs_dim, spec.act_dim):
            raise RunDirError(
                f"{run.buffer}: expected transitions of this robot ({spec.obs_dim} observations, "
                f"{spec.act_dim} actions), got {buffer.obs_dim} / {buffer.act_dim}: a run of another robot"
            )
        tally, first_episode, retrains, recorded = restore_tally(run)
        if (
            not tally.returns and (run.checkpoint / MODEL_FILE).is_file()
        ):  # a retrain follows an episode's line
            raise RunDirError(
                f"{run.path / 'metrics.jsonl'}: expected the record of the episodes its checkpoint was trained on, "
                "got none (restore metrics.jsonl, or start a new run: resuming would paper over the lost record)"
            )
        episodes_recorded = first_episode  # the label the next evaluation would carry
        ids = buffer.arrays()["episode_id"]
        if recorded["vouched"]:  # per episode: rows of an unrecorded episode cannot hide a loss
            held = (
                np.bincount(ids.astype(np.int64), minlength=max(recorded["vouched"]) + 1)
                if len(ids)
                else None
            )
            missing = sum(
                max(0, n - (0 if held is None else int(held[e]))) for e, n in recorded["vouched"].items()
            )
            if missing:
                log.warning("%s: %d transitions its metrics.jsonl records as learned from are not in the buffer "
                            "(never written before a kill, or left out as corrupt)", run.path, missing)  # fmt: skip
        if len(ids):  # an episode killed mid-way has rows but no metrics line: the next gets a new id
            first_episode = max(first_episode, int(ids.max()) + 1)
        if len(buffer) > tally.real_steps:  # that episode's steps, or a lost metrics.jsonl
            log.warning("%s: %d transitions in the buffer, %d real steps in metrics.jsonl: counting %d",
                        run.path, len(buffer), tally.real_steps, len(buffer))  # fmt: skip
            tally.real_steps = len(buffer)
        if (run.checkpoint / MODEL_FILE).is_file():
            agent = MPCAgent.load(run.checkpoint, cfg, spec, task)
        elif len(buffer) >= cfg.retrain.min_transitions:
            log.warning(
                "%s: no checkpoint: the model is trained from the buffer at the next retrain", run.path
            )
        # what the checkpoint was trained on (a kill during a retrain leaves the one before): the
        # retrain it missed runs before the next episode, not after it
        schedule.mark_trained(
            retrains[-1].get("transitions", len(buffer)) if agent.trained and retrains else 0
        )
        log.info("resuming %s at episode %d with %d transitions", run.path, first_episode, len(buffer))
    else:
        run.write_config(config_to_dict(cfg))
        buffer = ReplayBuffer(
            spec.obs_dim, spec.act_dim, directory=run.buffer, cfg=cfg.buffer, task=task_id(cfg)
        )
        tally, first_episode, retrains, recorded = Tally(), 0, [], {"vouched": {}, "evals": set()}
        episodes_recorded = 0
    evaluate = cfg.backend != "serial" and cfg.train.eval_episodes > 0
    eval_robot = make_robot(cfg, seed=cfg.seed + 7919) if evaluate else None
    target = solved_threshold(cfg, task.max_step_reward if task is not None else None)
    fallback = make_fallback(cfg.fallback, spec)

    def store(tr: Transition) -> None:
        buffer.add(
            tr.obs, tr.act, tr.reward, tr.next_obs, tr.terminated, tr.truncated, tr.stamp_s, tr.episode
        )

    tally.since_s = time.monotonic()  # (wall_s in each metrics line: a resume after a kill keeps it)
    episode = first_episode
    controller = None
    homed = None  # the next episode's homing, done during the retrain
    trace: list[tuple] = []  # the learning controllers' gate trace, ticks as real steps (gate.png)
    trace_from = 0  # real steps when the current controller was built

    def keep_trace() -> None:
        if controller is not None:
            trace.extend((t[0] + trace_from, *t[1:]) for t in controller.trace)

    def retrain() -> tuple[dict, dict | None]:
        """Retrain on the whole buffer (homing the rig for the next episode meanwhile), save and record
        it; the record and the homing's."""
        nonlocal controller
        more = tally.real_steps < cfg.train.steps
        record, homed = _retrain(agent, buffer, cfg, robot, homing if more else None, run.event)
        schedule.mark_trained(len(buffer))
        agent.save(run.checkpoint)
        record.update(kind="retrain", real_steps=tally.real_steps, wall_s=round(tally.elapsed_s(), 3))
        run.metric(record)
        retrains.append(record)
        keep_trace()
        controller = None  # rebuild with the new thresholds and a fresh monitor
        if record["shift_alarm"]:
            event = {"tick": tally.ticks, "run_tick": tally.ticks, "kind": "alarm", "trigger": "val_loss",
                     "score": record["fresh_mse"], "threshold": record["reference_mse"],
                     "reason": "fresh-data loss above holdout loss: trained longer"}  # fmt: skip
            run.event(event)
            tally.alarms.append({"tick": tally.ticks, "reason": "val_loss"})
        return record, homed

    def done() -> bool:
        solved = tally.solved_at_step is not None and cfg.train.stop_when_solved
        return solved or tally.real_steps >= cfg.train.steps

    def after_episode() -> dict | None:
        """What follows a learning episode: the retrain when due (homing the rig for the next
        episode meanwhile), then the evaluation when due. The retrain's record (None: not due)."""
        nonlocal homed
        record = None
        if schedule.due(len(buffer), episode_ended=True):
            record, homed = retrain()
        if evaluate and agent.trained and episode % cfg.train.eval_every_episodes == 0:
            solved = _evaluate(cfg, agent, eval_robot, task, run, tally, episode, target)
            if solved and tally.solved_at_step is None:
                tally.solved_at_step = tally.real_steps
        return record

    def learn() -> None:
        """Learning episodes until done, each followed by its retrain and evaluation when due."""
        nonlocal controller, trace_from, homed, episode
        # the robot first: a rig that cannot be reached draws no progress bar
        with robot_session(robot), Progress(cfg.train.steps, "train", enabled=progress) as bar:
            if resume:  # once the robot is reached: a resume that cannot reach it changes nothing
                begin_resume()
            bar.tick(tally.real_steps)
            bar.post()
            if missed:
                after_episode()
            while not done():
                if agent.trained and episode >= cfg.train.explore_episodes:
                    if controller is None:
                        controller = agent.controller(gate=cfg.run.gate, learning=True)
                        trace_from = tally.real_steps
                else:  # (no learning controller exists yet: one is built only once exploring ends)
                    controller = None
                    explorer = ShieldedExplorer(spec, fallback, cfg.explore, seed=cfg.seed + episode,
                                                correlation=cfg.train.explore_correlation,
                                                max_obs_age_s=cfg.gate.max_obs_age_s)  # fmt: skip
                res = run_episodes(
                    cfg, robot, judge, controller or explorer, run, tally, episodes=1, first_episode=episode,
                    seed_offset=0, progress=bar, kind="learn", on_transition=store, homing=homing, homed=homed,
                    max_steps=min(cfg.task.episode_steps, cfg.train.steps - tally.real_steps),  # robot time asked for
                    on_end=buffer.flush,  # the episode's data on disk before its record
                )[0]  # fmt: skip
                homed = None
                episode += 1
                if schedule.due(len(buffer), episode_ended=True):
                    bar.post(doing="retrain")  # (seconds of it, homing the rig meanwhile)
                record = after_episode()
                if record is not None:
                    bar.post(ret=res.ret, holdout=record["holdout_mse"], doing="episode")
            if tally.solved_at_step is not None and cfg.train.stop_when_solved:
                bar.post(doing="solved: stopped (train.stop_when_solved)")

    def begin_resume() -> None:
        """What a resume records once it goes ahead: its changed settings, and a ``resume`` line in
        events.jsonl — the events before it and after the last recorded episode are the killed job's
        (an evaluation or a homing it interrupted runs again and logs its events again)."""
        record_changes(run, config_to_dict(cfg))
        run.event({"kind": "resume", "run_tick": tally.ticks, "episodes": len(tally.returns),
                   "real_steps": tally.real_steps, "retrains": len(retrains)})  # fmt: skip

    def summarize(**extra) -> dict:
        summary = tally.summary(
            solved_threshold=target,
            end_stop_hits=tally.end_stop_hits,
            retrains=len(retrains),
            buffer_transitions=len(buffer),
            eval_returns=[m["eval_return"] for m in run.metrics() if m.get("kind") == "eval"],
            **_whole_run_link(recorded.get("link"), link_record(robot).get("link")),
            **extra,
        )
        run.write_summary(summary)
        write_plots(run, trace or None)
        return summary

    at_start = (len(tally.returns), len(retrains))
    # a resume first does what a kill interrupted after the last episode: its retrain (or one that
    # never ran) and the evaluation after it
    stopped_solved = tally.solved_at_step is not None and cfg.train.stop_when_solved  # left as it is
    n = episodes_recorded  # an evaluation a kill interrupted (its retrain done) is owed too
    owed_eval = evaluate and agent.trained and n >= 1 and n % cfg.train.eval_every_episodes == 0
    owed_eval = owed_eval and n not in recorded["evals"]
    missed = resume and not stopped_solved and (schedule.due(len(buffer), episode_ended=True) or owed_eval)
    if resume and done() and not missed:  # complete (solved, or its steps done): nothing to do
        buffer.close()
        before = _existing_summary(run)
        if before is not None:
            log.warning("%s: the run is complete (%s): nothing to do (give --steps to go on)", run.path,
                        "solved" if stopped_solved else f"{tally.real_steps} real steps")  # fmt: skip
            return before, run.path
    try:
        if missed and done():  # the run's last retrain: no robot time needed, so no robot reached
            missed = False
            begin_resume()  # (the settings the retrain now runs under)
            after_episode()
        if not done():
            learn()
    except BaseException as err:  # the job's own error (or the interrupt) is the one to raise
        try:
            buffer.close()
        except OSError as second:
            log.error("%s", second)
        keep_trace()
        tally.stop_clock()
        if (
            len(tally.returns),
            len(retrains),
        ) != at_start:  # this job ran episodes or retrains: their summary
            # (a resume that failed before, e.g. could not reach the robot, leaves the run's as it was)
            try:
                summarize(stopped_by=stop_reason(err))
            except Exception as second:  # noqa: BLE001
                log.error("%s: the summary of the episodes done was not written: %s", run.path, second)
        raise
    buffer.close()  # every row on disk (a failed write is raised here)
    keep_trace()
    tally.stop_clock()
    return summarize(), run.path


def _existing_summary(run: RunDir) -> dict | None:
    """The run's summary.json as it is, if readable and complete (else None: written anew)."""
    try:
        out = json.loads((run.path / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return out if isinstance(out, dict) and all(k in out for k in SUMMARY_KEYS) else None


def _whole_run_link(before: dict | None, now: dict | None) -> dict:
    """``{"link": the run's wire counters}``: those of the jobs before a resume plus this one's (a
    resume's transport counts from zero; its summary showed only the resume's own)."""
    if now is None:
        return {} if before is None else {"link": before}
    before = before or {}
    return {
        "link": {k: v + before.get(k, 0) if isinstance(before.get(k, 0), int) else v for k, v in now.items()}
    }


def _retrain(
    agent: MPCAgent, buffer: ReplayBuffer, cfg: Config, robot, homing: Homing | None, on_event=None
) -> tuple[dict, dict | None]:  # fmt: skip
    """Retrain; on a rig, home it for the next episode meanwhile: the retrain's torch runs on one
    thread and the homing loop needs little of the other core, and the rig would otherwise stand
    for the whole retrain and then home. Returns the retrain record and the homing record (None
    without homing). A retrain error is raised once the rig is homed."""
    if homing is None:
        return agent.retrain(buffer)[1], None
    box: dict = {}

    def work() -> None:
        try:
            box["record"] = agent.retrain(buffer)[1]
        except BaseException as err:  # noqa: BLE001 - raised below, in the job's thread
            box["error"] = err

    worker = threading.Thread(target=work, name="retrain", daemon=True)
    worker.start()  # before the homing takes its real-time priority: the retrain does not inherit it
    try:
        homed = home(cfg, robot, homing, on_event)
    finally:  # (a homing that fails: the retrain still ends before the job closes its buffer)
        worker.join()
    if "error" in box:
        raise box["error"]
    return box["record"], homed


def is_solved(mean_return: float, target: float | None, mpc_fraction: float, min_mpc_fraction: float) -> bool:
    """Evaluation verdict: the mean return reaches ``target`` with the learned controller in charge
    for at least ``min_mpc_fraction`` of the ticks (``task.solved_min_mpc_fraction``)."""
    return target is not None and mean_return >= target and mpc_fraction >= min_mpc_fraction


def _evaluate(cfg: Config, agent: MPCAgent, robot, task, run: RunDir, tally: Tally, episode: int,
              target: float | None) -> bool:  # fmt: skip
    """Measurement only: gated MPC on a separate twin, not counted, not learned from."""
    judge = make_judge(task, robot)
    ctrl = agent.controller(gate=cfg.run.gate)
    scratch = Tally()
    with robot_session(robot), Progress(0, "eval", enabled=False) as quiet:
        results = run_episodes(
            cfg, robot, judge, ctrl, _EvalRun(run), scratch, episodes=cfg.train.eval_episodes,
            first_episode=episode * 1000, seed_offset=90_000, progress=quiet, kind="eval",
        )  # fmt: skip
    mean = float(np.mean([r.ret for r in results]))
    fallback = sum(r.fallback_ticks for r in results)
    mpc_fraction = 1.0 - fallback / max(sum(r.steps for r in results), 1)
    solved = is_solved(mean, target, mpc_fraction, cfg.task.solved_min_mpc_fraction)
    run.timing(timing_record(episode, "eval", scratch.plan_s, scratch.tick_s))  # before its metrics line
    run.metric({
        "kind": "eval", "episode": episode, "real_steps": tally.real_steps, "wall_s": round(tally.elapsed_s(), 3),
        "eval_return": round(mean, 3),
        "eval_returns": [round(r.ret, 3) for r in results], "eval_violations": sum(r.violations for r in results),
        "eval_fallback_ticks": fallback, "eval_mpc_fraction": round(mpc_fraction, 4), "solved": solved,
        "plan_ms_p50": round(float(np.median(scratch.plan_s) * 1e3), 3) if scratch.plan_s else None,
    })  # fmt: skip
    tally.plan_s += scratch.plan_s
    return solved


class _EvalRun:
    """Evaluation writes its own summary line: per-episode records stay out of the run; its gate's
    switches and alarms go to events.jsonl marked ``"phase": "eval"`` (not the run's alarms)."""

    def __init__(self, run: RunDir):
        self.run = run

    def metric(self, record: dict) -> None:
        pass

    def event(self, record: dict) -> None:
        self.run.event({**record, "phase": "eval"})

    def timing(self, record: dict) -> None:
        pass
