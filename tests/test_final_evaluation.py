"""One honest pipeline: what a training run reports (metrics.json) is what medseg.evaluate gives on the files
medseg.predict writes for the same validation cases, from last.ckpt and from the run folder; nested regions are
post-processed consistently; the operating point and its flips travel with the run."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.config import compose
from medseg.data.labels import LabelSpec
from medseg.postprocess import OperatingPoint, postprocess

pytestmark = pytest.mark.slow
BRATS = {"mode": "sigmoid", "names": ["wt", "tc", "et"], "values": [0, 1, 2, 4], "regions": {"wt": [1, 2, 4], "tc": [1, 4], "et": [4]}}


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float) or isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-9, abs=1e-12)
    return a == b


def train_run(root: Path, out: Path, *extra: str) -> dict:
    from medseg.training import train

    cfg = compose("train", ["+experiment=demo", f"data.root={root}", "data.synthetic=null", f"paths.output_dir={out}", f"data.check.cache_dir={out / '.checks'}",
                            "data.patch_size=[32,32,32]", "data.num_workers=0", "data.val_fraction=0.34", "logger=csv", "~callbacks.model_summary",
                            # one validation, at the last epoch: the best checkpoint holds last.ckpt's weights
                            "trainer.max_epochs=4", "trainer.check_val_every_n_epoch=4", *extra])
    return train(cfg)


def predict_and_evaluate(ckpt: Path, cases_root: Path, ref: Path, out: Path, *data: str) -> dict:
    from medseg.evaluate import evaluate
    from medseg.prediction import predict

    results = predict(compose("predict", [f"ckpt_path={ckpt}", f"input={cases_root}", f"output={out}", "prefetch=0"]))
    assert results and not any("error" in r for r in results)
    evaluate(compose("evaluate", [f"pred={out}", f"ref={ref}", f"output={out / 'evaluation'}", *data]))
    return json.loads((out / "evaluation" / "summary.json").read_text())


def assert_reported_equals_evaluated(run: Path, evaluated: dict) -> None:
    reported = json.loads((run / "metrics.json").read_text())
    for key in ("cases", "metrics", "region_means", "lesion_matching", "lesion_detection", "lesion_recall_by_size"):
        if key in evaluated or key in reported:
            assert same(reported[key], evaluated[key]), key


def test_brats_run_reports_what_predict_then_evaluate_give_with_resampling(brats_tree, tmp_path):
    run = tmp_path / "run"
    # Resampled to 3 mm (the cases are 4 x 4 x 4.8 mm), the point tuned for lesion F1 with a size filter in the grid.
    metrics = train_run(brats_tree, run, "data.spacing=[3.0,3.0,3.0]", "model.operating_point.criterion=lesion_f1", "model.operating_point.thresholds=[0.3,0.5,0.7]",
                        "model.operating_point.min_component_mm3=[0.0,200.0]", "model.tta_flip_axes=[0]")
    assert "final_val/dice_wt" in metrics
    val_ids = json.loads((run / "split.json").read_text())["val"]
    only_val = tmp_path / "validation_cases"  # the validation cases alone, as a user would gather them
    only_val.mkdir()
    for case in val_ids:
        os.symlink(brats_tree / case, only_val / case)
    point = json.loads((run / "operating_point.json").read_text())
    assert point["tta_flip_axes"] == [0] and point["criterion"] == "lesion_f1"
    for ckpt in (run, run / "checkpoints" / "last.ckpt"):
        out = tmp_path / f"pred_{ckpt.name}"
        evaluated = predict_and_evaluate(ckpt, only_val, brats_tree, out)
        assert evaluated["cases"] == len(val_ids)
        assert_reported_equals_evaluated(run, evaluated)
        record = json.loads((out / "predictions.json").read_text())
        assert record["options"]["tta_flip_axes"] == [0] and record["options"]["operating_point"]["regions"] == point["regions"]
    # Where the disk has no room for the probabilities, the cases are predicted twice: the same files and numbers.
    import medseg.final_evaluation as final
    from omegaconf import OmegaConf

    from medseg.data.layouts import find_cases
    from medseg.prediction import load_model

    model, _ = load_model(run)
    cfg = OmegaConf.load(run / "config.yaml")
    by_id = {c["case"]: c for c in find_cases("brats", brats_tree, list(cfg.data.modalities))}
    original = final.room_for_probabilities
    final.room_for_probabilities = lambda *args: False
    try:
        again = final.evaluate_cases(model, cfg, [by_id[c] for c in val_ids], tmp_path / "again")
    finally:
        final.room_for_probabilities = original
    assert same(again.summary["metrics"], json.loads((run / "metrics.json").read_text())["metrics"]) and again.point.to_dict()["regions"] == point["regions"]
    for case in val_ids:
        assert np.array_equal(np.asarray(nib.load(tmp_path / "again" / f"{case}.nii.gz").dataobj), np.asarray(nib.load(run / "validation" / f"{case}.nii.gz").dataobj))
    assert not (tmp_path / "again" / ".probabilities").exists()
    # A grid choice whose files score worse than the configured point's is not kept: the configured point's files are.
    from medseg.metrics.operating_point import OperatingPointSweep

    chooser = OperatingPointSweep.choose
    OperatingPointSweep.choose = lambda self, criterion, default_threshold=0.5: OperatingPoint(self.names, (0.99,) * 3, (1e7,) * 3, criterion)  # nothing kept
    configured = point["regions"]["wt"]["threshold"]  # a configured point that finds lesions with these weights
    cfg.model.threshold = configured
    try:
        worse = final.evaluate_cases(model, cfg, [by_id[c] for c in val_ids], tmp_path / "worse")
    finally:
        OperatingPointSweep.choose = chooser
    assert final.criterion_value(worse.untuned, "lesion_f1", ("wt", "tc", "et")) > 0
    assert worse.point.threshold == (configured,) * 3 and worse.point.min_component_mm3 == (0.0, 0.0, 0.0) and worse.point.criterion == "lesion_f1"
    assert same(worse.summary["metrics"], worse.untuned["metrics"]) and not (tmp_path / "worse" / ".untuned").exists()
    kept = json.loads((tmp_path / "worse" / "predictions.json").read_text())["options"]["operating_point"]["regions"]
    assert {r["threshold"] for r in kept.values()} == {configured}
    # Without the tuned flips the predictions (and numbers) are those of another pipeline: predict says which it used.
    from medseg.prediction import predict

    predict(compose("predict", [f"ckpt_path={run}", f"input={only_val}", f"output={tmp_path / 'no_tta'}", "tta=false", "prefetch=0"]))
    assert json.loads((tmp_path / "no_tta" / "predictions.json").read_text())["options"]["tta_flip_axes"] == []


def test_msd_softmax_run_reports_what_predict_then_evaluate_give(msd_tree, tmp_path):
    run = tmp_path / "run"
    data = ["data=msd", "data.in_channels=2", "data.labels.names=[ncr,ed,et]", "data.labels.values=[0,1,2,4]"]
    train_run(msd_tree, run, *data, "model.operating_point.min_component_mm3=[0.0,300.0]")
    val_ids = json.loads((run / "split.json").read_text())["val"]
    task = tmp_path / "validation_task"  # an MSD task listing only the validation cases
    listed = json.loads((msd_tree / "dataset.json").read_text())
    # Case ids are the image folders (imagesTr/SYN-0003): keep their names, with the files listed by absolute path.
    entries = [{"case": Path(e["image"][0]).parent.as_posix().removeprefix("./"), "image": [str((msd_tree / i).resolve()) for i in e["image"]], "label": str((msd_tree / e["label"]).resolve())}
               for e in listed["training"]]
    entries = [e for e in entries if e["case"] in val_ids]
    task.mkdir()
    (task / "dataset.json").write_text(json.dumps({**listed, "training": entries}))
    evaluated = predict_and_evaluate(run, task, task, tmp_path / "pred", *data)
    assert evaluated["cases"] == len(val_ids) == 2
    assert_reported_equals_evaluated(run, evaluated)


def test_nested_regions_removed_from_the_outer_region_take_their_inner_voxels():
    spec = LabelSpec.from_config(BRATS)
    assert spec.nesting == ((0, 1), (0, 2), (1, 2))
    probs = torch.zeros(3, 20, 20, 20)
    probs[0, 2:10, 2:10, 2:10] = 0.9  # a large WT component ...
    probs[1, 4:8, 4:8, 4:8] = 0.9  # ... holding TC ...
    probs[2, 5:7, 5:7, 5:7] = 0.9  # ... and ET
    probs[0, 15:17, 15:17, 15:17] = 0.9  # a small WT component (8 voxels) ...
    probs[1:, 15:17, 15:17, 15:17] = 0.9  # ... with TC and ET inside
    probs[2, 12, 12, 12] = 0.9  # ET alone: counts for TC and WT too (inner regions win, as nnU-Net writes them)
    point = OperatingPoint(("wt", "tc", "et"), (0.5, 0.5, 0.5), (20.0, 0.0, 0.0))
    masks = postprocess(probs, "sigmoid", point, 1.0, 26, spec.nesting)
    assert not masks[:, 15:17, 15:17, 15:17].any()  # the removed WT component took its TC and ET voxels along
    assert not masks[:, 12, 12, 12].any()  # the lone ET voxel became a 1-voxel WT component, removed too
    assert masks[0].sum() == 512 and masks[1].sum() == 64 and masks[2].sum() == 8
    # To labels and back gives the masks that were scored.
    from medseg.prediction import segment

    labels = segment(probs, spec, point, 1.0)
    assert np.array_equal(spec.to_channels(labels[None]), masks)
    rng = np.random.default_rng(0)
    for _ in range(5):  # random probabilities and points: the round trip is exact
        noisy = torch.from_numpy(rng.random((3, 16, 16, 12))).float()
        point = OperatingPoint(("wt", "tc", "et"), tuple(rng.uniform(0.3, 0.7, 3)), tuple(rng.choice([0.0, 3.0, 10.0], 3)))
        masks = postprocess(noisy, "sigmoid", point, 1.0, 26, spec.nesting)
        assert np.array_equal(spec.to_channels(segment(noisy, spec, point, 1.0)[None]), masks)
        assert not (masks[2] & ~masks[1]).any() and not (masks[1] & ~masks[0]).any()
