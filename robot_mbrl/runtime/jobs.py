"""The `run` job: drive a robot with a controller for N episodes and write a run directory."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from robot_mbrl.config import Config, config_to_dict, is_paced
from robot_mbrl.hal.robot import Robot, stop_on_signals
from robot_mbrl.runtime.episode import Controller, EpisodeResult, Judge, run_episode
from robot_mbrl.runtime.homing import Homing, make_homing
from robot_mbrl.runtime.loop import realtime
from robot_mbrl.runtime.plots import write_plots
from robot_mbrl.runtime.policies import PolicyController, ZeroPolicy
from robot_mbrl.runtime.progress import Progress
from robot_mbrl.runtime.rundir import RunDir, Tally, default_run_path, run_dir, stop_reason

log = logging.getLogger(__name__)


@contextmanager
def robot_session(robot: Robot) -> Iterator[Robot]:
    """Connect, activate actuation where the backend has a separate step (serial rigs), and always
    end in safe_stop + close (exception, SIGINT, SIGTERM included)."""
    with stop_on_signals(robot):
        activate = getattr(robot, "activate", None)
        if callable(activate):
            activate()
        yield robot


def link_record(robot: Robot) -> dict:
    """``{"link": counters}`` for a robot behind a serial link (CRC and framing errors, lost frames,
    reconnects, device restarts: a run's record of its wire), else ``{}``."""
    stats = getattr(robot, "link_stats", None)
    return {"link": stats()} if callable(stats) else {}


def simple_controller(cfg: Config, robot: Robot) -> Controller:
    """random / zero / safe (the configured fallback policy, acting on trusted readings only) — no model."""
    from robot_mbrl.safety.fallback import make_fallback

    name = cfg.run.policy
    if name == "random":  # seeded colored noise inside the stopping-distance shield
        from robot_mbrl.agents.explore import ShieldedExplorer

        fallback = make_fallback(cfg.fallback, robot.spec)
        return ShieldedExplorer(
            robot.spec, fallback, cfg.explore, seed=cfg.seed, correlation=cfg.train.explore_correlation,
            max_obs_age_s=cfg.gate.max_obs_age_s,
        )  # fmt: skip
    if name == "zero":
        return PolicyController(ZeroPolicy(robot.spec))
    from robot_mbrl.agents.explore import FallbackController

    # the fallback acts on trusted readings only (a brake fed a glitched position pushes toward the end stop)
    return FallbackController(robot.spec, make_fallback(cfg.fallback, robot.spec), cfg.gate.max_obs_age_s)


def episode_record(res: EpisodeResult, **extra) -> dict:
    rec = {
        "episode": res.episode,
        "steps": res.steps,
        "return": round(res.ret, 4),
        "violations": res.violations,
        "end_stop_hits": res.end_stop_hits,
        "fallback_ticks": res.fallback_ticks,
        "deadline_misses": res.deadline_misses,
        "terminated": res.terminated,
        "plan_ms_p50": None if res.plan_ms_p50 is None else round(res.plan_ms_p50, 3),
        "tick_ms_p99": round(res.tick_ms_p99, 3),
        "tick_ms_max": round(res.tick_ms_max, 3),
        "vouched": res.vouched,
        "sample_timeouts": res.sample_timeouts,
    }
    rec.update(extra)
    return rec


def _link_delta(before: dict | None, after: dict | None) -> dict:
    """``{"link": what the wire's counters gained during an episode}`` (CRC errors, lost frames, link
    losses, reconnects... only those that changed; bytes left out), {} without a serial link: an
    unplugged cable mid-episode shows in that episode's line, not only in the run's summary."""
    if before is None or after is None:
        return {}
    gained = {k: v - before.get(k, 0) for k, v in after.items() if not k.startswith("bytes_")}
    return {"link": {k: v for k, v in gained.items() if v}}


def timing_record(episode: int, kind: str, plan_s: list[float], tick_s: list[float]) -> dict:
    """A ``timing.jsonl`` line: the episode's plan and tick times in ms (to the µs); a resume
    restores the run's percentiles from them."""
    return {
        "episode": episode,
        "kind": kind,
        "plan_ms": [round(t * 1e3, 3) for t in plan_s],
        "tick_ms": [round(t * 1e3, 3) for t in tick_s],
    }


def run_episodes(
    cfg: Config,
    robot: Robot,
    judge: Judge,
    controller: Controller,
    run: RunDir,
    tally: Tally,
    *,
    episodes: int,
    first_episode: int,
    seed_offset: int,
    progress: Progress,
    kind: str,
    on_transition=None,
    homing: Homing | None = None,
    homed: dict | None = None,
    max_steps: int | None = None,
    on_end: Callable[[], None] | None = None,
) -> list[EpisodeResult]:
    """``episodes`` episodes, each after ``homing`` (a rig's reset; None where the robot resets itself).
    ``homed``: the first episode's homing record where it was done already (during a retrain).
    ``max_steps``: ticks per episode (default ``task.episode_steps``). ``on_end``: called after each
    episode, before its record is written (the buffer's flush: a kill between them loses no data the
    record counts)."""
    results = []
    for i in range(episodes):
        ep = first_episode + i
        if i > 0 or homed is None:
            if homing is not None:  # (seconds of it: the bar says what the rig is doing)
                progress.post(doing="homing")
            homed = home(cfg, robot, homing, run.event)
            if homing is not None:
                progress.post(doing="episode")
        link_before = link_record(robot).get("link")
        with control_priority(cfg):
            res = run_episode(
                robot,
                judge,
                controller,
                episode=ep,
                max_steps=cfg.task.episode_steps if max_steps is None else max_steps,
                seed=cfg.seed * 100_003 + seed_offset + ep,
                paced=is_paced(cfg),
                tally=tally,
                on_transition=on_transition,
                on_event=run.event,
                on_tick=progress.tick,
                sample_wait_fraction=cfg.loop.sample_wait_fraction,
            )
        if on_end is not None:
            on_end()
        run.timing(timing_record(ep, kind, res.plan_s, res.tick_s))  # before its metrics line
        link = _link_delta(link_before, link_record(robot).get("link"))
        run.metric(
            episode_record(
                res,
                kind=kind,
                real_steps=tally.real_steps,
                wall_s=round(tally.elapsed_s(), 3),
                **homed,
                **link,
            )
        )
        finish = getattr(controller, "finish", None)
        if finish is not None:  # a planner thread still busy with a late plan: wait (or PlannerHung)
            finish()
        progress.post(ret=res.ret)
        results.append(res)
    return results


def control_priority(cfg: Config):  # -> a context manager
    """The control thread's scheduling for ``cfg``'s loop: ``loop.rt_priority`` on the wall clock; a
    twin in lockstep has no deadline to keep."""
    return realtime(cfg.loop.rt_priority if is_paced(cfg) else 0)


def home(cfg: Config, robot: Robot, homing: Homing | None, on_event=None) -> dict:
    """Home the rig (its reset) at the control thread's priority, its shield's switches to
    ``on_event``; its record, {} where the robot resets itself (``homing`` None)."""
    if homing is None:
        return {}
    with control_priority(cfg):
        return homing.home(
            robot, paced=is_paced(cfg), on_event=on_event, sample_wait_fraction=cfg.loop.sample_wait_fraction
        ).record()


def _open_job(cfg: Config, run: RunDir):  # -> robot, task, judge
    """The config written to the run directory; robot, task and judge for a ``run``-like job."""
    from robot_mbrl.factory import make_judge, make_robot, make_task

    run.write_config(config_to_dict(cfg))
    robot = make_robot(cfg)
    task = make_task(cfg)
    return robot, task, make_judge(task, robot)


def _drive(cfg: Config, robot: Robot, judge: Judge, controller: Controller, run: RunDir, *, kind: str,
           seed_offset: int, progress: bool, on_transition=None, summary_keys=None) -> Tally:  # fmt: skip
    """``run.episodes`` episodes in one robot session, with a progress bar; the tally (wall time set).
    ``summary_keys``: () -> the job's own summary keys, for the summary of a job ended early."""
    tally = Tally()
    homing = make_homing(cfg, robot.spec)  # its channel names checked before any robot time
    tally.since_s = time.monotonic()
    try:
        with (  # the robot first: a rig that cannot be reached draws no progress bar
            robot_session(robot),
            Progress(cfg.run.episodes * cfg.task.episode_steps, kind, enabled=progress) as bar,
        ):
            run_episodes(
                cfg, robot, judge, controller, run, tally, episodes=cfg.run.episodes, first_episode=0,
                seed_offset=seed_offset, progress=bar, kind=kind, on_transition=on_transition, homing=homing,
            )  # fmt: skip
    except BaseException as err:  # a lost link, Ctrl-C: the episodes done so far keep their summary
        tally.stop_clock()
        if tally.returns:
            stopped = stop_reason(err)
            try:
                keys = summary_keys() if summary_keys is not None else {}
                run.write_summary(tally.summary(stopped_by=stopped, **keys, **link_record(robot)))
                write_plots(run, getattr(controller, "trace", None))
            except Exception as second:  # noqa: BLE001 - the job's own error is the one to raise
                log.error("%s: the summary of the episodes done was not written: %s", run.path, second)
        raise
    tally.stop_clock()
    return tally


def run_job(cfg: Config, *, checkpoint: Path | None, out: Path | None, progress: bool) -> tuple[dict, Path]:
    with run_dir(out or default_run_path("run"), new=True) as run:
        return _run(cfg, run, checkpoint=checkpoint, progress=progress)


def _run(cfg: Config, run: RunDir, *, checkpoint: Path | None, progress: bool) -> tuple[dict, Path]:
    robot, task, judge = _open_job(cfg, run)
    if checkpoint is not None:
        import torch

        from robot_mbrl.agents.mpc import MPCAgent

        torch.set_num_threads(1)  # the onboard CPU budget, as in train

        controller: Controller = MPCAgent.load(checkpoint, cfg, robot.spec, task).controller(
            gate=cfg.run.gate
        )
    else:
        controller = simple_controller(cfg, robot)

    def keys() -> dict:
        return {"clamped_commands": robot.clamp_count, "checkpoint": str(checkpoint) if checkpoint else None}

    tally = _drive(cfg, robot, judge, controller, run, kind="run", seed_offset=50_000, progress=progress,
                   summary_keys=keys)  # fmt: skip
    summary = tally.summary(**keys(), **link_record(robot))
    run.write_summary(summary)
    write_plots(run, getattr(controller, "trace", None))
    return summary, run.path


def commission_job(cfg: Config, *, checkpoint: Path, out: Path | None, progress: bool) -> tuple[dict, Path]:
    with run_dir(out or default_run_path("commission"), new=True) as run:
        return _commission(cfg, run, checkpoint=checkpoint, progress=progress)


def _commission(cfg: Config, run: RunDir, *, checkpoint: Path, progress: bool) -> tuple[dict, Path]:
    """Phase-I calibration: run the checkpoint's gated controller for ``run.episodes`` episodes with
    the shift monitors observing only (the gate's other triggers act as always), then recalibrate
    the monitors on these real transitions (:meth:`MPCAgent.commission`) and write the checkpoint
    back in place. Run it once on the unchanged robot after training and before deployment."""
    import numpy as np
    import torch

    from robot_mbrl.agents.mpc import MODEL_FILE, MPCAgent, checkpoint_dir
    from robot_mbrl.models.checkpoint import CheckpointError

    torch.set_num_threads(1)  # the onboard CPU budget, as in train and run
    robot, task, judge = _open_job(cfg, run)
    ck = checkpoint_dir(checkpoint)
    # the checkpoint is written back: not while a train run (or another commissioning) writes its run
    owner = RunDir(ck.parent) if (ck.parent / "config.yaml").is_file() else None
    agent = MPCAgent.load(ck, cfg, robot.spec, task)
    if agent.ood_reference is None:  # before any robot time is spent
        raise CheckpointError(ck / MODEL_FILE, "a trained checkpoint with held-out calibration data", "none")
    controller = agent.controller(gate=cfg.run.gate, monitors_gate=False)
    rows: list = []
    tally = _drive(cfg, robot, judge, controller, run, kind="commission", seed_offset=70_000,
                   progress=progress, on_transition=rows.append,
                   summary_keys=lambda: {"checkpoint": str(ck), "commission": None})  # fmt: skip
    if tally.violations:
        log.warning(
            "commission: %d constraint-violating ticks: is the robot in its normal state?", tally.violations
        )
    obs = np.array([tr.obs for tr in rows], dtype=np.float32)
    act = np.array([tr.act for tr in rows], dtype=np.float32)
    nxt = np.array([tr.next_obs for tr in rows], dtype=np.float32)
    result = agent.commission(obs, act, nxt, np.array([tr.episode for tr in rows]))
    agent.save(ck)
    if owner is not None:
        owner.close()
    summary = tally.summary(checkpoint=str(ck), commission=result, **link_record(robot))
    run.write_summary(summary)
    write_plots(run, getattr(controller, "trace", None))
    return summary, run.path
