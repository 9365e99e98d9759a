"""How far ahead can a planner trust the learned model? Oracle vs long vs short+V (issue 4).

Receding-horizon controllers on the cart-pole twin, the same start states for every row:

- ``oracle``: CEM over ``--long`` ticks on MuJoCo rollouts of the twin's TRUE state and
  parameters (actuation delay and command rate limit included). Measurement only: what the task
  allows, which is what the README's "solved" threshold is set against.
- ``model, no V``: the same CEM and budget through the checkpoint's ensemble (mean over members),
  from the observation, no value function, at each of ``--model-horizons``: long horizons are what
  the design rejects.
- ``model, k + V``: the same CEM and budget, ``planner.horizon`` ticks + gamma^k V(s_k) with the
  checkpoint's value function.
- ``onboard MPC``: the checkpoint's own controller, ungated (the product, at its real-time budget).

Every row but the last takes 0.1-0.5 s per tick (not real time). Returns are the task's, summed
by the same judge as evaluation.

    python benchmarks/bench_horizon.py --checkpoint RUN_DIR [--episodes 3] [--long 60] [--model-horizons 10,30,60]
        [--pop 100] [--iters 3] [--oracle-only | --no-oracle] [--oracle-ablations [observed,rate_limit,shield]]
"""

from __future__ import annotations

import argparse
import platform
import time

import mujoco
import mujoco.rollout
import numpy as np
import torch

from robot_mbrl.agents.mpc import MPCAgent
from robot_mbrl.agents.planning_tasks import ShieldedTask
from robot_mbrl.config import load_config
from robot_mbrl.factory import make_judge, make_robot, make_task
from robot_mbrl.hal.robot import stop_on_signals
from robot_mbrl.runtime.episode import run_episode
from robot_mbrl.runtime.policies import PolicyController
from robot_mbrl.runtime.rundir import Tally

PENALTY = 10.0  # per tick outside the safe zone, as the planner's constraint_penalty


class RecedingCEM:
    """CEM over ``horizon`` commands in [-1, 1] with AR(1) noise; shifted warm start every tick."""

    def __init__(self, score, horizon: int, pop: int, iters: int, elites: int, rho: float, seed: int):
        self.score, self.h, self.pop, self.iters, self.elites, self.rho = (
            score,
            horizon,
            pop,
            iters,
            elites,
            rho,
        )
        self.rng = np.random.default_rng(seed)
        self.mean: np.ndarray | None = None

    def reset(self) -> None:
        self.mean = None

    def act(self, obs: np.ndarray) -> np.ndarray:
        first = self.mean is None
        mean = np.zeros(self.h) if first else np.append(self.mean[1:], self.mean[-1])
        std = np.full(self.h, 0.6)
        for _ in range(self.iters * (4 if first else 1)):
            e = self.rng.standard_normal((self.pop, self.h))
            for k in range(1, self.h):
                e[:, k] = self.rho * e[:, k - 1] + np.sqrt(1 - self.rho**2) * e[:, k]
            cand = np.clip(mean + std * e, -1.0, 1.0)
            cand[0] = np.clip(mean, -1.0, 1.0)
            best = cand[np.argsort(-self.score(obs, cand))[: self.elites]]
            mean = 0.1 * mean + 0.9 * best.mean(0)
            std = np.maximum(0.1 * std + 0.9 * best.std(0), 0.05)
        self.mean = mean
        return np.array([float(np.clip(mean[0], -1.0, 1.0))])


