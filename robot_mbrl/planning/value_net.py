"""The value function's networks: ``K`` batched SiLU MLP heads, and their lean inference path.

The planner evaluates V once per plan on ``E x N`` imagined states (224 rows x 5 heads at the default
config), ~12 % of a plan. :class:`HeadsInference` computes exactly what ``ValueFunction.head_values``
does with fewer tensor ops: input normalization folded into the first layer, the angles' sin and
cos from one ``sin(obs @ P + phase)``, zero weight rows for the raw angles (no gather), the prior
heads (randomized prior functions) stacked with the trained ones and the output scale folded into
the last layer, in-place activations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from robot_mbrl.models.inference import version_key


class _Heads(torch.nn.Module):
    """``K`` independent SiLU MLPs ``F -> 1`` as batched weights (one ``bmm`` per layer for all heads).

    ``x``: ``M x F`` (every head sees the same rows) or ``K x M x F`` (head k sees row block k)
    -> ``K x M``. Parameters ``w{i}`` (``K x in x out``) and ``b{i}`` (``K x 1 x out``), initialized
    from ``gen`` with PyTorch's default uniform ranges, head after head."""

    def __init__(self, n_in: int, hidden: int, layers: int, heads: int, gen: torch.Generator):
        super().__init__()
        dims = [n_in] + [hidden] * layers + [1]
        self.heads, self.n_layers = heads, len(dims) - 1
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            bound = a**-0.5
            w, bias = torch.empty(heads, a, b), torch.empty(heads, 1, b)
            for k in range(heads):
                # same draw order as torch.nn.Linear(a, b) per head: weight (out x in), then bias
                w[k] = torch.empty(b, a).uniform_(-bound, bound, generator=gen).T
                bias[k] = torch.empty(1, b).uniform_(-bound, bound, generator=gen)
            self.register_parameter(f"w{i}", torch.nn.Parameter(w))
            self.register_parameter(f"b{i}", torch.nn.Parameter(bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.expand(self.heads, *x.shape)
        for i in range(self.n_layers):
            x = torch.baddbmm(getattr(self, f"b{i}"), x, getattr(self, f"w{i}"))
            if i < self.n_layers - 1:
                x = F.silu(x)
        return x.squeeze(-1)


class HeadsInference:
    """``heads_values`` of a :class:`~robot_mbrl.planning.value.ValueFunction` without gradients:
    ``... x S -> K x ...`` (before its terminal floor). Rebuilt from the module whenever one of its
    parameters or buffers changes (tensor version counters), so fitting and loading invalidate it."""

    def __init__(self) -> None:
        self._key: tuple | None = None

    def _tensors(self, vf) -> list[torch.Tensor]:  # noqa: ANN001
        nets = [vf.net] + ([vf.prior] if vf.prior is not None else [])
        return [*(t for n in nets for t in n.parameters()), vf.in_mean, vf.in_std, vf.out_scale]

    @torch.no_grad()
    def _build(self, vf) -> None:  # noqa: ANN001
        S, ang, lin = vf.obs_dim, vf.angle_idx.tolist(), vf.lin_idx.tolist()
        n, L = len(ang), vf.net.n_layers
        P, phase = torch.zeros(S, 2 * n), torch.zeros(2 * n)
        for j, a in enumerate(ang):  # [sin_1..sin_n, cos_1..cos_n] = sin(obs P + phase)
            P[a, j] = P[a, n + j] = 1.0
            phase[n + j] = math.pi / 2
        nets = [(vf.net, 1.0)] + ([(vf.prior, vf.cfg.prior_scale)] if vf.prior is not None else [])
        ws = [torch.cat([getattr(net, f"w{i}").detach() for net, _ in nets]) for i in range(L)]
        bs = [torch.cat([getattr(net, f"b{i}").detach() for net, _ in nets]) for i in range(L)]
        scale = torch.cat([torch.full((net.heads, 1, 1), c) for net, c in nets]) * vf.out_scale
        ws[-1], bs[-1] = ws[-1] * scale, bs[-1] * scale
        w0 = ws[0].new_zeros(ws[0].shape[0], S + 2 * n, ws[0].shape[2])  # features: [lin, sin, cos]
        w0[:, lin] = ws[0][:, : len(lin)] / vf.in_std.view(1, -1, 1)
        w0[:, S:] = ws[0][:, len(lin) :]
        bs[0] = bs[0] - (vf.in_mean / vf.in_std).view(1, 1, -1) @ ws[0][:, : len(lin)]
        ws[0] = w0
        self.ws, self.bs, self.trig = ws, bs, ((P, phase) if n else None)
        self.heads = vf.net.heads

    def __call__(self, vf, obs: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        key = version_key(self._tensors(vf))
        if key != self._key:
            self._build(vf)
            self._key = key
        x = obs.reshape(-1, obs.shape[-1]).float()
        if self.trig is not None:
            x = torch.cat([x, torch.addmm(self.trig[1], x, self.trig[0]).sin_()], dim=-1)
        x = x.expand(self.ws[0].shape[0], *x.shape)
        for i, (w, b) in enumerate(zip(self.ws, self.bs, strict=True)):
            x = torch.baddbmm(b, x, w)
            if i < len(self.ws) - 1:
                x = F.silu(x, inplace=True)
        v = x.squeeze(-1)
        if v.shape[0] > self.heads:  # + the prior heads (already scaled)
            v = v[: self.heads] + v[self.heads :]
        return v.reshape(self.heads, *obs.shape[:-1])
