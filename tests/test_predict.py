"""Prediction: labels in the input's own geometry, known answers through the inverse transforms, robustness,
and the pipeline over several cases (reading and writing overlapped with inference, same outputs)."""

from __future__ import annotations

import hashlib
import csv
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

from conftest import shared_dataset
from medseg.config import CONFIG_DIR, ConfigError
from medseg.data.labels import LabelSpec
from medseg.data.layouts import DatasetError
from medseg.data.synthetic import CONTRASTS, generate_case
from medseg.module import SegmentationModule
from medseg.postprocess import OperatingPoint
from medseg.predict import main
from medseg.prediction import check_output_folder, find_input_cases, predict, predict_cases, segment

BRATS_VALUES = {0, 1, 2, 4}
SPACING = (2.0, 3.0, 4.0)  # anisotropic, mm
SHAPE = (40, 36, 28)  # RAS voxels before reorientation
# Seconds a stage of the pipeline tests waits for another stage that should run beside it: a guard against
# a deadlock (the stages running one after another), not a timing figure.
OVERLAP_WAIT_S = 60.0


def compose_predict(*overrides: str):
    """The ``conf/predict.yaml`` config with command-line overrides, composed as the CLI would."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose("predict", list(overrides))


def predict_config(ckpt: Path, source: Path | list[Path], output: Path, *extra: str):
    source = f"[{','.join(str(s) for s in source)}]" if isinstance(source, list) else str(source)
    return compose_predict(f"ckpt_path={ckpt}", f"input={source}", f"output={output}", *extra)


def run_main(*overrides: str) -> int:
    """The body of ``python -m medseg.predict OVERRIDES`` (Hydra's wrapper aside); returns the exit code."""
    try:
        main.__wrapped__(compose_predict(*overrides))
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def write_case(folder: Path, case_id: str, images: dict[str, np.ndarray], affine: np.ndarray, axcodes: tuple[str, str, str]) -> Path:
    """Save RAS ``(X, Y, Z)`` arrays as a BraTS case folder, stored in the orientation ``axcodes``."""
    case_dir = folder / case_id
    case_dir.mkdir(parents=True)
    for name, data in images.items():
        image = nib.Nifti1Image(data.astype(np.float32), affine)
        image = image.as_reoriented(ornt_transform(io_orientation(affine), axcodes2ornt(axcodes)))
        nib.save(image, case_dir / f"{case_id}_{name}.nii.gz")
    return case_dir


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def load(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(path)
    return np.asarray(image.dataobj), image.affine


def untrained_checkpoint(path: Path, *overrides: str) -> Path:
    """A checkpoint laid out as medseg.train writes it: the network of the ``train`` config composed with
    ``overrides``, with random weights (no training)."""
    from omegaconf import OmegaConf

    from medseg.config import compose
    from medseg.build import build_model

    cfg = compose("train", [f"paths.output_dir={path.parent}", *overrides])
    torch.manual_seed(0)
    torch.save({"state_dict": build_model(cfg).state_dict(), "medseg_config": OmegaConf.to_container(cfg, resolve=True)}, path)
    return path


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory) -> Path:
    """The demo network with random weights and 32^3 windows (several per case of :func:`brats_tree`)."""
    return untrained_checkpoint(tmp_path_factory.mktemp("demo") / "demo.ckpt", "+experiment=demo", "data.root=unused", "data.synthetic=null", "data.patch_size=[32,32,32]")


@pytest.fixture(scope="module")
def checkpoint(brats_tree, tmp_path_factory) -> Path:
    """A real training checkpoint (one epoch, the tiny demo net) that resamples to 4 mm."""
    from test_train import tiny_run

    from medseg.training import train

    out = tmp_path_factory.mktemp("run")
    train(tiny_run(brats_tree, out, "trainer.max_epochs=1", "trainer.limit_train_batches=1", "evaluate_best=false", "data.val_fraction=0", "data.spacing=[4.0,4.0,4.0]", "logger=csv"))
    return out / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def native_checkpoint(checkpoint, tmp_path_factory) -> Path:
    """The same weights, with a training config that keeps the native voxel spacing."""
    saved = torch.load(checkpoint, weights_only=True, map_location="cpu")
    saved["medseg_config"]["data"]["spacing"] = None
    path = tmp_path_factory.mktemp("native") / "native.ckpt"
    torch.save({"state_dict": saved["state_dict"], "medseg_config": saved["medseg_config"]}, path)
    return path


@pytest.fixture()
def support_model(monkeypatch):
    """A network with a known answer: region r (WT, TC, ET) is wherever image channel r (t1, t1ce, t2) is
    non-zero. Normalisation keeps zeros at zero, and the answer commutes with flips."""

    def predict_volume(self, image):  # (1, 4, H, W, D) -> (1, 3, H, W, D)
        return torch.where(image[:, :3] != 0, 10.0, -10.0)

    monkeypatch.setattr(SegmentationModule, "predict_volume", predict_volume)


@pytest.fixture()
def support_case(tmp_path) -> Path:
    """A case stored in PSR orientation at 2x3x4 mm whose channel supports are nested, off-centre boxes:
    t1 and flair cover A plus a small blob S, t1ce covers B in A, t2 covers C in B."""
    rng = np.random.default_rng(0)
    regions = {name: np.zeros(SHAPE, bool) for name in CONTRASTS}
    a, b, c, s = (slice(4, 30), slice(6, 28), slice(3, 20)), (slice(10, 26), slice(12, 26), slice(6, 16)), (slice(14, 22), slice(16, 24), slice(8, 14)), (slice(35, 37), slice(2, 4), slice(23, 25))
    for name, boxes in {"t1": (a, s), "flair": (a, s), "t1ce": (b,), "t2": (c,)}.items():
        for box in boxes:
            regions[name][box] = True
    images = {name: np.where(mask, rng.uniform(1.0, 2.0, SHAPE), 0.0) for name, mask in regions.items()}
    return write_case(tmp_path / "input", "CASE-1", images, np.diag([*SPACING, 1.0]), ("P", "S", "R"))


def expected_labels(case_dir: Path) -> np.ndarray:
    """BraTS labels implied by :func:`support_model`, computed on the arrays as stored (original orientation)."""
    wt, tc, et = (load(case_dir / f"{case_dir.name}_{m}.nii.gz")[0] != 0 for m in ("t1", "t1ce", "t2"))
    return np.select([et, tc, wt], [4, 1, 2], 0).astype(np.uint8)


# Fast: input resolution, output folder checks and label conversion need no network.


def test_input_kinds_resolve_to_cases(brats_tree, tmp_path):
    case = brats_tree / "SYN-0001"
    root = find_input_cases(brats_tree, CONTRASTS)
    assert [c["case"] for c in root.cases] == [f"SYN-000{i}" for i in range(6)] and root.enclosing_root == brats_tree.resolve()
    one = find_input_cases(case, CONTRASTS)
    assert [c["case"] for c in one.cases] == ["SYN-0001"] and one.enclosing_root is None
    assert [Path(f).name for f in one.cases[0]["image"]] == [f"SYN-0001_{m}.nii.gz" for m in CONTRASTS]
    files = [case / f"SYN-0001_{m}.nii.gz" for m in CONTRASTS]
    listed = find_input_cases([str(f) for f in files], CONTRASTS)
    assert listed.cases[0]["case"] == "SYN-0001" and listed.cases[0]["image"] == [str(f) for f in files]
    assert find_input_cases(str(files[0]), CONTRASTS).cases[0]["image"] == [str(files[0])]

    images = [str(f) for f in files]
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [{"image": images, "label": str(case / "SYN-0001_seg.nii.gz")}], "test": [{"image": images}]}))
    assert find_input_cases(tmp_path, CONTRASTS).cases[0]["label"] is None  # auto: the test list
    assert find_input_cases(tmp_path / "dataset.json", CONTRASTS, "training").cases[0]["label"] is not None
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [{"image": images, "label": str(case / "SYN-0001_seg.nii.gz")}]}))
    assert find_input_cases(tmp_path, CONTRASTS).cases[0]["label"] is not None  # auto without a test list
    with pytest.raises(DatasetError, match="does not exist"):
        find_input_cases(tmp_path / "nowhere", CONTRASTS)
    with pytest.raises(ConfigError, match="data_section"):
        find_input_cases(tmp_path, CONTRASTS, "validation")


