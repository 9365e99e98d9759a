"""Planned value targets (fitted value iteration with the planner) on closed-form systems."""

from __future__ import annotations

import numpy as np
import torch

from robot_mbrl.planning.value import ValueConfig, ValueFunction
from robot_mbrl.planning.value_targets import logged_action_plans, planned_value_targets
from tests.test_mpc import Integrator, Quadratic, planner


def test_logged_action_plans_stop_at_episode_ends() -> None:
    act = np.arange(6, dtype=np.float32)[:, None]  # episodes: rows 0-2 (terminated), 3-5 (data end)
    term = np.array([False, False, True, False, False, False])
    got = logged_action_plans(act, term, np.zeros(6, bool), horizon=3)[..., 0]
    np.testing.assert_array_equal(got, [[0, 1, 2], [1, 2, 2], [2, 2, 2], [3, 4, 5], [4, 5, 5], [5, 5, 5]])
    rep = logged_action_plans(act, np.zeros(6, bool), np.zeros(6, bool), horizon=2, repeat=2)[..., 0]
    np.testing.assert_array_equal(rep, [[0, 2], [1, 3], [2, 4], [3, 5], [4, 5], [5, 5]])


def zero_value(heads: int) -> ValueFunction:
    """A fitted-looking V that is exactly 0 (all output weights zero)."""
    vf = ValueFunction(2, config=ValueConfig(heads=heads, gamma=0.9))
    with torch.no_grad():
        for part in (vf.net, vf.target):
            getattr(part, f"w{part.n_layers - 1}").zero_()
            getattr(part, f"b{part.n_layers - 1}").zero_()
    vf.fitted = True
    return vf


def test_targets_improve_on_the_logged_actions_and_never_beat_the_optimum() -> None:
    """x' = x + a, r = -(x')^2, |a| <= 1, V = 0: the optimum from |x| <= 1 is 0 (a = -x, then 0);
    the logged 'do nothing' actions earn -x^2 (1 + g + g^2). The target is the planner's pick: at least
    the logged return, at most the optimum, and most of the way there."""
    plan = planner(Integrator(), Quadratic(), horizon=3, population=64, gamma=0.9, init_std=0.5)
    x = np.linspace(-1, 1, 21, dtype=np.float32)
    obs = np.stack([x, np.zeros_like(x)], 1)
    logged = np.zeros((21, 3, 1), np.float32)
    t = planned_value_targets(plan, zero_value(3), obs, logged, threshold=None, seed=0, chunk=8)
    assert t.shape == (3, 21)
    logged_return = -(x**2) * (1 + 0.9 + 0.81)
    assert bool((t >= torch.as_tensor(logged_return) - 1e-5).all())
    assert bool((t <= 1e-6).all())
    assert float(t.mean()) > 0.2 * float(logged_return.mean()), t  # most of the gap to the optimum closed
    again = planned_value_targets(plan, zero_value(3), obs, logged, threshold=None, seed=0, chunk=8)
    torch.testing.assert_close(again, t, rtol=0, atol=0)  # seeded


def test_targets_truncate_where_the_members_disagree() -> None:
    """Disagreement above the threshold from the second tick on: the imagined return stops after
    one tick, so with V = 0 the target is that tick's reward alone."""
    plan = planner(Integrator(pattern=[0.0, 1.0, 1.0]), Quadratic(), horizon=3, population=16, gamma=0.9)
    obs = np.array([[0.5, 0.0]], np.float32)
    logged = np.zeros((1, 3, 1), np.float32)
    full = planned_value_targets(plan, zero_value(2), obs, logged, threshold=None, seed=1)
    cut = planned_value_targets(plan, zero_value(2), obs, logged, threshold=0.5, seed=1)
    assert float(cut[0, 0]) > float(full[0, 0])  # fewer negative rewards summed
    assert float(cut[0, 0]) <= 0.0
