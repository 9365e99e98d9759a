"""The ensemble's inference path: normalizers folded into the weights, a lean encoding for planning.

The planner calls the model ~10 times per plan on ``E x 32`` rows, where each tensor op costs
microseconds of dispatch whatever its size. So the inference path differs from training only in
how it lays out the same computation, never in what it computes:

* the normalizers are folded into the first layer, the mean head and the gains;
* the angles' ``[1, sin, cos]`` come from one ``sin(obs @ P + phase)`` (cos = sin(. + pi/2), the
  constant from a zero column and phase pi/2);
* the MLP reads ``[obs, 1, sin, cos (, act)]`` whole, with zero weight rows for the channels it
  does not see (raw angles, controls), instead of gathering the channels it does see;
* with ``control_affine`` the gains read ``controls x [1, sin, cos]`` as its own tensor, so no
  slice of a concatenated input is copied on the way into a matmul.

Measured at the default planning shape (7 x 32 rows): 184 vs 210 us per model call
(benchmarks/RESULTS.md). ``angle_products`` models keep the training encoding.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from robot_mbrl.models.ensemble import ProbabilisticEnsemble

CHUNK = 256  # rows per chunk for large-batch inference (see trunk)


def version_key(tensors: list[torch.Tensor]) -> tuple[tuple[int, int], ...]:
    """Identity and version counter of every tensor: changes whenever one is replaced or modified in
    place (an optimizer step, ``load_state_dict``, a normalizer refit), so inference caches keyed on
    it never serve stale weights."""
    return tuple((t.data_ptr(), t._version) for t in tensors)


class Fused(NamedTuple):
    """Inference weights (``E`` leading): ``ws``/``bs`` the MLP, the last entry the mean head emitting
    the raw delta (zero-padded to 16 columns); ``w_lv``/``b_lv`` the normalized log-variance head;
    ``wg`` the gains (``control_affine``) or None; ``trig`` = (``P`` ``E x S x K``, ``phase``
    ``E x 1 x K``) for the planning layout, None where the model keeps the training encoding."""

    ws: list[torch.Tensor]
    bs: list[torch.Tensor]
    w_lv: torch.Tensor
    b_lv: torch.Tensor
    wg: torch.Tensor | None
    trig: tuple[torch.Tensor, torch.Tensor] | None


@torch.no_grad()
def fuse(model: ProbabilisticEnsemble) -> Fused:
    """Fold ``model``'s normalizers into its weights and lay out the first layer and the gains for
    :func:`plan_inputs` (see the module docstring)."""
    n_in, n_out = model.in_norm, model.out_norm
    k, D, E, S = model.mlp_dim, model.out_dim, model.num_members, model.obs_dim
    (m, s), (mg, sg) = (n_in.mean[:k], n_in.std[:k]), (n_in.mean[k:], n_in.std[k:])
    ws = [w.detach().clone() for w in model.weights]
    bs = [b.detach().clone() for b in model.biases]
    bs[0] = bs[0] - (m / s).view(1, 1, -1) @ ws[0]
    ws[0] = ws[0] / s.view(1, -1, 1)
    w_lv, b_lv = ws[-1][..., D:].contiguous(), bs[-1][..., D:].contiguous()
    # mean head zero-padded to 16 columns: MKL's batched gemm is ~2x faster than at D = 5
    pad = -D % 16
    ws[-1] = F.pad(ws[-1][..., :D] * n_out.std, (0, pad)).contiguous()
    bs[-1] = F.pad(bs[-1][..., :D] * n_out.std + n_out.mean, (0, pad))
    wg = None
    if model.gain is not None:
        g = model.gain.detach()
        wg = F.pad(g / sg.view(1, -1, 1) * n_out.std, (0, pad)).contiguous()
        bs[-1] = bs[-1] - F.pad((mg / sg).view(1, 1, -1) @ g * n_out.std, (0, pad))
    if model._products or not (model._has_angles or model._affine):
        return Fused(ws, bs, w_lv, b_lv, wg, None)  # the training encoding: plain concatenation
    ang = model._angle_idx.tolist()
    n = len(ang)
    K = 1 + 2 * n  # [1, sin_1..sin_n, cos_1..cos_n]
    P, phase = torch.zeros(S, K), torch.zeros(K)
    phase[0] = math.pi / 2
    for j, a in enumerate(ang):
        P[a, 1 + j] = P[a, 1 + n + j] = 1.0
        phase[1 + n + j] = math.pi / 2
    # the MLP's rows in [obs, 1, sin, cos (, act)]: the training layout is [state, sin, cos (, act)]
    lin = (model._state_idx if model._affine else model._plain_idx).tolist()
    rows = lin + [S + 1 + t for t in range(2 * n)]
    if not model._affine:
        rows += [S + K + a for a in range(model.act_dim)]
    w0 = ws[0].new_zeros(E, S + K + (0 if model._affine else model.act_dim), ws[0].shape[2])
    w0[:, rows] = ws[0]
    ws[0] = w0
    if wg is not None:  # gains: training layout [controls, c x (sin, cos) c-major] -> c x [1, sin, cos]
        C = wg.shape[1] // K
        rows = [c * K for c in range(C)] + [c * K + 1 + t for c in range(C) for t in range(2 * n)]
        g0 = wg.new_zeros(E, C * K, wg.shape[2])
        g0[:, rows] = wg
        wg = g0
    return Fused(ws, bs, w_lv, b_lv, wg, (P.expand(E, S, K), phase.view(1, 1, K).expand(E, 1, K)))


def plan_inputs(
    model: ProbabilisticEnsemble, f: Fused, obs: torch.Tensor, act: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Raw ``E x N x S``, ``E x N x A`` -> the MLP's input and the gains' input (or None), in the
    layout of ``f``."""
    if f.trig is None:
        return model.encode(obs, act), None
    sc1 = torch.baddbmm(f.trig[1], obs, f.trig[0]).sin_()  # E x N x K: [1, sin, cos]
    if not model._affine:
        return torch.cat([obs, sc1, act], dim=-1), None
    ctrl = torch.cat([obs.index_select(-1, model._ctrl_idx), act], dim=-1)
    return torch.cat([obs, sc1], dim=-1), (ctrl.unsqueeze(-1) * sc1.unsqueeze(-2)).flatten(-2)


def head(
    model: ProbabilisticEnsemble, f: Fused, obs: torch.Tensor, act: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw ``E x N x S``, ``E x N x A`` -> raw mean head ``E x N x (D + pad)`` (the physical delta,
    and reward) and the last hidden layer ``E x N x H``."""
    x, g = plan_inputs(model, f, obs, act)
    h = trunk(x, f.ws, f.bs, model._act)
    raw = torch.baddbmm(f.bs[-1], h, f.ws[-1])
    return (raw if g is None else raw.baddbmm_(g, f.wg)), h


def trunk(x: torch.Tensor, ws: list[torch.Tensor], bs: list[torch.Tensor], act) -> torch.Tensor:  # noqa: ANN001
    """Raw input ``E x N x I`` (may be an expanded view) -> last hidden layer ``E x N x H``.

    Large batches go in row chunks of ``CHUNK`` so the ``E x chunk x H`` activations stay in
    cache (at N = 3500 unchunked bmm + SiLU is memory-bound and ~25 % slower)."""
    n = x.shape[1]
    if n > 2 * CHUNK:
        return torch.cat([trunk(x[:, i : i + CHUNK], ws, bs, act) for i in range(0, n, CHUNK)], 1)
    for w, b in zip(ws[:-1], bs[:-1], strict=True):
        x = act(torch.baddbmm(b, x, w), True)
    return x
