"""ValueFunction: n-step targets, a closed-form chain, angles, determinism, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robot_mbrl.planning.value import ValueConfig, ValueFunction, _n_step


def chain(length: int, episodes: int, terminate: bool = True) -> tuple[np.ndarray, ...]:
    """Deterministic chain s_i = i / length, reward 1 per step, ends after ``length`` steps."""
    s = np.arange(length, dtype=np.float32) / length
    obs = np.tile(s, episodes)[:, None]
    next_obs = np.tile(np.append(s[1:], 1.0), episodes)[:, None].astype(np.float32)
    reward = np.ones(length * episodes)
    end = np.tile(np.arange(length) == length - 1, episodes)
    term = end if terminate else np.zeros_like(end)
    trunc = np.zeros_like(end) if terminate else end
    return obs, reward, next_obs, term, trunc


def test_n_step_pieces_match_hand_computation() -> None:
    r = np.array([1.0, 2.0, 3.0, 4.0])
    term = np.array([False, True, False, False])
    trunc = np.zeros(4, bool)
    ret, idx, disc = _n_step(r, term, trunc, gamma=0.5, n_step=2)
    # i=0: 1 + 0.5*2, then terminated -> no bootstrap; i=1: 2, terminated
    # i=2: 3 + 0.5*4, bootstrap next_obs[3] with 0.25... but i=3 ends the data (truncation) -> 0.25
    np.testing.assert_allclose(ret, [2.0, 2.0, 5.0, 4.0])
    np.testing.assert_array_equal(idx, [1, 1, 3, 3])
    np.testing.assert_allclose(disc, [0.0, 0.0, 0.25, 0.5])


def test_learns_closed_form_discounted_return_on_chain() -> None:
    length, gamma = 8, 0.9
    cfg = ValueConfig(gamma=gamma, n_step=4, tau=0.05, lr=3e-3, batch_size=64, hidden=32, seed=1)
    vf = ValueFunction(1, config=cfg)
    report = vf.fit(*chain(length, 40), epochs=60)
    s = torch.arange(length, dtype=torch.float32).unsqueeze(-1) / length
    truth = (1 - gamma ** (length - torch.arange(length, dtype=torch.float32))) / (1 - gamma)
    with torch.no_grad():
        v = vf(s)
    assert report.loss_last < report.loss_first
    assert torch.allclose(v, truth, atol=0.1), (v, truth)  # truth spans 1 .. 5.7


def test_truncation_bootstraps_instead_of_zero() -> None:
    """Same chain but time-limited: the value at the last step must stay well above 1."""
    length, gamma = 6, 0.8
    cfg = ValueConfig(gamma=gamma, n_step=3, tau=0.05, lr=3e-3, batch_size=64, hidden=32, seed=2)
    vf = ValueFunction(1, config=cfg)
    vf.fit(*chain(length, 40, terminate=False), epochs=60)
    with torch.no_grad():
        last = float(vf(torch.tensor([[(length - 1) / length]])))
    assert last > 1.5  # terminated chain gives exactly 1.0 here


def test_angles_enter_as_sin_cos_and_batched_shapes() -> None:
    vf = ValueFunction(2, angle_mask=np.array([False, True]))
    obs = torch.randn(7, 11, 2)
    v = vf(obs)
    assert v.shape == (7, 11)
    shifted = obs + torch.tensor([0.0, 2 * np.pi])
    torch.testing.assert_close(vf(shifted), v, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 3])
def test_same_seed_same_fit_and_save_load_round_trip(seed: int, tmp_path) -> None:
    data = chain(5, 10)
    vfs = []
    for _ in range(2):
        vf = ValueFunction(1, config=ValueConfig(seed=seed, batch_size=16))
        vf.fit(*data, epochs=3)
        vfs.append(vf)
    x = torch.linspace(0, 1, 9).unsqueeze(-1)
    with torch.no_grad():
        torch.testing.assert_close(vfs[0](x), vfs[1](x), rtol=0, atol=0)
    vfs[0].save(tmp_path / "v.pt")
    loaded = ValueFunction.load(tmp_path / "v.pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), vfs[0](x), rtol=0, atol=0)
        torch.testing.assert_close(loaded.target_value(x), vfs[0].target_value(x), rtol=0, atol=0)
    assert loaded.cfg == vfs[0].cfg and loaded.fitted


def test_rejects_mismatched_shapes() -> None:
    vf = ValueFunction(2)
    with pytest.raises(ValueError):
        vf.fit(np.zeros((4, 2)), np.zeros(3), np.zeros((4, 2)), np.zeros(4, bool), np.zeros(4, bool))


def test_heads_agree_on_the_data_and_spread_off_it_pessimism_lowers_value() -> None:
    """Five heads fitted to the chain: their spread is small on the visited states and larger far
    from them; the planner's value (mean - pessimism x std) is below the plain mean exactly there."""
    cfg = ValueConfig(gamma=0.9, n_step=4, tau=0.05, lr=3e-3, batch_size=64, hidden=32, heads=5, seed=4)
    vf = ValueFunction(1, config=cfg)
    vf.fit(*chain(8, 40), epochs=60)
    on = torch.linspace(0, 7 / 8, 8).unsqueeze(-1)
    off = torch.tensor([[4.0], [-3.0], [6.0]])
    with torch.no_grad():
        heads_on, heads_off = vf.head_values(on), vf.head_values(off)
        assert heads_on.shape == (5, 8) and heads_off.shape == (5, 3)
        spread_on, spread_off = heads_on.std(0).mean(), heads_off.std(0).mean()
        assert spread_off > 3 * spread_on, (spread_on, spread_off)
        plain = vf(off, pessimism=0.0)
        torch.testing.assert_close(plain, heads_off.mean(0))
        torch.testing.assert_close(vf(off), plain - heads_off.std(0, correction=0))  # default 1.0


