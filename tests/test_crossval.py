"""Cross-validation as one command (folds, out-of-fold predictions, the point tuned once, restarts, fold jobs) and
fold ensembles at prediction time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medseg.config import compose

pytestmark = pytest.mark.slow


def cv_config(root: Path, out: Path, *extra: str):
    return compose("crossval", ["+experiment=demo", f"data.root={root}", "data.synthetic=null", f"paths.output_dir={out}", f"data.check.cache_dir={out / '.checks'}",
                                "data.patch_size=[32,32,32]", "data.num_workers=0", "logger=csv", "~callbacks.model_summary", "trainer.max_epochs=2",
                                "trainer.check_val_every_n_epoch=2", "crossval.folds=3", "model.operating_point.min_component_mm3=[0.0,300.0]", *extra])


@pytest.fixture(scope="module")
def crossval_run(brats_tree, tmp_path_factory) -> tuple[Path, dict]:
    from medseg.crossvalidation import crossval

    out = tmp_path_factory.mktemp("cv") / "cv"
    return out, crossval(cv_config(brats_tree, out))


def test_every_case_is_predicted_out_of_fold_once_and_the_point_tuned_once(crossval_run, brats_tree):
    cv, summary = crossval_run
    cases = sorted(p.name for p in brats_tree.iterdir() if p.is_dir())
    assert summary["folds"] == 3 and summary["cases"] == len(cases) == 6
    splits = json.loads((cv / "splits.json").read_text())
    assert sorted(c for fold in splits.values() for c in fold) == cases  # each case in exactly one validation fold
    rows = [r for r in __import__("csv").DictReader((cv / "oof" / "evaluation" / "evaluation.csv").open())]
    assert sorted({r["case"] for r in rows}) == cases and {r["fold"] for r in rows} == {"0", "1", "2"}
    assert sorted(p.name for p in (cv / "oof").glob("*.nii.gz")) == [f"{c}.nii.gz" for c in cases]
    point = json.loads((cv / "operating_point.json").read_text())
    assert point["checkpoint"] == "crossval" and len(point["checkpoints"]) == 3 and (cv / "operating_point_sweep.csv").is_file()
    for checkpoint in point["checkpoints"]:  # every fold checkpoint carries the one point (paths relative: the folder travels)
        stored = torch.load(cv / checkpoint, weights_only=True, map_location="cpu")["medseg_operating_point"]
        assert stored["regions"] == point["regions"] and stored["tuned_on"] == "crossval"
    assert set(summary["per_fold"]) == {"0", "1", "2"} and "before_postprocessing" in summary
    assert all("fold" not in means for means in summary["region_means"].values())  # an identifier, not a measure
    for fold in range(3):  # out-of-fold probabilities kept, compact
        assert list((cv / f"fold_{fold}" / "oof" / "probabilities").glob("*.nii.gz.npz"))
        assert not (cv / f"fold_{fold}" / "validation").exists()  # no per-fold tuning


def test_finished_folds_are_reused_and_a_killed_fold_resumes(crossval_run, brats_tree, monkeypatch):
    import medseg.training
    from medseg.crossvalidation import crossval

    cv, summary = crossval_run
    trained = []
    original = medseg.training.train
    monkeypatch.setattr(medseg.training, "train", lambda cfg: trained.append(int(cfg.data.fold)) or original(cfg))
    again = crossval(cv_config(brats_tree, cv))
    assert trained == [] and again["metrics"] == summary["metrics"]  # nothing trained, the same report
    last = cv / "fold_1" / "checkpoints" / "last.ckpt"
    step = torch.load(last, weights_only=True, map_location="cpu")["global_step"]
    (cv / "fold_1" / "oof" / "oof.json").unlink()  # fold 1 was killed before its out-of-fold prediction
    resumed = crossval(cv_config(brats_tree, cv))
    assert trained == [1] and torch.load(last, weights_only=True, map_location="cpu")["global_step"] == step  # resumed at its end
    assert resumed["cases"] == 6


def test_one_fold_per_job_then_aggregate(brats_tree, tmp_path):
    from medseg.crossvalidation import crossval

    cv = tmp_path / "cv"
    assert crossval(cv_config(brats_tree, cv, "crossval.fold=2")) is None  # one fold, the others missing
    assert (cv / "fold_2" / "oof" / "oof.json").is_file() and not (cv / "fold_0").exists()
    assert crossval(cv_config(brats_tree, cv, "crossval.train=false")) is None  # nothing trained, folds missing
    with pytest.raises(Exception, match="crossval.fold"):
        crossval(cv_config(brats_tree, cv, "crossval.fold=3"))


def test_predicting_with_the_crossval_folder_averages_the_folds(crossval_run, brats_tree, tmp_path):
    from medseg.ensemble import EnsembleModel
    from medseg.prediction import load_model, predict

    cv, _ = crossval_run
    case = brats_tree / "SYN-0001"
    results = predict(compose("predict", [f"ckpt_path={cv}", f"input={case}", f"output={tmp_path / 'ensemble'}", "prefetch=0", "save_probabilities=true"]))
    record = json.loads((tmp_path / "ensemble" / "predictions.json").read_text())
    assert len(record["checkpoint"]) == 3 and "error" not in results[0]
    assert record["options"]["operating_point"]["regions"] == json.loads((cv / "operating_point.json").read_text())["regions"]
    ensemble, _ = load_model(cv)
    assert isinstance(ensemble, EnsembleModel) and len(ensemble.members) == 3
    image = torch.randn(1, 4, 32, 32, 32)
    with torch.inference_mode():
        mean = torch.stack([load_model(p)[0].predict_probabilities(image) for p in ensemble.paths]).mean(0)
        torch.testing.assert_close(ensemble.predict_probabilities(image), mean)  # the members' mean


def test_an_ensemble_of_copies_of_one_model_is_that_model_and_its_memory_does_not_grow(crossval_run):
    from medseg.bench.timing import peak_memory
    from medseg.ensemble import EnsembleModel, load_members
    from medseg.prediction import load_model

    cv, _ = crossval_run
    path = cv / json.loads((cv / "crossval.json").read_text())["checkpoints"][0]
    model, _ = load_model(path)
    image = torch.randn(1, 4, 48, 48, 32)
    peaks = {}
    with torch.inference_mode():
        single = model.predict_probabilities(image)
        for k in (1, 4):
            copies = EnsembleModel(model, load_members([path] * k), [path] * k)
            torch.testing.assert_close(copies.predict_probabilities(image), single)
            peaks[k] = peak_memory(lambda: copies.predict_probabilities(image), torch.device("cpu"))
    if peaks[1] is not None:
        assert peaks[4] <= 1.1 * peaks[1] + 2**20, peaks  # one network, one probability sum, whatever the number of members


def test_members_of_different_setups_are_refused(crossval_run, tmp_path):
    from medseg.config import ConfigError
    from medseg.prediction import load_model

    cv, _ = crossval_run
    paths = [str(cv / p) for p in json.loads((cv / "crossval.json").read_text())["checkpoints"]]
    saved = torch.load(paths[1], weights_only=True, map_location="cpu")
    saved["medseg_config"]["data"]["spacing"] = [3.0, 3.0, 3.0]
    other = tmp_path / "other.ckpt"
    torch.save(saved, other)
    with pytest.raises(ConfigError, match="differs .* in preprocessing"):
        load_model([paths[0], str(other)])


def test_cli_refuses_bad_fold_settings_in_one_line(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "medseg.crossval", "+experiment=demo", f"data.root={tmp_path}", "crossval.folds=1", f"hydra.run.dir={tmp_path / 'cv'}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "crossval.folds" in done.stdout + done.stderr and "Traceback" not in done.stderr


def test_aggregating_with_a_new_grid_counts_the_stored_probabilities_again(crossval_run, brats_tree, monkeypatch):
    import csv

    import numpy as np

    from medseg.crossvalidation import crossval
    from medseg.final_evaluation import Evaluator

    cv, _ = crossval_run
    counted = []
    original = Evaluator.case_counts
    monkeypatch.setattr(Evaluator, "case_counts", lambda self, record, probs: counted.append(record["case"]) or original(self, record, probs))
    grid = ["crossval.train=false", "model.operating_point.min_component_score=[0.0,0.6,0.9]", "model.operating_point.component_score=mean"]
    summary = crossval(cv_config(brats_tree, cv, *grid))
    assert sorted(counted) == sorted(p.name for p in brats_tree.iterdir() if p.is_dir())  # every out-of-fold case, once, no training
    for fold in range(3):
        oof = cv / f"fold_{fold}" / "oof"
        assert np.load(oof / "sweep_counts.npy").shape[3] == 3
        assert json.loads((oof / "sweep_grid.json").read_text())["min_component_score"] == [0.0, 0.6, 0.9]
    rows = list(csv.DictReader((cv / "operating_point_sweep.csv").open()))
    assert sorted({float(r["min_component_score"]) for r in rows}) == [0.0, 0.6, 0.9]
    point = summary["operating_point"]
    assert point["component_score"] == "mean" and all(r["min_component_score"] in (0.0, 0.6, 0.9) for r in point["regions"].values())
    counted.clear()
    assert crossval(cv_config(brats_tree, cv, *grid))["operating_point"] == point and counted == []  # the same grid: the stored counts


def test_out_of_fold_cases_are_predicted_again_with_other_test_time_flips(crossval_run, brats_tree, tmp_path):
    import shutil

    from medseg.config import ConfigError
    from medseg.crossvalidation import crossval

    source, _ = crossval_run
    cv = tmp_path / "cv"
    shutil.copytree(source, cv)
    with pytest.raises(ConfigError, match="test-time flips"):  # stored probabilities of other flips are not reused
        crossval(cv_config(brats_tree, cv, "crossval.train=false", "model.tta_flip_axes=[0]"))
    steps = {k: torch.load(cv / f"fold_{k}" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["global_step"] for k in range(3)}
    for k in range(3):
        (cv / f"fold_{k}" / "oof" / "oof.json").unlink()
    summary = crossval(cv_config(brats_tree, cv, "model.tta_flip_axes=[0]"))
    assert summary["operating_point"]["tta_flip_axes"] == [0]
    for k in range(3):  # predicted again, not trained again
        assert json.loads((cv / f"fold_{k}" / "oof" / "oof.json").read_text())["tta_flip_axes"] == [0]
        assert torch.load(cv / f"fold_{k}" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["global_step"] == steps[k]
