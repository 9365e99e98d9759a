"""Mirror symmetry of a robot: every real transition also teaches its mirror image.

A cart-pole on a level rail behaves the same when every position, angle, velocity and force changes
sign: ``(s, a) -> s'`` implies ``(-s, -a) -> -s'``, and its task pays the same for both. Declaring
that (``symmetry.negate``: the channels whose sign flips) doubles what ~1,500 real steps teach the
model and the value function: a swing through upright from the left also teaches the same swing
from the right. The mirrored rows are derived from real ones, never simulated. A robot that is not
symmetric (a sloped rail, one-sided friction, a sensor offset) or a task that is not (a target off
centre) must not declare it.

Arrays as in :meth:`~robot_mbrl.data.buffer.ReplayBuffer.arrays`: ``obs`` ``N x S``, ``act``
``N x A``, ``next_obs`` ``N x S``, ``reward``/``terminated``/``truncated`` ``N``, and any other
per-row keys (copied unchanged).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from robot_mbrl.hal.robot import RobotSpec
from robot_mbrl.typedconfig import param, require_names

Signs = tuple[np.ndarray, np.ndarray]  # (S,), (A,): +1 keeps a channel, -1 flips it


@dataclass(frozen=True)
class SymmetryConfig:
    """The robot's mirror symmetry (section ``symmetry``)."""

    negate: tuple[str, ...] = param(
        (),
        "observation and action channels whose sign flips under the robot's mirror symmetry (empty: "
        "none declared); the model and V then also train on the mirror image of every real "
        "transition. Only for a robot and task that are symmetric (see robot_mbrl/data/symmetry.py)",
    )


def mirror_signs(spec: RobotSpec, cfg: SymmetryConfig) -> Signs | None:
    """Per-channel signs from ``cfg`` (None: no symmetry); unknown names are a one-line ConfigError."""
    if not cfg.negate:
        return None
    names = (*spec.obs_names, *spec.act_names)
    require_names("symmetry.negate", cfg.negate, names)
    flip = np.array([-1.0 if n in cfg.negate else 1.0 for n in names], dtype=np.float32)
    return flip[: spec.obs_dim], flip[spec.obs_dim :]


def mirror(arrays: Mapping[str, np.ndarray], signs: Signs) -> dict[str, np.ndarray]:
    """The mirror image of every row: ``obs``, ``next_obs`` and ``act`` (those present) times their
    signs; every other key unchanged."""
    s, a = signs
    sign = {"obs": s, "next_obs": s, "act": a}
    return {k: np.asarray(v) * sign[k] if k in sign else v for k, v in arrays.items()}


def with_mirror(arrays: Mapping[str, np.ndarray], signs: Signs | None) -> dict[str, np.ndarray]:
    """The rows, then their mirror images (``signs`` None: the rows alone). With a ``truncated`` key
    the last real row is marked truncated in the result, so no multi-step return runs from one copy
    into the other."""
    if signs is None:
        return dict(arrays)
    m = mirror(arrays, signs)
    out = {k: np.concatenate([np.asarray(v), np.asarray(m[k])]) for k, v in arrays.items()}
    n = len(arrays["obs"])
    if n and "truncated" in out:
        out["truncated"] = out["truncated"].copy()
        out["truncated"][n - 1] = True
    return out