def test_one_head_loads_a_checkpoint_from_before_the_heads() -> None:
    """State dicts of the former single nn.Sequential V (``net.0.weight`` ...) load as one head."""
    vf = ValueFunction(2, angle_mask=np.array([False, True]), config=ValueConfig(heads=1, seed=5))
    old = {}
    for key, val in vf.state_dict().items():
        part, _, name = key.partition(".")
        if part in ("net", "target"):
            i = int(name[1:])
            old[f"{part}.{2 * i}.{'weight' if name[0] == 'w' else 'bias'}"] = (
                val[0].T.clone() if name[0] == "w" else val.reshape(-1).clone()
            )
        else:
            old[key] = val
    fresh = ValueFunction(2, angle_mask=np.array([False, True]), config=ValueConfig(heads=1, seed=9))
    fresh.load_state_dict(old)
    x = torch.randn(6, 2)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), vf(x), rtol=0, atol=0)


def test_prior_functions_are_fixed_and_the_heads_still_fit_the_data() -> None:
    """With randomized priors each head is trained network + fixed prior: the sum fits the chain,
    the heads agree on it and spread off it, and the prior networks are never trained."""
    cfg = ValueConfig(gamma=0.9, n_step=4, tau=0.05, lr=3e-3, batch_size=64, hidden=32, heads=5, seed=4,
                      prior_scale=2.0)  # fmt: skip
    vf = ValueFunction(1, config=cfg)
    assert vf.prior is not None and all(not p.requires_grad for p in vf.prior.parameters())
    prior0 = {k: v.clone() for k, v in vf.prior.state_dict().items()}
    on, off = torch.linspace(0, 7 / 8, 8).unsqueeze(-1), torch.tensor([[4.0], [-3.0], [6.0]])
    with torch.no_grad():
        before = vf.head_values(off).std(0).mean()
    vf.fit(*chain(8, 40), epochs=60)
    assert all(torch.equal(prior0[k], v) for k, v in vf.prior.state_dict().items())
    truth = (1 - 0.9 ** (8 - torch.arange(8.0))) / (1 - 0.9)
    with torch.no_grad():
        heads_on = vf.head_values(on)
        assert torch.allclose(heads_on.mean(0), truth, atol=0.3)
        assert vf.head_values(off).std(0).mean() > 3 * heads_on.std(0).mean()
        assert before > 0  # the priors alone already disagree (no data needed)
    plain = ValueFunction(1, config=ValueConfig(heads=5, seed=4))
    assert plain.prior is None and not any(k.startswith("prior") for k in plain.state_dict())