def test_output_folder_equal_to_or_inside_an_input_folder_is_refused(brats_tree, tmp_path):
    root = find_input_cases(brats_tree, CONTRASTS)
    for bad in (brats_tree, brats_tree / "SYN-0002", brats_tree / "predictions"):
        with pytest.raises(ConfigError, match="output="):
            check_output_folder(bad, root.folders, root.enclosing_root)
    case = find_input_cases(brats_tree / "SYN-0002", CONTRASTS)
    with pytest.raises(ConfigError, match="is an input folder"):
        check_output_folder(brats_tree / "SYN-0002" / ".." / "SYN-0002", case.folders, case.enclosing_root)
    assert check_output_folder(tmp_path / "out", root.folders, root.enclosing_root) == (tmp_path / "out").resolve()
    assert check_output_folder(brats_tree / "SYN-0002-pred", case.folders, case.enclosing_root).name == "SYN-0002-pred"  # beside a case folder is fine


def test_segment_softmax_classes_and_small_components():
    spec = LabelSpec.from_config({"mode": "softmax", "names": ["anterior", "posterior"], "values": [0, 1, 2]})
    probs = torch.zeros(3, 10, 10, 10)
    probs[0] = 1.0
    probs[:, 1:6, 1:6, 1:6] = torch.tensor([0.1, 0.7, 0.2])[:, None, None, None]  # 125 voxels of class 1
    probs[:, 8:10, 8:10, 8:10] = torch.tensor([0.2, 0.3, 0.5])[:, None, None, None]  # 8 voxels of class 2
    labels = segment(probs, spec)
    assert labels.dtype == np.uint8 and (labels == 1).sum() == 125  # the label file's type: no int64 volume and (labels == 2).sum() == 8
    cleaned = segment(probs, spec, OperatingPoint.uniform(spec.names, min_component_mm3=10.0))
    assert (cleaned == 1).sum() == 125 and (cleaned == 2).sum() == 0
    # sizes are volumes: at 2 mm voxels (8 mm^3 each) the 8-voxel component is 64 mm^3 and stays
    per_class = OperatingPoint(tuple(spec.names), (0.5, 0.5), (200.0, 60.0))
    coarse = segment(probs, spec, per_class, voxel_mm3=8.0)
    assert (coarse == 1).sum() == 125 and (coarse == 2).sum() == 8
    assert (segment(probs, spec, OperatingPoint(tuple(spec.names), (0.5, 0.5), (1001.0, 0.0)), voxel_mm3=8.0) == 1).sum() == 0
    empty = segment(torch.stack([torch.ones(4, 4, 4), torch.zeros(4, 4, 4), torch.zeros(4, 4, 4)]), spec)
    assert not empty.any()


