"""LQR terminal value: linearization, reward expansion, discounted Riccati, and its use by V and
the planner, against closed-form answers on linear systems with quadratic rewards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robot_mbrl.models.base import Prediction
from robot_mbrl.planning.mpc import MPCPlanner, PlannerConfig
from robot_mbrl.planning.terminal import (
    TerminalValue,
    discounted_lqr,
    linearize,
    local_linear_fit,
    lqr_policy,
    lqr_terminal,
    reward_quadratic,
)
from robot_mbrl.planning.value import ValueConfig, ValueFunction
from robot_mbrl.tasks.base import Task
from robot_mbrl.tasks.cartpole import CartpoleTask

# a discretized double integrator (position, velocity), dt = 0.1
DT = 0.1
A_TRUE = np.array([[1.0, DT], [0.0, 1.0]])
B_TRUE = np.array([[0.5 * DT**2], [DT]])


class LinearModel:
    """``s' = A s + B a`` for every member (an exact model of a linear robot)."""

    num_members = 3
    angle_mask = torch.zeros(2, dtype=torch.bool)

    def __init__(self, a=A_TRUE, b=B_TRUE):
        self.a = torch.as_tensor(a, dtype=torch.float32)
        self.b = torch.as_tensor(b, dtype=torch.float32)

    def predict(self, obs: torch.Tensor, act: torch.Tensor) -> Prediction:
        if obs.dim() == 2:
            obs, act = obs.expand(self.num_members, -1, -1), act.expand(self.num_members, -1, -1)
        mean = obs @ self.a.T + act @ self.b.T
        dis = torch.zeros(mean.shape[1])
        return Prediction(mean, torch.zeros_like(mean), None, dis, dis)


class QuadraticReward(Task):
    """r = 1 - 1/2 s'^T Q s' - 1/2 a^T R a on the next state (a reward maximum at the origin)."""

    def __init__(self, q=(4.0, 0.5), r=0.2, goal=True):
        self.q, self.r, self.has_goal = torch.tensor(q, dtype=torch.float64), r, goal

    def reward(self, obs, act, next_obs):
        q = self.q.to(next_obs.dtype)
        return 1.0 - 0.5 * (q * next_obs**2).sum(-1) - 0.5 * self.r * (act**2).sum(-1)

    def goal(self, obs_dim, act_dim):
        return (np.zeros(obs_dim), np.zeros(act_dim)) if self.has_goal else None


def test_linearize_recovers_a_linear_model() -> None:
    a, b = linearize(LinearModel(), np.array([0.3, -0.2]), np.array([0.1]))
    np.testing.assert_allclose(a, A_TRUE, atol=1e-4)
    np.testing.assert_allclose(b, B_TRUE, atol=1e-4)
    anchors = np.array([[0.3, -0.2, 0.1], [-1.0, 0.5, -0.4]])
    a, b = linearize(LinearModel(), np.zeros(2), np.zeros(1), anchors)
    np.testing.assert_allclose(a, A_TRUE, atol=1e-4)


def test_local_linear_fit_recovers_dynamics_across_the_angle_seam() -> None:
    """Channel 0 is an angle near a goal of pi: states on both sides of the +-pi seam, noisy
    transitions of a known linear system around (pi, 0) with an offset; the fit recovers A and B."""
    rng = np.random.default_rng(0)
    goal, n = np.array([np.pi, 0.0]), 400
    dev = rng.normal(0.0, 0.2, (n, 2))
    act = rng.uniform(-1.0, 1.0, (n, 1))
    nxt_dev = dev @ A_TRUE.T + act @ B_TRUE.T + 0.01 + rng.normal(0.0, 1e-3, (n, 2))
    wrap = lambda x: (x + np.pi) % (2 * np.pi) - np.pi  # noqa: E731
    obs = np.c_[wrap(goal[0] + dev[:, 0]), dev[:, 1]]
    nxt = np.c_[wrap(goal[0] + nxt_dev[:, 0]), nxt_dev[:, 1]]
    a, b = local_linear_fit(obs, act, nxt, goal, np.zeros(1), np.array([True, False]))
    np.testing.assert_allclose(a, A_TRUE, atol=5e-3)
    np.testing.assert_allclose(b, B_TRUE, atol=5e-3)


