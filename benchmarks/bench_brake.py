"""How far does the brake fallback really take to stop? Measured stopping distances against the
stopping-distance shield's model (``explore.brake_decel_m_s2`` / ``react_s`` of the exploration,
``explore.plan_brake_decel_m_s2`` / ``plan_react_s`` of the planner and gate, ``explore.margin``).

The shield (exploration, planner and gate) keeps every state inside

    x + v * react + v |v| / (2 a) <= safe_x - margin

so a shield model that over-predicts the stop keeps the robot far from the edge (and slow where the
task needs speed), one that under-predicts lets the brake overrun the constraint. This benchmark
brakes from many states and reports, for the configured model and a grid of alternatives, the
smallest slack ``prediction + margin - measured distance`` (negative: the brake went further than
the shield allowed for).

Two kinds of trials, HAL observations only (the same reading a rig gives):

- ``straight``: the cart is brought to one side with a gentle position loop, pushed toward the other
  at a random effort until a random target speed (or the middle of the rail), then the fallback brakes.
- ``swing`` (``--checkpoint RUN``): the run's learned MPC, planning without the shield and ungated
  (more aggressive than anything the product runs), drives a swing-up for a random number of ticks,
  then the fallback brakes; the pole's reaction on the cart is what makes these stops long at low speed.

Every tick reads, decides and writes at the control rate, paced on the wall clock for a serial rig
(``--set backend=serial --set serial.port=PORT``: straight trials only, the rig homed before each),
lockstep on the twin. The ``swing`` trials drive the robot where the shield would not let it go: twin only.

    python benchmarks/bench_brake.py [--config cartpole_swingup] [--checkpoint RUN ...] [--trials 60] [--set k=v]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from robot_mbrl.agents.explore import stopping_point
from robot_mbrl.config import load_config
from robot_mbrl.factory import make_robot, make_task
from robot_mbrl.runtime.jobs import robot_session
from robot_mbrl.safety.fallback import make_fallback
from robot_mbrl.typedconfig import ConfigError

GRID = ((3.0, 0.1), (5.0, 0.1), (8.0, 0.1), (8.0, 0.06), (10.0, 0.06), (12.0, 0.05))


class Rig:
    """One tick at a time at the robot's control rate (paced on the wall clock for a serial rig, lockstep
    on the twin): read, decide, write, as the runtime loop does. ``reset`` starts a trial: the twin
    resets itself, a rig is homed (``robot_mbrl/runtime/homing.py``)."""

    def __init__(self, robot, cfg, paced: bool):
        from robot_mbrl.runtime.homing import make_homing
        from robot_mbrl.runtime.loop import RateLoop

        self.robot, self.paced, self.homing = robot, paced, make_homing(cfg, robot.spec)
        self._loop = iter(RateLoop(robot.spec.control_hz, paced=paced))

    def reset(self, seed: int) -> None:
        if self.homing is not None:
            self.homing.home(self.robot, paced=self.paced)
        self.robot.reset(seed=seed)

    def tick(self, decide) -> np.ndarray:
        """Read this tick's observation, write ``decide(values)``; the values read."""
        next(self._loop)
        obs = self.robot.read().values
        self.robot.write(decide(obs))
        return obs


def brake_from_here(rig: Rig, brake, ix: int, iv: int, onset: np.ndarray | None = None, max_ticks: int = 100):
    """Brake until the cart stops: (onset speed, distance past the onset position). ``onset``: the
    reading of the tick that already wrote the first brake command (None: brake from the next tick)."""
    obs = rig.tick(brake.act) if onset is None else onset
    x0, v0 = obs[ix], obs[iv]
    direction = 1.0 if v0 >= 0 else -1.0
    furthest = 0.0
    for _ in range(max_ticks):
        obs = rig.tick(brake.act)
        furthest = max(furthest, direction * (obs[ix] - x0))
        if abs(obs[iv]) < 0.02:
            break
    return abs(v0), furthest


def straight_trials(rig: Rig, brake, ix: int, iv: int, fb, n: int, rng) -> list[tuple]:
    rows, safe_x = [], fb.safe_x_m

    def push(u: float) -> np.ndarray:  # the fallback's cart channel, the stop command elsewhere
        action = rig.robot.spec.stop_action().astype(float)
        action[fb.action_index] = u
        return action

    for trial in range(n):
        rig.reset(seed=trial)
        side = 1.0 if trial % 2 else -1.0
        start = -side * 0.8 * safe_x
        effort, target = rng.uniform(0.5, 1.0), rng.uniform(0.3, 2.0)

        def to_start(o: np.ndarray, start=start) -> np.ndarray:  # a gentle position loop
            return push(np.clip(-3.0 * (o[ix] - start) - 2.0 * o[iv], -0.4, 0.4))

        def there(o: np.ndarray, side=side, target=target) -> bool:  # target speed or mid-rail
            return side * o[iv] >= target or side * o[ix] > 0.1 * safe_x

        def toward(o: np.ndarray, side=side, effort=effort, there=there) -> np.ndarray:
            return brake.act(o) if there(o) else push(side * effort)

        for _ in range(150):
            rig.tick(to_start)
        for _ in range(60):  # push toward the other side; the tick that gets there brakes
            obs = rig.tick(toward)
            if there(obs):
                break
        else:
            obs = None
        rows.append(("straight", *brake_from_here(rig, brake, ix, iv, onset=obs)))
    return rows


