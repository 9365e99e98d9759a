"""Planned value targets: fitted value iteration with the planner as the improvement step.

Why: n-step targets on real transitions estimate the value of the policy that *collected* them
(exploration, early MPC), not of the controller that will use V. With ~1,500 real steps there are
only a handful of collect/retrain cycles, so V lags far behind what the planner could do from the
same states; on the balance task a good V alone lifts the MPC from ~150 to ~240 of 250 (see
benchmarks/RESULTS.md). Planned targets improve V offline, on the same real data:

    T_h(s) = sum_{t < tau} gamma^t r_t + gamma^tau V_target,h(s_tau)   (mean over members)

evaluated for ``population`` candidate sequences from every real state ``s`` (sampled as the planner
samples them, around the actions the robot really applied next; candidate 0 is those actions), and
taken at the candidate the planner would pick (pessimistic mean over heads minus its penalties):
like clipped double Q-learning, the choice and the value estimates share the heads, and a head
cannot pick its own optimistic error. Imagination stops where the ensemble disagrees (``tau``, the
planner's calibrated truncation) and nothing but real start states is used: the data stay real, the
planner does the maximization the real robot would do.

Shapes: ``N`` real states, ``P`` candidates per state, ``H`` value heads, ``E`` members.
"""

from __future__ import annotations

import numpy as np
import torch

from robot_mbrl.planning.mpc import MPCPlanner
from robot_mbrl.planning.value import ValueFunction


def logged_action_plans(
    act: np.ndarray, terminated: np.ndarray, truncated: np.ndarray, horizon: int, repeat: int = 1
) -> np.ndarray:
    """``N x horizon x A``: for every row, the actions really applied at ticks ``i, i + repeat, ...``
    while the episode lasts, then its last action repeated (the arrays' end is an episode end)."""
    n = len(act)
    end = np.asarray(terminated, bool) | np.asarray(truncated, bool)
    if n:
        end = end.copy()
        end[-1] = True
    # last row of the episode of each row: the first end at or after it
    end_idx = np.flatnonzero(end)
    last = end_idx[np.searchsorted(end_idx, np.arange(n))] if n else np.zeros(0, int)
    ticks = np.arange(n)[:, None] + repeat * np.arange(horizon)[None, :]
    return np.asarray(act)[np.minimum(ticks, last[:, None])]


@torch.no_grad()
def planned_value_targets(
    planner: MPCPlanner,
    value: ValueFunction,
    obs: np.ndarray,
    logged: np.ndarray | None,
    threshold: float | None,
    seed: int,
    chunk: int = 128,
) -> torch.Tensor:
    """``H x N`` targets for the ``N x S`` real states ``obs`` (see the module docstring).

    ``logged``: ``N x k x A`` sampling means (the actions that really followed), None: the bound
    centre. ``threshold``: the calibrated disagreement threshold (None: never truncate)."""
    cfg = planner.cfg
    k, p = cfg.horizon, cfg.population
    o = torch.as_tensor(np.array(obs, np.float32))  # a copy: buffer views are read-only
    n, a = len(o), planner.low.numel()
    gen = torch.Generator().manual_seed(seed)
    kappa = value.cfg.pessimism if value.cfg.heads > 1 else 0.0
    out = torch.empty(value.cfg.heads, n)
    for start in range(0, n, chunk):
        b = min(chunk, n - start)
        if logged is None:
            mean = planner.center.expand(k, b, a)
        else:
            mean = torch.as_tensor(np.array(logged[start : start + b], np.float32)).transpose(
                0, 1
            )  # k x B x A
        noise = torch.randn(k, b * p * a, generator=gen)
        if planner.noise_mix is not None:
            noise = planner.noise_mix @ noise
        cand = mean.unsqueeze(2) + planner.std0.view(k, 1, 1, a) * noise.view(k, b, p, a)
        cand = torch.minimum(torch.maximum(cand, planner.low), planner.high)
        cand[:, :, 0] = mean.clamp(planner.low, planner.high)
        s0 = o[start : start + b].repeat_interleave(p, 0)  # BP x S
        slots = None if planner.prior is None else torch.arange(1, b * p, p)
        roll = planner._rollout(
            s0, cand.reshape(k, b * p, a), threshold, value_fn=value.target_value, prior_slots=slots
        )
        g = (roll.ret + roll.tail).mean(-2)  # H x BP: member mean per head
        score = g.mean(0) - kappa * g.std(0, correction=0) - roll.penalty
        score = torch.nan_to_num(score, nan=-1e30, posinf=-1e30, neginf=-1e30).view(b, p)
        pick = score.argmax(1)
        out[:, start : start + b] = g.view(-1, b, p)[:, torch.arange(b), pick]
    return out
