"""Probabilistic ensemble: contract shapes, batched == per-member, angle handling, fit, disagreement OOD."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from robot_mbrl.models.base import DynamicsModel, Prediction
from robot_mbrl.models.ensemble import EnsembleConfig, ProbabilisticEnsemble, wrap_angle
from robot_mbrl.models.trainer import EnsembleTrainer, TrainerConfig

ANGLE = np.array([True, False])


def pendulum(
    rng: np.random.Generator, n: int, omega_max: float = 6.0, g: float = 9.81
) -> dict[str, np.ndarray]:
    """Damped torque pendulum, semi-implicit Euler at 20 Hz; theta wrapped to (-pi, pi]."""
    th, om, u = rng.uniform(-np.pi, np.pi, n), rng.uniform(-omega_max, omega_max, n), rng.uniform(-2, 2, n)
    om2 = om + 0.05 * (-g * np.sin(th) + 3.0 * u - 0.1 * om)
    th2 = np.pi - np.mod(np.pi - (th + 0.05 * om2), 2 * np.pi)
    obs, nxt = np.stack([th, om], 1), np.stack([th2, om2], 1)
    return dict(obs=obs, act=u[:, None], next_obs=nxt, reward=np.cos(th) - 0.01 * om**2)


def small_cfg(**kw) -> EnsembleConfig:
    return EnsembleConfig(**{"members": 5, "elites": 3, "hidden": 64, "layers": 3, **kw})


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def trained(one_thread) -> ProbabilisticEnsemble:
    model = ProbabilisticEnsemble(2, 1, ANGLE, small_cfg(learn_reward=True), seed=0)
    EnsembleTrainer(model, TrainerConfig(max_epochs=60, patience=8), seed=0).train(
        pendulum(np.random.default_rng(0), 3000, omega_max=4.0)
    )
    return model


def test_contract_shapes_and_wrapped_angles():
    model = ProbabilisticEnsemble(2, 1, ANGLE, small_cfg(), seed=1)
    as_protocol: DynamicsModel = model  # the planner and gate only see this contract
    assert as_protocol.num_members == 5 and as_protocol.elites == (0, 1, 2)
    obs = torch.tensor([[math.pi - 1e-3, 30.0]]).repeat(20, 1)  # a large velocity pushes theta across pi
    model.out_norm.mean.copy_(torch.tensor([0.5, 0.0]))  # predicted delta theta ~ +0.5 rad
    p = model.predict(obs, torch.zeros(20, 1))
    assert isinstance(p, Prediction) and p.reward is None
    assert p.mean.shape == p.var.shape == (5, 20, 2)
    assert p.disagreement.shape == p.max_pairwise.shape == (20,)
    assert torch.all(p.mean[..., 0] <= math.pi) and torch.all(p.mean[..., 0] > -math.pi)
    assert torch.all(p.mean[..., 0] < 0)  # wrapped: pi + ~0.5 -> ~ -pi + 0.5
    assert torch.all(p.var > 0)
    assert wrap_angle(torch.tensor(-math.pi)) == pytest.approx(math.pi)
    assert model.state_scale.shape == (2,) and model.num_members == 5 and len(model.elites) == 3


def test_batched_forward_equals_member_by_member():
    model = ProbabilisticEnsemble(2, 1, ANGLE, small_cfg(learn_reward=True), seed=2)
    shared = torch.randn(33, model.in_dim)
    per_member = torch.randn(5, 33, model.in_dim)
    mu_s, lv_s = model(shared)
    mu_p, lv_p = model(per_member)
    for e in range(5):
        m, lv = model.forward_member(shared, e)
        torch.testing.assert_close(mu_s[e], m, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lv_s[e], lv, rtol=1e-5, atol=1e-6)
        m, lv = model.forward_member(per_member[e], e)
        torch.testing.assert_close(mu_p[e], m, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lv_p[e], lv, rtol=1e-5, atol=1e-6)


def test_per_member_input_matches_shared_rows(trained):
    obs = torch.tensor(pendulum(np.random.default_rng(3), 5 * 40)["obs"], dtype=torch.float32).view(5, 40, 2)
    act = torch.rand(5, 40, 1, generator=torch.Generator().manual_seed(0)) * 4 - 2
    p = trained.predict(obs, act)
    for e in range(5):
        q = trained.predict(obs[e], act[e])
        torch.testing.assert_close(p.mean[e], q.mean[e], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(p.reward[e], q.reward[e], rtol=1e-5, atol=1e-5)


def test_disagreement_definition(trained):
    d = pendulum(np.random.default_rng(4), 50)
    p = trained.predict(torch.tensor(d["obs"]), torch.tensor(d["act"]))
    x = trained.encode(torch.tensor(d["obs"]).float(), torch.tensor(d["act"]).float())
    z = trained(trained.in_norm.normalize(x))[0][..., :2]  # normalized delta means, E x N x S
    torch.testing.assert_close(p.disagreement, z.std(0, correction=0).mean(-1), rtol=1e-3, atol=1e-5)
    pair = torch.stack([torch.linalg.vector_norm(z[i] - z[j], dim=-1) for i in range(5) for j in range(5)])
    pair = pair.amax(0)
    torch.testing.assert_close(p.max_pairwise, pair, rtol=1e-3, atol=1e-5)


def test_fits_pendulum_with_angle_wrap(trained):
    """Held-out one-step error of the elite mean: < 0.01 rad and < 0.03 rad/s (deltas span ~0.1-0.5)."""
    d = pendulum(np.random.default_rng(5), 2000, omega_max=4.0)
    p = trained.predict(torch.tensor(d["obs"]), torch.tensor(d["act"]))
    pred = p.mean[list(trained.elites)].mean(0).numpy()
    err = pred - d["next_obs"]
    err[:, 0] = np.pi - np.mod(np.pi - err[:, 0], 2 * np.pi)
    rmse = np.sqrt((err**2).mean(0))
    assert rmse[0] < 0.01 and rmse[1] < 0.03, rmse
    reward_rmse = np.sqrt(((p.reward[list(trained.elites)].mean(0).numpy() - d["reward"]) ** 2).mean())
    assert reward_rmse < 0.1 * d["reward"].std(), reward_rmse
    # crossing the wrap: states near +pi with positive velocity land near -pi, and the model agrees
    near = np.abs(np.abs(d["next_obs"][:, 0]) - np.pi) < 0.3
    assert near.sum() > 10 and np.abs(err[near, 0]).max() < 0.05


def test_disagreement_flags_far_out_of_distribution(trained):
    """Trained on |omega| <= 4: disagreement ranks |omega| in [12, 20] above in-distribution (AUROC >= 0.9)."""
    rng = np.random.default_rng(6)
    inside = pendulum(rng, 500, omega_max=4.0)
    far = pendulum(rng, 500, omega_max=20.0)
    far_obs = far["obs"].copy()
    far_obs[:, 1] = np.sign(far_obs[:, 1]) * rng.uniform(12, 20, 500)
    s_in = trained.predict(torch.tensor(inside["obs"]), torch.tensor(inside["act"])).disagreement.numpy()
    s_out = trained.predict(torch.tensor(far_obs), torch.tensor(far["act"])).disagreement.numpy()
    auroc = (s_out[:, None] > s_in[None, :]).mean()
    assert auroc >= 0.9, auroc


def test_same_seed_same_model_and_config_validation():
    a = ProbabilisticEnsemble(2, 1, ANGLE, small_cfg(), seed=7)
    b = ProbabilisticEnsemble(2, 1, ANGLE, small_cfg(), seed=7)
    c = ProbabilisticEnsemble(2, 1, ANGLE, small_cfg(), seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.weights[0], c.weights[0])
    assert not torch.equal(a.weights[0][0], a.weights[0][1])  # members differ from each other
    with pytest.raises(ValueError):
        EnsembleConfig(members=3, elites=5).validate()
    with pytest.raises(ValueError, match="angle_mask"):
        ProbabilisticEnsemble(3, 1, ANGLE)


def test_stepper_matches_predict_up_to_angle_wrap(trained):
    """The planner's stepper: same next states as predict (angles continuous, not wrapped), same
    disagreement, same learned reward; members starting at pi stay continuous across it."""
    d = pendulum(np.random.default_rng(6), 64)
    obs = torch.tensor(d["obs"], dtype=torch.float32)
    obs[:8, 0] = math.pi - 1e-3  # rollouts that cross +pi
    obs[:8, 1] = 6.0
    act = torch.tensor(d["act"], dtype=torch.float32)
    p = trained.predict(obs, act)
    step = trained.stepper()
    nxt, dis, rew = step(obs.expand(5, -1, -1), act.expand(5, -1, -1))
    torch.testing.assert_close(wrap_angle(nxt[..., 0]), p.mean[..., 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nxt[..., 1], p.mean[..., 1], rtol=1e-5, atol=1e-5)
    assert torch.all(nxt[:, :8, 0] > math.pi)  # not wrapped: continuous along the rollout
    torch.testing.assert_close(dis, p.disagreement, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(rew, p.reward, rtol=1e-5, atol=1e-5)
    # a second call from the unwrapped states keeps going and agrees with predict from wrapped ones
    nxt2, dis2, _ = step(nxt, act.expand(5, -1, -1))
    p2 = trained.predict(p.mean, act.expand(5, -1, -1))
    torch.testing.assert_close(wrap_angle(nxt2[..., 0]), p2.mean[..., 0], rtol=1e-4, atol=1e-4)
    # the planner's deferred disagreement: spread of the whole rollout == the per-tick values
    lean, _, _ = trained.stepper(spread=False)(obs.expand(5, -1, -1), act.expand(5, -1, -1))
    assert torch.equal(lean, nxt)
    torch.testing.assert_close(trained.spread(torch.stack([nxt, nxt2])), torch.stack([dis, dis2]))


@pytest.mark.parametrize(
    "angles, ctrl, kw",
    [
        ([False, False, False], None, {}),  # no angles: the training encoding
        ([True, False, False], None, {}),  # angles: [obs, 1, sin, cos, act] with zero rows
        ([True, False, True], None, {}),  # two angles
        ([True, False, False], None, {"angle_products": True}),  # the training encoding
        ([True, False, False], [False, False, True], {"control_affine": True}),
        ([False, False, False], [False, False, True], {"control_affine": True}),  # no angles: K = 1
        ([True, True, False], [False, False, True], {"control_affine": True, "learn_reward": True}),
    ],
)
def test_inference_path_equals_normalized_forward(angles, ctrl, kw):
    """Every encoding: predict and the planner's stepper (normalizers folded into the weights, the
    planning layout of the inputs) give the same next state and reward as normalize -> forward ->
    denormalize on the training encoding, with non-trivial normalizers and gains; the log-variance
    too. Breaks if a weight row of the planning layout lands on the wrong input."""
    angle = np.array(angles)
    mask = None if ctrl is None else np.array(ctrl)
    model = ProbabilisticEnsemble(3, 2, angle, small_cfg(**kw), seed=3, control_mask=mask)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        if model.gain is not None:
            model.gain.normal_(0.0, 0.5, generator=gen)
        for b in model.biases:
            b.normal_(0.0, 0.3, generator=gen)
        model.fit_normalizers(
            model.encode(torch.randn(64, 3, generator=gen) * 2, torch.randn(64, 2, generator=gen)),
            torch.randn(64, model.out_dim, generator=gen) * 0.3 + 0.1,
        )
    obs, act = torch.randn(6, 3, generator=gen) * 2, torch.randn(6, 2, generator=gen)
    with torch.no_grad():
        mu, logvar = model(model.in_norm.normalize(model.encode(obs, act)))
    raw = model.out_norm.denormalize(mu)
    ref = obs + raw[..., :3]
    ref = torch.where(torch.as_tensor(angle), wrap_angle(ref), ref)
    p = model.predict(obs, act)
    torch.testing.assert_close(p.mean, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        p.var, logvar[..., :3].exp() * model.out_norm.std[:3] ** 2, rtol=1e-4, atol=1e-6
    )
    nxt, _, rew = model.stepper()(obs.expand(5, -1, -1), act.expand(5, -1, -1))
    torch.testing.assert_close(
        torch.where(torch.as_tensor(angle), wrap_angle(nxt), nxt), ref, rtol=1e-4, atol=1e-5
    )
    if model.cfg.learn_reward:
        torch.testing.assert_close(rew, raw[..., 3], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(p.reward, raw[..., 3], rtol=1e-4, atol=1e-5)


def test_angle_products_encoding_and_checkpoint(tmp_path):
    """angle_products: every non-angle input (observation channels, actions) times the sin and cos of
    every angle, after the plain encoding; the network input grows accordingly and a checkpoint
    rebuilds the same encoding."""
    from robot_mbrl.models.checkpoint import load_checkpoint, save_checkpoint

    model = ProbabilisticEnsemble(2, 1, ANGLE, small_cfg(angle_products=True), seed=0)
    assert model.in_dim == 2 + 1 + 1 + 2 * 2  # sin, cos of theta; omega; u; (omega, u) x (sin, cos)
    x = model.encode(torch.tensor([[0.3, 2.0]]), torch.tensor([[0.5]]))
    s, c = math.sin(0.3), math.cos(0.3)
    torch.testing.assert_close(x[0], torch.tensor([2.0, s, c, 0.5, 2.0 * s, 2.0 * c, 0.5 * s, 0.5 * c]))
    plain = ProbabilisticEnsemble(2, 1, ANGLE, small_cfg(), seed=0)
    torch.testing.assert_close(plain.encode(torch.tensor([[0.3, 2.0]]), torch.tensor([[0.5]]))[0], x[0, :4])
    save_checkpoint(tmp_path / "m.pt", model)
    loaded, _, _ = load_checkpoint(tmp_path / "m.pt")
    assert loaded.in_dim == model.in_dim
    obs, act = torch.tensor([[0.3, 2.0], [-2.0, -1.0]]), torch.tensor([[0.5], [-0.2]])
    torch.testing.assert_close(loaded.predict(obs, act).mean, model.predict(obs, act).mean)


def test_control_affine_encoding_exact_affinity_and_checkpoint(tmp_path):
    """control_affine: the MLP sees the state without controls; every control (actions and the
    control channels) times [1, sin, cos] feeds a linear gain, so each member's prediction is exactly
    affine in the controls; the fused planning path equals the normalized forward; a checkpoint
    keeps the control mask."""
    from robot_mbrl.models.checkpoint import load_checkpoint, save_checkpoint

    angle, ctrl = np.array([True, False, False]), np.array([False, False, True])  # theta, omega, u_echo
    model = ProbabilisticEnsemble(3, 1, angle, small_cfg(control_affine=True), seed=0, control_mask=ctrl)
    assert (
        model.mlp_dim == 1 + 2 and model.in_dim == 3 + 2 * 3
    )  # omega, sin, cos | u_echo, a, (u_echo, a) x (s, c)
    x = model.encode(torch.tensor([[0.3, 2.0, -0.4]]), torch.tensor([[0.5]]))
    s, c = math.sin(0.3), math.cos(0.3)
    torch.testing.assert_close(
        x[0], torch.tensor([2.0, s, c, -0.4, 0.5, -0.4 * s, -0.4 * c, 0.5 * s, 0.5 * c])
    )
    with torch.no_grad():  # non-trivial gains and normalizers, as after training
        model.gain.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
        feats = model.encode(torch.randn(64, 3), torch.randn(64, 1))
        model.fit_normalizers(feats, torch.randn(64, 3) * 0.3 + 0.1)
    obs = torch.tensor([[0.3, 2.0, -0.4], [2.9, -1.0, 0.8]])
    step = model.stepper()  # angles not wrapped: the affinity is exact channel by channel
    mean = {a: step(obs.expand(5, -1, -1), torch.full((5, 2, 1), a))[0] for a in (0.0, 1.0, -0.7)}
    torch.testing.assert_close(mean[-0.7] - mean[0.0], -0.7 * (mean[1.0] - mean[0.0]), rtol=1e-4, atol=1e-5)
    # the fused prediction (normalizers folded into the weights and gains) == the normalized forward
    xin = model.in_norm.normalize(model.encode(obs, torch.tensor([[0.5], [-0.2]])))
    with torch.no_grad():
        mu, _ = model(xin)
    delta = model.out_norm.denormalize(mu)
    ref = obs + delta
    ref[..., 0] = wrap_angle(ref[..., 0])
    torch.testing.assert_close(
        model.predict(obs, torch.tensor([[0.5], [-0.2]])).mean, ref, rtol=1e-4, atol=1e-5
    )
    nxt, _, _ = step(obs.expand(5, -1, -1), torch.tensor([[0.5], [-0.2]]).expand(5, -1, -1))
    torch.testing.assert_close(wrap_angle(nxt[..., 0]), ref[..., 0], rtol=1e-4, atol=1e-5)
    save_checkpoint(tmp_path / "m.pt", model)
    loaded, _, _ = load_checkpoint(tmp_path / "m.pt")
    assert loaded.control_mask.tolist() == ctrl.tolist()
    torch.testing.assert_close(
        loaded.predict(obs, torch.ones(2, 1)).mean, model.predict(obs, torch.ones(2, 1)).mean
    )
    with pytest.raises(ValueError, match="control_affine and angle_products"):
        small_cfg(control_affine=True, angle_products=True).validate()


def test_control_affine_gain_carries_from_fast_to_slow_states(one_thread):
    """The gains are trained, and they carry to states without data: pendulum with a cos(theta)
    input gain, no training rows upright and slow (|theta| < 1 has |omega| > 4 only); the learned
    gain at (0, 0) is within 20 % of the true one (untrained gains would give 0)."""
    rng = np.random.default_rng(0)
    n = 4000
    th, om, u = rng.uniform(-np.pi, np.pi, n), rng.uniform(-7, 7, n), rng.uniform(-1, 1, n)
    keep = (np.abs(th) > 1.0) | (np.abs(om) > 4.0)
    th, om, u = th[keep], om[keep], u[keep]
    om2 = om + 0.05 * (9.81 * np.sin(th) + 20.0 * np.cos(th) * u - 0.1 * om)
    th2 = np.pi - np.mod(np.pi - (th + 0.05 * om2), 2 * np.pi)
    data = dict(obs=np.stack([th, om], 1), act=u[:, None], next_obs=np.stack([th2, om2], 1),
                reward=np.zeros(len(th)))  # fmt: skip
    model = ProbabilisticEnsemble(2, 1, ANGLE, small_cfg(control_affine=True), seed=0)
    EnsembleTrainer(model, TrainerConfig(max_epochs=80, patience=10), seed=0).train(data)
    at = torch.zeros(2, 2)
    p = model.predict(at, torch.tensor([[1.0], [-1.0]])).mean.mean(0)
    gain = float(p[0, 1] - p[1, 1]) / 2.0
    assert abs(gain - 0.05 * 20.0) < 0.2 * 0.05 * 20.0, gain
