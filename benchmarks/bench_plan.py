"""Plan-time benchmark of the onboard MPC on one thread; prints a markdown report.

    python benchmarks/bench_plan.py [--plans 300] [--population N] [--iterations I] [--sweep]
        [--members E] [--hidden H] [--layers L] [--net-sweep] [--rounds R]
    python benchmarks/bench_plan.py --config cartpole_swingup   # the default config's planner
    python benchmarks/bench_plan.py --config cartpole_swingup --set model.control_affine=false  # a variant
    python benchmarks/bench_plan.py --checkpoint RUN [--set value.terminal=none]  # a trained controller

Model: the real ``robot_mbrl.models.ensemble`` (its ``EnsembleConfig`` defaults unless overridden;
the planner then uses the lean ``ProbabilisticEnsemble.stepper``), else a stand-in with the same
shapes (stacked ``E x in x out`` weights, ``baddbmm`` per layer, SiLU), obs_dim 5, act_dim 1.
FLOPs count only the matmuls: ``2 * E * N * in * out`` per layer per model call (the real model
skips the log-variance half of the output layer; the count keeps it, as the reference does). The
reference rate is a plain ``torch.baddbmm`` loop over the same shapes and the same number of calls,
measured in the same run. ``--rounds`` repeats the first config to show the spread on a shared machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from robot_mbrl.models.base import Prediction
from robot_mbrl.planning.mpc import MPCPlanner, PlannerConfig
from robot_mbrl.tasks.base import Task

S, A = 5, 1
try:
    from robot_mbrl.models.ensemble import EnsembleConfig as _Cfg

    E, HIDDEN, LAYERS = _Cfg().members, _Cfg().hidden, _Cfg().layers
except ImportError:
    E, HIDDEN, LAYERS = 7, 128, 4


class StandInEnsemble:
    """Same shapes and per-call work as a PETS-style ensemble (means only, no grads)."""

    def __init__(self, members: int = E, obs_dim: int = S, act_dim: int = A, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.num_members, self.elites = members, tuple(range(members))
        self.dims = [obs_dim + act_dim] + [HIDDEN] * LAYERS + [2 * obs_dim]  # mean delta + logvar
        self.w = [
            torch.randn(members, i, o, generator=g) / i**0.5
            for i, o in zip(self.dims, self.dims[1:], strict=False)
        ]
        self.b = [torch.zeros(members, 1, o) for o in self.dims[1:]]
        self.in_mu, self.in_sd = torch.zeros(obs_dim + act_dim), torch.ones(obs_dim + act_dim)
        self.out_sd = torch.full((obs_dim,), 0.01)
        self.obs_dim = obs_dim

    def predict(self, obs: torch.Tensor, act: torch.Tensor) -> Prediction:
        x = (torch.cat([obs, act], -1) - self.in_mu) / self.in_sd
        for w, b in zip(self.w[:-1], self.b[:-1], strict=False):
            x = F.silu(torch.baddbmm(b, x, w))
        out = torch.baddbmm(self.b[-1], x, self.w[-1])
        delta, logvar = out[..., : self.obs_dim], out[..., self.obs_dim :]
        nm = delta.transpose(0, 1)  # N x E x S normalized means
        return Prediction(
            mean=obs + delta * self.out_sd,
            var=logvar.exp(),
            reward=None,
            disagreement=delta.std(0).mean(-1),
            max_pairwise=torch.cdist(nm, nm).amax((1, 2)),
        )


class NullModel:
    """Zero-cost model (x' = x + a, no network): measures the planner's own overhead."""

    def __init__(self, members: int = E):
        self.num_members, self.elites = members, tuple(range(members))

    def predict(self, obs: torch.Tensor, act: torch.Tensor) -> Prediction:
        mean = obs + act
        dis = mean[..., 0].std(0)
        return Prediction(mean, mean, None, dis, dis)


class QuadraticTask(Task):
    """Regulate to 0 with one track-like constraint (same cost profile as a real task)."""

    def reward(self, obs: torch.Tensor, act: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
        return -(next_obs**2).sum(-1) - 0.01 * (act**2).sum(-1)

    def terminated(self, next_obs: torch.Tensor) -> torch.Tensor:
        return next_obs[..., 0].abs() > 5.0

    def constraints(self, obs: torch.Tensor) -> torch.Tensor:
        return (obs[..., 0].abs() - 3.0).unsqueeze(-1)


def make_model(which: str = "auto") -> tuple[object, str]:
    """The real ensemble (``ProbabilisticEnsemble``) when importable, else the stand-in."""
    if which == "null":
        return NullModel(E), "zero-cost (planner overhead only)"
    if which != "stand-in":
        try:
            from robot_mbrl.models.ensemble import EnsembleConfig, ProbabilisticEnsemble
        except ImportError:
            if which == "real":
                raise
        else:
            cfg = EnsembleConfig(members=E, hidden=HIDDEN, layers=LAYERS)
            model = ProbabilisticEnsemble(S, A, cfg=cfg).eval()
            return model, "robot_mbrl.models.ensemble.ProbabilisticEnsemble"
    return StandInEnsemble(), "stand-in (stacked baddbmm + SiLU)"


def flops_per_call(n: int) -> int:
    dims = [S + A] + [HIDDEN] * LAYERS + [2 * S]
    return sum(2 * E * n * i * o for i, o in zip(dims, dims[1:], strict=False))


def bmm_reference(n: int, calls: int, repeats: int = 20) -> float:
    """Seconds for ``calls`` model-shaped baddbmm chains at batch ``n`` (best of ``repeats``)."""
    dims = [S + A] + [HIDDEN] * LAYERS + [2 * S]
    ws = [torch.randn(E, i, o) / i**0.5 for i, o in zip(dims, dims[1:], strict=False)]
    bs = [torch.zeros(E, 1, o) for o in dims[1:]]
    x0 = torch.randn(E, n, dims[0])
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(calls):
                x = x0
                for w, b in zip(ws, bs, strict=False):
                    x = torch.baddbmm(b, x, w)
            best = min(best, time.perf_counter() - t)
    return best


def bench(cfg: PlannerConfig, plans: int, which: str) -> dict[str, float]:
    model, _ = make_model(which)
    planner = MPCPlanner(model, QuadraticTask(), -np.ones(A), np.ones(A), config=cfg)  # type: ignore[arg-type]
    value = lambda s: -(s**2).sum(-1)  # noqa: E731  (cheap stand-in for V)
    planner.value_fn = value
    rng = np.random.default_rng(0)
    warm = None
    for _ in range(20):  # warm-up (allocator, dispatch caches)
        warm = planner.shift(planner.plan(rng.normal(size=S) * 0.3, warm, 1.0).actions)
    times = []
    for _ in range(plans):
        info = planner.plan(rng.normal(size=S) * 0.3, warm, 1.0)
        warm = planner.shift(info.actions)
        times.append(info.solve_time_s)
    t = np.asarray(times) * 1e3
    calls = cfg.iterations * cfg.horizon * cfg.action_repeat
    flops = calls * flops_per_call(cfg.population)
    ref_s = bmm_reference(cfg.population, calls)
    p50 = float(np.percentile(t, 50))
    return {
        "p50_ms": p50,
        "p99_ms": float(np.percentile(t, 99)),
        "max_ms": float(t.max()),
        "mflop": flops / 1e6,
        "gflops_plan": flops / (p50 / 1e3) / 1e9,
        "gflops_bmm": flops / ref_s / 1e9,
        "bmm_ms": ref_s * 1e3,
    }


def bench_config(name: str, plans: int, sets: list[str] | None = None, checkpoint: str | None = None) -> None:
    """The planner exactly as ``robot-mbrl train/run`` builds it from config ``name`` (real ensemble
    shape, shielded task, value network, disagreement truncation); untrained weights (timing does not
    depend on them), or with ``checkpoint`` (a run directory) the trained controller as ``run``
    loads it: its terminal value and LQR candidate (``value.terminal``, which an untrained agent has
    not got), its calibrated threshold, start states drawn from its real buffer. FLOPs are the
    matmuls the planner's model calls execute (mean head only, padded), next to a plain baddbmm
    chain over the same weight shapes and call count."""
    from pathlib import Path

    from robot_mbrl.agents.mpc import MPCAgent
    from robot_mbrl.config import load_config
    from robot_mbrl.data.buffer import ReplayBuffer
    from robot_mbrl.factory import make_robot, make_task

    sets = sets or []
    rng = np.random.default_rng(0)
    if checkpoint:
        run = Path(checkpoint)
        cfg = load_config(str(run / "config.yaml"), sets)
        robot = make_robot(cfg)
        agent = MPCAgent.load(run, cfg, robot.spec, make_task(cfg))
        real = ReplayBuffer.open(run / "buffer").arrays()["obs"]
        obs = lambda: real[rng.integers(len(real))]  # noqa: E731
        threshold = agent.thresholds["disagreement"]
        name = (
            f"{checkpoint} (value.terminal {cfg.value.terminal}, LQR candidate {agent.terminal is not None})"
        )
    else:
        cfg = load_config(name, sets)
        robot = make_robot(cfg)
        agent = MPCAgent(cfg, robot.spec, make_task(cfg))
        obs = lambda: np.array([0.0, np.pi, 0.0, 0.0, 0.0]) + rng.normal(size=robot.spec.obs_dim) * 0.3  # noqa: E731
        threshold = 1.0
    planner = agent.planner()
    pc = cfg.planner
    warm, times = None, []
    for i in range(plans + 20):
        info = planner.plan(obs(), warm, threshold)
        warm = planner.shift(info.actions)
        if i >= 20:  # warm-up (allocator, dispatch caches)
            times.append(info.solve_time_s)
    robot.close()
    t = np.asarray(times) * 1e3
    fused = agent.model._fused()
    ws, wg = fused.ws, fused.wg  # wg: control_affine gains (or None)
    n, calls = agent.model.num_members * pc.population, pc.iterations * pc.horizon * pc.action_repeat
    mats = [*ws, *([wg] if wg is not None else [])]
    flops = calls * sum(2 * w.shape[0] * pc.population * w.shape[1] * w.shape[2] for w in mats)
    x0 = torch.randn(agent.model.num_members, pc.population, ws[0].shape[1])
    xg = None if wg is None else torch.randn(agent.model.num_members, pc.population, wg.shape[1])
    best = float("inf")
    with torch.inference_mode():
        for _ in range(20):
            t0 = time.perf_counter()
            for _ in range(calls):
                x = x0
                for w in ws:
                    x = torch.bmm(x, w)
                if xg is not None:
                    torch.bmm(xg, wg)
            best = min(best, time.perf_counter() - t0)
    p50, p99 = float(np.percentile(t, 50)), float(np.percentile(t, 99))
    period_ms = 1e3 / robot.spec.control_hz
    shape = " x ".join(str(w.shape[2]) for w in ws[:-1]) + (
        " + control-affine gains" if wg is not None else ""
    )
    print(f"## Default-config plan time: `{name}` {' '.join(sets)} (1 thread, torch {torch.__version__})\n")
    print(f"ensemble {agent.model.num_members} members, hidden {shape} {cfg.model.activation}; planner "
          f"{pc.method} k={pc.horizon} x repeat {pc.action_repeat}, {pc.iterations} iteration(s) x "
          f"{pc.population} candidates; {plans} plans; batch per model call {n} rows\n")  # fmt: skip
    print(
        "| p50 ms | p99 ms | max ms | p99 / period | MFLOP/plan | GFLOP/s plan | GFLOP/s bmm chain | plan/bmm |"
    )
    print("|---|---|---|---|---|---|---|---|")
    g_plan, g_bmm = flops / (p50 / 1e3) / 1e9, flops / best / 1e9
    print(f"| {p50:.2f} | {p99:.2f} | {t.max():.2f} | {p99 / period_ms:.0%} | {flops / 1e6:.1f} | {g_plan:.1f} "
          f"| {g_bmm:.1f} | {g_plan / g_bmm:.0%} |")  # fmt: skip


def set_net(members: int | None, hidden: int | None, layers: int | None) -> None:
    """Override the module-level network shape (used by the model factories and FLOP counts)."""
    global E, HIDDEN, LAYERS
    E, HIDDEN, LAYERS = members or E, hidden or HIDDEN, layers or LAYERS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", type=int, default=300)
    parser.add_argument("--population", type=int, default=None)
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--model", choices=("auto", "real", "stand-in", "null"), default="auto")
    parser.add_argument("--sweep", action="store_true", help="also time other population/iterations")
    parser.add_argument("--members", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=1, help="time the first config this many times")
    parser.add_argument("--net-sweep", action="store_true", help="first config on other E x L x H nets")
    parser.add_argument(
        "--config", default=None, help="time the planner of this config (as train/run build it)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="with --config: override"
    )
    parser.add_argument(
        "--checkpoint", default=None, metavar="RUN", help="time a trained run's planner (as run loads it)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.config or args.checkpoint:
        bench_config(args.config or "cartpole_swingup", args.plans, args.set, args.checkpoint)
        return
    set_net(args.members, args.hidden, args.layers)
    base = PlannerConfig()
    over = {k: v for k, v in (("population", args.population), ("iterations", args.iterations)) if v}
    base = dataclasses.replace(base, **over)
    configs = [base] * args.rounds
    if args.sweep:
        configs += [
            dataclasses.replace(base, population=p, iterations=i)
            for p, i in ((16, 3), (64, 2), (128, 3), (256, 4), (500, 5))
        ]
    load0 = f"{os.getloadavg()[0]:.2f}"
    _, model_name = make_model(args.model)
    print(f"## MPC plan time (1 thread, torch {torch.__version__}, model: {model_name})\n")
    print(
        f"E={E} members x {LAYERS} x {HIDDEN} hidden, obs {S}, act {A}, horizon {base.horizon}, "
        f"method {base.method}, {args.plans} plans\n"
    )
    print(
        "| E x L x H | population | iterations | p50 ms | p99 ms | max ms | MFLOP/plan | GFLOP/s plan "
        "| GFLOP/s bmm loop | plan/bmm |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    nets = [(E, LAYERS, HIDDEN)]
    if args.net_sweep:
        nets += [(7, 4, 200), (5, 4, 200), (7, 3, 200), (7, 4, 128), (7, 3, 128), (5, 4, 128)]
    for net in dict.fromkeys(nets):
        set_net(net[0], net[2], net[1])
        for cfg in configs if net == nets[0] else [base]:
            row(cfg, args.plans if cfg is base else max(30, args.plans // 10), args.model)
    set_net(nets[0][0], nets[0][2], nets[0][1])
    null = bench(base, max(30, args.plans // 3), "null")
    print(
        f"\nPlanner overhead (zero-cost model, first config): p50 {null['p50_ms']:.2f} ms, "
        f"p99 {null['p99_ms']:.2f} ms. Load average before/after: {load0} / {os.getloadavg()[0]:.2f} "
        f"on {os.cpu_count()} cores (other processes inflate p99)."
    )


def row(cfg: PlannerConfig, plans: int, which: str) -> None:
    r = bench(cfg, plans, which)
    print(
        f"| {E} x {LAYERS} x {HIDDEN} | {cfg.population} | {cfg.iterations} | {r['p50_ms']:.2f} "
        f"| {r['p99_ms']:.2f} | {r['max_ms']:.2f} | {r['mflop']:.0f} | {r['gflops_plan']:.1f} "
        f"| {r['gflops_bmm']:.1f} | {r['gflops_plan'] / r['gflops_bmm']:.0%} |"
    )


if __name__ == "__main__":
    main()