def test_segment_filters_components_of_the_given_connectivity():
    # Two 8-voxel cubes touching at one corner: one 16-voxel component with 26-connectivity, two of 8 with 6.
    spec = LabelSpec.from_config({"mode": "sigmoid", "names": ["lesion"], "values": [0, 1], "regions": {"lesion": [1]}})
    probs = torch.zeros(1, 8, 8, 8)
    probs[0, 1:3, 1:3, 1:3] = probs[0, 3:5, 3:5, 3:5] = 0.9
    point = OperatingPoint.uniform(spec.names, min_component_mm3=10.0)
    assert (segment(probs, spec, point, connectivity=26) == 1).sum() == 16
    assert (segment(probs, spec, point, connectivity=6) == 1).sum() == 0


def test_user_errors_are_one_readable_line(tmp_path, caplog):
    assert run_main(f"ckpt_path={tmp_path / 'missing.ckpt'}", f"input={tmp_path}", f"output={tmp_path / 'out'}") == 1
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    assert run_main(f"ckpt_path={tmp_path / 'plain.ckpt'}", f"input={tmp_path}", f"output={tmp_path / 'out'}") == 1
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    assert run_main(f"ckpt_path={tmp_path / 'junk.ckpt'}", f"input={tmp_path}", f"output={tmp_path / 'out'}") == 1
    assert run_main(f"input={tmp_path}", f"output={tmp_path / 'out'}") == 1
    messages = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(messages) == 4 and all(r.exc_info is None for r in caplog.records)  # no traceback
    assert "checkpoint not found" in messages[0] and "medseg_config" in messages[1]
    assert "cannot read checkpoint" in messages[2] and "ckpt_path=..." in messages[3]
    assert not (tmp_path / "out").exists()


# RAS: nothing to invert, the probabilities come back as the inference tensors the sliding window made.
@pytest.mark.parametrize("axcodes", [("L", "P", "I"), ("R", "A", "S")])
def test_softmax_msd_case_known_answer(tmp_path, monkeypatch, axcodes):
    """An untrained hippocampus (softmax) checkpoint whose network answers class 1 below the case's mean
    intensity and class 2 above it, on a single-file MSD test image stored in LPI (or RAS) orientation."""
    ckpt = untrained_checkpoint(tmp_path / "hippocampus.ckpt", "+experiment=hippocampus", "data.root=unused")

    def predict_volume(self, image):  # (1, 1, H, W, D) z-scored over non-zero voxels -> (1, 3, H, W, D)
        x = image[:, 0]
        return torch.stack([torch.where(x == 0, 10.0, -10.0), torch.where(x < 0, 10.0, -10.0), torch.where(x > 0, 10.0, -10.0)], dim=1)

    monkeypatch.setattr(SegmentationModule, "predict_volume", predict_volume)
    rng = np.random.default_rng(1)
    image = np.zeros((20, 24, 16), np.float32)
    image[2:9, 3:20, 4:10] = rng.uniform(1.0, 2.0, (7, 17, 6))  # below the mean: class 1
    image[12:18, 5:9, 9:15] = rng.uniform(5.0, 6.0, (6, 4, 6))  # above: class 2
    stored = nib.Nifti1Image(image, np.diag([1.0, 1.5, 2.0, 1.0]))
    stored = stored.as_reoriented(ornt_transform(io_orientation(stored.affine), axcodes2ornt(axcodes)))
    (tmp_path / "task" / "imagesTs").mkdir(parents=True)
    nib.save(stored, tmp_path / "task" / "imagesTs" / "hip_001.nii.gz")
    (tmp_path / "task" / "dataset.json").write_text(json.dumps({"training": [], "test": ["./imagesTs/hip_001.nii.gz"]}))

    results = predict(predict_config(ckpt, tmp_path / "task", tmp_path / "out", "save_probabilities=true"))
    labels, affine = load(results[0]["prediction"])
    data = np.asarray(stored.dataobj)
    np.testing.assert_array_equal(labels, np.select([data >= 5, data > 0], [2, 1], 0))
    np.testing.assert_array_equal(affine, stored.affine)
    assert labels.dtype == np.uint8 and results[0]["case"] == "hip_001"
    probs, _ = load(results[0]["probabilities"])
    assert probs.shape == (*data.shape, 3)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