def test_reward_quadratic_of_the_cartpole_reward() -> None:
    """Second-order expansion at upright, centred, at rest: 1 - x^2 6.25 - theta^2 / 4 - u^2 / 5 -
    thetadot^2 / 100 (with A = I, B = 0 the next state is the state)."""
    task = CartpoleTask("swingup")
    r0, grad, w = reward_quadratic(task, np.zeros(4), np.zeros(1), np.eye(4), np.zeros((4, 1)))
    assert r0 == pytest.approx(1.0)
    assert grad < 1e-9
    np.testing.assert_allclose(np.diag(w), [12.5, 0.5, 0.0, 0.02, 0.4], atol=1e-6)
    np.testing.assert_allclose(w - np.diag(np.diag(w)), 0.0, atol=1e-9)


def test_discounted_riccati_solves_its_equation_and_stabilizes() -> None:
    gamma = 0.95
    w = np.diag([4.0, 0.5, 0.2])
    p, k = discounted_lqr(A_TRUE, B_TRUE, w, gamma)
    q, r = w[:2, :2], w[2:, 2:]
    g = r + gamma * B_TRUE.T @ p @ B_TRUE
    rhs = (
        q
        + gamma * A_TRUE.T @ p @ A_TRUE
        - gamma**2 * A_TRUE.T @ p @ B_TRUE @ np.linalg.solve(g, B_TRUE.T @ p @ A_TRUE)
    )
    np.testing.assert_allclose(p, rhs, rtol=1e-8, atol=1e-8)
    assert np.abs(np.linalg.eigvals(A_TRUE - B_TRUE @ k)).max() < 1.0


def test_terminal_value_is_the_discounted_return_of_the_lqr_loop() -> None:
    """Linear model, quadratic reward: V_T(s0) equals the return of a = -K s summed to convergence,
    and no other linear gain does better (the LQR is optimal)."""
    gamma, task = 0.95, QuadraticReward()
    term = lqr_terminal(task, np.zeros(2), np.zeros(1), A_TRUE, B_TRUE, gamma)
    assert term is not None and term.v0 == pytest.approx(1.0 / (1.0 - gamma))

    def ret(gain: np.ndarray, s0: np.ndarray) -> float:
        s, total = s0.copy(), 0.0
        for t in range(2000):
            a = -gain @ s
            s_next = A_TRUE @ s + B_TRUE @ a
            r = task.reward(torch.as_tensor(s), torch.as_tensor(a), torch.as_tensor(s_next))
            total += gamma**t * float(r)
            s = s_next
        return total

    s0 = np.array([0.4, -0.3])
    v_t = term.v0 - 0.5 * s0 @ term.P @ s0
    assert ret(term.K, s0) == pytest.approx(v_t, rel=1e-6)
    for dk in ([0.2, 0.0], [0.0, 0.2], [-0.2, 0.1]):
        assert ret(term.K + np.array([dk]), s0) < v_t


def test_terminal_value_is_off_where_the_goal_is_no_reward_maximum() -> None:
    class Tilted(QuadraticReward):
        def reward(self, obs, act, next_obs):
            return super().reward(obs, act, next_obs) + 0.5 * next_obs[..., 0]

    assert lqr_terminal(Tilted(), np.zeros(2), np.zeros(1), A_TRUE, B_TRUE, 0.95) is None
    assert lqr_terminal(QuadraticReward(), np.zeros(2), np.zeros(1), A_TRUE, B_TRUE, 1.0) is None


