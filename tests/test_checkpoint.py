"""Checkpoints: bit-exact round trip, extra state_dicts, clear errors for truncated/foreign files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robot_mbrl.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from robot_mbrl.models.ensemble import EnsembleConfig, ProbabilisticEnsemble
from robot_mbrl.models.trainer import EnsembleTrainer, TrainerConfig


def _trained(seed: int = 0) -> tuple[ProbabilisticEnsemble, EnsembleTrainer]:
    rng = np.random.default_rng(seed)
    obs = rng.uniform(-3, 3, (300, 3))
    act = rng.uniform(-1, 1, (300, 1))
    nxt = obs + 0.1 * np.sin(obs) + 0.05 * act
    data = dict(obs=obs, act=act, next_obs=nxt, reward=obs[:, 1] ** 2)
    cfg = EnsembleConfig(members=4, elites=2, hidden=32, layers=2, learn_reward=True)
    model = ProbabilisticEnsemble(3, 1, np.array([True, False, False]), cfg, seed=seed)
    trainer = EnsembleTrainer(model, TrainerConfig(max_epochs=5), seed=seed)
    trainer.train(data)
    return model, trainer


def test_round_trip_is_bit_exact(tmp_path):
    model, trainer = _trained()
    value = torch.nn.Linear(3, 1)
    path = tmp_path / "ckpt" / "model.pt"
    save_checkpoint(
        path, model, extra={"value": value.state_dict(), "trainer": trainer.state_dict()}, meta={"step": 7}
    )
    loaded, extra, meta = load_checkpoint(path)
    assert meta == {"step": 7}
    assert loaded.elites == model.elites and loaded.cfg == model.cfg
    obs, act = torch.randn(64, 3), torch.randn(64, 1)
    a, b = model.predict(obs, act), loaded.predict(obs, act)
    for f in ("mean", "var", "reward", "disagreement", "max_pairwise"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    v2 = torch.nn.Linear(3, 1)
    v2.load_state_dict(extra["value"])
    assert torch.equal(v2.weight, value.weight)
    t2 = EnsembleTrainer(loaded)
    t2.load_state_dict(extra["trainer"])
    assert t2.reference_mse == pytest.approx(trainer.reference_mse) and t2.trained_upto == 300


def test_truncated_foreign_missing_files_give_one_line_errors(tmp_path):
    model, _ = _trained()
    path = tmp_path / "model.pt"
    save_checkpoint(path, model)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CheckpointError,
        match=r"model.pt: expected a complete checkpoint archive, got a truncated one \(\d+ bytes",
    ) as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value) and "miniz" not in str(err.value)
    torch.save({"state": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="expected schema"):
        load_checkpoint(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pt")
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files behind


def test_flipped_bytes_nan_weights_and_garbage_are_clear_errors(tmp_path):
    model, trainer = _trained()
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, extra={"trainer": trainer.state_dict()})
    data = bytearray(path.read_bytes())
    i = len(data) // 2  # inside a tensor's bytes: the zip's CRC is all that can tell
    data[i : i + 64] = bytes(b ^ 0xFF for b in data[i : i + 64])
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(data))
    with pytest.raises(
        CheckpointError, match="flipped.pt: expected a checkpoint whose data match their checksums"
    ):
        load_checkpoint(bad)
    (tmp_path / "hello.pt").write_text("hello\n")
    with pytest.raises(
        CheckpointError, match=r"hello.pt: expected a torch checkpoint file, got unreadable data"
    ):
        load_checkpoint(tmp_path / "hello.pt")
    with torch.no_grad():
        next(iter(model.parameters())).fill_(float("nan"))
    save_checkpoint(tmp_path / "nan.pt", model)
    with pytest.raises(CheckpointError, match="nan.pt: expected finite model weights, got NaN/inf in"):
        load_checkpoint(tmp_path / "nan.pt")


def test_a_missing_weight_or_a_plain_pickle_is_named_in_one_line(tmp_path, recwarn):
    """torch's "Error(s) in loading state_dict for X:" put the missing key's name on the next line,
    which the one-line error cut off; a plain pickle printed torch's warnings before the error."""
    import pickle

    from robot_mbrl.models.checkpoint import SCHEMA, one_line

    model, _ = _trained()
    path = tmp_path / "model.pt"
    save_checkpoint(path, model)
    payload = torch.load(path, weights_only=True)
    assert payload["schema"] == SCHEMA
    del payload["model"]["gain" if "gain" in payload["model"] else next(iter(payload["model"]))]
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"Error\(s\) in loading state_dict .*Missing key") as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value)
    with open(path, "wb") as f:
        pickle.dump({"schema": "x"}, f, protocol=4)
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(path)
    assert not [w for w in recwarn if "pickle" in str(w.message).lower()]
    assert one_line(KeyError("value")) == "no 'value' entry"