# Slow: these use a trained checkpoint.


@pytest.mark.slow
def test_round_trip_non_ras_anisotropic_case(checkpoint, tmp_path):
    case = generate_case(np.random.default_rng(7), shape=(48, 40, 32), spacing=(3.0, 4.0, 4.8))
    case_dir = write_case(tmp_path / "input", "SYN-LPS", case.images, case.affine, ("P", "S", "R"))
    before = file_hashes(tmp_path / "input")
    reference_data, reference_affine = load(case_dir / "SYN-LPS_flair.nii.gz")
    assert reference_data.shape == (40, 32, 48)  # permuted: stored P, S, R

    runs = {}
    for tta in (False, True):
        out = tmp_path / f"out_tta{tta}"
        results = predict(predict_config(checkpoint, case_dir, out, f"tta={tta}", "save_probabilities=true"))
        assert [r["case"] for r in results] == ["SYN-LPS"] and "error" not in results[0]
        labels, affine = load(out / "SYN-LPS.nii.gz")
        assert labels.shape == reference_data.shape and labels.dtype == np.uint8
        np.testing.assert_array_equal(affine, reference_affine)
        assert nib.aff2axcodes(affine) == ("P", "S", "R")
        assert set(np.unique(labels).tolist()) <= BRATS_VALUES
        probs, prob_affine = load(out / "probabilities" / "SYN-LPS.nii.gz")
        assert probs.shape == (*reference_data.shape, 3) and probs.dtype == np.float32
        assert probs.min() >= 0.0 and probs.max() <= 1.0
        np.testing.assert_array_equal(prob_affine, reference_affine)
        summary = json.loads((out / "predictions.json").read_text())
        assert summary["failed"] == 0 and summary["cases"][0]["prediction"] == str(out / "SYN-LPS.nii.gz") and summary["options"]["tta_flip_axes"] == ([0, 1, 2] if tta else [])  # tta=true: the training flips (none were tuned)
        assert sorted(p.name for p in out.iterdir()) == ["SYN-LPS.nii.gz", "predictions.json", "probabilities"]  # no temporary files left
        runs[tta] = probs
    assert not np.allclose(runs[False], runs[True], atol=1e-4)  # the flips changed the average
    assert file_hashes(tmp_path / "input") == before


@pytest.mark.slow
@pytest.mark.parametrize("tta", [False, True])
def test_inverse_geometry_gives_the_known_answer_in_the_original_orientation(native_checkpoint, support_model, support_case, tmp_path, tta):
    out = tmp_path / "out"
    predict(predict_config(native_checkpoint, support_case, out, f"tta={tta}"))
    labels, affine = load(out / "CASE-1.nii.gz")
    expected = expected_labels(support_case)
    assert set(np.unique(expected).tolist()) == BRATS_VALUES
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_array_equal(affine, load(support_case / "CASE-1_t1.nii.gz")[1])


@pytest.mark.slow
def test_inverse_geometry_through_resampling(checkpoint, support_model, support_case, tmp_path):
    """The checkpoint resamples 2x3x4 mm to 4 mm: the answer matches up to interpolation at box borders."""
    out = tmp_path / "out"
    predict(predict_config(checkpoint, support_case, out))
    labels, _ = load(out / "CASE-1.nii.gz")
    expected = expected_labels(support_case)
    for value in (1, 2, 4):
        pred, ref = labels == value, expected == value
        dice = 2 * (pred & ref).sum() / (pred.sum() + ref.sum())
        assert dice > 0.75, (value, dice)


@pytest.mark.slow
def test_min_component_mm3_removes_the_small_component(native_checkpoint, support_model, support_case, tmp_path):
    """The blob S has 8 voxels of 2x3x4 mm = 192 mm^3; the other components are over 1000 mm^3."""
    kept = predict(predict_config(native_checkpoint, support_case, tmp_path / "all"))
    removed = predict(predict_config(native_checkpoint, support_case, tmp_path / "clean", "min_component_mm3=500"))
    full, clean = load(kept[0]["prediction"])[0], load(removed[0]["prediction"])[0]
    np.testing.assert_array_equal(full, expected_labels(support_case))
    changed = full != clean
    assert changed.sum() == 8 and (full[changed] == 2).all() and (clean[changed] == 0).all()


