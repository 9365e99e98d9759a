"""LQR terminal value around the task's goal: the terminal cost of textbook MPC, from real data.

Why: V is learned from real transitions, and with ~1,500 of them the states a short-horizon
planner must aim for (the pole upright and slow) are rarely visited, so V there is an
extrapolation that does not pay the planner to hold the pole (benchmarks/RESULTS.md: the same
learned model and planner balance at ~240 of 250 with a Riccati value, ~150 with the learned V).
Near an equilibrium the infinite-horizon problem has a closed-form answer (the terminal cost of
quasi-infinite-horizon MPC, Chen & Allgoewer 1998; Mayne et al. 2000): a linear model around the
goal, the known reward to second order, the discounted Riccati equation:

    V_T(s) = r* / (1 - gamma) - 1/2 ds' P ds,    ds = s - s*,    LQR law a = a* - K ds

The linear model is a least-squares fit of the real transitions nearest the goal
(:func:`local_linear_fit`; :func:`linearize` takes the ensemble's slope instead). The value
function uses ``max(V_h(s), V_T(s))`` per head (:meth:`ValueFunction.set_terminal`): far from the
goal the quadratic falls below every learned value and V decides, near it V_T does; no explicit
terminal set (a verified ellipsoid of the saturated LQR through the ensemble was measured: small
and conservative, it lost the balance gain; RESULTS.md). The planner also rolls the LQR law out
through the ensemble as one candidate (``planner.policy_candidate``). Nothing here comes from the
simulator.

Shapes: ``S`` observation dim, ``A`` action dim.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from robot_mbrl.models.base import DynamicsModel
from robot_mbrl.models.ensemble import wrap_angle
from robot_mbrl.tasks.base import Task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TerminalValue:
    goal: np.ndarray  # S, the equilibrium s*
    P: np.ndarray  # S x S, cost-to-go Hessian (V_T = v0 - 1/2 ds' P ds)
    K: np.ndarray  # A x S, LQR gain (a = a* - K ds)
    goal_act: np.ndarray  # A, the equilibrium action a*
    v0: float  # r* / (1 - gamma)

    def to_dict(self) -> dict:
        """Plain lists and floats (checkpoint metadata)."""
        return {k: np.asarray(v).tolist() for k, v in vars(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> TerminalValue:
        return cls(**{k: float(v) if k == "v0" else np.asarray(v, np.float64) for k, v in d.items()})


def linearize(
    model: DynamicsModel,
    goal: np.ndarray,
    act: np.ndarray,
    anchors: np.ndarray | None = None,
    step: float = 1e-3,
) -> tuple[np.ndarray, np.ndarray]:
    """``A`` (``S x S``), ``B`` (``S x A``): central differences of the members' mean prediction,
    steps of ``step`` x the model's state scale (1 for actions), at ``(s*, a*)`` or averaged over
    ``anchors`` (``M x (S + A)`` real state-action pairs: where the model has seen data; at a goal
    the robot never reached, the network's slope there is extrapolation)."""
    s_dim, a_dim = len(goal), len(act)
    scale = getattr(model, "state_scale", None)
    hs = np.full(s_dim, step) if scale is None else step * np.asarray(scale, np.float64)[:s_dim]
    h = np.concatenate([hs, np.full(a_dim, step)])
    n = s_dim + a_dim
    z0 = np.concatenate([goal, act])[None] if anchors is None else np.asarray(anchors, np.float64)
    dz = np.diag(h)
    z = np.concatenate([z0[:, None] + dz, z0[:, None] - dz], axis=1).reshape(-1, n)  # M*2n x n
    zt = torch.as_tensor(z, dtype=torch.float32)
    with torch.no_grad():
        nxt = model.predict(zt[:, :s_dim], zt[:, s_dim:]).mean.mean(0).double().numpy()
    nxt = nxt.reshape(len(z0), 2, n, s_dim)
    diff = nxt[:, 0] - nxt[:, 1]
    angles = getattr(model, "angle_mask", None)
    if angles is not None:  # a finite difference across the +-pi seam
        m = np.asarray(angles, bool)
        diff[..., m] = (diff[..., m] + np.pi) % (2 * np.pi) - np.pi
    jac = (diff / (2 * h[None, :, None])).mean(0).T  # S x n
    return jac[:, :s_dim], jac[:, s_dim:]


def local_linear_fit(
    obs: np.ndarray,
    act: np.ndarray,
    next_obs: np.ndarray,
    goal: np.ndarray,
    goal_act: np.ndarray,
    angle_mask: np.ndarray | None = None,
    ridge: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray]:
    """``A``, ``B`` by least squares on real transitions near the goal (``N x S``, ``N x A``,
    ``N x S``): ``s' - s* = A (s - s*) + B (a - a*) + c`` with angle differences wrapped.

    Why not the network's slope: near a goal the robot reaches only in passing, a few dozen rows
    among ~1,500 pin the local dynamics down for a linear fit, while the ensemble, fitted to all
    rows, can carry the dominant regime's coupling over (on the swing-up twin the learned coupling
    of force to pole rate at upright has the hanging regime's sign; the local fit has the sign the
    balance data show; benchmarks/RESULTS.md)."""
    mask = np.zeros(len(goal), bool) if angle_mask is None else np.asarray(angle_mask, bool)

    def dev(x: np.ndarray) -> np.ndarray:
        d = np.asarray(x, np.float64) - goal
        d[:, mask] = (d[:, mask] + np.pi) % (2 * np.pi) - np.pi
        return d

    x = np.concatenate([dev(obs), np.asarray(act, np.float64) - goal_act, np.ones((len(obs), 1))], axis=1)
    delta = np.asarray(next_obs, np.float64) - np.asarray(obs, np.float64)
    delta[:, mask] = (delta[:, mask] + np.pi) % (2 * np.pi) - np.pi
    y = dev(obs) + delta
    scale = x.std(0) + 1e-9
    scale[-1] = 1.0
    xs = x / scale
    w = np.linalg.solve(xs.T @ xs + ridge * len(x) * np.eye(x.shape[1]), xs.T @ y) / scale[:, None]
    s_dim = len(goal)
    return w[:s_dim].T, w[s_dim:-1].T


def reward_quadratic(task: Task, goal: np.ndarray, act: np.ndarray, A: np.ndarray, B: np.ndarray):
    """``r*``, gradient norm and the stage cost Hessian ``W`` (``(S + A) x (S + A)``, PSD part) of
    ``-r(s, a, A s + B a)`` around ``(s*, a*, s*)``: the known reward to second order along the
    linearized dynamics."""
    s_dim, a_dim = len(goal), len(act)
    z0 = torch.as_tensor(np.concatenate([goal, act, goal]), dtype=torch.float64)

    def r(z: torch.Tensor) -> torch.Tensor:
        return task.reward(z[:s_dim], z[s_dim : s_dim + a_dim], z[s_dim + a_dim :])

    grad = torch.autograd.functional.jacobian(r, z0).numpy()
    hess = torch.autograd.functional.hessian(r, z0).numpy()
    # z = M [ds; da] with ds' = A ds + B da
    m = np.zeros((2 * s_dim + a_dim, s_dim + a_dim))
    m[: s_dim + a_dim] = np.eye(s_dim + a_dim)
    m[s_dim + a_dim :, :s_dim], m[s_dim + a_dim :, s_dim:] = A, B
    w = -m.T @ hess @ m
    w = (w + w.T) / 2
    eig, vec = np.linalg.eigh(w)
    w = (vec * eig.clip(min=0.0)) @ vec.T  # the reward's convex part only: a max, not a saddle
    return float(r(z0)), float(np.linalg.norm(grad)), w


def discounted_lqr(
    A: np.ndarray, B: np.ndarray, W: np.ndarray, gamma: float, iters: int = 20000, tol: float = 1e-10
) -> tuple[np.ndarray, np.ndarray] | None:
    """``P``, ``K`` of ``min sum gamma^t 1/2 [s; a]' W [s; a]`` (cross terms included) under
    ``s' = A s + B a`` by Riccati iteration; None when it does not converge to a finite P."""
    s_dim = A.shape[0]
    q, n, r = W[:s_dim, :s_dim], W[:s_dim, s_dim:], W[s_dim:, s_dim:]
    p = q.copy()
    for _ in range(iters):
        g = r + gamma * B.T @ p @ B
        h = n + gamma * A.T @ p @ B
        try:
            k = np.linalg.solve(g, h.T)
        except np.linalg.LinAlgError:
            return None
        p_new = q + gamma * A.T @ p @ A - h @ k
        p_new = (p_new + p_new.T) / 2
        if not np.isfinite(p_new).all():
            return None
        if np.abs(p_new - p).max() <= tol * max(1.0, np.abs(p_new).max()):
            return p_new, k
        p = p_new
    return None


def lqr_terminal(
    task: Task, goal: np.ndarray, goal_act: np.ndarray, A: np.ndarray, B: np.ndarray, gamma: float
) -> TerminalValue | None:
    """The terminal value of the module docstring for the linearization ``A``, ``B``
    (:func:`local_linear_fit` or :func:`linearize`), or None (with a log line saying why) when the
    goal is not a reward maximum or the Riccati iteration fails."""
    if not 0 < gamma < 1:
        log.warning("terminal value: needs a discount gamma < 1, got %s: off", gamma)
        return None
    goal = np.asarray(goal, np.float64)
    goal_act = np.asarray(goal_act, np.float64)
    r_star, grad, w = reward_quadratic(task, goal, goal_act, A, B)
    if grad > 1e-4:
        log.warning("terminal value: the reward is not stationary at the goal (|grad| %.2g): off", grad)
        return None
    s_dim = len(goal)
    if np.linalg.eigvalsh(w[s_dim:, s_dim:]).min() <= 1e-9:
        log.warning("terminal value: the reward does not penalize actions at the goal: off")
        return None
    sol = discounted_lqr(A, B, w, gamma)
    if sol is None:
        log.warning("terminal value: discounted Riccati iteration did not converge: off")
        return None
    p, k = sol
    term = TerminalValue(goal=goal, P=p, K=k, goal_act=goal_act, v0=r_star / (1.0 - gamma))
    log.info("terminal value: v0 %.2f, K %s", term.v0, np.round(k, 3).tolist())
    return term


class LinearFeedback:
    """The LQR law ``a* - K (s - s*)`` (angle deviations wrapped) as the planner's prior candidate:
    called on ``M x S`` tensors (value targets roll one per start state), and :meth:`one` on one
    state in Python floats, the planner's per-tick call for its single candidate (between model
    calls, ~10 tensor ops a tick cost 0.9 ms per plan, the float path 0.3; benchmarks/RESULTS.md)."""

    def __init__(self, term: TerminalValue, angle_mask: np.ndarray) -> None:
        self.goal = torch.as_tensor(term.goal, dtype=torch.float32)
        self.gain = torch.as_tensor(term.K, dtype=torch.float32).T  # S x A
        self.act0 = torch.as_tensor(term.goal_act, dtype=torch.float32)
        self.angles = torch.as_tensor(np.asarray(angle_mask, bool))
        self._goal, self._k, self._act0 = term.goal.tolist(), term.K.tolist(), term.goal_act.tolist()
        self._is_angle = np.asarray(angle_mask, bool).tolist()

    def __call__(self, states: torch.Tensor) -> torch.Tensor:
        ds = states - self.goal
        return self.act0 - torch.where(self.angles, wrap_angle(ds), ds) @ self.gain

    def one(self, state: list[float]) -> list[float]:
        """The same law on one state (``S`` floats) -> ``A`` floats."""
        ds = [
            math.pi - (math.pi - (s - g)) % (2 * math.pi) if ang else s - g  # as wrap_angle
            for s, g, ang in zip(state, self._goal, self._is_angle, strict=True)
        ]
        return [
            a0 - sum(k * d for k, d in zip(row, ds, strict=True))
            for a0, row in zip(self._act0, self._k, strict=True)
        ]


def lqr_policy(term: TerminalValue | None, angle_mask: np.ndarray) -> LinearFeedback | None:
    """The LQR law of ``term`` as the planner's prior candidate, or None without a terminal value."""
    return None if term is None else LinearFeedback(term, angle_mask)


def fit_terminal(
    task: Task,
    model: DynamicsModel,
    data: dict[str, np.ndarray],
    act_dim: int,
    angle_mask: np.ndarray,
    slope: bool,
    rows: int,
    gamma: float,
) -> TerminalValue | None:
    """The terminal value for ``task`` from the ``rows`` real transitions of highest reward in
    ``data`` (buffer arrays): linearized by :func:`local_linear_fit` or, with ``slope``, by the
    model's mean slope there (:func:`linearize`). None when the task has no goal or the rows are
    too few for the fit."""
    obs_dim = data["obs"].shape[1]
    goal = task.goal(obs_dim, act_dim)
    if goal is None:
        return None
    top = np.argsort(data["reward"], kind="stable")[-rows:]
    if len(top) < 2 * (obs_dim + act_dim + 1):
        log.info("terminal value: %d transitions are too few for the local fit", len(top))
        return None
    if slope:
        A, B = linearize(
            model, goal[0], goal[1], np.concatenate([data["obs"][top], data["act"][top]], axis=1)
        )
    else:
        A, B = local_linear_fit(
            data["obs"][top], data["act"][top], data["next_obs"][top], goal[0], goal[1], angle_mask
        )
    return lqr_terminal(task, goal[0], goal[1], A, B, gamma)
