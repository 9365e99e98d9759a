"""What a planner hands to the safety gate and the loop every tick."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PlanInfo:
    """The chosen plan and everything the gate needs to judge it.

    Shapes: ``k`` horizon steps, ``E`` model members, ``S`` observation dim, ``A`` action dim,
    ``C`` constraints.
    """

    action: np.ndarray  # A, the first action of the plan (what the MPC proposes now)
    actions: torch.Tensor  # k x A, the whole planned sequence (warm start for the next tick)
    predicted_obs: torch.Tensor  # (k+1) x E x S, per-member trajectory of the plan (row 0 = now)
    disagreement: torch.Tensor  # k, ensemble disagreement at each planned step (normalized units)
    constraint_margins: torch.Tensor  # k x E x C, g(x) per step and member; > 0 is a violation
    value_tail: float  # gamma^t V(s_t) term used at the tail (or at the truncation step)
    expected_return: float  # the plan's estimated return (mean over members)
    truncated_at: int | None  # first step whose disagreement exceeded the threshold, else None
    solve_time_s: float  # wall time spent in plan()

    @property
    def worst_disagreement(self) -> float:
        return float(self.disagreement.max()) if self.disagreement.numel() else 0.0

    @property
    def worst_margin(self) -> float:
        """max g(x) over steps, members and constraints (> 0: some member predicts a violation)."""
        m = self.constraint_margins
        return float(m.max()) if m.numel() else float("-inf")
