"""Training end to end on generated data: the loss falls, files appear, resuming continues the run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from medseg.config import ConfigError, compose
from medseg.data.layouts import DatasetError
from medseg.training import train

pytestmark = pytest.mark.slow


def tiny_run(root: Path, out: Path, *extra: str):
    return compose(
        "train",
        [
            "+experiment=demo",
            f"data.root={root}",
            "data.synthetic=null",
            f"paths.output_dir={out}",
            f"data.check.cache_dir={out / '.data_checks'}",
            "data.patch_size=[32,32,32]",
            "data.num_workers=0",
            "data.val_fraction=0.34",
            "trainer.log_every_n_steps=1",
            "~callbacks.model_summary",
            *extra,
        ],
    )


def epoch_losses(run: Path) -> list[float]:
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    return [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]


def test_training_smoke(brats_tree, tmp_path):
    cfg = tiny_run(brats_tree, tmp_path, "trainer.max_epochs=8", "trainer.check_val_every_n_epoch=4")
    metrics = train(cfg)

    losses = epoch_losses(tmp_path)
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < 0.9 * sum(losses[:2]) / 2, f"loss did not fall: {losses}"
    for key in ("val/dice", "val/dice_wt", "val/dice_tc", "val/dice_et", "val/iou_wt", "val/recall_et", "val/lesion_recall_et", "val/lesion_recall_large_wt", "val/lesion_dice_tc", "final_val/dice_et", "final_val/lesion_f1_wt"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert not any(k.startswith("test/") for k in metrics)  # validation cases are not called test
    header = (tmp_path / "csv" / "metrics.csv").open().readline()
    assert "train/loss_focal" in header and "train/loss_dice" in header  # the parts of focal + Dice
    validation = tmp_path / "validation"
    cases = list(csv.DictReader((validation / "evaluation" / "evaluation.csv").open()))
    assert len(cases) == 2 * 3  # two validation cases, three regions
    assert {"case", "region", "dice", "hd95_mm", "lesion_recall", "n_ref_lesions_small", "detected_large"} <= set(cases[0])
    val_ids = set(json.loads((tmp_path / "split.json").read_text())["val"])
    assert {r["case"] for r in cases} == val_ids
    assert {p.name for p in validation.glob("*.nii.gz")} == {f"{c}.nii.gz" for c in val_ids}  # the predictions that were scored
    assert not (validation / ".probabilities").exists()
    for name in ("config.yaml", "split.json", "metrics.json", "operating_point.json", "checkpoints/last.ckpt", "csv/metrics.csv", "validation/predictions.json"):
        assert (tmp_path / name).is_file(), name
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    best = [p for p in (tmp_path / "checkpoints").glob("epoch*.ckpt")]
    assert len(best) == 1
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["checkpoint"] == str(best[0]) and summary["training"]["val/dice"] == pytest.approx(metrics["val/dice"])
    assert summary["metrics"]["dice_et"] == pytest.approx(metrics["final_val/dice_et"])
    # The operating point travels in every checkpoint of the run, with the flips it was tuned on.
    point = json.loads((tmp_path / "operating_point.json").read_text())
    for path in (best[0], tmp_path / "checkpoints" / "last.ckpt"):
        stored = torch.load(path, weights_only=True, map_location="cpu")["medseg_operating_point"]
        assert stored["regions"] == point["regions"] and stored["tta_flip_axes"] == [] and stored["tuned_on"] == best[0].name
    # Checkpoints load safely (weights only) and carry the resolved config for prediction.
    checkpoint = torch.load(best[0], weights_only=True, map_location="cpu")
    assert checkpoint["medseg_config"]["data"]["labels"]["names"] == ["wt", "tc", "et"]
    # trainer.precision: auto, recorded as what it resolved to on this CPU (float32 whatever the CPU model)
    assert checkpoint["medseg_config"]["trainer"]["precision"] == "32-true" and "precision: 32-true" in (tmp_path / "config.yaml").read_text()


def test_resume_continues_from_checkpoint(brats_tree, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    train(tiny_run(brats_tree, first, "trainer.max_epochs=2", "evaluate_best=false"))
    last = torch.load(first / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert last["epoch"] == 1  # last.ckpt is written at the end of every training epoch (0-based index)
    steps_per_epoch = last["global_step"] // 2

    train(tiny_run(brats_tree, second, "trainer.max_epochs=3", "evaluate_best=false", f"ckpt_path={first}/checkpoints/last.ckpt"))
    resumed = torch.load(second / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert resumed["epoch"] == 2 and resumed["global_step"] == 3 * steps_per_epoch
    rows = list(csv.DictReader((second / "csv" / "metrics.csv").open()))
    assert {int(r["epoch"]) for r in rows if r["epoch"]} == {2}  # only the third epoch was trained again
    assert min(int(r["step"]) for r in rows) == 2 * steps_per_epoch
    assert resumed["optimizer_states"][0]["state"], "optimizer state was not restored"


def test_bad_data_root_is_a_clear_error(tmp_path):
    cfg = tiny_run(tmp_path / "missing", tmp_path)
    with pytest.raises(DatasetError, match=r"missing.*does not exist.*data.root="):
        train(cfg)


def test_unset_data_root_names_the_key(tmp_path):
    cfg = compose("train", ["+experiment=brats", f"paths.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"data.root.*synapse"):
        train(cfg)