@pytest.mark.slow
def test_min_component_score_removes_the_components_scoring_below_it(native_checkpoint, support_model, support_case, tmp_path):
    """Every component of the support model peaks at sigmoid(10) = 0.99995: a minimum score of 0.999 keeps them all,
    1.0 removes them all, whatever their size."""
    kept = predict(predict_config(native_checkpoint, support_case, tmp_path / "kept", "min_component_score=0.999", "lesion_table=true"))
    removed = predict(predict_config(native_checkpoint, support_case, tmp_path / "removed", "min_component_score=1.0"))
    np.testing.assert_array_equal(load(kept[0]["prediction"])[0], expected_labels(support_case))
    assert not load(removed[0]["prediction"])[0].any()
    record = json.loads((tmp_path / "removed" / "predictions.json").read_text())
    assert {r["min_component_score"] for r in record["options"]["operating_point"]["regions"].values()} == {1.0}
    scores = [float(r["score"]) for r in csv.DictReader(open(kept[0]["lesion_table"]))]
    assert scores and all(0.999 <= s < 1.0 for s in scores)  # the table's score is the one the filter thresholds


@pytest.mark.slow
def test_broken_case_is_reported_and_the_others_complete(brats_tree, checkpoint, tmp_path):
    root = tmp_path / "input"
    for case in ("SYN-0000", "SYN-0001", "SYN-0002"):
        shutil.copytree(brats_tree / case, root / case)
    broken = root / "SYN-0001" / "SYN-0001_flair.nii.gz"
    broken.write_bytes(broken.read_bytes()[:2000])  # truncated gzip
    out = tmp_path / "out"
    assert run_main(f"ckpt_path={checkpoint}", f"input={root}", f"output={out}") == 1
    summary = json.loads((out / "predictions.json").read_text())
    by_case = {c["case"]: c for c in summary["cases"]}
    assert summary["failed"] == 1 and set(by_case) == {"SYN-0000", "SYN-0001", "SYN-0002"}
    assert by_case["SYN-0001"]["error"].startswith(str(broken)) and "\n" not in by_case["SYN-0001"]["error"]
    assert not (out / "SYN-0001.nii.gz").exists()
    for case in ("SYN-0000", "SYN-0002"):
        assert Path(by_case[case]["prediction"]).is_file()
        assert load(out / f"{case}.nii.gz")[0].shape == (48, 48, 32)


@pytest.mark.slow
def test_output_equal_to_input_is_refused_before_anything_is_written(brats_copy, checkpoint, tmp_path):
    before = file_hashes(brats_copy)
    for source, output in ((brats_copy / "SYN-0003", brats_copy / "SYN-0003"), (brats_copy, brats_copy), (brats_copy, brats_copy / "predictions")):
        with pytest.raises(ConfigError, match="input folder|input root"):
            predict(predict_config(checkpoint, source, output))
    with pytest.raises(DatasetError, match="does not exist"):
        predict(predict_config(checkpoint, tmp_path / "nowhere", tmp_path / "out"))
    assert file_hashes(brats_copy) == before and not (tmp_path / "out").exists()
    assert sorted(p.name for p in brats_copy.iterdir()) == [f"SYN-000{i}" for i in range(6)] + ["synthetic.json"]


@pytest.mark.slow
@pytest.mark.realdata
def test_real_brats_samples_keep_their_geometry(checkpoint, tmp_path):
    root = shared_dataset("BraTS_samples")
    results = predict(predict_config(checkpoint, root, tmp_path / "out"))
    assert len(results) == 2 and all("error" not in r for r in results)
    for result in results:
        labels, affine = load(result["prediction"])
        _, reference_affine = load(root / result["case"] / f"{result['case']}_flair.nii.gz")
        assert labels.shape == (240, 240, 155) and labels.dtype == np.uint8
        np.testing.assert_array_equal(affine, reference_affine)
        assert set(np.unique(labels).tolist()) <= BRATS_VALUES