def test_regress_fits_fixed_targets_and_syncs_the_targets() -> None:
    cfg = ValueConfig(gamma=0.9, lr=3e-3, batch_size=64, hidden=32, heads=3, seed=6)
    vf = ValueFunction(1, config=cfg)
    with pytest.raises(ValueError, match="fit"):
        vf.regress(np.zeros((4, 1)), torch.zeros(3, 4), epochs=1)
    vf.fit(*chain(8, 10), epochs=2)
    x = np.linspace(0, 1, 64, dtype=np.float32)[:, None]
    want = torch.tensor(3.0 * np.sin(3 * x[:, 0])).expand(3, -1).clone()
    want[1, 0] = float("nan")  # a non-finite target drops its row for every head
    with pytest.raises(ValueError, match="targets"):
        vf.regress(x, want[:2], epochs=1)
    vf.regress(x, want, epochs=300)
    xt = torch.as_tensor(x)
    with torch.no_grad():
        assert torch.allclose(vf.head_values(xt)[:, 1:], want[:, 1:], atol=0.15)
        torch.testing.assert_close(
            vf.target_value(xt), vf.head_values(xt), rtol=1e-5, atol=1e-5
        )  # head_values: the folded inference path


@pytest.mark.parametrize(
    "angles, prior", [([False, True, False], 0.0), ([False, True, False], 0.7), ([False] * 3, 0.5)]
)
def test_inference_path_equals_the_trained_network(angles, prior):
    """V without gradients (the planner's folded path: normalization in the first layer, prior heads
    stacked, output scale in the last layer) equals the differentiable path head by head, and follows
    a parameter or normalizer change (no stale cache)."""
    vf = ValueFunction(3, np.array(angles), ValueConfig(heads=4, prior_scale=prior))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        vf.in_mean.copy_(torch.randn(len(vf.lin_idx), generator=gen))
        vf.in_std.copy_(torch.rand(len(vf.lin_idx), generator=gen) + 0.5)
        vf.out_scale.fill_(3.0)
    obs = torch.randn(2, 7, 3, generator=gen) * 2

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            fast = vf.head_values(obs)
        return fast, vf.head_values(obs).detach()  # grad enabled: the training path

    fast, ref = both()
    assert fast.shape == (4, 2, 7)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        vf.net.w1.mul_(1.5)
        vf.in_std.mul_(2.0)
    fast2, ref2 = both()
    torch.testing.assert_close(fast2, ref2, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fast2, fast)


def test_the_runs_seed_reaches_the_value_function(tmp_path):
    """--seed drives every stochastic component: V's initialization and minibatch order stayed at
    value.seed (0) whatever the run's seed; a checkpoint keeps the combined seed."""
    from robot_mbrl.agents.mpc import MPCAgent
    from robot_mbrl.config import load_config
    from robot_mbrl.factory import make_robot, make_task

    def agent(seed):
        cfg = load_config(None, [f"seed={seed}"])
        return MPCAgent(cfg, make_robot(cfg).spec, make_task(cfg)), cfg

    (a, _), (b, _), (c, cfg5) = agent(0), agent(5), agent(5)
    w = [x.value.net.w0.detach() for x in (a, b, c)]
    assert not torch.equal(w[0], w[1]) and torch.equal(w[1], w[2])
    assert (a.value.seed, b.value.seed) == (0, 5)
    c.save(tmp_path)
    loaded = MPCAgent.load(tmp_path, cfg5, make_robot(cfg5).spec, make_task(cfg5))
    assert loaded.value.seed == 5
