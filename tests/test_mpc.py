"""MPCPlanner against closed-form answers on small analytic models (no learned model needed)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from robot_mbrl.models.base import Prediction
from robot_mbrl.planning.mpc import MPCPlanner, PlannerConfig
from robot_mbrl.tasks.base import Task


class Integrator:
    """x' = x + a + offset_e on channel 0 (member offsets), channel 1 counts ticks.

    ``disagreement`` of the step that produces tick ``t+1`` is ``rate * (t+1)``, or ``pattern[t]``
    when given; ``nan_above`` makes predictions non-finite where the action exceeds it."""

    def __init__(self, offsets=(0.0, 0.0, 0.0), rate=0.0, nan_above=None, reward_head=False, pattern=None):
        self.offsets = torch.tensor(offsets).view(-1, 1)
        self.num_members, self.elites = len(offsets), tuple(range(len(offsets)))
        self.rate, self.nan_above, self.reward_head = rate, nan_above, reward_head
        self.pattern = None if pattern is None else torch.tensor(pattern)

    def predict(self, obs: torch.Tensor, act: torch.Tensor) -> Prediction:
        assert obs.dim() == 3 and obs.shape[0] == self.num_members  # one batched call, E x N x S
        x = obs[..., 0] + act[..., 0] + self.offsets
        if self.nan_above is not None:
            x = torch.where(act[..., 0] > self.nan_above, float("nan"), x)
        t = obs[..., 1] + 1
        mean = torch.stack([x, t], -1)
        dis = self.rate * t[0] if self.pattern is None else self.pattern[t[0].long() - 1]
        return Prediction(mean, torch.zeros_like(mean), -(x**2) if self.reward_head else None, dis, dis)


class Quadratic(Task):
    """r = -(x')^2, optional constraint x <= limit, optional termination x' > end."""

    def __init__(self, limit=None, end=None, sign=-1.0, const=None):
        self.limit, self.end, self.sign, self.const = limit, end, sign, const

    def reward(self, obs, act, next_obs):
        if self.const is not None:
            return torch.full(next_obs.shape[:-1], self.const)
        x = next_obs[..., 0]
        return self.sign * x**2 if self.sign < 0 else x

    def terminated(self, next_obs):
        if self.end is None:
            return super().terminated(next_obs)
        return next_obs[..., 0] > self.end

    def constraints(self, obs):
        if self.limit is None:
            return super().constraints(obs)
        return (obs[..., 0] - self.limit).unsqueeze(-1)


def planner(model=None, task=None, low=-1.0, high=1.0, value_fn=None, **cfg) -> MPCPlanner:
    cfg.setdefault("population", 128)
    cfg.setdefault("iterations", 4)
    cfg.setdefault("elites", 8)
    cfg.setdefault("init_std", 0.5)
    return MPCPlanner(
        model or Integrator(),
        task or Quadratic(),
        np.array([low]),
        np.array([high]),
        value_fn=value_fn,
        config=PlannerConfig(**cfg),
    )


X0 = np.array([0.7, 0.0])


@pytest.mark.parametrize("method", ["cem", "mppi"])
def test_finds_closed_form_optimal_first_action(method: str) -> None:
    info = planner(method=method).plan(X0)
    assert abs(info.action[0] + 0.7) < 0.05
    assert abs(info.expected_return) < 0.02  # optimum: 0 reward at every step


@pytest.mark.parametrize("method", ["cem", "mppi"])
def test_default_config_converges_with_warm_start(method: str) -> None:
    p = MPCPlanner(
        Integrator(), Quadratic(), np.array([-1.0]), np.array([1.0]), config=PlannerConfig(method=method)
    )
    warm = None
    for _ in range(6):  # replanning from the same state refines the shifted-back plan
        info = p.plan(X0, warm)
        warm = info.actions
    assert abs(info.action[0] + 0.7) < 0.1


def test_return_is_averaged_over_members() -> None:
    offsets = (-0.3, 0.1, 0.5)  # one step: maximize -mean_e (x0 + a + b_e)^2 -> a = -(x0 + mean b)
    info = planner(Integrator(offsets), horizon=1).plan(np.array([0.2, 0.0]))
    assert abs(info.action[0] + (0.2 + 0.1)) < 0.03


@pytest.mark.parametrize("repeat", [1, 2])
def test_bootstrap_term_is_gamma_k_times_value(repeat: int) -> None:
    value = lambda s: torch.full(s.shape[:-1], 3.0)  # noqa: E731
    p = planner(task=Quadratic(const=0.0), value_fn=value, gamma=0.9, action_repeat=repeat)
    info = p.plan(X0)
    expected = 0.9 ** (5 * repeat) * 3.0
    assert math.isclose(info.value_tail, expected, rel_tol=1e-5)
    assert math.isclose(info.expected_return, expected, rel_tol=1e-5)
    assert info.truncated_at is None
    assert info.predicted_obs.shape == (6, 3, 2) and info.disagreement.shape == (5,)
    assert float(info.predicted_obs[-1, 0, 1]) == 5 * repeat  # model stepped k * repeat times


def test_truncation_stops_at_first_over_threshold_step() -> None:
    value = lambda s: torch.full(s.shape[:-1], 10.0)  # noqa: E731
    kw = dict(model=Integrator(rate=0.1), task=Quadratic(const=1.0), value_fn=value, gamma=0.9)
    info = planner(**kw).plan(X0, disagreement_threshold=0.25)  # d = 0.1, 0.2, 0.3 > 0.25 ...
    assert info.truncated_at == 2
    assert math.isclose(info.expected_return, 1 + 0.9 + 0.9**2 * 10.0, rel_tol=1e-5)
    assert math.isclose(info.value_tail, 0.9**2 * 10.0, rel_tol=1e-5)
    torch.testing.assert_close(info.disagreement, torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5]))
    full = 1 + 0.9 + 0.9**2 + 0.9**3 + 0.9**4 + 0.9**5 * 10.0
    for p, thr in ((planner(**kw, truncate_on_disagreement=False), 0.25), (planner(**kw), None)):
        info = p.plan(X0, disagreement_threshold=thr)
        assert info.truncated_at is None and math.isclose(info.expected_return, full, rel_tol=1e-5)
    info = planner(**kw).plan(X0, disagreement_threshold=0.05)  # first step already over
    assert info.truncated_at == 0 and math.isclose(info.expected_return, 10.0, rel_tol=1e-5)
    kw["model"] = Integrator(pattern=[0.1, 0.3, 0.1, 0.1, 0.1])  # trust never comes back
    info = planner(**kw).plan(X0, disagreement_threshold=0.25)
    assert info.truncated_at == 1 and math.isclose(info.expected_return, 1 + 0.9 * 10.0, rel_tol=1e-5)


def test_shift_drops_first_and_fills() -> None:
    seq = torch.tensor([[0.1], [0.2], [0.3]])
    torch.testing.assert_close(planner().shift(seq), torch.tensor([[0.2], [0.3], [0.3]]))
    torch.testing.assert_close(planner(shift_fill="zero").shift(seq), torch.tensor([[0.2], [0.3], [0.0]]))
    clipped = planner(low=0.25, high=1.0, shift_fill="zero").shift(seq)
    torch.testing.assert_close(clipped, torch.tensor([[0.2], [0.3], [0.25]]))


def test_warm_start_is_the_first_candidate() -> None:
    warm = torch.tensor([[-0.7], [0.0], [0.0], [0.0], [0.0]])  # exactly optimal from X0
    p = planner(population=4, iterations=1, elites=1)
    info = p.plan(X0, warm)
    torch.testing.assert_close(info.actions, warm, atol=0, rtol=0)
    nan_warm = warm.clone()
    nan_warm[1] = float("nan")
    assert torch.isfinite(p.plan(X0, nan_warm).actions).all()


def test_read_only_observation_plans_without_warning() -> None:
    """Observations may come straight from a memory-mapped buffer chunk (read-only)."""
    ro = np.array(X0, dtype=np.float32)
    ro.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        info = planner(seed=3).plan(ro)
    torch.testing.assert_close(info.actions, planner(seed=3).plan(np.array(X0)).actions, atol=0, rtol=0)


@pytest.mark.parametrize("method", ["cem", "mppi"])
def test_same_seed_same_actions(method: str) -> None:
    runs = []
    for seed in (5, 5, 6):
        p = planner(method=method, seed=seed, population=16, iterations=2)
        warm, acts = None, []
        for _ in range(3):
            info = p.plan(X0, warm)
            warm = p.shift(info.actions)
            acts.append(info.actions)
        runs.append(torch.stack(acts))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("method", ["cem", "mppi"])
def test_action_bounds_respected(method: str) -> None:
    info = planner(method=method, low=-0.2, high=0.3).plan(X0)
    assert (info.actions >= -0.2).all() and (info.actions <= 0.3).all()
    assert abs(info.action[0] + 0.2) < 1e-3  # the bound is the constrained optimum


def test_constraint_penalty_steers_away_from_constrained_region() -> None:
    task = Quadratic(limit=0.5, sign=1.0)  # reward x' (go right) but constraint x <= 0.5
    free = planner(task=task, constraint_penalty=0.0).plan(np.zeros(2))
    assert free.worst_margin > 0.5  # without a penalty it runs through the limit
    safe = planner(task=task, constraint_penalty=10.0).plan(np.zeros(2))
    assert safe.worst_margin <= 0.0
    assert safe.constraint_margins.shape == (5, 3, 1)
    assert float(safe.predicted_obs[1:, :, 0].max()) > 0.4  # still goes as far right as allowed


def test_termination_is_avoided() -> None:
    task = Quadratic(end=0.5, const=1.0)  # alive reward 1 per step, episode ends past x = 0.5
    info = planner(task=task, termination_penalty=10.0).plan(np.array([0.4, 0.0]))
    assert float(info.predicted_obs[1:, :, 0].max()) <= 0.5
    assert math.isclose(info.expected_return, sum(0.99**t for t in range(5)), rel_tol=1e-5)
    value = lambda s: torch.full(s.shape[:-1], 10.0)  # noqa: E731
    doomed = planner(task=task, low=0.2, value_fn=value).plan(np.array([0.4, 0.0]))  # ends at step 0
    assert math.isclose(doomed.expected_return, 1.0, rel_tol=1e-6) and doomed.value_tail == 0.0


def test_learned_reward_source() -> None:
    p = MPCPlanner(
        Integrator(reward_head=True),
        Quadratic(sign=1.0),
        np.array([-1.0]),
        np.array([1.0]),
        config=PlannerConfig(population=128, iterations=4),
        reward_source="model",
    )
    assert abs(p.plan(X0).action[0] + 0.7) < 0.05  # task reward would push right, model's left
    with pytest.raises(ValueError):
        MPCPlanner(
            Integrator(),
            Quadratic(),
            np.array([-1.0]),
            np.array([1.0]),
            config=PlannerConfig(),
            reward_source="model",
        ).plan(X0)


def test_non_finite_model_output_is_flagged_not_raised() -> None:
    partial = planner(Integrator(nan_above=0.0)).plan(np.array([-0.7, 0.0]))  # optimum +0.7 is NaN
    assert np.isfinite(partial.expected_return) and partial.action[0] <= 0.0
    broken = planner().plan(np.array([float("nan"), 0.0]))
    assert not np.isfinite(broken.expected_return)
    assert not torch.isfinite(broken.predicted_obs).all()
    assert broken.solve_time_s > 0


def test_plan_info_is_complete() -> None:
    info = planner(task=Quadratic(limit=2.0)).plan(X0, disagreement_threshold=1.0)
    assert info.action.shape == (1,) and info.actions.shape == (5, 1)
    torch.testing.assert_close(info.predicted_obs[0], torch.tensor(X0, dtype=torch.float32).expand(3, 2))
    assert info.constraint_margins.shape == (5, 3, 1) and info.worst_margin < 0
    assert 0 < info.solve_time_s < 1.0 and info.worst_disagreement == 0.0
    assert np.allclose(info.action, info.actions[0].numpy())


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        MPCPlanner(
            Integrator(),
            Quadratic(),
            np.array([-1.0]),
            np.array([1.0]),
            config=PlannerConfig(population=4, elites=8),
        )


@pytest.mark.parametrize("rho", [0.0, 0.6])
def test_noise_correlation_gives_ar1_candidates_with_unchanged_marginal_std(rho: float) -> None:
    """Candidates deviate from the sampling mean by AR(1) noise along the horizon: correlation rho
    between consecutive planned steps (rho^2 two steps apart), the configured std at every step."""
    p = planner(low=-100.0, high=100.0, population=20_000, iterations=1, elites=1, init_std=0.1,
                noise_correlation=rho)  # fmt: skip
    seen = []
    rollout = p._rollout
    p._rollout = lambda s0, cand, thr, **kw: seen.append(cand.clone()) or rollout(s0, cand, thr, **kw)
    p.plan(X0)
    dev = seen[0][:, 1:, 0]  # k x N (candidate 0 is the mean itself); the mean is the bound centre 0
    std = dev.std(1)
    torch.testing.assert_close(std, torch.full_like(std, 10.0), rtol=0.03, atol=0)  # 0.1 x half range
    corr = torch.corrcoef(dev)
    lag1, lag2 = torch.diagonal(corr, 1), torch.diagonal(corr, 2)
    torch.testing.assert_close(lag1, torch.full_like(lag1, rho), rtol=0, atol=0.03)
    torch.testing.assert_close(lag2, torch.full_like(lag2, rho**2), rtol=0, atol=0.03)


class Unsure(Integrator):
    """Integrator whose members disagree more the farther x is from 0 (data only near 0)."""

    def predict(self, obs: torch.Tensor, act: torch.Tensor) -> Prediction:
        pred = super().predict(obs, act)
        dis = pred.mean[0, :, 0].abs()
        return Prediction(pred.mean, pred.var, pred.reward, dis, dis)


def test_exploration_bonus_seeks_disagreement_within_the_trusted_horizon() -> None:
    """r = -(x')^2 pulls to 0; a bonus per tick of disagreement / threshold (<= 1 per tick) pushes out,
    but never past the threshold, where the return would stop being trusted."""
    x0 = np.array([0.0, 0.0])
    calm = planner(Unsure(), Quadratic(), horizon=3, seed=0).plan(x0, disagreement_threshold=1.5)
    eager = planner(Unsure(), Quadratic(), horizon=3, seed=0, exploration_bonus=5.0)
    info = eager.plan(x0, disagreement_threshold=1.5)
    assert abs(calm.action[0]) < 0.15
    assert abs(info.action[0]) > 0.5
    assert float(info.disagreement.max()) <= 1.5 + 1e-6  # stays where the return is trusted


def test_disturbance_is_added_to_every_imagined_tick() -> None:
    """Offset-free MPC: x' = x + a + d with d = 0.3 known to the planner; from x = 0.7 the optimum
    is a = -(0.7 + 0.3) first and a = -0.3 after (hold against the drift), each step's prediction
    carries d."""
    p = planner(horizon=3)
    p.disturbance = torch.tensor([0.3, 0.0])
    info = p.plan(X0)
    assert abs(info.action[0] + 1.0) < 0.05
    assert bool((info.actions[1:, 0] + 0.3).abs().max() < 0.08)
    assert abs(info.expected_return) < 0.03
    x = info.predicted_obs[:, 0, 0]
    torch.testing.assert_close(x[1:] - x[:-1], info.actions[:, 0] + 0.3, rtol=0, atol=1e-5)
    p.disturbance = None
    assert abs(p.plan(X0).action[0] + 0.7) < 0.05


@pytest.mark.parametrize("repeat", [1, 2, 3])
def test_the_warm_start_moves_on_one_planned_step_every_action_repeat_ticks(repeat: int) -> None:
    """A planned step lasts ``action_repeat`` ticks: the warm start dropped a whole step every tick,
    running ``repeat - 1`` ticks ahead of the plan per tick. Now one step per ``repeat`` ticks."""
    from types import SimpleNamespace

    from robot_mbrl.agents.gated import GatedMPC

    planner = SimpleNamespace(cfg=SimpleNamespace(action_repeat=repeat), shift=lambda a: a[1:])
    ctl = SimpleNamespace(planner=planner, _ticks_into_step=0)
    plan = torch.arange(6.0).view(6, 1)
    lengths = [len(GatedMPC._warm_start(ctl, plan)) for _ in range(2 * repeat)]
    assert lengths == ([6] * (repeat - 1) + [5]) * 2
