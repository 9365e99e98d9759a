"""Probabilistic ensemble of MLPs (PETS-style) computed as one batched network.

Shapes: ``E`` members, ``N``/``B`` batch, ``S`` observation dim, ``A`` action dim, ``I`` network input
dim (``S`` + one extra per angle channel + ``A``), ``D`` output dim (``S``, plus 1 with a reward head).

Each member maps a normalized input ``[obs (angles as sin, cos), act]`` to a Gaussian over the
normalized target ``[next_obs - obs (angle channels: wrapped difference), reward?]``. All members run
in one computation: weights are stacked ``E x in x out`` and each layer is one ``torch.baddbmm``.
The log-variance is softly bounded between learned ``min_logvar`` and ``max_logvar`` (PETS softplus
trick) so the NLL cannot collapse the variance outside the data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from robot_mbrl.models.base import Prediction
from robot_mbrl.models.normalizer import Normalizer
from robot_mbrl.typedconfig import param

# name -> f(x, inplace); in-place variants save an allocation per layer on the no-grad planning path
ACTIVATIONS = {
    "silu": lambda x, inplace: F.silu(x, inplace=inplace),
    "relu": lambda x, inplace: F.relu(x, inplace=inplace),
    "tanh": lambda x, inplace: x.tanh_() if inplace else torch.tanh(x),
    "elu": lambda x, inplace: F.elu(x, inplace=inplace),
}


@dataclass(frozen=True)
class EnsembleConfig:
    members: int = param(7, "ensemble members E, each trained on its own bootstrap resample", ge=1)
    elites: int = param(5, "members with the best holdout loss (the planner may use only these)", ge=1)
    hidden: int = param(200, "units per hidden layer", ge=1)
    layers: int = param(4, "hidden layers per member", ge=1)
    activation: str = param("silu", "hidden activation", choices=tuple(ACTIVATIONS))
    learn_reward: bool = param(False, "also predict the reward (Prediction.reward)")
    lr: float = param(1e-3, "Adam learning rate", gt=0)
    weight_decay: tuple[float, ...] = param(
        factory=lambda: (2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4),
        doc="L2 weight decay per layer (input layer first, output layer last); "
        "missing entries repeat the last value, extra ones are ignored",
    )
    min_logvar_init: float = param(-10.0, "initial lower soft bound of the normalized log-variance")
    max_logvar_init: float = param(0.5, "initial upper soft bound of the normalized log-variance")

    def validate(self) -> None:
        if self.elites > self.members:
            raise ValueError(f"elites ({self.elites}) <= members ({self.members})")
        if not self.weight_decay or any(w < 0 for w in self.weight_decay):
            raise ValueError("weight_decay: a non-empty list of values >= 0")
        if self.min_logvar_init >= self.max_logvar_init:
            raise ValueError("min_logvar_init < max_logvar_init")

    def layer_decay(self, layer: int) -> float:
        """Weight decay of layer ``layer`` (0 = input layer, ``layers`` = output layer)."""
        return self.weight_decay[min(layer, len(self.weight_decay) - 1)]


def wrap_angle(x: torch.Tensor) -> torch.Tensor:
    """Wrap radians to (-pi, pi]."""
    return math.pi - torch.remainder(math.pi - x, 2 * math.pi)


class ProbabilisticEnsemble(torch.nn.Module):
    """E Gaussian MLP members in one batched network; implements :class:`~robot_mbrl.models.base.DynamicsModel`."""

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        angle_mask: np.ndarray | None = None,
        cfg: EnsembleConfig | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.cfg = cfg = cfg or EnsembleConfig()
        self.obs_dim, self.act_dim, self.seed = obs_dim, act_dim, seed
        mask = np.zeros(obs_dim, bool) if angle_mask is None else np.asarray(angle_mask, bool)
        if mask.shape != (obs_dim,):
            raise ValueError(f"angle_mask: expected shape ({obs_dim},), got {mask.shape}")
        self.register_buffer("angle_mask", torch.as_tensor(mask))
        self.in_dim = obs_dim + int(mask.sum()) + act_dim
        self.out_dim = obs_dim + int(cfg.learn_reward)
        self._act = ACTIVATIONS[cfg.activation]
        E, D = cfg.members, self.out_dim
        gen = torch.Generator().manual_seed(seed)
        dims = [self.in_dim] + [cfg.hidden] * cfg.layers + [2 * D]
        self.weights = torch.nn.ParameterList()
        self.biases = torch.nn.ParameterList()
        for d_in, d_out in zip(dims[:-1], dims[1:], strict=True):
            w = torch.empty(E, d_in, d_out)
            torch.nn.init.trunc_normal_(w, std=1.0 / (2.0 * math.sqrt(d_in)), generator=gen)
            self.weights.append(torch.nn.Parameter(w))
            self.biases.append(torch.nn.Parameter(torch.zeros(E, 1, d_out)))
        self.max_logvar = torch.nn.Parameter(torch.full((E, 1, D), cfg.max_logvar_init))
        self.min_logvar = torch.nn.Parameter(torch.full((E, 1, D), cfg.min_logvar_init))
        self.in_norm = Normalizer(self.in_dim)
        self.out_norm = Normalizer(self.out_dim)
        self.register_buffer("elite_idx", torch.arange(min(cfg.elites, E)))

    # -- DynamicsModel attributes ----------------------------------------------------------
    @property
    def num_members(self) -> int:
        return self.cfg.members

    @property
    def elites(self) -> tuple[int, ...]:
        return tuple(int(i) for i in self.elite_idx)

    def set_elites(self, members: list[int] | tuple[int, ...]) -> None:
        if len(members) != len(self.elite_idx):
            raise ValueError(f"set_elites: expected {len(self.elite_idx)} members, got {len(members)}")
        self.elite_idx.copy_(torch.as_tensor(sorted(members)))

    @property
    def state_scale(self) -> torch.Tensor:
        """``S``: per-channel std of the next-state delta, the unit of "normalized" state errors."""
        return self.out_norm.std[: self.obs_dim]

    # -- encoding --------------------------------------------------------------------------
    def encode(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """``... x S``, ``... x A`` -> ``... x I`` raw network input (angles as sin, cos)."""
        m = self.angle_mask
        ang = obs[..., m]
        return torch.cat([obs[..., ~m], torch.sin(ang), torch.cos(ang), act], dim=-1)

    def target(self, obs: torch.Tensor, next_obs: torch.Tensor, reward: torch.Tensor | None) -> torch.Tensor:
        """``... x S``, ``... x S``, ``...`` -> ``... x D`` raw target (wrapped delta, reward)."""
        delta = next_obs - obs
        delta = torch.where(self.angle_mask, wrap_angle(delta), delta)
        if self.cfg.learn_reward:
            if reward is None:
                raise ValueError("learn_reward=True: expected rewards, got None")
            delta = torch.cat([delta, reward.unsqueeze(-1).to(delta.dtype)], dim=-1)
        return delta

    def fit_normalizers(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Fit on ``N x I`` raw inputs and ``N x D`` raw targets (from :meth:`encode`/:meth:`target`)."""
        self.in_norm.fit(inputs)
        self.out_norm.fit(targets)

    # -- network ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized input ``N x I`` (shared) or ``E x N x I`` -> normalized mean, log-variance ``E x N x D``."""
        n, inplace = len(self.weights), not torch.is_grad_enabled()
        if x.dim() == 2:  # shared input: expand (no copy); faster than broadcasting matmul on CPU
            x = x.expand(self.num_members, *x.shape)
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            # planning path: bmm + in-place bias add measured faster than baddbmm at N=3500
            x = torch.bmm(x, w).add_(b) if inplace else torch.baddbmm(b, x, w)
            if i < n - 1:
                x = self._act(x, inplace)
        return self._split(x, self.max_logvar, self.min_logvar)

    def forward_member(self, x: torch.Tensor, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference single-member forward (``N x I`` -> ``N x D`` twice); for tests, not the hot path."""
        n = len(self.weights)
        for i in range(n):
            x = x @ self.weights[i][e] + self.biases[i][e]
            if i < n - 1:
                x = self._act(x, False)
        return self._split(x, self.max_logvar[e], self.min_logvar[e])

    def _split(
        self, out: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = out.chunk(2, dim=-1)
        logvar = hi - F.softplus(hi - logvar)
        logvar = lo + F.softplus(logvar - lo)
        return mean, logvar

    # -- prediction ------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, obs: torch.Tensor, act: torch.Tensor) -> Prediction:
        """``N x S``/``N x A`` (shared) or ``E x N x S``/``E x N x A`` -> :class:`Prediction` (``E x N x S``).

        ``disagreement`` is the std over all E members (population std) of the predicted next state
        divided by :attr:`state_scale`, averaged over the S channels; ``max_pairwise`` is the largest
        L2 distance between two members' predictions in the same units. Angle differences are wrapped.
        """
        dtype = self.in_norm.mean.dtype
        obs, act = obs.to(dtype), act.to(dtype)
        x = self.in_norm.normalize(self.encode(obs, act))
        mu, logvar = self.forward(x)
        S, std = self.obs_dim, self.out_norm.std
        raw = self.out_norm.denormalize(mu)
        nxt = obs + raw[..., :S]  # E x N x S (obs broadcasts when shared)
        diff = nxt - nxt[:1]
        diff = torch.where(self.angle_mask, wrap_angle(diff), diff) / self.state_scale
        disagreement = diff.std(0, correction=0).mean(-1)
        pairwise = torch.cdist(diff.transpose(0, 1), diff.transpose(0, 1))  # N x E x E
        reward = raw[..., S] if self.cfg.learn_reward else None
        return Prediction(
            mean=torch.where(self.angle_mask, wrap_angle(nxt), nxt),
            var=logvar[..., :S].exp() * std[:S] ** 2,
            reward=reward,
            disagreement=disagreement,
            max_pairwise=pairwise.amax(dim=(-1, -2)),
        )