def oracle_score(twin, task, safe_x: float, observed: bool = False, rate_limit: bool = True, shield=None):
    """Scores command sequences on the twin's true physics (MuJoCo rollouts from its live state).

    Ablations: ``observed`` starts the rollouts from the reading (encoder positions, the device's
    filtered velocities) instead of the true state; ``rate_limit=False`` scores the commands as
    requested, ignoring the HAL's rate limit, as the onboard planner does; ``shield`` (a
    :class:`ShieldedTask`) penalizes every tick outside the brake's stopping-distance set as well, the
    constraint the onboard planner and gate keep."""
    m, cfg = twin.model, twin.cfg
    sub, spec = cfg.substeps, mujoco.mjtState.mjSTATE_FULLPHYSICS
    datas = [mujoco.MjData(m) for _ in range(2)]
    step = twin.spec.act_rate_per_s[0] * twin.spec.dt_s if twin.spec.act_rate_per_s else 2.0

    def score(obs: np.ndarray, cand: np.ndarray) -> np.ndarray:
        st = np.empty(mujoco.mj_stateSize(m, spec))
        mujoco.mj_getState(m, twin.data, st, spec)
        if observed:  # FULLPHYSICS layout: time, qpos (x, theta), qvel (xdot, thetadot), ...
            st[1:5] = obs[:4]
        truth = twin.truth()
        n, h = cand.shape
        applied = np.empty_like(cand)  # what the HAL's rate limit lets through
        prev = np.full(n, truth.u_acting)  # the last command the HAL let through (it acts now)
        for k in range(h):
            prev = prev + np.clip(cand[:, k] - prev, -step, step) if rate_limit else cand[:, k]
            applied[:, k] = prev
        # the command written now acts from the next tick (actuation delay of one period)
        acting = np.concatenate([np.full((n, 1), truth.u_acting), applied[:, :-1]], axis=1)
        ctrl = np.repeat(acting * truth.actuator_gain, sub, axis=1)[..., None]
        states, _ = mujoco.rollout.rollout(m, datas, st, ctrl)
        s = states[:, sub - 1 :: sub]  # state at the end of every tick
        x, th, xd, thd = s[..., 1], s[..., 2], s[..., 3], s[..., 4]
        nxt = torch.as_tensor(np.stack([x, th, xd, thd, applied], -1))
        r = task.reward(nxt, torch.as_tensor(applied[..., None]), nxt).numpy()
        out = np.abs(x) > safe_x
        if shield is not None:
            out |= (shield.constraints(nxt.float()) > 0).any(-1).numpy()
        return r.sum(1) - PENALTY * out.sum(1)

    return score


def model_score(agent: MPCAgent, task, horizon_value: bool, gamma: float):
    """Scores command sequences through the ensemble (mean over members of each member's return)."""
    model = agent.model
    e = model.num_members

    def score(obs: np.ndarray, cand: np.ndarray) -> np.ndarray:
        n, h = cand.shape
        s = torch.as_tensor(obs, dtype=torch.float32).expand(e, n, -1).clone()
        acts = torch.as_tensor(cand, dtype=torch.float32)
        total, alive, g = torch.zeros(e, n), torch.ones(e, n), 1.0
        with torch.no_grad():
            for k in range(h):
                a = acts[:, k, None].expand(e, n, 1)
                nxt = model.predict(s, a).mean
                viol = (task.constraints(nxt) > 0).any(-1).float()
                total += g * alive * (task.reward(s, a, nxt) - PENALTY * viol)
                alive = alive * (~task.terminated(nxt)).float()
                s, g = nxt, g * gamma
            if horizon_value:
                total += g * alive * agent.value(s)
        return total.mean(0).numpy()

    return score


