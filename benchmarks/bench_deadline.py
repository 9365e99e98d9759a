"""A planner that hangs on a rig: does the tick keep its deadline?

The trained controller drives the emulated rig (``robot-mbrl emulate`` in its own process: the twin
behind the wire protocol, its physics running on its own clock and its watchdog braking when
commands stop, as a device does) through the serial driver, with homing between episodes, while its
planner is made to block for ``--hang-ms`` once every ``--hang-every`` ticks (a stuck kernel, a page
fault storm, swapping; ``time.sleep``, which releases the GIL as those do). Baseline in the same run: the planner called in the tick's own thread (the
behaviour before ``runtime/deadline.py``; ``GatedMPC.preempt = False``), where the gate learns of
the miss only when the plan returns and the device meanwhile applies the last command until its
watchdog brakes. Also both without a hang: what the worker thread costs a tick. Modes interleave.

    python benchmarks/bench_deadline.py --checkpoint RUN [--episodes 2] [--hang-ms 200] [--hang-every 50]

Reports per mode: the ticks' work time p50 / p99 / max (read to write), ticks over the 20 ms period,
the gate's deadline misses, fallback ticks, violations, end-stop hits and the return. The shift monitors observe but do not gate here: their alarms on an uncommissioned
checkpoint vary per rig episode and would swamp what the deadline does.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from robot_mbrl.agents.mpc import MPCAgent
from robot_mbrl.config import load_config
from robot_mbrl.factory import make_judge, make_robot, make_task
from robot_mbrl.runtime.jobs import _drive
from robot_mbrl.runtime.rundir import run_dir


def run_mode(agent, cfg, *, preempt: bool, hang_s: float, hang_every: int, out: Path) -> dict:
    robot, task = make_robot(cfg), make_task(cfg)
    ctl = agent.controller(monitors_gate=False)  # (their alarms vary per rig episode; not the subject here)
    ctl.preempt = preempt  # (loop.preempt_planner)
    if preempt:
        ctl._warm_up()  # as agent.controller() does with loop.preempt_planner on a rig
    plan, hung = ctl.planner.plan, set()

    def planned(*args, **kwargs):
        due = ctl.tick // hang_every  # one hang per hang_every ticks, on the first plan in that block
        if hang_s > 0 and due > 0 and due not in hung:  # (a busy tick makes no call: counting calls
            hung.add(due)  # would give the worker fewer hangs)
            time.sleep(hang_s)  # (releases the GIL, as a stuck kernel does)
        return plan(*args, **kwargs)

    ctl.planner.plan = planned
    with run_dir(out, new=True) as run:
        tally = _drive(cfg, robot, make_judge(task, robot), ctl, run, kind="run", seed_offset=80_000,
                       progress=False)  # fmt: skip
    return {"tally": tally}


def emulator(cfg_path: str, seconds: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "robot_mbrl.cli", "emulate", cfg_path, "--duration", str(seconds)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    for line in proc.stdout:  # type: ignore[union-attr]
        m = re.search(r"(/\S+/mcu|socket://\S+)", line)
        if m:
            return proc, m.group(1)
    raise RuntimeError("the emulator did not print its port")


def rig_args(ap: argparse.ArgumentParser, episodes: int, steps: int) -> None:
    """The options every emulated-rig benchmark takes."""
    ap.add_argument("--checkpoint", required=True, help="a train run directory")
    ap.add_argument("--episodes", type=int, default=episodes)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--rounds", type=int, default=2, help="repetitions of the modes, order alternating")


def open_rig(args: argparse.Namespace, *overrides: str):
    """The emulated rig in its own process, the checkpoint's config pointed at it and its agent (torch
    on one thread, as onboard); (emulator process, port, config, agent, the report's header line)."""
    torch.set_num_threads(1)
    cfg_path = os.path.join(args.checkpoint, "config.yaml")
    proc, port = emulator(cfg_path, 3600)
    try:
        cfg = load_config(cfg_path, ["backend=serial", f"serial.port={port}", f"run.episodes={args.episodes}",
                                     f"task.episode_steps={args.steps}", *overrides])  # fmt: skip
        agent = MPCAgent.load(args.checkpoint, cfg, make_robot(cfg).spec, make_task(cfg))
    except BaseException:
        proc.terminate()
        raise
    head = (f"# {datetime.date.today()} {platform.node()} {platform.processor() or platform.machine()} "
            f"{os.cpu_count()} cpus, torch {torch.__version__}; emulated rig on {port}; {args.episodes} x "
            f"{args.steps} ticks per mode and round, {args.rounds} rounds")  # fmt: skip
    return proc, port, cfg, agent, head


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    rig_args(ap, episodes=2, steps=250)
    ap.add_argument("--hang-ms", type=float, default=200.0)
    ap.add_argument("--hang-every", type=int, default=50)
    args = ap.parse_args()
    proc, port, cfg, agent, head = open_rig(args)
    try:
        print(f"{head}; hang {args.hang_ms:g} ms once every {args.hang_every} ticks")
        rows: dict[tuple[float, bool], list[dict]] = {}
        tmp = Path(tempfile.mkdtemp(prefix="bench-deadline-"))
        for rnd in range(args.rounds):
            for hang in (0.0, args.hang_ms / 1e3):
                for preempt in (False, True) if rnd % 2 == 0 else (True, False):  # order alternates
                    r = run_mode(agent, cfg, preempt=preempt, hang_s=hang, hang_every=args.hang_every,
                                 out=tmp / f"r{rnd}-{hang}-{preempt}")  # fmt: skip
                    rows.setdefault((hang, preempt), []).append(r)
    finally:
        proc.terminate()
        proc.wait(10)
    print("| planner | hang | tick p50 ms | p99 ms | max ms | ticks > 20 ms | deadline misses | fallback ticks "
          "| violations | end-stop hits | return |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (hang, preempt), rs in sorted(rows.items()):
        tick = np.concatenate([np.asarray(r["tally"].tick_s) for r in rs]) * 1e3
        period_ms = 1e3 / cfg.twin.control_hz

        def total(key: str, rs: list[dict] = rs) -> int:
            return sum(getattr(r["tally"], key) for r in rs)

        rets = [x for r in rs for x in r["tally"].returns]
        name = "worker thread, waited for until the budget" if preempt else "in the tick's thread (baseline)"
        print(f"| {name} | {'none' if hang == 0 else f'{hang * 1e3:g} ms'} | {np.median(tick):.2f} "
              f"| {np.percentile(tick, 99):.2f} | {tick.max():.1f} | {int(np.sum(tick > period_ms))} / {tick.size} "
              f"| {total('deadline_misses')} | {total('fallback_ticks')} | {total('violations')} "
              f"| {total('end_stop_hits')} | {np.mean(rets):.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
