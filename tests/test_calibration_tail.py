"""Thresholds beyond what the calibration sample certifies (GPD tail) and the serial-correlation
inflation of CUSUM residuals."""

from __future__ import annotations

import numpy as np
import pytest

from robot_mbrl.safety.calibration import calibrate_threshold, long_run_inflation, tail_threshold


@pytest.mark.parametrize(
    ("name", "draw", "quantile"),
    [
        ("exponential", lambda rng, n: rng.exponential(size=n), lambda a: -np.log(a)),
        ("pareto xi=0.25", lambda rng, n: rng.pareto(4.0, size=n), lambda a: a**-0.25 - 1.0),
    ],
)
def test_gpd_tail_extrapolates_to_rates_far_below_one_over_n(name, draw, quantile) -> None:
    """2,000 scores, target 1e-4 (5x below 1/n): over 60 calibrations the median threshold is within
    10 % of the true quantile and the median realized rate within a factor 2 of the target."""
    rng = np.random.default_rng(0)
    alpha = 1e-4
    ths = np.array([tail_threshold(draw(rng, 2000), alpha) for _ in range(60)])
    truth = quantile(alpha)
    assert abs(np.median(ths) / truth - 1.0) < 0.1, (name, np.median(ths), truth)
    rates = np.exp(-ths) if name == "exponential" else (1.0 + ths) ** -4.0  # exact survival functions
    assert alpha / 2 < np.median(rates) < 2 * alpha, (name, np.median(rates))
    with pytest.raises(ValueError, match="scores"):
        tail_threshold(draw(rng, 15), alpha)  # too few points for a tail fit


def test_gpd_tail_is_the_conformal_quantile_where_the_sample_certifies_the_rate() -> None:
    s = np.random.default_rng(1).normal(size=5000)
    assert tail_threshold(s, 1e-3) == calibrate_threshold(s, 1e-3)
    with pytest.raises(ValueError, match="finite"):
        tail_threshold(np.append(s[:100], np.nan), 1e-4)
    assert tail_threshold(np.ones(500), 1e-5) == 1.0  # a flat top: nothing to extrapolate


def test_long_run_inflation_is_one_for_iid_and_sqrt_of_ar1_factor() -> None:
    """AR(1) with unit marginal variance and correlation rho: the variance of long sums grows by
    (1 + rho) / (1 - rho); batches stay inside their episode."""
    rng = np.random.default_rng(2)
    n, rho = 40_000, 0.8
    iid = rng.normal(size=(n, 2))
    ar = np.empty(n)
    ar[0] = rng.normal()
    e = rng.normal(size=n) * np.sqrt(1 - rho**2)
    for t in range(1, n):
        ar[t] = rho * ar[t - 1] + e[t]
    z = np.stack([iid[:, 0], ar], 1)
    groups = np.repeat(np.arange(n // 250), 250)
    infl = long_run_inflation(z, groups, batch=50)
    assert 0.99 <= infl[0] < 1.1
    assert abs(infl[1] - np.sqrt((1 + rho) / (1 - rho))) < 0.3, infl
    assert np.array_equal(long_run_inflation(z[:100], groups[:100], batch=50), np.ones(2))  # too few batches
    # a bias counts too (a CUSUM accumulates it): mean 0.5 on unit noise -> lambda^2 ~ 1 + 50 * 0.25
    biased = long_run_inflation(iid + np.array([0.0, 0.5]), groups, batch=50)
    assert biased[1] > 3.0 and biased[0] < 1.1


def test_commission_windows_stay_inside_episodes() -> None:
    from robot_mbrl.agents.monitor_calibration import commission_windows

    obs = np.arange(7, dtype=np.float32)[:, None]
    ref = {"commission_obs": obs, "commission_act": obs * 10, "commission_next_obs": obs + 1,
           "commission_episode": np.array([0, 0, 0, 0, 1, 1, 1])}  # fmt: skip
    o0, act, nxt, ep = commission_windows(ref, 3)
    np.testing.assert_array_equal(o0[:, 0], [0, 1, 4])  # windows 2-4 and 3-5 would cross episodes
    np.testing.assert_array_equal(act[..., 0], [[0, 10, 20], [10, 20, 30], [40, 50, 60]])
    np.testing.assert_array_equal(nxt[:, 0], [3, 4, 7])
    np.testing.assert_array_equal(ep, [0, 0, 1])
