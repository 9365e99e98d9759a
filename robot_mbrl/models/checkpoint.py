"""Ensemble checkpoints: state_dicts + config + schema, written atomically, loaded with weights_only.

A checkpoint is one file holding plain data only (tensors, numbers, strings, lists, dicts)::

    {"schema": SCHEMA, "config": {...EnsembleConfig...}, "obs_dim", "act_dim", "angle_mask", "control_mask", "seed",
     "model": state_dict (weights, logvar bounds, normalizers, elites), "extra": {name: state_dict}}

``extra`` carries other components' state (e.g. ``{"value": value_fn.state_dict(),
"trainer": trainer.state_dict()}``), returned as-is by :func:`load_checkpoint`.
"""

from __future__ import annotations

import io
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from robot_mbrl.models.ensemble import EnsembleConfig, ProbabilisticEnsemble
from robot_mbrl.runtime.files import atomic_write_bytes
from robot_mbrl.typedconfig import ConfigError, build, to_dict

SCHEMA = "robot_mbrl.ensemble_checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, foreign or inconsistent. ``str(err)`` is one line."""

    def __init__(self, path: str | os.PathLike, expected: str, got: str):
        super().__init__(f"{path}: expected {expected}, got {got}")


def save_checkpoint(
    path: str | os.PathLike,
    model: ProbabilisticEnsemble,
    extra: dict[str, dict[str, Any]] | None = None,
    meta: dict[str, Any] | None = None,
) -> None:
    """Write ``model`` (+ ``extra`` state_dicts, + plain-data ``meta``) to ``path`` atomically."""
    payload = {
        "schema": SCHEMA,
        "config": to_dict(model.cfg),
        "obs_dim": model.obs_dim,
        "act_dim": model.act_dim,
        "angle_mask": [bool(b) for b in model.angle_mask.tolist()],
        "control_mask": [bool(b) for b in model.control_mask.tolist()],
        "seed": model.seed,
        "model": model.state_dict(),
        "extra": dict(extra or {}),
        "meta": dict(meta or {}),
    }
    mem = io.BytesIO()
    torch.save(payload, mem)
    atomic_write_bytes(path, mem.getvalue())


def one_line(err: BaseException, limit: int = 200) -> str:
    """An exception in one line: torch's multi-line messages (``Error(s) in loading state_dict for
    X:`` then the missing keys on the next lines) joined, a missing key named."""
    if isinstance(err, KeyError):
        return f"no {err.args[0]!r} entry" if err.args else "a missing entry"
    text = " ".join(part.strip() for part in str(err).strip().splitlines() if part.strip())
    return (text or type(err).__name__)[:limit]


def load_checkpoint(
    path: str | os.PathLike,
) -> tuple[ProbabilisticEnsemble, dict[str, dict[str, Any]], dict[str, Any]]:
    """Rebuild the ensemble saved at ``path``; returns ``(model, extra, meta)``.

    Raises :class:`CheckpointError` (a ``ValueError``, one line naming the file) for a missing,
    truncated, foreign or inconsistent file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "an ensemble checkpoint", "no such file")
    _check_archive(path)
    try:
        with warnings.catch_warnings():  # a foreign pickle's torch warnings: the error below says it
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to unpickle is a bad file, said in one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        first = first.split(". ")[0]  # the first sentence: what is wrong, not torch's advice
        if "Weights only load failed" in first:  # torch's advice text, not what is wrong here
            first = "not a plain-data checkpoint"
        raise CheckpointError(path, "a torch checkpoint file", f"unreadable data ({first[:120]})") from None
    if not isinstance(payload, dict) or payload.get("schema") != SCHEMA:
        got = payload.get("schema") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(path, f"schema {SCHEMA!r}", repr(got))
    try:
        cfg = build(EnsembleConfig, payload["config"], source=str(path), prefix="config")
        model = ProbabilisticEnsemble(
            payload["obs_dim"],
            payload["act_dim"],
            payload["angle_mask"],
            cfg,
            seed=payload["seed"],
            control_mask=payload.get("control_mask"),  # absent before control_affine existed
        )
        model.load_state_dict(payload["model"])
    except ConfigError:
        raise
    except (KeyError, RuntimeError, TypeError) as err:
        raise CheckpointError(path, "a consistent ensemble checkpoint", one_line(err)) from None
    bad = [k for k, v in payload["model"].items() if torch.is_tensor(v) and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]  # fmt: skip
    if bad:
        raise CheckpointError(path, "finite model weights", f"NaN/inf in {', '.join(bad[:3])}")
    model.eval()
    return model, payload.get("extra", {}), payload.get("meta", {})


def _check_archive(path: Path) -> None:
    """Raise :class:`CheckpointError` when ``path`` is a zip archive (torch's format) that is
    truncated or whose members fail their CRC: flipped bytes inside a tensor would otherwise load
    as wrong weights without a word."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"PK\x03\x04":  # a zip's start without its end: cut short (a copy, a full disk)
            raise CheckpointError(
                path,
                "a complete checkpoint archive",
                f"a truncated one ({path.stat().st_size} bytes, no end)",
            )
        return  # not a zip at all: torch.load says what it is
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise CheckpointError(path, "a complete checkpoint archive", f"a damaged one ({err})") from None
    if bad is not None:
        raise CheckpointError(
            path, "a checkpoint whose data match their checksums", f"a CRC mismatch in {bad}"
        )
