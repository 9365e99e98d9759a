"""Trainer: elites, early stopping, shift alarm across retrains, schedule, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robot_mbrl.data.buffer import ReplayBuffer
from robot_mbrl.models.ensemble import EnsembleConfig, ProbabilisticEnsemble
from robot_mbrl.models.trainer import EnsembleTrainer, RetrainSchedule, ScheduleConfig, TrainerConfig

ANGLE = np.array([True, False])


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def pendulum(rng: np.random.Generator, n: int, g: float = 9.81) -> dict[str, np.ndarray]:
    """Damped torque pendulum, semi-implicit Euler at 20 Hz; theta wrapped to (-pi, pi]."""
    th, om, u = rng.uniform(-np.pi, np.pi, n), rng.uniform(-4, 4, n), rng.uniform(-2, 2, n)
    om2 = om + 0.05 * (-g * np.sin(th) + 3.0 * u - 0.1 * om)
    th2 = np.pi - np.mod(np.pi - (th + 0.05 * om2), 2 * np.pi)
    return dict(
        obs=np.stack([th, om], 1), act=u[:, None], next_obs=np.stack([th2, om2], 1), reward=np.cos(th)
    )


def make(
    seed: int = 0, members: int = 4, elites: int = 2, **trainer_kw
) -> tuple[ProbabilisticEnsemble, EnsembleTrainer]:
    cfg = EnsembleConfig(members=members, elites=elites, hidden=64, layers=2)
    model = ProbabilisticEnsemble(2, 1, ANGLE, cfg, seed=seed)
    return model, EnsembleTrainer(model, TrainerConfig(**{"max_epochs": 15, **trainer_kw}), seed=seed)


def test_elites_are_the_best_holdout_members():
    model, trainer = make(members=5, elites=3)
    with torch.no_grad():  # member 2 starts dead (all weights 0): only its output bias can learn
        for w in model.weights:
            w[2].zero_()
    data = pendulum(np.random.default_rng(0), 1500)
    report = trainer.train(data)
    assert 2 not in report.elites
    holdout = {k: v[report.holdout_idx] for k, v in data.items()}
    assert len(report.holdout_idx) == report.n_holdout == 300 and report.n_train == 1200
    mse, nll = trainer.evaluate(holdout)
    np.testing.assert_allclose(mse.numpy(), report.member_holdout_mse, rtol=1e-4)
    assert set(report.elites) == set(np.argsort(mse.numpy())[:3].tolist())
    assert model.elites == report.elites
    assert report.holdout_mse == pytest.approx(float(mse[list(report.elites)].mean()), rel=1e-4)
    assert report.holdout_nll == pytest.approx(float(nll[list(report.elites)].mean()), rel=1e-3)
    assert len(report.train_nll) == len(report.holdout_mse_history) == report.epochs
    assert (
        report.train_nll[-1] < report.train_nll[0]
        and report.holdout_mse_history[-1] < report.holdout_mse_history[0]
    )


def test_early_stopping_stops_on_unlearnable_data():
    rng = np.random.default_rng(1)
    data = pendulum(rng, 800)
    data["next_obs"] = rng.normal(size=(800, 2))  # targets independent of inputs
    _, trainer = make(max_epochs=200, patience=3)
    report = trainer.train(data)
    assert report.stopped_early and 3 <= report.epochs < 40, report.epochs
    _, trainer = make(max_epochs=4, patience=50)
    report = trainer.train(pendulum(rng, 800))
    assert not report.stopped_early and report.epochs == 4


def test_shift_alarm_fires_on_changed_physics_only():
    rng = np.random.default_rng(2)
    buf = ReplayBuffer(2, 1)
    buf.extend(pendulum(rng, 2000))
    _, trainer = make(max_epochs=40, patience=5)
    first = trainer.train(buf)
    assert first.fresh_mse is None and not first.shift_alarm

    buf.extend(pendulum(rng, 400))  # same physics, fresh states
    same = trainer.train(buf, max_epochs=10)
    assert same.fresh_mse is not None and same.reference_mse == pytest.approx(first.holdout_mse)
    assert not same.shift_alarm and same.max_epochs == 10, (same.fresh_mse, same.reference_mse)

    buf.extend(pendulum(rng, 400, g=4.0))  # gravity changed: the physics moved under the model
    shifted = trainer.train(buf, max_epochs=10)
    assert shifted.shift_alarm and shifted.max_epochs == 20
    assert shifted.fresh_mse > 5 * shifted.reference_mse


def test_same_seed_same_training_and_too_little_data():
    data = pendulum(np.random.default_rng(3), 500)
    ra, rb, rc = (make(seed=s, max_epochs=3)[1].train(data) for s in (4, 4, 5))
    assert ra.train_nll == rb.train_nll and ra.member_holdout_mse == rb.member_holdout_mse
    np.testing.assert_array_equal(ra.holdout_idx, rb.holdout_idx)
    assert ra.train_nll != rc.train_nll
    with pytest.raises(ValueError, match="at least 20 transitions"):
        make()[1].train({k: v[:10] for k, v in data.items()})


def test_retrain_schedule():
    every = RetrainSchedule(
        ScheduleConfig(retrain_every_steps=100, min_transitions=150, min_new_transitions=10)
    )
    assert not every.due(100) and every.due(150) and every.due(151, episode_ended=True)
    every.mark_trained(150)
    assert not every.due(249) and every.due(250)
    episodes = RetrainSchedule(
        ScheduleConfig(between_episodes=True, min_transitions=50, min_new_transitions=20)
    )
    assert not episodes.due(60) and episodes.due(60, episode_ended=True)
    episodes.mark_trained(60)
    assert not episodes.due(61, episode_ended=True)  # never on a single new transition
    assert episodes.due(80, episode_ended=True)
    with pytest.raises(Exception, match="min_new_transitions"):
        from robot_mbrl.typedconfig import build

        build(ScheduleConfig, {"min_new_transitions": 1})


def test_holdout_is_contiguous_blocks_and_calibration_segments_lie_inside_them():
    """trainer.holdout_block >= K: the K-tick calibration segments are held out in full (with
    single held-out rows ~80 % of a segment's later ticks are training rows)."""
    from robot_mbrl.agents.monitor_calibration import segment_starts

    cfg = TrainerConfig(holdout_block=20)
    trainer = EnsembleTrainer(ProbabilisticEnsemble(2, 1, ANGLE, EnsembleConfig(members=2)), cfg, seed=3)
    hold, tr = (t.numpy() for t in trainer._split(1500))
    assert len(hold) == 300 and len(tr) == 1200 and not set(hold) & set(tr)
    starts = hold[np.r_[True, np.diff(hold) > 1]]  # first row of each held-out run
    assert np.all(starts % 20 == 0) and len(starts) <= 15  # whole blocks of 20 (adjacent ones merge)
    again = EnsembleTrainer(ProbabilisticEnsemble(2, 1, ANGLE, EnsembleConfig(members=2)), cfg, seed=3)
    np.testing.assert_array_equal(again._split(1500)[0].numpy(), hold)  # seeded
    episode = np.repeat(np.arange(6), 250)
    seg = segment_starts(episode, np.zeros(1500, bool), hold, 10, whole=True)
    assert len(seg) > 0 and np.isin(seg[:, None] + np.arange(10), hold).all()  # never a training row
    loose = segment_starts(episode, np.zeros(1500, bool), hold, 10)  # only the start held out
    assert len(loose) > len(seg) and not np.isin(loose[:, None] + np.arange(10), hold).all()
    small_hold, small_tr = trainer._split(50)  # short buffers: shorter blocks, never all rows
    assert len(small_hold) == 10 and len(small_tr) == 40
