"""diffusion_env.checkpoints: atomic checkpoints, the latest pointer, pruning, weights_only state."""

import pickle

import pytest
import torch

from diffusion_env import checkpoints


def test_a_checkpoint_round_trips_and_becomes_the_latest(tmp_path):
    weights = {"net": {"w": torch.arange(4.0).reshape(2, 2)}}
    state = {"step": 3, "history": [{"loss": 0.5}], "rng": torch.Generator().manual_seed(1).get_state(), "big": 2**100}
    path = checkpoints.write_checkpoint(tmp_path, "step-03", weights=weights, state=state, texts={"config.json": "{}"})
    assert checkpoints.find_checkpoint(tmp_path) == path == tmp_path / "step-03"
    assert torch.equal(checkpoints.read_weights(path, "net")["w"], weights["net"]["w"])
    read = checkpoints.read_state(path)
    assert read["step"] == 3 and read["history"] == [{"loss": 0.5}] and read["big"] == 2**100
    assert (path / "config.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_pruning_keeps_the_last_checkpoints(tmp_path):
    for step in range(1, 5):
        checkpoints.write_checkpoint(tmp_path, f"step-{step:02d}", weights={}, state={"step": step}, keep_last=2)
    assert checkpoints.checkpoint_names(tmp_path, "step-") == ["step-03", "step-04"]
    assert checkpoints.latest_name(tmp_path) == "step-04"
    with pytest.raises(ValueError, match="keep_last=-1"):
        checkpoints.write_checkpoint(tmp_path, "step-05", weights={}, keep_last=-1)


def test_a_failed_write_keeps_the_previous_checkpoint_current(tmp_path, monkeypatch):
    checkpoints.write_checkpoint(tmp_path, "step-01", weights={}, state={"step": 1})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(checkpoints.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.write_checkpoint(tmp_path, "step-02", weights={}, state={"step": 2})
    monkeypatch.undo()
    assert checkpoints.read_state(checkpoints.find_checkpoint(tmp_path))["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-01"]


class Custom:
    """An object that weights_only loading refuses."""


def test_state_is_read_with_weights_only(tmp_path):
    checkpoints.write_checkpoint(tmp_path, "step-01", weights={}, state={"object": Custom()})
    with pytest.raises(pickle.UnpicklingError):
        checkpoints.read_state(tmp_path / "step-01")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoints.find_checkpoint(tmp_path / "empty")
