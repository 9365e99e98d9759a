"""Homing benchmark: how much robot time the reset of a rig costs, from the states episodes end in.

    python benchmarks/bench_homing.py [--episodes 10] [--checkpoint RUN] [--set homing.gains=[...]]

On the MuJoCo twin (``homing.mode: always``; the twin's own reset is not used between an episode
and its homing, so the physics carries on from where the episode left the rig): each episode is
driven by the shielded random exploration of ``train`` (and, with ``--checkpoint``, by the learned
gated MPC too), then the rig is homed with the config's gains and, from an identical copy of the
end state, with the pole-damping gain set to 0 (the baseline, measured in the same run). Reported:
robot time to settle (p50 / max, seconds at the control rate), episodes settled within
``homing.timeout_s``, shielded ticks, end-stop hits while homing, and the ratio of settle times.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import platform
import time

import numpy as np

from robot_mbrl.agents.explore import ShieldedExplorer
from robot_mbrl.config import load_config
from robot_mbrl.factory import make_judge, make_robot, make_task
from robot_mbrl.runtime.episode import run_episode
from robot_mbrl.runtime.homing import make_homing
from robot_mbrl.runtime.rundir import Tally
from robot_mbrl.safety.fallback import make_fallback


def _home(cfg, robot) -> dict:
    hits = robot.end_stop_hits
    r = make_homing(cfg, robot.spec).home(robot, paced=False)
    return {"s": r.ticks / robot.spec.control_hz, "settled": r.settled, "shielded": r.shielded_ticks,
            "hits": robot.end_stop_hits - hits}  # fmt: skip


def measure(cfg, controllers: dict, episodes: int, gains_off: tuple[float, ...]) -> dict:
    base = dataclasses.replace(cfg, homing=dataclasses.replace(cfg.homing, gains=gains_off))
    out: dict = {}
    for name, make in controllers.items():
        rows = {"config": [], "baseline": []}
        for ep in range(episodes):
            robot = make_robot(cfg, seed=cfg.seed + ep)
            robot.connect()
            task = make_task(cfg)
            run_episode(robot, make_judge(task, robot), make(robot, ep), episode=ep,
                        max_steps=cfg.task.episode_steps, seed=cfg.seed * 1000 + ep, paced=False, tally=Tally())  # fmt: skip
            twin = copy.deepcopy(robot)  # the same end state for the baseline
            rows["config"].append(_home(cfg, robot))
            rows["baseline"].append(_home(base, twin))
            robot.close()
        out[name] = rows
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=None)
    ap.add_argument("--checkpoint", default=None, help="also home after the learned controller's episodes")
    ap.add_argument("--episodes", type=int, default=10)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    cfg = load_config(args.config, [*args.overrides, "homing.mode=always"])
    gains = list(cfg.homing.gains)
    off = tuple(0.0 if c == "thetadot_rad_s" else g for c, g in zip(cfg.homing.channels, gains, strict=True))

    def explorer(robot, ep):
        return ShieldedExplorer(robot.spec, make_fallback(cfg.fallback, robot.spec), cfg.explore, seed=cfg.seed + ep,
                                correlation=cfg.train.explore_correlation)  # fmt: skip

    controllers = {"shielded random exploration": explorer}
    if args.checkpoint:
        import torch

        from robot_mbrl.agents.mpc import MPCAgent

        torch.set_num_threads(1)
        ck_cfg = load_config(f"{args.checkpoint}/config.yaml", [*args.overrides, "homing.mode=always"])

        def learned(robot, ep):
            return MPCAgent.load(args.checkpoint, ck_cfg, robot.spec, make_task(ck_cfg)).controller(gate=True)

        controllers["learned gated MPC"] = learned
    t0 = time.time()
    res = measure(cfg, controllers, args.episodes, off)
    print(f"# homing, {platform.node() or 'host'} {platform.machine()}, {time.strftime('%Y-%m-%d')}, "
          f"{args.episodes} episodes per controller, gains {gains} on {list(cfg.homing.channels)} vs the pole "
          f"term off {list(off)}, timeout {cfg.homing.timeout_s} s, {time.time() - t0:.0f} s wall")  # fmt: skip
    print("| episodes driven by | homing | robot time to settle p50 / max (s) | settled | shielded ticks (mean) "
          "| end-stop hits while homing |\n|---|---|---|---|---|---|")  # fmt: skip
    for name, rows in res.items():
        p50 = {}
        for which, label in (("config", "config gains"), ("baseline", "pole term off")):
            r = rows[which]
            s = np.array([x["s"] for x in r])
            p50[which] = float(np.median(s))
            print(f"| {name} | {label} | {p50[which]:.1f} / {s.max():.1f} | {sum(x['settled'] for x in r)}/{len(r)} "
                  f"| {np.mean([x['shielded'] for x in r]):.1f} | {sum(x['hits'] for x in r)} |")  # fmt: skip
        print(
            f"| {name} | ratio (pole term off / config), p50 | {p50['baseline'] / p50['config']:.2f}x | | | |"
        )


if __name__ == "__main__":
    main()