def swing_trials(rig: Rig, brake, ix: int, iv: int, checkpoint: str, n: int, rng) -> list[tuple]:
    from robot_mbrl.agents.mpc import MPCAgent

    cfg = load_config(f"{checkpoint}/config.yaml", ["explore.plan_shield=false"])
    agent = MPCAgent.load(checkpoint, cfg, rig.robot.spec, make_task(cfg))
    planner, threshold = agent.planner(), agent.thresholds["disagreement"]
    rows = []
    for trial in range(n):
        rig.reset(seed=1000 + trial)
        planner.reset(trial)
        plan = {"warm": None}

        def mpc(obs: np.ndarray, plan=plan) -> np.ndarray:
            info = planner.plan(obs, plan["warm"], threshold)
            plan["warm"] = planner.shift(info.actions)
            return info.action

        for _ in range(int(rng.integers(10, 140))):
            rig.tick(mpc)
        rows.append(("swing", *brake_from_here(rig, brake, ix, iv)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="cartpole_swingup")
    ap.add_argument("--checkpoint", action="append", default=[],
                    help="run dir: also brake from its swing-up states (repeatable)")  # fmt: skip
    ap.add_argument("--trials", type=int, default=60, help="trials of each kind")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override (a twin parameter, or backend=serial serial.port=PORT for a rig)")  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(1)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as err:
        ap.error(str(err))
    robot = make_robot(cfg, seed=args.seed + 11)
    spec, fb = robot.spec, cfg.fallback
    brake = make_fallback(fb, spec)
    ix, iv = spec.index(fb.position_channel), spec.index(fb.velocity_channel)
    rng = np.random.default_rng(args.seed)
    serial = cfg.backend == "serial"
    if serial and args.checkpoint:
        ap.error("--checkpoint: the swing trials drive without the shield; run them on the twin only")
    t0 = time.perf_counter()
    with robot_session(robot.connect()):
        rig = Rig(robot, cfg, paced=serial or cfg.loop.paced)
        rows = straight_trials(rig, brake, ix, iv, fb, args.trials, rng)
        for checkpoint in args.checkpoint:
            rows += swing_trials(rig, brake, ix, iv, checkpoint, args.trials, rng)
    ex = cfg.explore
    print(f"# brake benchmark, {platform.node()} {platform.machine()}, {time.strftime('%Y-%m-%d')}, "
          f"config {args.config}, checkpoints {args.checkpoint or None}, {len(rows)} stops, "
          f"{time.perf_counter() - t0:.0f} s")  # fmt: skip
    kinds = sorted({r[0] for r in rows})
    for kind in kinds:
        v = np.array([r[1] for r in rows if r[0] == kind])
        d = np.array([r[2] for r in rows if r[0] == kind])
        print(f"{kind}: {len(v)} stops, onset speed up to {v.max():.2f} m/s, distance up to {d.max():.3f} m")
    v = np.array([r[1] for r in rows])
    d = np.array([r[2] for r in rows])
    fast = v >= 1.0
    print("\n| a (m/s^2) | react (s) | margin (m) | min slack (m) | stops past the shield | largest measured / "
          "predicted stop from >= 1 m/s (no margin) | predicted stop at 1.5 m/s (m) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    explore = (ex.brake_decel_m_s2, ex.react_s)
    plan = ex.plan_brake()
    roles = {explore: "exploration", plan: "planner, gate"} if plan != explore else {plan: "config"}
    for a, react in dict.fromkeys([*roles, *GRID]):
        stop = stopping_point(0.0, v, a, react)  # distance from the onset, v >= 0
        pred = stop + ex.margin
        ratio = f"{np.max(d[fast] / stop[fast]):.2f}" if fast.any() else "-"
        mark = f" ({roles[a, react]})" if (a, react) in roles else ""
        print(f"| {a:g}{mark} | {react:g} | {ex.margin:g} | {np.min(pred - d):+.3f} | {int((pred < d).sum())} | "
              f"{ratio} | {stopping_point(0.0, 1.5, a, react):.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
