"""Evaluation of prediction files against references: numbers, files, pictures and errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import cc3d
import nibabel as nib
import numpy as np
import pytest

from medseg.config import compose
from medseg.data.layouts import DatasetError
from medseg.evaluate import evaluate


def write_predictions(brats_tree: Path, out: Path, edit=None) -> Path:
    """The reference labels of every case as ``<case>.nii.gz`` predictions, optionally edited."""
    out.mkdir(parents=True, exist_ok=True)
    for case in sorted(p for p in brats_tree.iterdir() if p.is_dir()):
        img = nib.load(case / f"{case.name}_seg.nii.gz")
        data = np.asarray(img.dataobj).copy()
        if edit is not None:
            data = edit(case.name, data)
        nib.save(nib.Nifti1Image(data.astype(np.uint8), img.affine, img.header), out / f"{case.name}.nii.gz")
    return out


def run(pred: Path, ref: Path, *extra: str):
    cfg = compose("evaluate", [f"pred={pred}", f"ref={ref}", *extra])
    return evaluate(cfg), Path(cfg.output)


def test_perfect_predictions_score_one_and_write_files(brats_tree, tmp_path):
    rows, out = run(write_predictions(brats_tree, tmp_path / "pred"), brats_tree)
    assert len(rows) == 6 * 3
    assert all(r["dice"] == 1.0 and r["hd95_mm"] == 0.0 and r["lesion_recall"] == 1.0 for r in rows)
    for name in ("evaluation.csv", "summary.json", "dice_per_case.png", "recall_by_lesion_size.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "dice_per_case.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"] == 6 and summary["region_means"]["et"]["dice"] == 1.0


def test_deleted_lesions_lower_recall_exactly(brats_tree, tmp_path):
    removed: dict[str, int] = {}

    def drop_two_satellites(case, seg):
        components = cc3d.connected_components(seg > 0, connectivity=26)  # tumour and satellites
        sizes = np.bincount(components.ravel())[1:]
        smallest = np.argsort(sizes)[:2] + 1  # the two smallest whole-tumour components
        seg[np.isin(components, smallest)] = 0
        removed[case] = 2
        return seg

    rows, out = run(write_predictions(brats_tree, tmp_path / "pred", drop_two_satellites), brats_tree)
    wt = [r for r in rows if r["region"] == "wt"]
    for row in wt:
        n_ref = cc3d.connected_components(np.isin(np.asarray(nib.load(brats_tree / row["case"] / f"{row['case']}_seg.nii.gz").dataobj), [1, 2, 4]), connectivity=26).max()
        assert row["n_ref_lesions"] == n_ref and row["missed"] == removed[row["case"]]
        assert row["lesion_recall"] == pytest.approx((n_ref - 2) / n_ref)
        assert row["dice"] < 1.0 and row["precision"] == 1.0
    with open(out / "evaluation.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    summary = json.loads((out / "summary.json").read_text())
    pooled = summary["lesion_recall_by_size"]["wt"]
    assert sum(v["reference"] - v["detected"] for v in pooled.values()) == 2 * 6
    detection = summary["lesion_detection"]["wt"]  # every predicted component is a kept reference lesion
    n_ref = sum(r["n_ref_lesions"] for r in wt)
    recall = (n_ref - 12) / n_ref
    assert detection["lesion_precision"] == 1.0 and detection["fp_per_case"] == 0.0
    assert detection["lesion_recall"] == pytest.approx(recall) and detection["lesion_f1"] == pytest.approx(2 * recall / (1 + recall))


def test_geometry_mismatch_names_the_file(brats_tree, tmp_path):
    pred = write_predictions(brats_tree, tmp_path / "pred")
    img = nib.load(pred / "SYN-0003.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:-1], img.affine), pred / "SYN-0003.nii.gz")
    with pytest.raises(ValueError, match=r"SYN-0003.nii.gz: shape .* differs from the reference"):
        run(pred, brats_tree)


def test_prediction_without_reference(brats_tree, tmp_path):
    pred = write_predictions(brats_tree, tmp_path / "pred")
    (pred / "SYN-0000.nii.gz").rename(pred / "OTHER.nii.gz")
    with pytest.raises(DatasetError, match=r"no reference label .* \['OTHER'\]"):
        run(pred, brats_tree)


@pytest.mark.slow
def test_cli(brats_tree, tmp_path):
    pred = write_predictions(brats_tree, tmp_path / "pred")
    result = subprocess.run([sys.executable, "-m", "medseg.evaluate", f"pred={pred}", f"ref={brats_tree}", f"output={tmp_path / 'eval'}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "eval" / "evaluation.csv").is_file() and not (Path.cwd() / "outputs" / "evaluate").exists()
    bad = subprocess.run([sys.executable, "-m", "medseg.evaluate", f"pred={tmp_path / 'nothing'}", f"ref={brats_tree}", f"output={tmp_path / 'eval2'}"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "does not exist" in bad.stdout + bad.stderr and "Traceback" not in bad.stderr


def test_a_reference_case_without_prediction_is_an_error_unless_scored_empty(brats_tree, tmp_path):
    pred = write_predictions(brats_tree, tmp_path / "pred")
    (pred / "SYN-0004.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"1 case\(s\) have a reference but no prediction .*SYN-0004.*missing=zero"):
        run(pred, brats_tree)
    rows, out = run(pred, brats_tree, "missing=zero")
    missing = [r for r in rows if r.get("missing")]
    assert len(rows) == 6 * 3 and {r["case"] for r in missing} == {"SYN-0004"}
    assert all(r["dice"] == 0.0 and r["lesion_recall"] == 0.0 and r["detected"] == 0 for r in missing)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["missing_cases"] == ["SYN-0004"] and summary["cases"] == 6
    assert summary["metrics"]["dice_wt"] == pytest.approx(5 / 6)  # five perfect cases and one empty prediction


def test_only_the_files_predict_wrote_are_scored(brats_tree, tmp_path):
    """With medseg.predict's predictions.json: its cases, a failed one counting as missing; stale files left out."""
    pred = write_predictions(brats_tree, tmp_path / "pred")
    listed = [{"case": c, "prediction": str(pred / f"{c}.nii.gz")} for c in ("SYN-0000", "SYN-0001")] + [{"case": "SYN-0002", "error": "unreadable"}]
    (pred / "predictions.json").write_text(json.dumps({"cases": listed, "failed": 1}))
    (pred / "SYN-0002.nii.gz").unlink()  # predict failed on it: no file ...
    with pytest.raises(DatasetError, match=r"SYN-0002"):
        run(pred, brats_tree)
    rows, out = run(pred, brats_tree, "missing=zero")
    assert sorted({r["case"] for r in rows}) == ["SYN-0000", "SYN-0001", "SYN-0002"]  # ... and SYN-0003..5 are stale
    listed[0]["prediction"] = str(pred / "gone.nii.gz")
    (pred / "predictions.json").write_text(json.dumps({"cases": listed[:2]}))
    with pytest.raises(DatasetError, match=r"gone.nii.gz for case SYN-0000, but the file is gone"):
        run(pred, brats_tree)
