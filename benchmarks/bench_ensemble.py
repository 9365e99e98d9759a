"""Ensemble training and forward speed: batched ensemble vs a plain member-by-member loop.

Prints markdown rows. Training: seconds per epoch (one pass over the 80 % training split in
minibatches of 256 plus the holdout evaluation) for 7 members x 200 hidden at 1k and 5k
transitions, 2 threads. Forward: latency of one prediction for 3,500 (state, action) pairs, 1 thread.
The loop baseline is 7 separate ``nn.Sequential`` Gaussian MLPs trained one after another on the
same data with the same loss, optimizer and batch size. Data: cartpole-shaped (S=4, one angle, A=1).

Run: ``python benchmarks/bench_ensemble.py [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from robot_mbrl.models.ensemble import EnsembleConfig, ProbabilisticEnsemble
from robot_mbrl.models.trainer import EnsembleTrainer, TrainerConfig

S, A, E, HIDDEN, BATCH = 4, 1, 7, 200, 256
ANGLE = np.array([False, False, True, False])


def data(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    obs = rng.uniform(-2, 2, (n, S))
    act = rng.uniform(-1, 1, (n, A))
    nxt = obs + 0.05 * np.tanh(obs[:, ::-1]) + 0.02 * act
    return dict(obs=obs, act=act, next_obs=nxt, reward=np.cos(obs[:, 2]))


def member_loop_nets(layers: int, in_dim: int, seed: int) -> list[torch.nn.Sequential]:
    torch.manual_seed(seed)
    nets = []
    for _ in range(E):
        mods: list[torch.nn.Module] = []
        d = in_dim
        for _ in range(layers):
            mods += [torch.nn.Linear(d, HIDDEN), torch.nn.SiLU()]
            d = HIDDEN
        mods.append(torch.nn.Linear(d, 2 * S))
        nets.append(torch.nn.Sequential(*mods))
    return nets


def loop_epoch_s(layers: int, n: int, epochs: int) -> float:
    """Per-epoch time of 7 separate nets trained one after another (bootstrap, NLL, holdout eval)."""
    d = data(n)
    x = torch.tensor(np.concatenate([d["obs"], d["act"]], 1), dtype=torch.float32)
    y = torch.tensor(d["next_obs"] - d["obs"], dtype=torch.float32)
    x, y = (x - x.mean(0)) / x.std(0), (y - y.mean(0)) / y.std(0)
    n_ho = int(0.2 * n)
    x_tr, y_tr, x_ho, y_ho = x[n_ho:], y[n_ho:], x[:n_ho], y[:n_ho]
    nets = member_loop_nets(layers, x.shape[1], 0)
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for net in nets:
        max_lv = torch.nn.Parameter(torch.full((S,), 0.5))
        min_lv = torch.nn.Parameter(torch.full((S,), -10.0))
        opt = torch.optim.Adam([*net.parameters(), max_lv, min_lv], lr=1e-3, weight_decay=5e-5)
        boot = torch.randint(len(x_tr), (len(x_tr),), generator=gen)
        for _ in range(epochs):
            order = boot[torch.randperm(len(boot), generator=gen)]
            for b in range(0, len(order), BATCH):
                idx = order[b : b + BATCH]
                mu, lv = net(x_tr[idx]).chunk(2, -1)
                lv = min_lv + F.softplus(max_lv - F.softplus(max_lv - lv) - min_lv)
                loss = ((mu - y_tr[idx]) ** 2 * torch.exp(-lv) + lv).mean() + 0.01 * (max_lv - min_lv).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                ((net(x_ho).chunk(2, -1)[0] - y_ho) ** 2).mean()
    return (time.perf_counter() - start) / epochs


def ensemble_epoch_s(layers: int, n: int, epochs: int) -> float:
    model = ProbabilisticEnsemble(
        S, A, ANGLE, EnsembleConfig(members=E, hidden=HIDDEN, layers=layers), seed=0
    )
    trainer = EnsembleTrainer(
        model, TrainerConfig(max_epochs=epochs, patience=10**6, batch_size=BATCH), seed=0
    )
    report = trainer.train(data(n))
    return report.wall_s / report.epochs


def forward_ms(layers: int, n: int = 3500, reps: int = 20) -> tuple[float, float]:
    """Median ms of ``predict`` (batched ensemble) and of 7 Sequential forwards (member loop)."""
    model = ProbabilisticEnsemble(
        S, A, ANGLE, EnsembleConfig(members=E, hidden=HIDDEN, layers=layers), seed=0
    )
    obs, act = torch.randn(n, S), torch.randn(n, A)
    nets = member_loop_nets(layers, S + A, 0)
    x = torch.randn(n, S + A)

    def loop() -> None:
        with torch.no_grad():
            torch.stack([net(x) for net in nets])

    out = []
    for fn in (lambda: model.predict(obs, act), loop):
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out.append(1e3 * statistics.median(times))
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="median over this many timed runs")
    ap.add_argument("--epochs", type=int, default=5, help="epochs per timed run")
    args = ap.parse_args()
    med = lambda f, *a: statistics.median(f(*a) for _ in range(args.repeats))  # noqa: E731
    torch.set_num_threads(2)
    print("| layers x hidden | transitions | ensemble s/epoch | member loop s/epoch | speed-up |")
    print("|---|---|---|---|---|")
    for layers in (3, 4):
        for n in (1000, 5000):
            ens, loop = (
                med(ensemble_epoch_s, layers, n, args.epochs),
                med(loop_epoch_s, layers, n, args.epochs),
            )
            print(f"| {layers} x {HIDDEN} | {n} | {ens:.3f} | {loop:.3f} | {loop / ens:.1f}x |")
    torch.set_num_threads(1)
    print()
    print("| layers x hidden | batch | ensemble predict ms (1 thread) | member loop ms | speed-up |")
    print("|---|---|---|---|---|")
    for layers in (3, 4):
        for n in (500, 3500):
            ens, loop = forward_ms(layers, n)
            print(f"| {layers} x {HIDDEN} | {n} | {ens:.1f} | {loop:.1f} | {loop / ens:.1f}x |")


if __name__ == "__main__":
    main()
