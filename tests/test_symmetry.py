"""Mirror symmetry (symmetry.negate): signs from names, mirrored arrays, the trainer and V learn the
mirror images, and a model trained on one side of a symmetric system predicts the other side."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robot_mbrl.data.symmetry import SymmetryConfig, mirror, mirror_signs, with_mirror
from robot_mbrl.models.ensemble import EnsembleConfig, ProbabilisticEnsemble
from robot_mbrl.models.trainer import EnsembleTrainer, TrainerConfig
from robot_mbrl.typedconfig import ConfigError
from tests.test_ensemble import pendulum

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def cartpole_spec():
    from robot_mbrl.config import load_config
    from robot_mbrl.factory import make_robot

    robot = make_robot(load_config("cartpole_swingup"))
    spec = robot.spec
    robot.close()
    return spec


def test_signs_from_names_and_unknown_names():
    spec = cartpole_spec()
    assert mirror_signs(spec, SymmetryConfig()) is None
    s, a = mirror_signs(spec, SymmetryConfig(negate=("x_m", "theta_rad", "motor_u")))
    assert s.tolist() == [-1, -1, 1, 1, 1] and a.tolist() == [-1]
    with pytest.raises(ConfigError, match=r"symmetry.negate: expected names from .*got \['bogus'\]"):
        mirror_signs(spec, SymmetryConfig(negate=("x_m", "bogus")))


def test_mirrored_arrays_and_episode_boundary():
    rng = np.random.default_rng(0)
    d = {
        "obs": rng.normal(size=(4, 2)), "act": rng.normal(size=(4, 1)), "next_obs": rng.normal(size=(4, 2)),
        "reward": np.arange(4.0), "terminated": np.zeros(4, bool), "truncated": np.zeros(4, bool),
        "episode_id": np.array([0, 0, 1, 1]),
    }  # fmt: skip
    signs = (np.array([-1.0, 1.0]), np.array([-1.0]))
    m = mirror(d, signs)
    np.testing.assert_array_equal(m["obs"], d["obs"] * [-1, 1])
    np.testing.assert_array_equal(m["next_obs"], d["next_obs"] * [-1, 1])
    np.testing.assert_array_equal(m["act"], -d["act"])
    assert m["reward"] is d["reward"]
    both = with_mirror(d, signs)
    assert all(len(v) == 8 for v in both.values())
    np.testing.assert_array_equal(both["obs"][4:], m["obs"])
    # the last real row ends an episode in the result, so n-step returns stop there; input untouched
    assert both["truncated"].tolist() == [False, False, False, True, False, False, False, False]
    assert not d["truncated"].any()
    assert with_mirror(d, None)["obs"] is d["obs"]


def test_trainer_learns_the_mirror_side():
    """A pendulum seen only at theta > 0 (and its mirror image declared): the model predicts theta < 0
    as well as theta > 0; without the symmetry its error there is several times larger. Mirror
    images follow their rows into the holdout; the reported holdout rows are real ones."""
    rng = np.random.default_rng(1)
    data = pendulum(rng, 1500, omega_max=3.0)
    keep = data["obs"][:, 0] > 0.3
    one_side = {k: v[keep] for k, v in data.items()}
    test = pendulum(np.random.default_rng(2), 2000, omega_max=3.0)
    other = test["obs"][:, 0] < -0.3
    cfg = EnsembleConfig(members=3, elites=2, hidden=64, layers=2)
    signs = (np.array([-1.0, -1.0]), np.array([-1.0]))
    err = {}
    for name, mir in (("mirror", signs), ("plain", None)):
        model = ProbabilisticEnsemble(2, 1, np.array([True, False]), cfg, seed=0)
        tr = EnsembleTrainer(model, TrainerConfig(max_epochs=80, patience=10), seed=0, mirror=mir)
        report = tr.train(one_side)
        n = int(keep.sum())
        assert report.n_train + report.n_holdout == (2 * n if mir is not None else n)
        assert report.holdout_idx.max() < n
        pred = model.predict(torch.tensor(test["obs"][other]), torch.tensor(test["act"][other])).mean.mean(0)
        err[name] = float(((pred[:, 1] - torch.tensor(test["next_obs"][other, 1])) ** 2).mean())
    assert err["mirror"] * 4 < err["plain"], err


def test_agent_fits_value_on_the_mirror_images(monkeypatch):
    """With symmetry.negate the value function's fit and the input OOD reference see every real row
    and its mirror image."""
    from robot_mbrl.agents.mpc import MPCAgent
    from robot_mbrl.config import load_config
    from robot_mbrl.data.buffer import ReplayBuffer
    from robot_mbrl.factory import make_robot, make_task

    names = "[x_m, theta_rad, xdot_m_s, thetadot_rad_s, u_applied, motor_u]"
    cfg = load_config(
        "cartpole_swingup",
        [f"symmetry.negate={names}", "value.planned_rounds=0", "trainer.max_epochs=2", "value.epochs=1"],
    )
    robot = make_robot(cfg)
    agent = MPCAgent(cfg, robot.spec, make_task(cfg))
    robot.close()
    buf = ReplayBuffer(robot.spec.obs_dim, robot.spec.act_dim)
    rng = np.random.default_rng(0)
    for i in range(300):
        o = rng.normal(size=5)
        buf.add(o, rng.uniform(-1, 1, 1), 0.5, o + 0.01, False, i % 100 == 99, 0.02 * i, i // 100)
    seen = {}
    fit = agent.value.fit

    def spy(obs, reward, next_obs, terminated, truncated):  # noqa: ANN001
        seen.update(obs=obs, truncated=truncated)
        return fit(obs, reward, next_obs, terminated, truncated)

    monkeypatch.setattr(agent.value, "fit", spy)
    report, _ = agent.retrain(buf)
    assert len(seen["obs"]) == 600 and report.n_train + report.n_holdout == 600
    np.testing.assert_allclose(seen["obs"][300:], -seen["obs"][:300])
    assert seen["truncated"][299]
    # the input OOD reference is what the model trained on: real training rows and their images
    ref, n_real = agent.ood_reference["train_obs"], 300 - len(report.holdout_idx)
    assert len(ref) == 2 * n_real and np.allclose(ref[n_real:], -ref[:n_real])
