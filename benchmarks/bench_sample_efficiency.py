"""Sample efficiency (issue 4): real steps to the solved threshold, robot_mbrl vs SB3 SAC.

Both learn the same task on the twin with the same seed. robot_mbrl: `train_job` with the packaged
config (its evaluation episodes are measurement only). SAC: Stable-Baselines3 on the gymnasium id
of the same twin task, evaluated every ``--sac-eval-every`` steps on 3 episodes; steps-to-threshold
is the first evaluation whose mean return reaches the same threshold. When SAC does not reach it
within ``--sac-steps``, the ratio is reported as a lower bound.

    pip install stable-baselines3   # the [bench] extra
    python benchmarks/bench_sample_efficiency.py [--config cartpole_swingup] [--seed 0] [--sac-steps 30000]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

import robot_mbrl  # noqa: F401  (registers the gymnasium ids)
from robot_mbrl.config import load_config
from robot_mbrl.runtime.train import solved_threshold, train_job

GYM_IDS = {"swingup": "robot_mbrl/CartpoleSwingup-v0", "balance": "robot_mbrl/CartpoleBalance-v0"}


def sac_steps_to_threshold(
    cfg, threshold: float, seed: int, max_steps: int, eval_every: int
) -> tuple[int | None, list]:
    from stable_baselines3 import SAC

    env_id = GYM_IDS[cfg.twin.task]
    kwargs = {"episode_steps": cfg.task.episode_steps}
    env = gym.make(env_id, seed=seed, config=cfg.twin, **kwargs)
    eval_env = gym.make(env_id, seed=seed + 7919, config=cfg.twin, **kwargs)
    model = SAC("MlpPolicy", env, seed=seed, verbose=0, device="cpu", learning_starts=500)
    history = []
    steps = 0
    while steps < max_steps:
        model.learn(total_timesteps=eval_every, reset_num_timesteps=False)
        steps += eval_every
        rets = []
        for ep in range(3):
            obs, _ = eval_env.reset(seed=seed * 1000 + ep)
            done, ret = False, 0.0
            while not done:
                act, _ = model.predict(obs, deterministic=True)
                obs, r, term, trunc, _ = eval_env.step(act)
                ret += r
                done = term or trunc
            rets.append(ret)
        history.append((steps, float(np.mean(rets))))
        if np.mean(rets) >= threshold:
            return steps, history
    return None, history


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sac-steps", type=int, default=30_000)
    ap.add_argument("--sac-eval-every", type=int, default=2_500)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config, [f"seed={args.seed}"])
    threshold = solved_threshold(cfg, 1.0)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        summary, _ = train_job(cfg, out=Path(tmp) / "run", progress=False)
    ours_s = time.monotonic() - t0
    ours = summary["solved_at_step"]
    t0 = time.monotonic()
    sac, history = sac_steps_to_threshold(cfg, threshold, args.seed, args.sac_steps, args.sac_eval_every)
    sac_s = time.monotonic() - t0
    print(f"# sample efficiency, {platform.node()} {platform.machine()}, {time.strftime('%Y-%m-%d')}, "
          f"task {cfg.twin.task}, seed {args.seed}, threshold {threshold}")  # fmt: skip
    print("| learner | real steps to threshold | wall s | eval returns |")
    print("|---|---|---|---|")
    ours_txt = ours if ours is not None else f"not within {summary['real_steps']}"
    print(f"| robot_mbrl (gated MPC) | {ours_txt} "
          f"| {ours_s:.0f} | {summary['eval_returns']} |")  # fmt: skip
    print(f"| SB3 SAC | {sac if sac is not None else f'not within {args.sac_steps}'} | {sac_s:.0f} "
          f"| {json.dumps(history)} |")  # fmt: skip
    if ours is not None:
        ratio = (sac if sac is not None else args.sac_steps) / ours
        print(f"\nratio SAC / robot_mbrl: {'>= ' if sac is None else ''}{ratio:.1f}x")


if __name__ == "__main__":
    main()