def episodes(robot, judge, controller, n: int, seed: int, steps: int) -> tuple[list[float], float]:
    rets, t0, ticks = [], time.perf_counter(), 0
    for ep in range(n):
        res = run_episode(robot, judge, controller, episode=ep, max_steps=steps, seed=seed * 1000 + ep,
                          paced=False, tally=Tally())  # fmt: skip
        rets.append(res.ret)
        ticks += res.steps
    return rets, (time.perf_counter() - t0) / max(ticks, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=None, help="run dir (model rows); without it only the oracle")
    ap.add_argument("--config", default="cartpole_swingup")
    ap.add_argument("--episodes", type=int, default=3)
    ap.add_argument("--long", type=int, default=60, help="the oracle's horizon, ticks")
    ap.add_argument(
        "--model-horizons", default="60", help="comma-separated horizons of the model rows without V"
    )
    ap.add_argument("--pop", type=int, default=100)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--elites", type=int, default=10)
    ap.add_argument("--rho", type=float, default=0.8, help="AR(1) correlation of the sampling noise")
    ap.add_argument("--seed", type=int, default=21)
    ap.add_argument("--oracle-only", action="store_true")
    ap.add_argument("--no-oracle", action="store_true")
    ap.add_argument(
        "--oracle-ablations",
        nargs="?",
        const="observed,rate_limit,shield",
        default="",
        metavar="NAMES",
        help="oracle ablation rows (default all of observed,rate_limit,shield): the oracle from the "
        "observed state, blind to the rate limit, kept inside the brake's stopping-distance set (the "
        "onboard planner's shield)",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(f"{args.checkpoint}/config.yaml" if args.checkpoint else args.config)
    robot = make_robot(cfg, seed=args.seed)
    task = make_task(cfg)
    judge = make_judge(task, robot)
    steps = cfg.task.episode_steps
    print(f"# horizon benchmark, {platform.node()} {platform.machine()}, {time.strftime('%Y-%m-%d')}, "
          f"checkpoint {args.checkpoint}, {args.episodes} episodes x {steps} ticks, CEM {args.pop} x "
          f"{args.iters} (x4 on the first tick), seed {args.seed}")  # fmt: skip
    print("| controller | horizon (ticks) | returns | mean | s per tick |\n|---|---|---|---|---|")

    def row(name: str, horizon: str, controller) -> None:
        with stop_on_signals(robot):
            rets, dt = episodes(robot, judge, controller, args.episodes, args.seed, steps)
        print(f"| {name} | {horizon} | {' / '.join(f'{r:.1f}' for r in rets)} | {np.mean(rets):.1f} | {dt:.3f} |",
              flush=True)  # fmt: skip

    cem_args = dict(pop=args.pop, iters=args.iters, elites=args.elites, rho=args.rho, seed=args.seed)
    if not args.no_oracle:
        row("oracle (true physics)", str(args.long),
            PolicyController(RecedingCEM(oracle_score(robot, task, cfg.twin.safe_x_m), args.long, **cem_args)))  # fmt: skip
    ablations = {
        "observed": ("oracle from the observed state", {"observed": True}),
        "rate_limit": ("oracle blind to the rate limit", {"rate_limit": False}),
        "shield": ("oracle inside the stopping-distance shield",
                   {"shield": ShieldedTask(task, robot.spec, cfg.explore)}),
    }  # fmt: skip
    for key in filter(None, args.oracle_ablations.split(",")):
        if key not in ablations:
            ap.error(f"--oracle-ablations: expected names from {sorted(ablations)}, got {key!r}")
        name, kw = ablations[key]
        score = oracle_score(robot, task, cfg.twin.safe_x_m, **kw)
        row(name, str(args.long), PolicyController(RecedingCEM(score, args.long, **cem_args)))
    if args.checkpoint is None or args.oracle_only:
        return
    agent = MPCAgent.load(args.checkpoint, cfg, robot.spec, task)
    k, gamma = cfg.planner.horizon, cfg.planner.gamma
    for h in (int(v) for v in args.model_horizons.split(",")):
        row(
            "model, no V",
            str(h),
            PolicyController(RecedingCEM(model_score(agent, task, False, 1.0), h, **cem_args)),
        )
    row("model, k + V", f"{k} + V",
        PolicyController(RecedingCEM(model_score(agent, task, True, gamma), k, **cem_args)))  # fmt: skip
    row("onboard MPC (checkpoint's controller, ungated)", f"{k} + V", agent.controller(gate=False))


if __name__ == "__main__":
    main()
