"""Calibration, residual CUSUM, input OOD, val-loss monitor and the combined ShiftMonitor."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from robot_mbrl.hal.robot import Channel, Observation, RobotSpec
from robot_mbrl.models.base import Prediction
from robot_mbrl.safety.calibration import (
    calibrate_threshold,
    fit_variance_model,
    plan_disagreement_scores,
    residual_calibration,
)
from robot_mbrl.safety.cusum import VarianceCusum
from robot_mbrl.safety.fallback import FallbackConfig, make_fallback
from robot_mbrl.safety.gate import GateConfig, SafetyGate
from robot_mbrl.safety.monitors import (
    CusumMonitor,
    OODMonitor,
    ShiftConfig,
    ShiftMonitor,
    ValLossMonitor,
    siegmund_arl,
)

SPEC = RobotSpec(
    obs=(
        Channel("x_m", "m", -1.0, 1.0),
        Channel("theta_rad", "rad", -math.pi, math.pi, angle=True),
        Channel("xdot_m_s", "m/s", -5.0, 5.0),
    ),
    act=(Channel("u", "1", -1.0, 1.0),),
    control_hz=50.0,
)


# -- calibration ---------------------------------------------------------------------------------
def test_calibrated_threshold_hits_the_target_false_alarm_rate():
    rng = np.random.default_rng(0)
    # r = ceil(101 * 0.9) = 91 of 100: expected rate 1 - 91/101 = 0.099 (the uncorrected rank
    # ceil(100 * 0.9) = 90 would give 0.109, above the target)
    alpha, n = 0.1, 100
    rates = []
    for _ in range(400):
        thr = calibrate_threshold(rng.standard_normal(n), alpha)
        rates.append(0.5 * math.erfc(thr / math.sqrt(2)))  # P(N(0,1) > thr)
    assert np.mean(rates) == pytest.approx(1 - 91 / 101, abs=0.004)
    # a large calibration set: every single threshold is close to the target
    thr = calibrate_threshold(rng.exponential(size=20_000), 0.01)
    fresh = rng.exponential(size=200_000)
    assert np.mean(fresh > thr) == pytest.approx(0.01, abs=0.0015)


def test_calibration_refuses_to_fail_open():
    with pytest.raises(ValueError, match="at least 999"):
        calibrate_threshold(np.arange(500.0), 1e-3)
    with pytest.raises(ValueError, match="finite"):
        calibrate_threshold(np.array([1.0] * 50 + [np.nan]), 0.1)


class ShiftedMembers:
    """E members with x' = x + b_e * a (S = 2, second dim copies the first): disagreement is the
    std over members of the means, averaged over dims, so after t equal actions it is t*|a|*std(b)."""

    def __init__(self, b=(0.9, 1.0, 1.1, 1.2)):
        self.b = torch.tensor(b)
        self.num_members = len(b)
        self.elites = tuple(range(len(b)))
        self.calls = 0

    def predict(self, obs: torch.Tensor, act: torch.Tensor) -> Prediction:
        self.calls += 1
        assert obs.shape[0] == self.num_members and obs.ndim == 3  # each member its own trajectory
        mean = obs + self.b[:, None, None] * act[..., :1]
        n = obs.shape[1]
        return Prediction(
            mean=mean,
            var=torch.ones_like(mean),
            reward=None,
            disagreement=mean.std(dim=0, unbiased=False).mean(-1),
            max_pairwise=torch.zeros(n),
        )


def test_plan_disagreement_scores_is_the_worst_step_of_each_member_rollout():
    model = ShiftedMembers()
    k, n = 5, 7
    rng = np.random.default_rng(0)
    obs0 = rng.standard_normal((n, 2))
    amp = rng.uniform(0.1, 1.0, n)
    actions = np.repeat(amp[:, None, None], k, axis=1)  # constant action per segment
    actions[:, k - 1] *= -1  # the last step reverses: the worst step is k - 1, not k
    scores = plan_disagreement_scores(model, obs0, actions, batch_size=3)
    expected = (k - 1) * amp * float(model.b.std(unbiased=False))
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    assert model.calls == k * 3  # batched: ceil(7 / 3) chunks of k steps
    np.testing.assert_allclose(plan_disagreement_scores(model, obs0, actions), scores, rtol=1e-6)


# -- CUSUM ---------------------------------------------------------------------------------------
def test_siegmund_matches_the_textbook_cusum_table():
    # k = 0.5, h = 5 (Montgomery, SQC, two-sided ARL0 ~ 465, ARL1 ~ 10.4 for a 1-sigma shift)
    assert siegmund_arl(5.0, 0.5, 0.0) / 2 == pytest.approx(465, rel=0.02)
    assert siegmund_arl(5.0, 0.5, 1.0) == pytest.approx(10.4, rel=0.03)


def run_lengths(cusum: CusumMonitor, z: np.ndarray) -> list[int]:
    """Ticks to each alarm, restarting the statistic after every alarm (the ARL's definition)."""
    lengths, since = [], 0
    for zt in z:
        since += 1
        if cusum.update(zt):
            lengths.append(since)
            cusum.reset()
            since = 0
    return lengths


def test_cusum_in_control_false_alarms_match_arl0():
    rng = np.random.default_rng(1)
    quiet = CusumMonitor(1, arl0_ticks=10_000)
    assert len(run_lengths(quiet, rng.standard_normal((20_000, 1)))) <= 8  # Poisson(2): P(>8) < 3e-4
    cusum = CusumMonitor(1, arl0_ticks=500)
    lengths = run_lengths(cusum, rng.standard_normal((60_000, 1)))
    assert len(lengths) > 60 and np.mean(lengths) == pytest.approx(500, rel=0.25)


@pytest.mark.parametrize("dims,aggregate", [(1, "max"), (4, "max"), (4, "mean")])
def test_cusum_detects_a_unit_shift_within_its_promised_delay(dims, aggregate):
    rng = np.random.default_rng(2)
    cusum = CusumMonitor(dims, arl0_ticks=10_000, shift_sigma=1.0, aggregate=aggregate)
    delays = []
    for _ in range(150):
        cusum.reset()
        z = rng.standard_normal((2000, dims))
        z[:, 0] += 1.0  # a unit shift in one residual dimension
        delays.append(next(t + 1 for t, zt in enumerate(z) if cusum.update(zt)))
    assert np.mean(delays) == pytest.approx(cusum.expected_delay(1.0), rel=0.2)
    assert cusum.expected_delay(0.0) == pytest.approx(10_000, rel=1e-6)


def test_cusum_one_glitch_does_not_alarm_and_the_alarm_clears_after_the_shift():
    cusum = CusumMonitor(1, arl0_ticks=10_000, z_clip=6.0, cap_factor=2.0)
    assert not cusum.update(np.array([1e6]))  # clipped to 6 < h ~ 8
    cusum.reset()
    for _ in range(200):
        cusum.update(np.array([3.0]))
    assert cusum.alarm and cusum.score == pytest.approx(2 * cusum.threshold)  # capped
    ticks = next(t for t in range(1, 100) if not cusum.update(np.array([0.0])))
    assert ticks <= cusum.threshold / cusum.k + 1


def mean_run_length(detector, draw, runs: int = 60) -> float:
    """Mean ticks to the first alarm of ``detector`` fed ``draw()`` each tick, over ``runs`` restarts."""
    lengths = []
    for _ in range(runs):
        detector.reset()
        lengths.append(next(t for t in range(1, 100_000) if detector.update(draw())))
    return float(np.mean(lengths))


def test_variance_cusum_quiet_in_control_detects_a_variance_increase_and_bounds_a_glitch():
    """Run length in control >= the Wald bound (checked at a small ARL0 so the test sees alarms at
    all), per dimension and summed over dimensions; a x3 variance increase of a zero-mean residual
    in one of 3 dims alarms within ~2x Wald's expected delay; one glitch is bounded by the clip."""
    rng = np.random.default_rng(8)
    var = VarianceCusum(3, arl0_ticks=200, ratio=2.0, aggregate="max")
    assert var.h == pytest.approx(math.log(600))
    assert mean_run_length(var, lambda: rng.standard_normal(3)) >= 200
    var = VarianceCusum(3, arl0_ticks=10_000, ratio=2.0, aggregate="max")
    delays = []
    for _ in range(40):
        var.reset()
        z = lambda: rng.standard_normal(3) * np.array([1.0, np.sqrt(3.0), 1.0])  # noqa: E731
        delays.append(next(t for t in range(1, 10_000) if var.update(z())))
    assert np.mean(delays) < 2 * var.expected_delay(3.0) < 60
    var.reset()
    assert not var.update(np.array([1e9, 0.0, 0.0]))  # one glitch: clipped to 0.25 * 36 < h ~ 10.3
    assert var.expected_delay(1.0) == math.inf  # no drift without a variance increase
    # summed over channels: quiet in control, and a change spread over all channels is found sooner
    total = VarianceCusum(3, arl0_ticks=200, ratio=2.0, aggregate="sum")
    assert total.h == pytest.approx(math.log(200))
    assert mean_run_length(total, lambda: rng.standard_normal(3)) >= 200
    spread = np.full(3, 2.0)
    per_dim = VarianceCusum(3, arl0_ticks=10_000, ratio=2.0, aggregate="max").expected_delay(spread)
    assert VarianceCusum(3, arl0_ticks=10_000, ratio=2.0).expected_delay(spread) < per_dim / 2


# -- OOD and val loss ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["knn", "mahalanobis"])
def test_ood_threshold_rate_and_separation(method):
    rng = np.random.default_rng(3)
    cov = np.array([[1.0, 0.8, 0.0], [0.8, 1.0, 0.0], [0.0, 0.0, 4.0]])
    draw = lambda n: rng.multivariate_normal(np.zeros(3), cov, size=n)  # noqa: E731
    ood = OODMonitor(method, k=5, max_reference=3000, seed=0)
    thr = ood.fit(draw(5000), draw(2000), false_alarm_rate=0.05)
    assert ood.threshold == thr and np.isfinite(thr)
    assert np.mean(ood.score(draw(4000)) > thr) == pytest.approx(0.05, abs=0.02)
    far = np.array([[6.0, 6.0, 0.0], [3.0, -3.0, 0.0], [0.0, 0.0, 20.0]])  # (3,-3) breaks correlation
    assert np.all(ood.score(far) > thr)
    assert ood.score(np.zeros(3)).shape == ()


def test_knn_ood_calibration_uses_leave_one_out_reference_scores():
    """With 40 held-out inputs alone a 1e-3 rate is not certifiable; the reference's leave-one-out
    scores (the (k+1)-th neighbour, skipping the point itself) make it so, at the right rate."""
    rng = np.random.default_rng(5)
    ood = OODMonitor("knn", k=5, max_reference=4000, seed=0)
    with pytest.raises(ValueError, match="cannot certify"):
        calibrate_threshold(rng.standard_normal(40), 1e-3)
    thr = ood.fit(rng.standard_normal((4000, 3)), rng.standard_normal((40, 3)), false_alarm_rate=1e-2)
    loo = ood.calibration_scores(rng.standard_normal((40, 3)))[40:]
    assert len(loo) == 4000 and np.all(loo > 0)  # a point is never its own neighbour
    assert np.mean(ood.score(rng.standard_normal((20000, 3))) > thr) == pytest.approx(1e-2, abs=5e-3)


def test_residual_calibration_whitens_held_out_residuals():
    """Correlated, biased, badly scaled residuals -> zero mean, identity covariance; a shift against
    the usual correlation is amplified (what makes a dynamics change visible to the CUSUM)."""
    rng = np.random.default_rng(6)
    cov = np.array([[9.0, 2.7, 0.0], [2.7, 1.0, 0.0], [0.0, 0.0, 0.25]])  # channels 0, 1: rho 0.9
    z = rng.multivariate_normal([1.0, 0.0, -2.0], cov, size=2000)
    z[0, 1] = np.nan  # dropped, not propagated
    bias, whiten = residual_calibration(z)
    np.testing.assert_allclose(bias, [1.0, 0.0, -2.0], atol=0.2)
    np.testing.assert_allclose(whiten, whiten.T, atol=1e-12)  # ZCA: symmetric
    with pytest.raises(ValueError, match="residual calibration"):
        residual_calibration(z[1:5])
    mon = ShiftMonitor(SPEC)
    mon.set_residual_calibration(bias, whiten)
    mean, std = np.zeros(3), np.full(3, 0.1)  # residuals well inside (-pi, pi] on the angle channel
    w = mon.residual_z(mean + std * z[1:], mean, std)
    np.testing.assert_allclose(w.mean(0), 0.0, atol=1e-9)
    np.testing.assert_allclose(np.cov(w, rowvar=False), np.eye(3), atol=1e-9)
    np.testing.assert_allclose(mon.residual_z(mean + std * z[1:], mean, std, calibrated=False), z[1:])
    against = mon.residual_z(
        std * (bias + np.array([3.0, -1.0, 0.0])), mean, std
    )  # 1 sigma each, anti-correlated
    assert np.abs(against).max() > 3.0
    with pytest.raises(ValueError, match="residual calibration"):
        mon.set_residual_calibration(bias, np.full((3, 3), np.nan))


def test_variance_model_recovers_aleatoric_and_epistemic_weights():
    """residual^2 ~ a * aleatoric + b * epistemic per channel: recovered from held-out residuals; a
    channel whose residuals ignore the epistemic part gets b = 0, not a negative weight."""
    rng = np.random.default_rng(9)
    ale = rng.uniform(0.5, 2.0, (4000, 2))
    epi = rng.uniform(0.0, 3.0, (4000, 2))
    true = np.array([[2.0, 1.0], [5.0, 0.0]])  # channel 1: no epistemic part
    r = rng.standard_normal((4000, 2)) * np.sqrt(true[0] * ale + true[1] * epi)
    r[0, 0] = np.nan  # ignored
    coef = fit_variance_model(r, ale, epi)
    np.testing.assert_allclose(coef[:, 0], true[:, 0], rtol=0.15)
    assert coef[0, 1] == pytest.approx(1.0, rel=0.1) and coef[1, 1] >= 0.0 and coef[1, 1] < 0.1
    assert np.all(coef >= 0)


def test_residual_channels_choose_what_the_cusum_watches():
    cfg = ShiftConfig(residual_channels=("x_m", "xdot_m_s"), arl0_ticks=1e4)
    mon = ShiftMonitor(SPEC, cfg)
    assert mon.cusum.num_dims == 2 and list(mon.watched) == [True, False, True]
    z_theta_only = np.array([0.0, 50.0, 0.0])  # a huge residual on an unwatched channel
    for t in range(200):
        mon.observe(np.zeros(3), np.zeros(1), 0.01 * z_theta_only, np.zeros(3), np.full(3, 0.01), t)
    assert mon.cusum.score == 0.0
    with pytest.raises(ValueError, match="residual_channels"):
        ShiftMonitor(SPEC, ShiftConfig(residual_channels=("nope",)))


def test_val_loss_alarms_above_its_factor():
    val = ValLossMonitor(factor=2.0)
    assert not val.update(fresh_loss=1.5, holdout_loss=1.0)
    assert val.update(fresh_loss=2.5, holdout_loss=1.0) and val.score == 2.5
    assert val.update(fresh_loss=float("nan"), holdout_loss=1.0)  # a broken loss is not "fine"


# -- ShiftMonitor --------------------------------------------------------------------------------
def feed(monitor: ShiftMonitor, z_shift: float, ticks: range, rng) -> list[dict]:
    events = []
    for t in ticks:
        mean = rng.uniform(-0.5, 0.5, 3)
        std = np.array([0.01, 0.02, 0.1])
        nxt = mean + std * (rng.standard_normal(3) + np.array([z_shift, 0.0, 0.0]))
        events += monitor.observe(mean, np.zeros(1), nxt, mean, std, t)
    return events


def test_shift_monitor_alarms_once_then_debounces_and_resets_on_retrain():
    rng = np.random.default_rng(4)
    mon = ShiftMonitor(SPEC, ShiftConfig(arl0_ticks=100_000, debounce_ticks=100, variance_ratio=0.0))
    assert mon.state("cusum_var") == (False, 0.0, math.inf)  # off
    assert feed(mon, 0.0, range(0, 2000), rng) == [] and mon.active_alarms() == []  # P(alarm) ~ 2 %
    events = feed(mon, 2.0, range(2000, 2300), rng)
    assert [e["trigger"] for e in events] == ["cusum"] and events[0]["kind"] == "alarm"
    assert 2000 < events[0]["tick"] < 2000 + 4 * mon.cusum.expected_delay(2.0)
    assert [name for name, _, _ in mon.active_alarms()] == ["cusum"]
    # clears briefly, comes back within the debounce time: no second event
    assert feed(mon, 0.0, range(2300, 2360), rng) == [] and mon.active_alarms() == []
    assert feed(mon, 2.0, range(2360, 2400), rng) == [] and mon.active_alarms() != []
    mon.on_retrain()
    assert mon.active_alarms() == [] and mon.cusum.score == 0.0
    assert [e["trigger"] for e in feed(mon, 2.0, range(2400, 2600), rng)] == ["cusum"]


@pytest.mark.parametrize("reset", [True, False])
def test_new_episode_restarts_the_cusum_unless_configured_to_carry_evidence(reset):
    """The last ticks of a failing episode (a falling pole: the worst-modelled states) must not
    alarm the next episode at its first tick; ``reset_each_episode: false`` keeps the evidence."""
    rng = np.random.default_rng(7)
    mon = ShiftMonitor(SPEC, ShiftConfig(arl0_ticks=100_000, reset_each_episode=reset))
    feed(mon, 2.0, range(0, 200), rng)
    assert mon.active_alarms() != [] and mon.cusum.score > 0
    mon.new_episode()
    assert (mon.active_alarms() == [] and mon.cusum.score == 0.0) is reset


def test_shift_monitor_wraps_angle_residuals_and_accepts_observations():
    mon = ShiftMonitor(SPEC)
    z = mon.residual_z(
        np.array([0.0, -math.pi + 0.01, 0.0]),
        np.array([0.0, math.pi - 0.01, 0.0]),
        np.array([1.0, 0.01, 1.0]),
    )
    assert z[1] == pytest.approx(2.0)
    obs = Observation(np.zeros(3), 0.0)
    nxt = Observation(np.array([np.nan, 0.0, 0.0]), 0.02)
    assert mon.observe(obs, np.zeros(1), nxt, np.zeros(3), np.ones(3), 0) == []  # skipped, no crash
    assert mon.cusum.score == 0.0


def test_shift_monitor_ood_needs_persistence_and_feeds_the_gate():
    rng = np.random.default_rng(5)
    mon = ShiftMonitor(SPEC, ShiftConfig(ood_persist_ticks=3, ood_false_alarm_rate=0.01))
    train_obs = rng.uniform([-0.3, -math.pi, -1.0], [0.3, math.pi, 1.0], (3000, 3))
    thr = mon.fit_ood(
        train_obs, rng.uniform(-1, 1, (3000, 1)), train_obs[:1000] * 0.99, rng.uniform(-1, 1, (1000, 1))
    )
    far = np.array([0.9, 0.0, 4.0])
    events = []
    for t in range(3):
        events += mon.observe(far, np.zeros(1), far, far, np.ones(3), t)
        assert (mon.ood_score > thr) and (len(events) == (1 if t == 2 else 0))
    assert events[0]["trigger"] == "ood"
    gate = SafetyGate(
        SPEC, GateConfig(disagreement_threshold=1.0), make_fallback(FallbackConfig(kind="hold"), SPEC), mon
    )
    gate.set_thresholds(ood=thr * 2)  # the gate forwards the stored OOD threshold
    assert mon.ood.threshold == thr * 2
    assert "monitor:val_loss" not in [name for name, _, _ in mon.active_alarms()]
    (event,) = mon.report_val_loss(5.0, 1.0, tick=3)
    assert event["trigger"] == "val_loss" and event["score"] == 5.0
    assert [name for name, _, _ in mon.active_alarms()] == ["ood", "val_loss"]
    d = gate.decide(4, 0.0, Observation(np.zeros(3), 0.0), None, None, False)
    assert {"monitor:ood", "monitor:val_loss"} <= {t.name for t in d.triggers}


def test_calibration_statistic_equals_what_the_planner_reports():
    """The real ensemble and planner: scoring a plan's own actions from its start state reproduces
    PlanInfo.worst_disagreement, so the gate compares like with like."""
    from robot_mbrl.models.ensemble import EnsembleConfig, ProbabilisticEnsemble
    from robot_mbrl.planning.mpc import MPCPlanner, PlannerConfig
    from robot_mbrl.tasks.cartpole import CartpoleTask

    angle = np.array([False, True, False, False])
    model = ProbabilisticEnsemble(4, 1, angle, EnsembleConfig(members=4, elites=2, hidden=16), seed=0)
    mpc = MPCPlanner(
        model,
        CartpoleTask(),
        np.array([-1.0]),
        np.array([1.0]),
        config=PlannerConfig(horizon=5, population=8, iterations=1, elites=2),
    )
    s0 = np.array([0.1, 3.0, 0.2, -0.5], dtype=np.float32)
    info = mpc.plan(s0)
    score = plan_disagreement_scores(model, s0[None], info.actions.numpy()[None])
    assert score[0] == pytest.approx(info.worst_disagreement, rel=1e-5)


def test_cusum_level_for_large_shifts_does_not_overflow():
    from robot_mbrl.safety.monitors import siegmund_arl, solve_cusum_h

    h = solve_cusum_h(k=1.0, one_sided_arl0=1e4)  # shift_sigma = 2 used to raise OverflowError
    assert 0 < h < 20 and abs(siegmund_arl(h, 1.0, 0.0) / 1e4 - 1) < 1e-3


def test_jump_check_alarms_at_the_step_holds_until_the_episode_ends_and_gates():
    """A sensor offset as a one-tick residual spike: the clipped CUSUM counts it as one ordinary tick
    (no alarm); the jump check alarms at that tick, stays in alarm on the following quiet ticks and
    clears with the next episode; the gate writes the fallback's action while it holds."""
    rng = np.random.default_rng(2)
    mon = ShiftMonitor(SPEC, ShiftConfig(arl0_ticks=1e6, z_clip=3.0, debounce_ticks=0))
    mon.set_jump_threshold(6.0)
    pred, std = np.zeros(3), np.ones(3)
    events = []
    for t in range(200):
        events += mon.observe(pred, np.zeros(1), rng.normal(0.0, 1.0, 3).clip(-4, 4), pred, std, t)
    assert events == [] and mon.jump_score <= 4.0
    spike = np.array([0.0, 0.0, 20.0])
    (event,) = mon.observe(pred, np.zeros(1), spike, pred, std, 200)
    assert event["trigger"] == "jump" and event["score"] == pytest.approx(20.0) and event["threshold"] == 6.0
    assert not mon.cusum.alarm  # the CUSUM saw at most z_clip from it
    for t in range(201, 220):
        mon.observe(pred, np.zeros(1), rng.normal(0.0, 1.0, 3).clip(-4, 4), pred, std, t)
    assert [name for name, _, _ in mon.active_alarms()] == ["jump"]
    fallback = make_fallback(FallbackConfig(kind="hold"), SPEC)
    gate = SafetyGate(SPEC, GateConfig(disagreement_threshold=1.0), fallback, mon)
    d = gate.decide(220, 0.0, Observation(np.zeros(3), 0.0), None, None, False)
    assert "monitor:jump" in {t.name for t in d.triggers} and d.source == "fallback"
    mon.new_episode()
    assert mon.active_alarms() == []
    with pytest.raises(ValueError, match="jump threshold"):
        mon.set_jump_threshold(float("nan"))
