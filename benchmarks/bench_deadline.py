"""A planner that hangs on a paced loop: does the tick keep its deadline?

The trained controller drives the twin on the wall clock (50 Hz, as on a rig) while its planner is
made to block for ``--hang-ms`` on every ``--hang-every``-th call (a stuck kernel, a page fault
storm, swapping). Baseline in the same run: the planner called in the tick's own thread (the
behaviour before ``runtime/deadline.py``; ``GatedMPC.preempt = False``), where the gate learns of
the miss only when the plan returns. Also both without a hang: what the worker thread costs a tick.

    python benchmarks/bench_deadline.py --checkpoint RUN [--episodes 2] [--hang-ms 200] [--hang-every 50]

Reports per mode: the ticks' work time p50 / p99 / max (read to write), ticks over the 20 ms period,
the gate's deadline misses, fallback ticks, violations and the return.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import numpy as np
import torch

from robot_mbrl.agents.mpc import MPCAgent
from robot_mbrl.config import load_config
from robot_mbrl.factory import make_judge, make_robot, make_task
from robot_mbrl.runtime.episode import run_episode
from robot_mbrl.runtime.rundir import Tally


def run_mode(
    agent, robot, judge, *, preempt: bool, hang_s: float, hang_every: int, episodes: int, steps: int
):
    ctl = agent.controller()
    ctl.preempt = preempt
    plan, calls = ctl.planner.plan, [0]

    def planned(*args, **kwargs):
        calls[0] += 1
        if hang_s > 0 and calls[0] % hang_every == 0:
            time.sleep(hang_s)  # (releases the GIL, as a stuck kernel does)
        return plan(*args, **kwargs)

    ctl.planner.plan = planned
    tick_s, over, misses, fallback, viol, rets = [], 0, 0, 0, 0, []
    with robot:
        for ep in range(episodes):
            res = run_episode(robot, judge, ctl, episode=ep, max_steps=steps, seed=80_000 + ep, paced=True,
                              tally=Tally())  # fmt: skip
            tick_s += res.tick_s
            over += sum(t > 1.0 / robot.spec.control_hz for t in res.tick_s)
            misses += res.deadline_misses
            fallback += res.fallback_ticks
            viol += res.violations
            rets.append(res.ret)
    t = np.asarray(tick_s) * 1e3
    return {
        "ticks": len(t),
        "p50": float(np.median(t)),
        "p99": float(np.percentile(t, 99)),
        "max": float(t.max()),
        "over_period": int(over),
        "misses": misses,
        "fallback": fallback,
        "violations": viol,
        "return": float(np.mean(rets)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="a train run directory")
    ap.add_argument("--episodes", type=int, default=2)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--hang-ms", type=float, default=200.0)
    ap.add_argument("--hang-every", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(os.path.join(args.checkpoint, "config.yaml"), ["twin.realtime=false"])
    robot, task = make_robot(cfg), make_task(cfg)
    judge = make_judge(task, robot)
    agent = MPCAgent.load(args.checkpoint, cfg, robot.spec, task)
    print(f"# {datetime.date.today()} {platform.node()} {platform.processor() or platform.machine()} "
          f"{os.cpu_count()} cpus, torch {torch.__version__}; {args.episodes} x {args.steps} paced ticks per row, "
          f"hang {args.hang_ms:g} ms every {args.hang_every} plans")  # fmt: skip
    print("| planner | hang | tick p50 ms | p99 ms | max ms | ticks > 20 ms | deadline misses | fallback ticks "
          "| violations | return |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for hang in (0.0, args.hang_ms / 1e3):
        for preempt in (False, True):
            r = run_mode(agent, robot, judge, preempt=preempt, hang_s=hang, hang_every=args.hang_every,
                         episodes=args.episodes, steps=args.steps)  # fmt: skip
            name = (
                "worker thread, waited for until the budget" if preempt else "in the tick's thread (baseline)"
            )
            print(f"| {name} | {'none' if hang == 0 else f'{hang * 1e3:g} ms'} | {r['p50']:.2f} | {r['p99']:.2f} "
                  f"| {r['max']:.1f} | {r['over_period']} / {r['ticks']} | {r['misses']} | {r['fallback']} "
                  f"| {r['violations']} | {r['return']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
