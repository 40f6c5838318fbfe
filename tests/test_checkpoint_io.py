"""Checkpoints: atomic writes, no non-finite weights, weights-only loading with a guarded fallback."""

from __future__ import annotations

import logging
from fractions import Fraction

import pytest
import torch

from medseg.checkpoint_io import AtomicCheckpointIO, NonFiniteWeightsError, non_finite_tensors


def checkpoint(value: float = 1.0) -> dict:
    return {"state_dict": {"net.weight": torch.full((3, 3), value), "net.steps": torch.tensor(4)}, "global_step": 7}


def test_save_and_load_round_trip(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint(checkpoint(2.0), tmp_path / "sub" / "last.ckpt")
    loaded = io.load_checkpoint(tmp_path / "sub" / "last.ckpt")
    assert loaded["global_step"] == 7 and torch.equal(loaded["state_dict"]["net.weight"], torch.full((3, 3), 2.0))
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_a_write_killed_halfway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint(checkpoint(1.0), target)

    def dies_halfway(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # what a signal arriving mid-write looks like to the writer

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint(checkpoint(5.0), target)
    monkeypatch.undo()
    assert torch.equal(io.load_checkpoint(target)["state_dict"]["net.weight"], torch.full((3, 3), 1.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_never_saved(tmp_path, bad):
    state = checkpoint()
    state["state_dict"]["net.weight"][1, 2] = bad
    assert non_finite_tensors(state["state_dict"]) == ["net.weight"]
    with pytest.raises(NonFiniteWeightsError, match=r"last\.ckpt: non-finite weights in net\.weight"):
        AtomicCheckpointIO().save_checkpoint(state, tmp_path / "last.ckpt")
    assert not list(tmp_path.iterdir())


def test_loading_is_weights_only_unless_the_file_needs_more(tmp_path, caplog):
    io = AtomicCheckpointIO()
    plain, pickled = tmp_path / "plain.ckpt", tmp_path / "pickled.ckpt"
    torch.save(checkpoint(), plain)
    torch.save({**checkpoint(), "hyper_parameters": {"ratio": Fraction(1, 3)}}, pickled)  # an arbitrary class
    with caplog.at_level(logging.WARNING, logger="medseg"):
        assert io.load_checkpoint(plain)["global_step"] == 7
        assert not caplog.records
        assert io.load_checkpoint(pickled)["hyper_parameters"]["ratio"] == Fraction(1, 3)
    assert "pickled.ckpt holds more than tensors" in caplog.text and "trust" in caplog.text
    with pytest.raises(Exception, match="Unsupported global"):  # an explicit weights_only=True is honoured
        io.load_checkpoint(pickled, weights_only=True)