@pytest.mark.slow
def test_cli_predicts_a_case_folder_and_writes_nothing_else(brats_tree, checkpoint, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "medseg.predict", f"ckpt_path={checkpoint}", f"input={brats_tree / 'SYN-0004'}", f"output={out}"],
        capture_output=True, text=True, cwd=cwd, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert load(out / "SYN-0004.nii.gz")[0].shape == (48, 48, 32)
    assert json.loads((out / "predictions.json").read_text())["failed"] == 0
    assert list(cwd.iterdir()) == []  # no Hydra outputs/ folder, no log file
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flip_axes, calls", [((0, 1, 2), 8), ((0,), 2), ((), 1)])
def test_tta_flips_only_the_axes_the_model_was_trained_with(flip_axes, calls):
    from itertools import combinations

    from medseg.postprocess import flip_averaged_probabilities

    seen = []
    image = torch.arange(2 * 4 * 5 * 6, dtype=torch.float32).reshape(2, 4, 5, 6)  # (C_in, H, W, D), no symmetry

    def predict_volume(batch):  # an equivariant "network": logits are the first input channel
        seen.append(batch.clone())
        return batch[:, :1]

    probs = flip_averaged_probabilities(predict_volume, image[None], "sigmoid", flip_axes)[0]
    assert len(seen) == calls
    dims = [2 + a for a in flip_axes]
    expected = [image[None].flip(list(c)) for k in range(len(dims) + 1) for c in combinations(dims, k)]
    assert all(any(torch.equal(s, e) for s in seen) for e in expected)
    torch.testing.assert_close(probs, torch.sigmoid(image[:1]))  # every flip undone before averaging


# The pipeline over several cases: reading and writing in worker threads beside the sliding window.


def fake_cases(folder: Path, n_cases: int) -> list[dict]:
    """Records of cases ``C0, C1, ...`` whose one image is a readable (tiny) NIfTI file."""
    folder.mkdir(parents=True)
    cases = []
    for i in range(n_cases):
        path = folder / f"C{i}.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), path)
        cases.append({"case": f"C{i}", "image": [str(path)], "label": None})
    return cases


def replace_stages(monkeypatch, cases: list[dict], before=lambda stage, index: None, fail=frozenset()) -> None:
    """Stand-ins for ``read_case``, ``infer_case`` and ``write_case`` of :mod:`medseg.predict`: each calls
    ``before(stage, case index)``, then raises a RuntimeError if ``(stage, index)`` is in ``fail``; the
    written result is ``{"case", "prediction": index}``."""

    def stage(name: str, index: int) -> None:
        before(name, index)
        if (name, index) in fail:
            raise RuntimeError(f"{name} of case {index} failed")

    def read_case(record, transform, options):
        index = cases.index(record)
        stage("read", index)
        return SimpleNamespace(record=record, index=index)

    def infer_case(case, model, options):
        stage("infer", case.index)
        return case.index

    def write_case(case, probs, transform, spec, options):
        stage("write", case.index)
        return {"case": case.record["case"], "prediction": probs.pop() if isinstance(probs, list) else probs}  # the held probabilities

    for fn in (read_case, infer_case, write_case):
        monkeypatch.setattr(f"medseg.prediction.{fn.__name__}", fn)


def test_prefetch_must_be_a_whole_number_from_zero(tmp_path, caplog):
    assert run_main(f"ckpt_path={tmp_path / 'missing.ckpt'}", f"input={tmp_path}", f"output={tmp_path / 'out'}", "prefetch=-1") == 1
    assert "expected prefetch to be a whole number >= 0" in caplog.text and not (tmp_path / "out").exists()


def test_prefetch_0_runs_each_case_start_to_end_in_the_calling_thread(monkeypatch, tmp_path):
    cases = fake_cases(tmp_path / "in", 3)
    calls = []
    replace_stages(monkeypatch, cases, lambda stage, index: calls.append((stage, index, threading.current_thread())))
    results = list(predict_cases(cases, None, None, None, None, prefetch=0))
    assert results == [{"case": f"C{i}", "prediction": i} for i in range(3)]
    assert calls == [(stage, i, threading.main_thread()) for i in range(3) for stage in ("read", "infer", "write")]


@pytest.mark.parametrize("prefetch", [1, 2])
def test_cases_are_read_and_written_while_another_case_is_inferred(monkeypatch, tmp_path, prefetch):
    """Stand-in stages that return only once the stage they should run beside has begun: the next case's
    reading while a case is inferred, the next case's inference while a case is written. One stage after
    another they would wait in vain and fail."""
    n_cases = 5
    cases = fake_cases(tmp_path / "in", n_cases)
    overlaps = {"infer": "read", "write": "infer"}  # stage of case i -> stage of case i + 1 begun meanwhile
    begun = {(stage, i): threading.Event() for stage in ("read", "infer", "write") for i in range(n_cases)}
    threads = {}

    def before(stage: str, index: int) -> None:
        threads[stage, index] = threading.current_thread().name
        begun[stage, index].set()
        if stage in overlaps and index + 1 < n_cases and not begun[overlaps[stage], index + 1].wait(OVERLAP_WAIT_S):
            raise TimeoutError(f"case {index + 1}: {overlaps[stage]} did not begin during the {stage} of case {index}")

    replace_stages(monkeypatch, cases, before)
    results = list(predict_cases(cases, None, None, None, None, prefetch))
    assert results == [{"case": f"C{i}", "prediction": i} for i in range(n_cases)]
    for i in range(n_cases):
        assert threads["infer", i] == threading.main_thread().name
        assert threads["read", i].startswith("medseg-read") and threads["write", i].startswith("medseg-write")


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_a_case_failing_in_any_stage_is_reported_in_its_place_and_the_others_complete(monkeypatch, tmp_path, prefetch):
    cases = fake_cases(tmp_path / "in", 6)
    failing = {1: "read", 2: "infer", 3: "write"}
    replace_stages(monkeypatch, cases, fail={(stage, i) for i, stage in failing.items()})
    results = list(predict_cases(cases, None, None, None, None, prefetch))
    assert [r["case"] for r in results] == [c["case"] for c in cases]
    for i, stage in failing.items():
        assert results[i] == {"case": f"C{i}", "error": f"RuntimeError: {stage} of case {i} failed", "image": cases[i]["image"]}
    assert [results[i]["prediction"] for i in (0, 4, 5)] == [0, 4, 5]


