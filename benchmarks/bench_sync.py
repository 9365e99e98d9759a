"""Ticks locked to a rig's samples: how many of an episode's transitions are vouched (learned from)?

The trained controller drives the emulated rig (``robot-mbrl emulate`` in its own process: the twin
behind the wire protocol, sampling and sending STATE on its own clock, as a device does) through the
serial driver. A transition is vouched only when the next reading is the device's first sample after
the command (``drivers/serial_robot.py``). Modes, interleaved, order alternating per round:

- phase ``reset``: the episode starts as the job starts it, right after the reset's fresh sample;
- phase ``edge``: the controller's reset waits for the device's next sample and then until
  ``--lead-ms`` before the one after, so the ticks start just before the device samples (the phase
  a slow reset or chance can leave);

each with ``loop.sample_wait_fraction`` 0 (the baseline: reads take whatever sample is there) and
0.25 (:class:`robot_mbrl.runtime.loop.SampleSync`). No homing between episodes (the subject is the
reading, not the start state; the gate keeps the cart clear of the end stops).

    python benchmarks/bench_sync.py --checkpoint RUN [--episodes 4] [--steps 150] [--rounds 2] [--set K=V]

Reports per mode: vouched transitions / steps, episodes that kept under 90 %, reads whose sample did
not come within the wait, the reading's age at the read (device sample to read, the device clock
mapped onto ours) p50 / p99, the ticks' work p99 (the wait included) and the mean return.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from bench_deadline import open_rig, rig_args  # noqa: E402 - the rig in its own process, as there

from robot_mbrl.factory import make_judge, make_robot, make_task  # noqa: E402
from robot_mbrl.runtime.jobs import _drive  # noqa: E402
from robot_mbrl.runtime.rundir import run_dir  # noqa: E402


class AtTheEdge:
    """Wraps a controller; its reset puts the episode's ticks ``lead_s`` before the device's samples."""

    def __init__(self, inner, robot, lead_s: float):
        self.inner, self.robot, self.lead_s = inner, robot, lead_s

    def reset(self, obs) -> None:
        self.inner.reset(obs)
        self.robot.read()
        if self.robot.await_sample(0.2) is None:
            raise RuntimeError("the emulated rig sent no STATE within 0.2 s")
        time.sleep(self.robot.spec.dt_s - self.lead_s)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def run_mode(agent, cfg, *, phase: str, sync: bool, lead_s: float, out: Path) -> dict:
    cfg = dataclasses.replace(
        cfg, loop=dataclasses.replace(cfg.loop, sample_wait_fraction=0.25 if sync else 0.0)
    )
    robot, task = make_robot(cfg), make_task(cfg)
    ctl = agent.controller(
        monitors_gate=False
    )  # (their alarms on an uncommissioned checkpoint vary per episode)
    if phase == "edge":
        ctl = AtTheEdge(ctl, robot, lead_s)
    ages: list[float] = []
    read = robot.read

    def timed_read():
        obs = read()
        ages.append(float(obs.info.get("age_s", np.nan)))
        return obs

    robot.read = timed_read  # type: ignore[method-assign]
    with run_dir(out, new=True) as run:
        tally = _drive(cfg, robot, make_judge(task, robot), ctl, run, kind="run", seed_offset=90_000,
                       progress=False)  # fmt: skip
    eps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    eps = [e for e in eps if "vouched" in e]
    return {"tally": tally, "episodes": eps, "ages": ages}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    rig_args(ap, episodes=4, steps=150)
    ap.add_argument("--lead-ms", type=float, default=1.0)
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)"
    )
    args = ap.parse_args()
    proc, port, cfg, agent, head = open_rig(args, "homing.mode=never", *args.set)
    try:
        print(f"{head}; edge: ticks {args.lead_ms:g} ms before the device samples; "
              f"loop.preempt_planner {cfg.loop.preempt_planner}")  # fmt: skip
        rows: dict[tuple[str, bool], list[dict]] = {}
        tmp = Path(tempfile.mkdtemp(prefix="bench-sync-"))
        for rnd in range(args.rounds):
            for phase in ("reset", "edge"):
                for sync in (False, True) if rnd % 2 == 0 else (True, False):
                    r = run_mode(agent, cfg, phase=phase, sync=sync, lead_s=args.lead_ms / 1e3,
                                 out=tmp / f"r{rnd}-{phase}-{sync}")  # fmt: skip
                    rows.setdefault((phase, sync), []).append(r)
    finally:
        proc.terminate()
        proc.wait(10)
    print("| phase | reads | vouched / steps | episodes < 90 % | sample timeouts | age p50 ms | age p99 ms "
          "| tick p99 ms | return |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for (phase, sync), rs in sorted(rows.items()):
        eps = [e for r in rs for e in r["episodes"]]
        steps, vouched = sum(e["steps"] for e in eps), sum(e["vouched"] for e in eps)
        low = sum(e["vouched"] < 0.9 * e["steps"] for e in eps)
        ages = np.concatenate([np.asarray(r["ages"]) for r in rs]) * 1e3
        ages = ages[np.isfinite(ages)]
        tick = np.concatenate([np.asarray(r["tally"].tick_s) for r in rs]) * 1e3
        rets = [x for r in rs for x in r["tally"].returns]
        name = "wait for the sample (0.25)" if sync else "latest sample (baseline)"
        print(f"| {phase} | {name} | {vouched} / {steps} ({100 * vouched / steps:.1f} %) | {low} / {len(eps)} "
              f"| {sum(e['sample_timeouts'] for e in eps)} | {np.median(ages):.2f} | {np.percentile(ages, 99):.2f} "
              f"| {np.percentile(tick, 99):.2f} | {np.mean(rets):.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
