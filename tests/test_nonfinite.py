"""A NaN or infinite loss: training stops naming the step and the cases, or skips the step; weights stay finite."""

from __future__ import annotations

import csv

import pytest
import torch

from medseg.checkpoint_io import non_finite_tensors
from medseg.module import NonFiniteLossError, SegmentationModule
from medseg.training import train
from test_train import tiny_run

pytestmark = pytest.mark.slow


@pytest.fixture()
def poison(monkeypatch):
    """Make the batches of the given optimizer steps NaN; record one weight tensor at every step."""
    weights: dict[int, torch.Tensor] = {}
    poisoned_cases: dict[int, list[str]] = {}

    def install(steps):
        original = SegmentationModule.training_step

        def training_step(self, batch, batch_idx):
            weights[self.global_step] = next(self.net.parameters()).detach().clone()
            if self.global_step in steps:
                poisoned_cases[self.global_step] = list(batch["case"])
                batch = {**batch, "image": batch["image"] * float("nan")}
            return original(self, batch, batch_idx)

        monkeypatch.setattr(SegmentationModule, "training_step", training_step)
        return weights, poisoned_cases

    return install


def checkpoints_are_finite(folder):
    files = list(folder.glob("checkpoints/*.ckpt"))
    assert files
    for path in files:
        assert not non_finite_tensors(torch.load(path, weights_only=True)["state_dict"]), path


def test_nonfinite_loss_stops_training_naming_step_and_cases(brats_tree, tmp_path, poison):
    _, cases = poison({3})  # two steps per epoch
    with pytest.raises(NonFiniteLossError) as error:
        train(tiny_run(brats_tree, tmp_path, "trainer.max_epochs=3", "trainer.check_val_every_n_epoch=1"))
    message = str(error.value)
    assert "at step 3 (epoch 1): loss nan on cases" in message and all(c in message for c in cases[3])
    assert "model.nonfinite=skip" in message and "\n" not in message
    checkpoints_are_finite(tmp_path)
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2  # end of epoch 0


def test_skip_leaves_the_weights_of_a_nonfinite_step_unchanged(brats_tree, tmp_path, poison):
    weights, _ = poison({3, 4})
    train(tiny_run(brats_tree, tmp_path, "trainer.max_epochs=4", "model.nonfinite=skip", "evaluate_best=false"))
    assert torch.equal(weights[3], weights[4]) and torch.equal(weights[4], weights[5])  # steps 3 and 4 skipped
    assert not torch.equal(weights[2], weights[3]) and not torch.equal(weights[5], weights[6])  # the others trained
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    assert sum(float(r["train/skipped_steps"]) for r in rows if r.get("train/skipped_steps")) == 2
    checkpoints_are_finite(tmp_path)


def test_skip_still_stops_after_too_many_steps_in_a_row(brats_tree, tmp_path, poison):
    poison(set(range(3, 100)))
    with pytest.raises(NonFiniteLossError, match=r"at step 6 \(epoch 3\).*after 3 skipped steps in a row"):
        train(tiny_run(brats_tree, tmp_path, "trainer.max_epochs=5", "model.nonfinite=skip", "model.max_skipped_steps=3"))
    checkpoints_are_finite(tmp_path)


def test_nonfinite_option_is_validated():
    with pytest.raises(ValueError, match="expected nonfinite in"):
        SegmentationModule(net=torch.nn.Identity(), loss=torch.nn.MSELoss(), optimizer=torch.optim.SGD, labels={"mode": "sigmoid", "names": ["a"], "values": [0, 1], "regions": {"a": [1]}}, inferer={}, nonfinite="ignore")