def test_pipelined_prediction_writes_what_one_case_after_another_writes(brats_tree, demo_checkpoint, tmp_path):
    names = [f"SYN-000{i}" for i in range(6)]
    runs = {prefetch: predict(predict_config(demo_checkpoint, brats_tree, tmp_path / f"prefetch{prefetch}", f"prefetch={prefetch}", "save_probabilities=true")) for prefetch in (0, 1, 2)}

    def comparable(result: dict) -> dict:  # the paths differ by output folder; the seconds by run
        return {**{k: v for k, v in result.items() if k != "seconds"}, "prediction": Path(result["prediction"]).name, "probabilities": Path(result["probabilities"]).name}

    sequential = runs[0]
    assert [r["case"] for r in sequential] == names and not any("error" in r for r in sequential)
    labels = [load(r["prediction"])[0] for r in sequential]
    assert len(np.unique(np.concatenate([x.ravel() for x in labels]))) > 1  # not a comparison of empty volumes
    for prefetch in (1, 2):
        assert [comparable(r) for r in runs[prefetch]] == [comparable(r) for r in sequential]
        for ref, result in zip(sequential, runs[prefetch]):
            for key in ("prediction", "probabilities"):
                (data, affine), (ref_data, ref_affine) = load(result[key]), load(ref[key])
                np.testing.assert_array_equal(data, ref_data)
                np.testing.assert_array_equal(affine, ref_affine)


@pytest.mark.parametrize("prefetch", [1, 2])
def test_broken_case_in_the_middle_of_a_pipelined_folder_is_reported_and_the_cases_after_it_are_predicted(brats_tree, demo_checkpoint, tmp_path, prefetch):
    root = tmp_path / "input"
    names = [f"SYN-000{i}" for i in range(5)]
    for case in names:
        shutil.copytree(brats_tree / case, root / case)
    broken = root / "SYN-0002" / "SYN-0002_t1.nii.gz"
    broken.write_bytes(broken.read_bytes()[:2000])  # truncated gzip
    out = tmp_path / "out"
    assert run_main(f"ckpt_path={demo_checkpoint}", f"input={root}", f"output={out}", f"prefetch={prefetch}") == 1
    summary = json.loads((out / "predictions.json").read_text())
    assert [c["case"] for c in summary["cases"]] == names and summary["failed"] == 1
    assert summary["cases"][2]["error"].startswith(str(broken)) and "\n" not in summary["cases"][2]["error"]
    predicted = [f"{case}.nii.gz" for case in names if case != "SYN-0002"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*predicted, "predictions.json"])  # no temporary files left
    assert all(load(out / name)[0].shape == (48, 48, 32) for name in predicted)


def test_reference_label_folders_of_every_layout_are_refused_as_output(brats_tree, msd_tree, tmp_path):
    """An output folder holding a dataset's reference labels would have its files replaced by predictions of the
    same names: MSD and nnU-Net labelsTr/labelsTs, a folder dataset's labels/, a BraTS root's case folders."""
    from medseg.data.layouts import find_cases, reference_label_folders
    from medseg.data.layouts.nnunet import export_nnunet

    nnunet = export_nnunet(find_cases("brats", brats_tree, CONTRASTS), tmp_path / "Dataset001_Syn", ["T1", "T1ce", "T2", "FLAIR"],
                           {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3}, {1: 2, 2: 1, 4: 3}, regions_class_order=[1, 2, 3])
    (nnunet / "labelsTs").mkdir()
    folder = tmp_path / "folder"
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    for case in ("SYN-0000", "SYN-0001"):
        shutil.copy(brats_tree / case / f"{case}_flair.nii.gz", folder / "images" / f"{case}.nii.gz")
        shutil.copy(brats_tree / case / f"{case}_seg.nii.gz", folder / "labels" / f"{case}.nii.gz")
    cases = {
        "msd": (msd_tree, [msd_tree / "labelsTr"]),
        "msd images folder": (msd_tree / "imagesTr", [msd_tree / "labelsTr"]),
        "nnunet": (nnunet, [nnunet / "labelsTr", nnunet / "labelsTs"]),
        "nnunet imagesTr": (nnunet / "imagesTr", [nnunet / "labelsTr", nnunet / "labelsTs"]),
        "folder": (folder, [folder / "labels"]),
        "brats": (brats_tree, [brats_tree / "SYN-0002"]),
    }
    for name, (source, labels) in cases.items():
        found = reference_label_folders(source)
        for label_folder in labels:
            assert label_folder.resolve() in found, name
            with pytest.raises(ConfigError, match="reference labels"):
                check_output_folder(label_folder, [], None, found)
    assert check_output_folder(tmp_path / "predictions", [], None, reference_label_folders(msd_tree)) == (tmp_path / "predictions").resolve()


