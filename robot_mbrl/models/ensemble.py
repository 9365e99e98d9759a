"""Probabilistic ensemble of MLPs (PETS-style) computed as one batched network.

Shapes: ``E`` members, ``N``/``B`` batch, ``S`` observation dim, ``A`` action dim, ``I`` network input
dim (``S`` + one extra per angle channel + ``A``), ``D`` output dim (``S``, plus 1 with a reward head).

Each member maps a normalized input ``[obs (angles as sin, cos), act]`` to a Gaussian over the
normalized target ``[next_obs - obs (angle channels: wrapped difference), reward?]``. All members run
in one computation: weights are stacked ``E x in x out`` and each layer is one ``torch.baddbmm``.
With ``control_affine`` the MLP sees the state only and a linear gain map of the controls times
``[1, sin, cos]`` of the angles is added to its mean (the prediction is affine in the controls).
The log-variance is softly bounded between learned ``min_logvar`` and ``max_logvar`` (PETS softplus
trick) so the NLL cannot collapse the variance outside the data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from robot_mbrl.models.base import Prediction
from robot_mbrl.models.inference import Fused, fuse, head, version_key
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
    members: int = param(
        7,
        "ensemble members E, each trained on its own bootstrap resample (>= 2: the gate needs their spread)",
        ge=2,
    )
    elites: int = param(
        5,
        "members with the best holdout loss (the retrain's report and its shift check; the planner uses all)",
        ge=1,
    )
    hidden: int = param(
        64, "units per hidden layer (64 x 3 keeps the default plan p99 < 5 ms on one core)", ge=1
    )
    layers: int = param(3, "hidden layers per member", ge=1)
    activation: str = param("silu", "hidden activation", choices=tuple(ACTIVATIONS))
    learn_reward: bool = param(False, "also predict the reward (Prediction.reward)")
    lr: float = param(1e-3, "Adam learning rate", gt=0)
    weight_decay: tuple[float, ...] = param(
        factory=lambda: (2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4),
        doc="L2 weight decay per layer (input layer first, output layer last); "
        "missing entries repeat the last value, extra ones are ignored",
    )
    angle_products: bool = param(
        False,
        "also feed every non-angle input (observation channels and actions) times the sin and cos "
        "of every angle channel: in a rigid-body system forces and rates act through the angle "
        "(cart-pole: the cart's push turns the pole with cos(theta), sign flipped between hanging "
        "and upright), which a network otherwise has to learn separately in each region",
    )
    control_affine: bool = param(
        False,
        "delta = f(state without controls) + sum_c u_c (g_c + sum_j g_cj sin th_j + h_cj cos th_j), "
        "controls = actions + control_channels: a rigid body's input matrix M(q)^-1 B depends on the "
        "configuration, not the velocities, so the push learned as the pole swings through upright "
        "holds when it is upright and slow (an MLP on (state, u) learns it per region)",
    )
    control_channels: tuple[str, ...] = param(
        (),
        "observation channels that carry the actuation acting during the tick (the echoed, "
        "rate-limited command of a drive with one tick of delay: the twin's u_applied); with "
        "control_affine they enter like the actions (ignored without it)",
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
        if self.control_affine and self.angle_products:
            raise ValueError("control_affine and angle_products: expected at most one, got both")

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
        control_mask: np.ndarray | None = None,
    ):
        super().__init__()
        self.cfg = cfg = cfg or EnsembleConfig()
        self.obs_dim, self.act_dim, self.seed = obs_dim, act_dim, seed
        mask = np.zeros(obs_dim, bool) if angle_mask is None else np.asarray(angle_mask, bool)
        if mask.shape != (obs_dim,):
            raise ValueError(f"angle_mask: expected shape ({obs_dim},), got {mask.shape}")
        self.register_buffer("angle_mask", torch.as_tensor(mask))
        self._has_angles = bool(mask.any())  # the mask is fixed at construction
        self._angle_idx = torch.as_tensor(np.flatnonzero(mask))
        self._plain_idx = torch.as_tensor(np.flatnonzero(~mask))
        n_ang = int(mask.sum())
        self._products = cfg.angle_products and n_ang > 0
        n_lin = obs_dim - n_ang + act_dim  # linear inputs: the non-angle channels and the actions
        self.in_dim = obs_dim + n_ang + act_dim + (2 * n_ang * n_lin if self._products else 0)
        ctrl = np.zeros(obs_dim, bool) if control_mask is None else np.asarray(control_mask, bool)
        if ctrl.shape != (obs_dim,) or (ctrl & mask).any():
            raise ValueError(
                f"control_mask: expected {obs_dim} flags on non-angle channels, got {ctrl.tolist()}"
            )
        self.control_mask = ctrl  # not a buffer: checkpoints store it next to angle_mask
        self._affine = cfg.control_affine
        self.mlp_dim = self.in_dim  # inputs of the MLP; the rest (control_affine) feed the gains
        if self._affine:  # MLP: the non-control channels; gains: the controls and them x sin, cos
            self._state_idx = torch.as_tensor(np.flatnonzero(~mask & ~ctrl))
            self._ctrl_idx = torch.as_tensor(np.flatnonzero(ctrl))
            self.mlp_dim = len(self._state_idx) + 2 * n_ang
            self.in_dim = self.mlp_dim + (int(ctrl.sum()) + act_dim) * (1 + 2 * n_ang)
        self.out_dim = obs_dim + int(cfg.learn_reward)
        self._act = ACTIVATIONS[cfg.activation]
        E, D = cfg.members, self.out_dim
        gen = torch.Generator().manual_seed(seed)
        dims = [self.mlp_dim] + [cfg.hidden] * cfg.layers + [2 * D]
        self.weights = torch.nn.ParameterList()
        self.biases = torch.nn.ParameterList()
        for d_in, d_out in zip(dims[:-1], dims[1:], strict=True):
            w = torch.empty(E, d_in, d_out)
            torch.nn.init.trunc_normal_(w, std=1.0 / (2.0 * math.sqrt(d_in)), generator=gen)
            self.weights.append(torch.nn.Parameter(w))
            self.biases.append(torch.nn.Parameter(torch.zeros(E, 1, d_out)))
        # control_affine: the gains, a linear map of the control features to the mean (zero at start)
        self.gain = (
            torch.nn.Parameter(torch.zeros(E, self.in_dim - self.mlp_dim, D)) if self._affine else None
        )
        self._gain_params = [] if self.gain is None else [self.gain]  # for the fused-weights cache key
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
        """``... x S``, ``... x A`` -> ``... x I`` raw network input (angles as sin, cos; with
        ``angle_products`` also every other input times every sin and cos; with ``control_affine``
        the MLP's inputs, then the controls, then every control times every sin and cos)."""
        if self._affine:
            ang = obs.index_select(-1, self._angle_idx)
            sc = torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)
            ctrl = torch.cat([obs.index_select(-1, self._ctrl_idx), act], dim=-1)
            feats = (ctrl.unsqueeze(-1) * sc.unsqueeze(-2)).flatten(-2)  # control-major
            return torch.cat([obs.index_select(-1, self._state_idx), sc, ctrl, feats], dim=-1)
        if not self._has_angles:
            return torch.cat([obs, act], dim=-1)
        ang = obs.index_select(-1, self._angle_idx)
        sc = torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)
        lin = torch.cat([obs.index_select(-1, self._plain_idx), act], dim=-1)
        if not self._products:
            return torch.cat([lin[..., : -act.shape[-1]], sc, act], dim=-1)
        # every linear input times the sin and cos of every angle, input-major
        return torch.cat(
            [lin[..., : -act.shape[-1]], sc, act, (lin.unsqueeze(-1) * sc.unsqueeze(-2)).flatten(-2)], -1
        )

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
        x, u = x[..., : self.mlp_dim], x[..., self.mlp_dim :]
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            # planning path: bmm + in-place bias add measured faster than baddbmm at N=3500
            x = torch.bmm(x, w).add_(b) if inplace else torch.baddbmm(b, x, w)
            if i < n - 1:
                x = self._act(x, inplace)
        return self._split(
            x, self.max_logvar, self.min_logvar, None if self.gain is None else torch.bmm(u, self.gain)
        )

    def forward_member(self, x: torch.Tensor, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference single-member forward (``N x I`` -> ``N x D`` twice); for tests, not the hot path."""
        n = len(self.weights)
        x, u = x[..., : self.mlp_dim], x[..., self.mlp_dim :]
        for i in range(n):
            x = x @ self.weights[i][e] + self.biases[i][e]
            if i < n - 1:
                x = self._act(x, False)
        return self._split(
            x, self.max_logvar[e], self.min_logvar[e], None if self.gain is None else u @ self.gain[e]
        )

    def _split(
        self, out: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor, affine: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = out.chunk(2, dim=-1)
        return mean if affine is None else mean + affine, self._bound(logvar, hi, lo)

    @staticmethod
    def _bound(logvar: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
        """Soft-clamp the normalized log-variance between ``lo`` and ``hi`` (PETS softplus trick)."""
        logvar = hi - F.softplus(hi - logvar)
        return lo + F.softplus(logvar - lo)

    # -- prediction ------------------------------------------------------------------------
    def _fused(self) -> Fused:
        """Inference weights (:func:`robot_mbrl.models.inference.fuse`), rebuilt whenever a parameter
        or buffer changes (tracked by tensor version counters, so training and load_state_dict
        invalidate it)."""
        n_in, n_out = self.in_norm, self.out_norm
        # iterating a ParameterList costs ~18 us, so the parameter objects are listed once
        params = self.__dict__.get("_fused_params") or [*self.weights, *self.biases, *self._gain_params]
        tensors = [*params, n_in.mean, n_in.std, n_out.mean, n_out.std]
        key = version_key(tensors)
        if self.__dict__.get("_fused_key") != key:
            self._fused_params = [*self.weights, *self.biases, *self._gain_params]
            self._fused_val = fuse(self)  # the value before its key: a reader on another thread
            self._fused_key = key  # (the planner's) never pairs the new key with the old weights
        return self._fused_val

    def _step(
        self, obs: torch.Tensor, act: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """The computation behind :meth:`predict`: -> next obs ``E x N x S``, disagreement ``N``,
        reward ``E x N`` or None, last hidden ``E x N x H``, normalized member differences ``E x N x S``."""
        fused = self._fused()
        dtype, E, S = self.in_norm.mean.dtype, self.num_members, self.obs_dim
        obs, act = obs.to(dtype), act.to(dtype)
        if obs.dim() == 2:  # shared input: expand (no copy); faster than broadcasting matmul on CPU
            obs, act = obs.expand(E, *obs.shape), act.expand(E, *act.shape)
        raw, h = head(self, fused, obs, act)  # E x N x (D + pad) physical delta (and reward)
        nxt = obs + raw[..., :S]
        diff = nxt - nxt[:1]
        if self._has_angles:
            nxt = torch.where(self.angle_mask, wrap_angle(nxt), nxt)
            diff = torch.where(self.angle_mask, wrap_angle(diff), diff)
        diff = diff / self.state_scale
        return (
            nxt,
            diff.std(0, correction=0).mean(-1),
            raw[..., S] if self.cfg.learn_reward else None,
            h,
            diff,
        )

    def stepper(
        self, spread: bool = True
    ) -> Callable[
        [torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]
    ]:
        """The planner's per-tick model call, bound to the current fused weights (take one per plan).

        ``E x N x S``, ``E x N x A`` -> next observations ``E x N x S`` with angles NOT wrapped (each
        member's angle stays continuous along a rollout; everything the planner computes from angles
        is periodic, and it wraps the trajectory once), ``disagreement`` ``N`` as in :meth:`predict`
        (population std over members / :attr:`state_scale`, mean over S; without the wrap it can only
        be larger when members differ by more than pi; ``spread=False``: None, the caller takes
        :meth:`spread` of the whole rollout at once) and the learned reward ``E x N`` or None.
        About a third fewer tensor ops than :meth:`predict`.
        """
        fused = self._fused()
        S, reward = self.obs_dim, self.cfg.learn_reward

        def step(
            obs: torch.Tensor, act: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
            with torch.no_grad():
                raw, _ = head(self, fused, obs, act)
                nxt = obs + raw[..., :S]
                dis = self.spread(nxt.unsqueeze(0))[0] if spread else None
                return nxt, dis, (raw[..., S] if reward else None)

        return step

    @torch.no_grad()
    def spread(self, states: torch.Tensor) -> torch.Tensor:
        """``K x E x N x S`` member predictions (angles as the stepper leaves them) -> ``K x N``
        disagreement, as :meth:`stepper`'s. The member spread is two small matmuls (centre, then
        average the squares) instead of reductions over the member axis, which are slow on CPU at
        planning sizes; a planner takes it once per rollout instead of once per tick."""
        K, E, N, S = states.shape
        centre = torch.eye(E) - 1.0 / E  # x_e - mean over members, as one E x E matmul
        sq = torch.matmul(centre, states.reshape(K, E, N * S)).square_()
        var = torch.matmul(torch.full((1, E), 1.0 / E), sq)  # K x 1 x NS
        return torch.matmul(var.view(K, N, S).sqrt_(), 1.0 / (self.state_scale * S))  # mean over S

    @torch.no_grad()
    def predict(self, obs: torch.Tensor, act: torch.Tensor) -> Prediction:
        """``N x S``/``N x A`` (shared) or ``E x N x S``/``E x N x A`` -> :class:`Prediction` (``E x N x S``).

        ``disagreement`` is the std over all E members (population std) of the predicted next state
        divided by :attr:`state_scale`, averaged over the S channels; ``max_pairwise`` is the largest
        L2 distance between two members' predictions in the same units. Angle differences are wrapped.
        """
        nxt, disagreement, reward, h, diff = self._step(obs, act)
        fused = self._fused()
        logvar = self._bound(torch.baddbmm(fused.b_lv, h, fused.w_lv), self.max_logvar, self.min_logvar)
        S, diff = self.obs_dim, diff.transpose(0, 1)  # N x E x S
        return Prediction(
            mean=nxt,
            var=logvar[..., :S].exp() * self.out_norm.std[:S] ** 2,
            reward=reward,
            disagreement=disagreement,
            max_pairwise=torch.cdist(diff, diff).amax(dim=(-1, -2)),
        )
