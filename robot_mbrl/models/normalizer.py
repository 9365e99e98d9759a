"""Per-dimension standardization fitted on buffer data (kept in the module's state_dict)."""

from __future__ import annotations

import torch


class Normalizer(torch.nn.Module):
    """``x -> (x - mean) / std`` per feature; ``std`` is floored at ``eps`` so constant features stay finite.

    ``mean``/``std`` are registered buffers (``D``), so they travel with ``state_dict`` and checkpoints.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> None:
        """Fit on ``... x D`` samples (all leading dims are pooled)."""
        x = x.reshape(-1, self.dim).to(self.mean.dtype)
        if x.shape[0] == 0:
            raise ValueError("Normalizer.fit: expected at least one sample, got 0")
        self.mean.copy_(x.mean(0))
        std = x.std(0, unbiased=False) if x.shape[0] > 1 else torch.ones_like(self.std)
        self.std.copy_(std.clamp_min(self.eps))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``... x D`` physical -> ``... x D`` normalized."""
        return (x - self.mean) / self.std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """``... x D`` normalized -> ``... x D`` physical."""
        return z * self.std + self.mean
