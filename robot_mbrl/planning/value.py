"""State-value function V(s) learned from REAL transitions, the planner's tail ``gamma^k V(s_k)``.

Shapes: ``N`` transitions, ``S`` observation dim, ``F`` network input dim (``S`` plus one extra
per angle channel: angles enter as sin, cos). ``V`` takes any leading dims: ``... x S -> ...``.

Targets are n-step returns bootstrapped with a Polyak-averaged target network (per head: an
ensemble of ``heads`` networks, each with its own target; the planner sees their pessimistic mean):

    G_i = sum_{j < m} gamma^j r_{i+j} + gamma^m (1 - terminated_{i+m-1}) V_target(next_obs_{i+m-1})

with ``m = min(n_step, ticks left in the episode)``: an episode boundary (``terminated`` or
``truncated``; the end of the arrays counts as truncated) stops the sum; a termination bootstraps
with 0, a truncation with V of its ``next_obs``. Use the planner's ``gamma`` (per control tick).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from robot_mbrl.models.ensemble import wrap_angle
from robot_mbrl.planning.terminal import TerminalValue
from robot_mbrl.planning.value_net import HeadsInference, _Heads
from robot_mbrl.typedconfig import build, param, to_dict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValueConfig:
    hidden: int = param(64, "units per hidden layer", ge=1)
    layers: int = param(2, "hidden layers", ge=1)
    gamma: float = param(0.99, "discount per control tick (must match PlannerConfig.gamma)", gt=0, le=1)
    n_step: int = param(5, "n of the n-step return targets", ge=1)
    tau: float = param(0.01, "Polyak rate of the target network per update", gt=0, le=1)
    lr: float = param(1e-3, "Adam learning rate", gt=0)
    weight_decay: float = param(0.0, "Adam L2 weight decay", ge=0)
    batch_size: int = param(256, "minibatch size", ge=1)
    epochs: int = param(
        150, "passes over the whole buffer per fit() (fewer: V lags the data, see RESULTS.md)", ge=1
    )
    heads: int = param(
        5, "independent V networks (own initialization and minibatch order); see ValueFunction", ge=1
    )
    pessimism: float = param(1.0, "V(s) = mean over heads - pessimism x std over heads", ge=0)
    prior_scale: float = param(
        0.0,
        "scale of a fixed random prior network added to each head (randomized prior functions): the "
        "heads then disagree off the data, so pessimism and learning-time optimism mean something",
        ge=0,
    )
    learning_pessimism: float | None = param(
        None,
        "pessimism of the planner's V in learning episodes (negative: optimism, seek states V is "
        "unsure of); None: the same as in evaluation and deployment",
    )
    planned_rounds: int = param(
        0,
        "rounds of fitted value iteration with planned targets after each fit on real n-step returns "
        "(robot_mbrl.planning.value_targets; 0: n-step targets only)",
        ge=0,
    )
    terminal: str = param(
        "none",
        "terminal value around the task's goal: 'lqr' = max(V, LQR cost-to-go of the learned model's "
        "linearization) where higher (robot_mbrl.planning.terminal), refreshed after each "
        "model fit; tasks without a goal equilibrium ignore it",
        choices=("none", "lqr", "lqr_model"),
    )
    terminal_rows: int = param(
        128, "real transitions of highest reward the terminal value's linear fit uses", ge=1
    )
    planned_epochs: int = param(40, "epochs of regression on the planned targets per round", ge=1)
    seed: int = param(0, "seed of initialization and minibatch order, added to the run's seed")


@dataclass
class ValueFitReport:
    epochs: int
    updates: int
    loss_first: float  # mean TD loss of the first epoch
    loss_last: float  # mean TD loss of the last epoch
    value_mean: float  # mean V over the fitted observations after training
    wall_s: float


class ValueFunction(torch.nn.Module):
    """``heads`` MLPs ``V_k(s)``, each with its own Polyak target network; ``vf(obs)`` maps
    ``... x S -> ...`` (physical units) to ``mean_k V_k - pessimism * std_k V_k``.

    Why an ensemble: the planner maximizes over candidate tails, so it seeks out states where a
    single V network errs upwards (on the balance task a 4x larger CEM population made a single V's
    MPC worse; see benchmarks/RESULTS.md). Heads that differ in initialization and minibatch order
    agree where the data pins V down and spread apart where it does not; the pessimistic mean
    penalizes exactly those states."""

    def __init__(
        self,
        obs_dim: int,
        angle_mask: np.ndarray | None = None,
        config: ValueConfig | None = None,
        run_seed: int = 0,
    ):
        super().__init__()
        self.cfg = cfg = config or ValueConfig()
        self.seed = cfg.seed + run_seed  # the run's seed moves V's initialization and minibatch order too
        mask = np.zeros(obs_dim, bool) if angle_mask is None else np.asarray(angle_mask, bool)
        if mask.shape != (obs_dim,):
            raise ValueError(f"angle_mask: expected shape ({obs_dim},), got {mask.shape}")
        self.obs_dim = obs_dim
        self.register_buffer("angle_idx", torch.as_tensor(np.flatnonzero(mask)))
        self.register_buffer("lin_idx", torch.as_tensor(np.flatnonzero(~mask)))
        self._angle_mask = torch.as_tensor(mask)
        n_in = obs_dim + int(mask.sum())
        # input normalization of the non-angle channels and output scale, fitted on the first fit()
        self.register_buffer("in_mean", torch.zeros(len(self.lin_idx)))
        self.register_buffer("in_std", torch.ones(len(self.lin_idx)))
        self.register_buffer("out_scale", torch.ones(()))
        gen = torch.Generator().manual_seed(self.seed)
        self.net = _Heads(n_in, cfg.hidden, cfg.layers, cfg.heads, gen)
        self.target = _Heads(n_in, cfg.hidden, cfg.layers, cfg.heads, gen)
        self.target.load_state_dict(self.net.state_dict())
        self.target.requires_grad_(False)
        # randomized prior functions (Osband et al. 2018): a fixed random network per head, added to
        # the trained one; the data pin the sum down, off the data the heads keep their priors' spread
        self.prior: _Heads | None = None
        if cfg.prior_scale > 0:
            self.prior = _Heads(
                n_in, cfg.hidden, cfg.layers, cfg.heads, torch.Generator().manual_seed(self.seed + 7919)
            )
            self.prior.requires_grad_(False)
        # LQR terminal value (robot_mbrl.planning.terminal), set after each model fit; term_on 0: off
        self.register_buffer("term_goal", torch.zeros(obs_dim))
        self.register_buffer("term_P", torch.zeros(obs_dim, obs_dim))
        self.register_buffer("term_on", torch.zeros(()))
        self.register_buffer("term_v0", torch.zeros(()))
        self.fitted = False
        self._infer = HeadsInference()

    def set_terminal(self, term: TerminalValue | None) -> None:
        """Every head's value becomes ``max(V_h(s), V_T(s))`` with the LQR value of ``term`` (None: off)."""
        if term is None:
            self.term_on.zero_()
            return
        self.term_goal.copy_(torch.as_tensor(term.goal))
        self.term_P.copy_(torch.as_tensor(term.P))
        self.term_on.fill_(1.0)
        self.term_v0.fill_(term.v0)

    @property
    def has_terminal(self) -> bool:
        return bool(self.term_on > 0)

    def _floor(self, obs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``K x ...`` head values raised to the terminal value where it is higher (``obs``: ``... x S``)."""
        if not self.has_terminal:
            return v
        ds = obs.float() - self.term_goal
        ds = torch.where(self._angle_mask, wrap_angle(ds), ds)
        q = (ds @ self.term_P).mul_(ds).sum(-1)  # ds' P ds (half the time of the einsum at plan sizes)
        return torch.maximum(v, q.mul_(-0.5).add_(self.term_v0))

    def _out(self, heads: _Heads, f: torch.Tensor) -> torch.Tensor:
        """``heads(f)`` plus the scaled prior, in value units."""
        v = heads(f)
        if self.prior is not None:
            with torch.no_grad():
                p = self.prior(f)
            v = v + self.cfg.prior_scale * p
        return v * self.out_scale

    def features(self, obs: torch.Tensor) -> torch.Tensor:
        """``... x S -> ... x F``: normalized linear channels, sin and cos of the angles."""
        lin = (obs[..., self.lin_idx] - self.in_mean) / self.in_std
        ang = obs[..., self.angle_idx]
        return torch.cat([lin, torch.sin(ang), torch.cos(ang)], dim=-1)

    def head_values(self, obs: torch.Tensor) -> torch.Tensor:
        """``... x S -> K x ...``: every head's value (without gradients: the same numbers through
        :class:`~robot_mbrl.planning.value_net.HeadsInference`, the planner's path)."""
        if not torch.is_grad_enabled():
            return self._floor(obs, self._infer(self, obs))
        lead = obs.shape[:-1]
        v = self._out(self.net, self.features(obs.float()).reshape(-1, self.net.w0.shape[1]))
        return self._floor(obs, v.reshape(self.cfg.heads, *lead))

    def forward(self, obs: torch.Tensor, pessimism: float | None = None) -> torch.Tensor:
        """``... x S -> ...`` state values: mean over heads minus ``pessimism`` (default: the
        config's) x their std; a negative ``pessimism`` is optimism (an exploration bonus)."""
        v = self.head_values(obs)
        if self.cfg.heads == 1:
            return v[0]
        kappa = self.cfg.pessimism if pessimism is None else pessimism
        std, mean = torch.std_mean(v, 0, correction=0)
        return mean - kappa * std

    def target_value(self, obs: torch.Tensor) -> torch.Tensor:
        """``... x S -> K x ...``: every head's target network (no gradient)."""
        with torch.no_grad():
            f = self.features(obs.float())
            v = self._out(self.target, f.reshape(-1, f.shape[-1])).reshape(-1, *obs.shape[:-1])
            return self._floor(obs, v)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        """Checkpoints written before the heads (``net.{2i}.weight`` of one ``nn.Sequential``) load as
        a one-head ensemble."""
        for key in ("term_goal", "term_P", "term_on", "term_v0"):  # before the terminal value: off
            state_dict.setdefault(prefix + key, getattr(self, key).detach().clone().zero_())
        for part in ("net", "target"):
            i = 0
            while f"{prefix}{part}.{2 * i}.weight" in state_dict:
                w = state_dict.pop(f"{prefix}{part}.{2 * i}.weight")
                b = state_dict.pop(f"{prefix}{part}.{2 * i}.bias")
                state_dict[f"{prefix}{part}.w{i}"] = w.T.unsqueeze(0).contiguous()
                state_dict[f"{prefix}{part}.b{i}"] = b.view(1, 1, -1)
                i += 1
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def fit(
        self,
        obs: np.ndarray,
        reward: np.ndarray,
        next_obs: np.ndarray,
        terminated: np.ndarray,
        truncated: np.ndarray,
        epochs: int | None = None,
        seed: int | None = None,
    ) -> ValueFitReport:
        """Train on time-ordered real transitions: ``N x S``, ``N``, ``N x S``, ``N`` bool, ``N`` bool.

        Episodes must be contiguous; ``truncated`` marks every other boundary (time limit, buffer
        gap). Calling fit again continues training (normalizers are fitted on the first call).
        """
        t0 = time.perf_counter()
        cfg = self.cfg
        o = torch.as_tensor(np.array(obs, np.float32))
        no = torch.as_tensor(np.array(next_obs, np.float32))
        r = np.asarray(reward, np.float64).reshape(-1)
        term = np.asarray(terminated, bool).reshape(-1)
        trunc = np.asarray(truncated, bool).reshape(-1)
        n = len(r)
        if not (o.shape == no.shape == (n, self.obs_dim) and len(term) == len(trunc) == n):
            raise ValueError(f"fit: expected N x {self.obs_dim} obs/next_obs and N rewards/flags, N={n}")
        if not self.fitted:
            lin = o[:, self.lin_idx]
            self.in_mean.copy_(lin.mean(0))
            self.in_std.copy_(lin.std(0).clamp_min(1e-6) if n > 1 else torch.ones_like(self.in_std))
            horizon = min(1.0 / (1.0 - cfg.gamma), 1e3) if cfg.gamma < 1 else 1e3
            spread = max(abs(float(r.mean())), float(r.std()) if n > 1 else 0.0, 1e-3)
            self.out_scale.fill_(spread * horizon)  # fixed output unit: regress O(1) numbers
            self.fitted = True
        ret, boot_idx, boot_disc = _n_step(r, term, trunc, cfg.gamma, cfg.n_step)
        ret_t = torch.as_tensor(ret, dtype=torch.float32)
        idx_t = torch.as_tensor(boot_idx)
        disc_t = torch.as_tensor(boot_disc, dtype=torch.float32)

        def td_target(b: torch.Tensor) -> torch.Tensor:  # head k's own target network on its rows
            nb = no[idx_t[b]]
            return ret_t[b] + disc_t[b] * self._floor(nb, self._out(self.target, self.features(nb)))

        return self._train(o, td_target, cfg.epochs if epochs is None else epochs, seed, polyak=True, t0=t0)

    def regress(
        self, obs: np.ndarray, targets: torch.Tensor, epochs: int, seed: int | None = None
    ) -> ValueFitReport:
        """Fit every head to fixed targets (``N x S``, ``K x N``; rows with a non-finite target of any
        head are dropped), then copy the heads into their target networks: one round of fitted
        value iteration (see :mod:`robot_mbrl.planning.value_targets`). Needs a fitted V."""
        if not self.fitted:
            raise ValueError("regress: fit() the value function on real transitions first")
        t0 = time.perf_counter()
        o = torch.as_tensor(np.array(obs, np.float32))
        y = torch.as_tensor(targets, dtype=torch.float32)
        if y.shape != (self.cfg.heads, len(o)):
            raise ValueError(f"regress: expected targets {self.cfg.heads} x {len(o)}, got {tuple(y.shape)}")
        ok = torch.isfinite(y).all(0)
        o, y = o[ok], y[:, ok]
        rows = torch.arange(self.cfg.heads).unsqueeze(1)
        report = self._train(o, lambda b: y[rows, b], epochs, seed, polyak=False, t0=t0)
        self.target.load_state_dict(self.net.state_dict())
        return report

    def _train(
        self,
        o: torch.Tensor,
        target_fn: Callable[[torch.Tensor], torch.Tensor],
        epochs: int,
        seed: int | None,
        polyak: bool,
        t0: float,
    ) -> ValueFitReport:
        """Minibatch MSE on ``target_fn(b)`` (``K x B`` targets for row indices ``b``, ``K x B``),
        every head its own minibatch order; Polyak-update the targets after each step if ``polyak``."""
        cfg, n, heads = self.cfg, len(o), self.cfg.heads
        gen = torch.Generator().manual_seed(self.seed if seed is None else seed)
        opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        losses, updates = [], 0
        for _ in range(epochs):
            perm = torch.stack([torch.randperm(n, generator=gen) for _ in range(heads)])  # K x N
            total = 0.0
            for start in range(0, n, cfg.batch_size):
                b = perm[:, start : start + cfg.batch_size]  # K x B
                with torch.no_grad():
                    y = target_fn(b)
                v = self._out(self.net, self.features(o[b]))  # K x B
                loss = F.mse_loss(v / self.out_scale, y / self.out_scale)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if polyak:
                    self._polyak(cfg.tau)
                total += float(loss.detach()) * b.shape[1]
                updates += 1
            losses.append(total / max(n, 1))
        with torch.no_grad():
            v_mean = float(self(o).mean()) if n else 0.0
        report = ValueFitReport(
            epochs=epochs,
            updates=updates,
            loss_first=losses[0] if losses else float("nan"),
            loss_last=losses[-1] if losses else float("nan"),
            value_mean=v_mean,
            wall_s=time.perf_counter() - t0,
        )
        log.info("value fit: %s", report)
        return report

    @torch.no_grad()
    def _polyak(self, tau: float) -> None:
        for pt, p in zip(self.target.parameters(), self.net.parameters(), strict=True):
            pt.lerp_(p, tau)

    def save(self, path: str | Path) -> None:
        """Write ``{"config", "obs_dim", "state_dict", "fitted"}`` (no pickled objects)."""
        torch.save(
            {
                "config": to_dict(self.cfg),
                "obs_dim": self.obs_dim,
                "fitted": self.fitted,
                "angle_idx": self.angle_idx.tolist(),
                "state_dict": self.state_dict(),
            },
            Path(path),
        )

    @classmethod
    def load(cls, path: str | Path) -> ValueFunction:
        data = torch.load(Path(path), weights_only=True)
        mask = np.zeros(data["obs_dim"], bool)
        mask[data["angle_idx"]] = True
        vf = cls(data["obs_dim"], mask, build(ValueConfig, data["config"], source=str(path)))
        vf.load_state_dict(data["state_dict"])
        vf.fitted = bool(data["fitted"])
        return vf


def _n_step(
    r: np.ndarray, term: np.ndarray, trunc: np.ndarray, gamma: float, n_step: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n-step pieces for every transition ``i`` (all ``N``): discounted reward sum, index of the
    transition whose ``next_obs`` bootstraps, and its discount ``gamma^m`` (0 after termination)."""
    n = len(r)
    end = term | trunc
    if n:
        end[-1] = True  # the data ends: treat as a truncation unless terminated
    ret = np.zeros(n)
    boot_idx = np.arange(n)
    boot_disc = np.zeros(n)
    alive = np.ones(n, bool)  # still summing (no episode end within the first j steps)
    for j in range(n_step):
        idx = np.minimum(np.arange(n) + j, n - 1)
        ret += np.where(alive, gamma**j * r[idx], 0.0)
        boot_idx = np.where(alive, idx, boot_idx)
        boot_disc = np.where(alive, np.where(term[idx], 0.0, gamma ** (j + 1)), boot_disc)
        alive &= ~end[idx]
    return ret, boot_idx, boot_disc
