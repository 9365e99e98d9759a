"""The contract between learned dynamics models and their users (planner, gate, monitors).

A model predicts the next observation for a batch of (observation, action) pairs for each of its
E members. Shapes: ``E`` members, ``N`` batch, ``S`` observation dim, ``A`` action dim. All inputs
and outputs are in physical units (the model normalizes internally); angle channels (see
``RobotSpec.angle_mask``) come back wrapped to (-pi, pi].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Prediction:
    """Per-member Gaussian over the next observation (and optionally the reward)."""

    mean: torch.Tensor  # E x N x S, next-observation means (physical units, angles wrapped)
    var: torch.Tensor  # E x N x S, aleatoric variances of the next observation
    reward: torch.Tensor | None  # E x N learned reward means, None without a reward head
    disagreement: torch.Tensor  # N, std over members of the normalized means, averaged over dims
    max_pairwise: torch.Tensor  # N, max over member pairs of the normalized mean distance (L2)


class DynamicsModel(Protocol):
    """What the planner and the safety layer need from a model."""

    num_members: int
    elites: tuple[int, ...]

    def predict(self, obs: torch.Tensor, act: torch.Tensor) -> Prediction:
        """``obs``/``act``: ``N x S``/``N x A`` (every member sees the same input) or
        ``E x N x S``/``E x N x A`` (member e sees row e: each member propagates its own
        trajectory). Deterministic (means); no gradients needed."""
        ...