def test_value_function_takes_the_higher_of_its_heads_and_the_terminal_value() -> None:
    term = lqr_terminal(QuadraticReward(), np.zeros(2), np.zeros(1), A_TRUE, B_TRUE, 0.95)
    vf = ValueFunction(2, config=ValueConfig(heads=3, gamma=0.95))
    near, far = torch.tensor([0.05, 0.0]), torch.tensor([3.0, 2.0])
    before_near, before_far = vf.head_values(near), vf.head_values(far)
    vf.set_terminal(term)
    v_t = term.v0 - 0.5 * near.double().numpy() @ term.P @ near.double().numpy()
    torch.testing.assert_close(vf.head_values(near), torch.full((3,), float(v_t)), rtol=1e-5, atol=1e-5)
    assert float(vf(near).detach()) == pytest.approx(v_t, rel=1e-5)  # heads agree there: no pessimism penalty
    torch.testing.assert_close(vf.head_values(far), before_far)  # V_T far below: the heads decide
    assert float(vf.target_value(near).min()) == pytest.approx(v_t, rel=1e-5)
    assert (before_near < v_t).all()
    # it travels with the state dict; a state dict from before the terminal value loads with it off
    other = ValueFunction(2, config=ValueConfig(heads=3, gamma=0.95))
    other.load_state_dict(vf.state_dict())
    assert other.has_terminal
    old = {k: v for k, v in vf.state_dict().items() if not k.startswith("term_")}
    other.load_state_dict(old)
    assert not other.has_terminal
    vf.set_terminal(None)
    torch.testing.assert_close(vf.head_values(near), before_near)


def test_terminal_value_measures_angle_deviations_the_short_way_round() -> None:
    """V_T of a pole at goal + 2 pi + 0.05 is V_T at goal + 0.05 (with and without gradients), and
    the other channels are never wrapped (a velocity of 4 is far from the goal, not 4 - 2 pi)."""
    term = lqr_terminal(QuadraticReward(), np.zeros(2), np.zeros(1), A_TRUE, B_TRUE, 0.95)
    vf = ValueFunction(2, np.array([True, False]), config=ValueConfig(heads=3, gamma=0.95))
    vf.set_terminal(term)
    near, wrapped = torch.tensor([0.05, 0.0]), torch.tensor([0.05 + 2 * np.pi, 0.0])
    v_t = term.v0 - 0.5 * near.double().numpy() @ term.P @ near.double().numpy()
    fast = np.array([0.0, 4.0])  # velocity 4: V_T far below the heads; wrapped to 4 - 2 pi, above
    vf_heads = ValueFunction(2, np.array([True, False]), config=ValueConfig(heads=3, gamma=0.95))
    heads_fast = vf_heads.head_values(torch.as_tensor(fast, dtype=torch.float32)).detach()
    d = fast - [0, 2 * np.pi]
    assert term.v0 - 0.5 * d @ term.P @ d > float(heads_fast.max())
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            got = vf.head_values(wrapped).detach()
            torch.testing.assert_close(got, torch.full((3,), float(v_t)), rtol=1e-5, atol=1e-4)
            fast_t = torch.as_tensor(fast, dtype=torch.float32)
            torch.testing.assert_close(vf.head_values(fast_t).detach(), vf_heads.head_values(fast_t).detach())


def test_prior_candidate_follows_the_feedback_law_through_the_model() -> None:
    """Candidate 1 applies a = clip(-K s) on its own predicted state each tick; on a double integrator
    starting away from 0 it is the best of a tiny random population."""
    term = lqr_terminal(QuadraticReward(), np.zeros(2), np.zeros(1), A_TRUE, B_TRUE, 0.95)
    gain = torch.as_tensor(term.K, dtype=torch.float32).T

    def prior(states: torch.Tensor) -> torch.Tensor:
        return -states @ gain

    cfg = PlannerConfig(horizon=5, population=4, iterations=1, elites=1, gamma=0.95, seed=3)
    p = MPCPlanner(
        LinearModel(), QuadraticReward(), np.array([-1.0]), np.array([1.0]), config=cfg, prior=prior
    )
    s0 = np.array([0.8, 0.0])
    info = p.plan(s0)
    s, expected = torch.tensor(s0, dtype=torch.float32), []
    for _ in range(5):
        a = (-s @ gain).clamp(-1.0, 1.0)
        expected.append(a)
        s = s @ LinearModel().a.T + a @ LinearModel().b.T
    torch.testing.assert_close(info.actions, torch.stack(expected), rtol=1e-5, atol=1e-6)
    no_prior = MPCPlanner(LinearModel(), QuadraticReward(), np.array([-1.0]), np.array([1.0]), config=cfg)
    assert no_prior.plan(s0).expected_return < info.expected_return


