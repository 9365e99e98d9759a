"""State-value function V(s) learned from REAL transitions, the planner's tail ``gamma^k V(s_k)``.

Shapes: ``N`` transitions, ``S`` observation dim, ``F`` network input dim (``S`` plus one extra
per angle channel: angles enter as sin, cos). ``V`` takes any leading dims: ``... x S -> ...``.

Targets are n-step returns bootstrapped with a Polyak-averaged target network:

    G_i = sum_{j < m} gamma^j r_{i+j} + gamma^m (1 - terminated_{i+m-1}) V_target(next_obs_{i+m-1})

with ``m = min(n_step, ticks left in the episode)``: an episode boundary (``terminated`` or
``truncated``; the end of the arrays counts as truncated) stops the sum; a termination bootstraps
with 0, a truncation with V of its ``next_obs``. Use the planner's ``gamma`` (per control tick).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

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
    seed: int = param(0, "seed of initialization and minibatch order")


@dataclass
class ValueFitReport:
    epochs: int
    updates: int
    loss_first: float  # mean TD loss of the first epoch
    loss_last: float  # mean TD loss of the last epoch
    value_mean: float  # mean V over the fitted observations after training
    wall_s: float


class ValueFunction(torch.nn.Module):
    """MLP ``V(s)`` with a target network; ``vf(obs)`` maps ``... x S -> ...`` (physical units)."""

    def __init__(self, obs_dim: int, angle_mask: np.ndarray | None = None, config: ValueConfig | None = None):
        super().__init__()
        self.cfg = cfg = config or ValueConfig()
        mask = np.zeros(obs_dim, bool) if angle_mask is None else np.asarray(angle_mask, bool)
        if mask.shape != (obs_dim,):
            raise ValueError(f"angle_mask: expected shape ({obs_dim},), got {mask.shape}")
        self.obs_dim = obs_dim
        self.register_buffer("angle_idx", torch.as_tensor(np.flatnonzero(mask)))
        self.register_buffer("lin_idx", torch.as_tensor(np.flatnonzero(~mask)))
        n_in = obs_dim + int(mask.sum())
        # input normalization of the non-angle channels and output scale, fitted on the first fit()
        self.register_buffer("in_mean", torch.zeros(len(self.lin_idx)))
        self.register_buffer("in_std", torch.ones(len(self.lin_idx)))
        self.register_buffer("out_scale", torch.ones(()))
        gen = torch.Generator().manual_seed(cfg.seed)
        self.net = self._mlp(n_in, cfg, gen)
        self.target = self._mlp(n_in, cfg, gen)
        self.target.load_state_dict(self.net.state_dict())
        self.target.requires_grad_(False)
        self.fitted = False

    @staticmethod
    def _mlp(n_in: int, cfg: ValueConfig, gen: torch.Generator) -> torch.nn.Sequential:
        """SiLU MLP ``F -> 1`` initialized from ``gen`` (PyTorch's default uniform ranges)."""
        dims = [n_in] + [cfg.hidden] * cfg.layers + [1]
        mods: list[torch.nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:], strict=True):
            lin = torch.nn.Linear(a, b, device="meta").to_empty(device="cpu")  # no global RNG
            with torch.no_grad():
                lin.weight.uniform_(-(a**-0.5), a**-0.5, generator=gen)
                lin.bias.uniform_(-(a**-0.5), a**-0.5, generator=gen)
            mods += [lin, torch.nn.SiLU()]
        return torch.nn.Sequential(*mods[:-1])

    def features(self, obs: torch.Tensor) -> torch.Tensor:
        """``... x S -> ... x F``: normalized linear channels, sin and cos of the angles."""
        lin = (obs[..., self.lin_idx] - self.in_mean) / self.in_std
        ang = obs[..., self.angle_idx]
        return torch.cat([lin, torch.sin(ang), torch.cos(ang)], dim=-1)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """``... x S -> ...`` state values."""
        return self.net(self.features(obs.float())).squeeze(-1) * self.out_scale

    def target_value(self, obs: torch.Tensor) -> torch.Tensor:
        """``... x S -> ...`` values of the target network (no gradient)."""
        with torch.no_grad():
            return self.target(self.features(obs.float())).squeeze(-1) * self.out_scale

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
        gen = torch.Generator().manual_seed(cfg.seed if seed is None else seed)
        opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        epochs = cfg.epochs if epochs is None else epochs
        losses, updates = [], 0
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen)
            total = 0.0
            for start in range(0, n, cfg.batch_size):
                b = perm[start : start + cfg.batch_size]
                # n-step target from the target network, regressed in units of out_scale
                y = ret_t[b] + disc_t[b] * self.target_value(no[idx_t[b]])
                loss = F.mse_loss(self(o[b]) / self.out_scale, y / self.out_scale)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                self._polyak(cfg.tau)
                total += float(loss.detach()) * len(b)
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
