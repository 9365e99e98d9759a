"""Twin throughput: control steps per second in lockstep vs the raw MuJoCo step rate, same run.

    python benchmarks/bench_twin.py [--steps 5000] [--repeats 3]

* twin: ``CartpoleTwin.write`` + ``read`` (10 physics steps per 20 ms control period, encoders,
  velocity filter, delay queue, end-stop check, schedule with one event);
* gym: the registered ``robot_mbrl/CartpoleSwingup-v0`` through ``env.step`` (adds task reward);
* raw: ``mujoco.mj_step`` on the same compiled model, one call per physics step, converted to
  control periods (divide by substeps); the ceiling for any Python twin.

Prints one markdown row per mode (best of ``--repeats``) and the overhead of the twin over raw.
"""

from __future__ import annotations

import argparse
import platform
import time

import gymnasium
import mujoco
import numpy as np

import robot_mbrl  # noqa: F401  (registers the gym ids)
from robot_mbrl.sim.cartpole import CartpoleTwin
from robot_mbrl.sim.params import ScheduleEvent, TwinConfig


def twin_rate(steps: int) -> float:
    cfg = TwinConfig(schedule=(ScheduleEvent(at_s=1e6, kind="sensor_bias", target="x_m", value=0.1),))
    twin = CartpoleTwin(cfg, seed=0)
    actions = np.random.default_rng(0).uniform(-0.3, 0.3, size=(steps, 1))
    twin.reset(seed=0)
    t0 = time.perf_counter()
    for a in actions:
        twin.write(a)
        twin.read()
    return steps / (time.perf_counter() - t0)


def gym_rate(steps: int) -> float:
    env = gymnasium.make("robot_mbrl/CartpoleSwingup-v0")
    actions = np.random.default_rng(0).uniform(-0.3, 0.3, size=(steps, 1)).astype(np.float32)
    env.reset(seed=0)
    t0 = time.perf_counter()
    for a in actions:
        _, _, terminated, truncated, _ = env.step(a)
        if terminated or truncated:
            env.reset()
    rate = steps / (time.perf_counter() - t0)
    env.close()
    return rate


def raw_rate(steps: int, substeps: int) -> float:
    twin = CartpoleTwin(TwinConfig(), seed=0)  # same compiled model with the same parameters
    m, d = twin.model, twin.data
    d.qpos[1] = np.pi
    ctrl = np.random.default_rng(0).uniform(-0.3, 0.3, size=steps)
    t0 = time.perf_counter()
    for u in ctrl:
        d.ctrl[0] = u
        for _ in range(substeps):
            mujoco.mj_step(m, d)
    return steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5000, help="control steps per measurement")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    args = ap.parse_args()
    substeps = TwinConfig().substeps
    best = {
        "twin": max(twin_rate(args.steps) for _ in range(args.repeats)),
        "gym": max(gym_rate(args.steps) for _ in range(args.repeats)),
        "raw": max(raw_rate(args.steps, substeps) for _ in range(args.repeats)),
    }
    hz = TwinConfig().control_hz
    print(
        f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}, "
        f"mujoco {mujoco.__version__}, {substeps} physics steps per control step"
    )
    print("| mode | control steps/s | x real time at 50 Hz | us per control step |")
    print("|---|---|---|---|")
    for mode, rate in best.items():
        print(f"| {mode} | {rate:,.0f} | {rate / hz:,.0f} | {1e6 / rate:.1f} |")
    print(f"twin overhead over raw mj_step: {best['raw'] / best['twin']:.2f}x")


if __name__ == "__main__":
    main()
