"""Gate under shift (issue 5): gated vs --no-gate on the same seeds, per shift scenario.

For each scenario the twin's schedule injects the shift mid-episode; we report constraint-violating
ticks, end-stop hits, detection delay (ticks from the shift to the first monitor alarm or gate
switch to fallback), the return, and plan+gate time. In distribution (no shift) we count false
alarms over N ticks and the fraction of ticks on MPC.

    python benchmarks/bench_shift.py --checkpoint RUN_DIR [--config cartpole_swingup] [--episodes 4]
        [--set monitor.arl0_ticks=1e5 ...] [--id-only] [--residual-stats]

Deployment order, as in the README: ``robot-mbrl train``, ``robot-mbrl commission --checkpoint
RUN_DIR`` (Phase-I calibration of the monitors on the twin's own seeds, not the ones used here),
then this benchmark on RUN_DIR.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import time
from collections import Counter

import numpy as np
import torch

from robot_mbrl.agents.mpc import MPCAgent
from robot_mbrl.config import load_config
from robot_mbrl.factory import make_judge, make_robot, make_task
from robot_mbrl.hal.robot import stop_on_signals
from robot_mbrl.runtime.episode import run_episode
from robot_mbrl.runtime.rundir import Tally
from robot_mbrl.sim.params import ScheduleEvent

SCENARIOS = {
    "pole mass x2": ("param_scale", "pole_mass_kg", 2.0),
    "actuator gain x0.5": ("actuator_gain", "motor_u", 0.5),
    "rail friction x3": ("param_scale", "rail_coulomb_n", 3.0),
    "angle-sensor bias 0.1 rad": ("sensor_bias", "theta_rad", 0.1),
}


def run(cfg, checkpoint, *, gate: bool, episodes: int, shift_tick: int | None, seed: int) -> dict:
    robot = make_robot(cfg, seed=seed)
    task = make_task(cfg)
    judge = make_judge(task, robot)
    agent = MPCAgent.load(checkpoint, cfg, robot.spec, task)
    ctrl = agent.controller(gate=gate)
    tally = Tally()
    events: list[dict] = []
    delays, rets, violations, hits = [], [], 0, 0
    step_s: list[float] = []
    with stop_on_signals(robot):
        for ep in range(episodes):
            start = ctrl.tick
            ep_events: list[dict] = []
            t0 = time.perf_counter()
            res = run_episode(robot, judge, ctrl, episode=ep, max_steps=cfg.task.episode_steps, seed=seed * 1000 + ep,
                              paced=False, tally=tally, on_event=ep_events.append)  # fmt: skip
            step_s.append((time.perf_counter() - t0) / max(res.steps, 1))
            rets.append(res.ret)
            violations += res.violations
            hits += res.end_stop_hits
            events += ep_events
            if shift_tick is not None:
                after = [e["tick"] - start - shift_tick for e in ep_events
                         if e.get("kind") == "alarm" or (e.get("kind") == "switch" and e.get("to") == "fallback")]  # fmt: skip
                after = [d for d in after if d >= 0]
                delays.append(min(after) if after else None)
    plan_ms = np.asarray(tally.plan_s) * 1e3 if tally.plan_s else np.zeros(1)
    return {
        "return": float(np.mean(rets)),
        "violations": violations,
        "end_stop_hits": hits,
        "delays": delays,
        "alarms": sum(1 for e in events if e.get("kind") == "alarm"),
        "by_trigger": dict(Counter(e.get("trigger") for e in events if e.get("kind") == "alarm")),
        "mpc_fraction": 1.0 - tally.fallback_ticks / max(tally.ticks, 1),
        "ticks": tally.ticks,
        "plan_p99_ms": float(np.percentile(plan_ms, 99)),
        "tick_ms": float(np.mean(step_s) * 1e3),
    }


def _residuals(cfg, checkpoint, *, episodes: int, seed: int) -> list[np.ndarray]:
    """Calibrated one-step residuals ``z`` (exactly what the CUSUM sees) of ungated episodes."""
    from robot_mbrl.agents.predictive import predictive

    robot = make_robot(cfg, seed=seed)
    task = make_task(cfg)
    agent = MPCAgent.load(checkpoint, cfg, robot.spec, task)
    ctrl = agent.controller(gate=False)
    out = []
    with stop_on_signals(robot):
        for ep in range(episodes):
            zs: list[np.ndarray] = []

            def residual(tr, zs=zs) -> None:
                mean, std = predictive(agent.model, tr.obs[None], tr.act[None], robot.spec.angle_mask,
                                       agent.variance_coef)  # fmt: skip
                zs.append(ctrl.monitor.residual_z(tr.next_obs, mean[0], std[0]))

            run_episode(robot, make_judge(task, robot), ctrl, episode=ep, max_steps=cfg.task.episode_steps,
                        seed=seed * 1000 + ep, paced=False, tally=Tally(), on_transition=residual)  # fmt: skip
            out.append(np.asarray(zs))
    return out


def residual_stats(
    cfg, base, checkpoint, *, episodes: int, shift_tick: int, seed: int, window: int = 100
) -> dict:
    """How visible a shift is to the residual monitors: the calibrated one-step residuals of the
    ``window`` ticks after the shift against the same ticks of the same episodes without it
    (``base``: same seeds, so the twin and the controller are identical up to the shift; comparing
    with the ticks before the shift would confound the shift with the episode's phase, e.g. the
    swing-up before and the balance after). Per channel: RMS ratio and mean change; ``kl`` = the
    Gaussian KL divergence per tick between the two (summed over channels as if independent). Any
    detector with in-control ARL ``A`` needs on average at least ``log(A) / kl`` ticks after the
    change (Lorden 1971): the floor under the detection delay."""
    span = slice(shift_tick + 1, shift_tick + 1 + window)  # the tick into the shift excluded
    b = np.concatenate([z[span] for z in _residuals(cfg, checkpoint, episodes=episodes, seed=seed)])
    a = np.concatenate([z[span] for z in _residuals(base, checkpoint, episodes=episodes, seed=seed)])
    va, vb = a.var(0), b.var(0)
    ratio = vb / va
    kl = float(np.sum(0.5 * (ratio - 1.0 - np.log(ratio)) + (b.mean(0) - a.mean(0)) ** 2 / (2 * va)))
    return {"rms_ratio": np.sqrt(ratio), "mean_change": (b.mean(0) - a.mean(0)) / np.sqrt(va), "kl": kl}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--config", default=None)
    ap.add_argument("--episodes", type=int, default=4)
    ap.add_argument("--shift-at-s", type=float, default=3.0)
    ap.add_argument("--id-ticks", type=int, default=10_000, help="in-distribution ticks for false alarms")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--id-only", action="store_true", help="only the in-distribution false-alarm run")
    ap.add_argument(
        "--residual-stats",
        action="store_true",
        help="also: how visible each shift is in the residuals (against the same episodes unshifted)",
    )
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = load_config(args.config, args.set)
    shift_tick = int(round(args.shift_at_s * base.twin.control_hz))
    print(f"# gate under shift, {platform.node()} {platform.machine()}, {time.strftime('%Y-%m-%d')}, "
          f"checkpoint {args.checkpoint}, {args.episodes} episodes x {base.task.episode_steps} ticks, "
          f"shift at {args.shift_at_s} s (tick {shift_tick}), seed {args.seed}")  # fmt: skip
    print(
        "| scenario | gate | violations | end-stop hits | detection delay (ticks, per episode) | return | MPC fraction |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, (kind, target, value) in SCENARIOS.items():
        if args.id_only:
            break
        ev = ScheduleEvent(at_s=args.shift_at_s, kind=kind, target=target, value=value)
        cfg = dataclasses.replace(base, twin=dataclasses.replace(base.twin, schedule=(ev,)))
        for gate in (True, False):
            r = run(
                cfg, args.checkpoint, gate=gate, episodes=args.episodes, shift_tick=shift_tick, seed=args.seed
            )
            print(f"| {name} | {'on' if gate else 'off'} | {r['violations']} | {r['end_stop_hits']} | {r['delays']} "
                  f"| {r['return']:.1f} | {r['mpc_fraction']:.2f} |")  # fmt: skip
    if args.residual_stats:
        print("\n| scenario | residual RMS with / without the shift (per channel) | mean change (std) | KL nats/tick "
              "| delay floor at ARL0 1e4 / 1e6 (ticks) |\n|---|---|---|---|---|")  # fmt: skip
        for name, (kind, target, value) in SCENARIOS.items():
            ev = ScheduleEvent(at_s=args.shift_at_s, kind=kind, target=target, value=value)
            cfg = dataclasses.replace(base, twin=dataclasses.replace(base.twin, schedule=(ev,)))
            r = residual_stats(
                cfg, base, args.checkpoint, episodes=args.episodes, shift_tick=shift_tick, seed=args.seed
            )
            floor = [np.log(a) / r["kl"] if r["kl"] > 0 else float("inf") for a in (1e4, 1e6)]
            print(f"| {name} | {np.array2string(r['rms_ratio'], precision=2)} | "
                  f"{np.array2string(r['mean_change'], precision=2)} | {r['kl']:.3f} | {floor[0]:.0f} / {floor[1]:.0f} |")  # fmt: skip
    episodes = max(1, args.id_ticks // base.task.episode_steps)
    r = run(base, args.checkpoint, gate=True, episodes=episodes, shift_tick=None, seed=args.seed + 1)
    print(f"\nIn distribution: {r['ticks']} ticks, {r['alarms']} monitor alarms (false alarms: {r['by_trigger']}), "
          f"MPC fraction {r['mpc_fraction']:.3f}, violations {r['violations']}, plan p99 {r['plan_p99_ms']:.2f} ms, "
          f"mean tick (plan+gate+twin) {r['tick_ms']:.2f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