def test_cartpole_goal_is_upright_at_rest() -> None:
    s, a = CartpoleTask("balance").goal(5, 1)
    np.testing.assert_array_equal(s, np.zeros(5))
    np.testing.assert_array_equal(a, np.zeros(1))
    assert QuadraticReward(goal=False).goal(2, 1) is None


def test_prior_slots_of_batched_start_states_follow_their_own_states() -> None:
    """Value targets roll P candidates from each of B start states; slot 1 of every block follows
    the prior from its own start, the other candidates keep their sampled actions."""
    cfg = PlannerConfig(horizon=3, population=4, iterations=1, elites=1, gamma=0.95)
    p = MPCPlanner(
        LinearModel(), QuadraticReward(), np.array([-1.0]), np.array([1.0]), config=cfg,
        prior=lambda s: -0.5 * s[:, :1],
    )  # fmt: skip
    starts = torch.tensor([[0.4, 0.0], [-0.8, 0.0]]).repeat_interleave(4, 0)  # B=2 x P=4
    cand = torch.full((3, 8, 1), 0.3)
    p._rollout(starts, cand, None, prior_slots=torch.arange(1, 8, 4))
    torch.testing.assert_close(cand[0, [1, 5], 0], torch.tensor([-0.2, 0.4]))
    assert bool((cand[:, [0, 2, 3, 4, 6, 7]] == 0.3).all())
    assert float(cand[1, 1, 0]) != -0.2  # the state moved: the prior acted on it again


def test_lqr_policy_wraps_angle_deviations_only() -> None:
    """The prior candidate's law a* - K (s - s*) measures angle deviations the short way round
    (a pole at goal + 2 pi + 0.1 acts as at goal + 0.1), and never wraps the other channels (a
    velocity of 4 rad/s is not 4 - 2 pi)."""
    term = TerminalValue(
        goal=np.array([0.0, 0.3, 0.0]), P=np.eye(3), K=np.array([[1.0, 2.0, 3.0]]),
        goal_act=np.array([0.5]), v0=1.0,
    )  # fmt: skip
    policy = lqr_policy(term, np.array([False, True, False]))
    states = np.array([[0.1, 0.4, 4.0], [0.1, 0.4 + 2 * np.pi, 4.0], [0.0, 0.3 - 2 * np.pi - 0.1, 0.0]])
    expected = 0.5 - np.array([0.1 + 2 * 0.1 + 3 * 4.0, 0.1 + 2 * 0.1 + 3 * 4.0, 2 * -0.1])
    out = policy(torch.as_tensor(states, dtype=torch.float32))[:, 0]
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)
    assert lqr_policy(None, np.array([False, True, False])) is None


def test_single_prior_candidate_float_path_equals_the_tensor_path() -> None:
    """plan() feeds its one prior candidate through LinearFeedback.one (Python floats) instead of the
    tensor call: the same actions on the members' mean state, angle deviation wrapped, clipped."""

    class SpreadModel(LinearModel):  # members differ: the law acts on their mean
        def predict(self, obs: torch.Tensor, act: torch.Tensor) -> Prediction:
            p = super().predict(obs, act)
            mean = p.mean + torch.tensor([-0.05, 0.0, 0.1]).view(3, 1, 1)
            return Prediction(mean, p.var, None, p.disagreement, p.max_pairwise)

    term = TerminalValue(
        goal=np.array([0.0, 0.2]), P=np.eye(2), K=np.array([[0.7, 0.4]]), goal_act=np.array([0.1]), v0=1.0
    )
    law = lqr_policy(term, np.array([False, True]))
    cfg = PlannerConfig(horizon=6, population=4, iterations=1, elites=1, gamma=0.95)
    outs = []
    for prior in (law, lambda s: law(s)):  # the lambda has no float path
        p = MPCPlanner(
            SpreadModel(), QuadraticReward(), np.array([-1.0]), np.array([1.0]), config=cfg, prior=prior
        )
        cand = torch.full((6, 4, 1), 0.3)
        p._rollout(torch.tensor([0.3, 0.2 + 2 * np.pi - 0.5]), cand, None, prior_slots=torch.tensor([1]))
        outs.append(cand)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-5)
    assert bool((outs[0][:, [0, 2, 3]] == 0.3).all())
    assert len(set(outs[0][:, 1, 0].tolist())) > 2  # the law acted on a moving state, clipped or not