@pytest.mark.slow
def test_predict_never_writes_over_the_reference_labels_of_an_msd_task(checkpoint, msd_tree, tmp_path):
    task = Path(shutil.copytree(msd_tree, tmp_path / "task"))
    before = file_hashes(task)
    with pytest.raises(ConfigError, match="reference labels"):
        predict(predict_config(checkpoint, task, task / "labelsTr"))
    assert file_hashes(task) == before


def test_predict_uses_the_flips_the_point_was_tuned_with_unless_told_otherwise():
    from omegaconf import OmegaConf

    from medseg.prediction import prediction_flips

    model = SimpleNamespace(postprocessing=SimpleNamespace(tta_flip_axes=None))
    config = OmegaConf.create({"model": {"tta_flip_axes": [0]}, "data": {"augment": {"flip_axes": [0, 1, 2]}}})
    assert prediction_flips(None, model, config) == (0,)  # the training config's, which the point was tuned with
    assert prediction_flips(False, model, config) == ()
    assert prediction_flips(True, model, config) == (0,)
    model.postprocessing.tta_flip_axes = (1, 2)  # recorded with the tuned point: it wins
    assert prediction_flips(None, model, config) == (1, 2)
    model.postprocessing.tta_flip_axes = ()
    config.model.tta_flip_axes = []
    assert prediction_flips(None, model, config) == () and prediction_flips(True, model, config) == (0, 1, 2)


def test_a_killed_run_continues_where_it_stopped_and_other_checkpoints_are_refused(brats_tree, demo_checkpoint, tmp_path, monkeypatch):
    import medseg.prediction as prediction

    names, out, written = [f"SYN-000{i}" for i in range(6)], tmp_path / "out", []
    real_write = prediction.write_case

    def write(*args, **kwargs):
        written.append(args[0].record["case"])
        if len(written) == 3 and kill:
            raise KeyboardInterrupt  # killed while writing the third case
        return real_write(*args, **kwargs)

    monkeypatch.setattr(prediction, "write_case", write)
    kill = True
    with pytest.raises(KeyboardInterrupt):
        predict(predict_config(demo_checkpoint, brats_tree, out, "prefetch=0"))
    record = json.loads((out / "predictions.json").read_text())
    assert record["complete"] is False and [c["case"] for c in record["cases"]] == names[:2]  # it says what it finished

    kill, written[:] = False, []
    results = predict(predict_config(demo_checkpoint, brats_tree, out, "prefetch=0"))
    assert written == names[2:]  # the finished cases were kept, not predicted again
    record = json.loads((out / "predictions.json").read_text())
    assert record["complete"] is True and [c["case"] for c in record["cases"]] == [r["case"] for r in results] == names
    before = file_hashes(out)

    other = untrained_checkpoint(tmp_path / "other.ckpt", "+experiment=demo", "data.root=unused", "data.synthetic=null", "data.patch_size=[32,32,32]")
    with pytest.raises(ConfigError, match="overwrite=true"):  # predictions of another checkpoint: refused, nothing touched
        predict(predict_config(other, brats_tree, out))
    assert file_hashes(out) == before
    with pytest.raises(ConfigError, match="overwrite=true"):  # other options (a size filter) count as another run too
        predict(predict_config(demo_checkpoint, brats_tree, out, "min_component_mm3=5"))

    predict(predict_config(other, brats_tree / names[0], out, "overwrite=true"))  # the earlier run's files go
    assert sorted(p.name for p in out.iterdir()) == [f"{names[0]}.nii.gz", "predictions.json"]
    assert json.loads((out / "predictions.json").read_text())["checkpoint"] == str(other.resolve())


def test_an_output_folder_with_unaccounted_label_files_is_refused(brats_tree, demo_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "someone_else.nii.gz").write_bytes(b"not ours")
    with pytest.raises(ConfigError, match="no predictions.json"):
        predict(predict_config(demo_checkpoint, brats_tree / "SYN-0000", out))
    assert [p.name for p in out.iterdir()] == ["someone_else.nii.gz"]
