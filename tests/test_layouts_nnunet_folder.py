"""The nnU-Net v2 and folder layouts: cases, labels and channels from the data, the same arrays as the layouts
they were converted from, precise problems, and check -> train -> predict -> evaluate end to end."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import shared_dataset
from medseg.config import compose
from medseg.data.labels import LabelSpec
from medseg.data.layouts import LAYOUTS, DatasetError, find_brats_cases, find_cases, find_input_cases, find_label_files, read_msd_datalist, scan_cases
from medseg.data.layouts.nnunet import export_nnunet, labels_config
from medseg.data.transforms import preprocessing

MODALITIES = ["t1", "t1ce", "t2", "flair"]
# nnU-Net's BraTS conversion (Dataset137): edema 2 -> 1, necrosis 1 -> 2, enhancing 4 -> 3; regions as lists.
BRATS_AS_NNUNET = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3}
BRATS_VALUE_MAP = {1: 2, 2: 1, 4: 3}


def brats_as_nnunet(brats_root: Path, out: Path) -> Path:
    cases = find_brats_cases(brats_root, MODALITIES)
    return export_nnunet(cases, out, ["T1", "T1ce", "T2", "FLAIR"], BRATS_AS_NNUNET, BRATS_VALUE_MAP, regions_class_order=[1, 2, 3])


def brats_as_folder(brats_root: Path, out: Path) -> Path:
    """The BraTS cases as root/images/CASE_<modality>.nii.gz and root/labels/CASE.nii.gz (links)."""
    (out / "images").mkdir(parents=True)
    (out / "labels").mkdir()
    for case in find_brats_cases(brats_root, MODALITIES):
        for modality, file in zip(MODALITIES, case["image"]):
            os.symlink(file, out / "images" / f"{case['case']}_{modality}.nii.gz")
        os.symlink(case["label"], out / "labels" / f"{case['case']}.nii.gz")
    return out


def data_config(*overrides: str):
    return compose("train", ["paths.output_dir=unused", *overrides]).data


def preprocessed(data, case):
    spec = LabelSpec.from_config(data.labels)
    return preprocessing(spec, intensity=data.intensity, crop_foreground=data.crop_foreground)(case)


def test_every_layout_is_registered_with_a_config_group():
    groups = {p.stem for p in (Path(__file__).parent.parent / "conf" / "data").glob("*.yaml")}
    assert set(LAYOUTS) == {"brats", "msd", "nnunet", "folder"} and set(LAYOUTS) <= groups
    with pytest.raises(ValueError, match="one of \\['brats', 'folder', 'msd', 'nnunet'\\]"):
        find_cases("nnunetv1", "/nowhere")


def test_nnunet_labels_give_classes_or_regions():
    classes = labels_config({"background": 0, "PZ": 1, "TZ": 2})
    assert classes == {"mode": "softmax", "names": ["PZ", "TZ"], "values": [0, 1, 2], "regions": None}
    regions = labels_config(BRATS_AS_NNUNET, [1, 2, 3])
    assert regions["mode"] == "sigmoid" and regions["names"] == ["whole_tumor", "tumor_core", "enhancing_tumor"]
    assert regions["values"] == [0, 1, 2, 3] and regions["regions"]["tumor_core"] == [2, 3] and regions["regions"]["enhancing_tumor"] == [3]
    # Class order follows the values, not the json's key order.
    assert labels_config({"background": 0, "b": 2, "a": 1})["names"] == ["a", "b"]


@pytest.mark.parametrize("labels, order, message", [
    ({"tumour": 1}, None, "background = 0"),
    ({"background": 0, "a": 1, "ignore": 2}, None, "'ignore' label"),
    ({"background": 0, "a": 1, "b": 3}, None, "consecutive"),
    ({"background": 0, "a": "1"}, None, "positive integer"),
    ({"background": 0, "a b": 1, "a-b": 2}, None, "repeat"),
    ({"background": 0, "wt": [1, 2], "tc": [2]}, [1], "regions_class_order lists 1 values for 2 regions"),
])
def test_malformed_nnunet_labels_are_named(labels, order, message):
    with pytest.raises(DatasetError, match=message):
        labels_config(labels, order, "x/dataset.json")


def test_nnunet_config_reads_channels_labels_and_regions_from_dataset_json(brats_tree, tmp_path):
    root = brats_as_nnunet(brats_tree, tmp_path / "Dataset137_BraTS")
    data = data_config("data=nnunet", f"data.root={root}")
    assert data.in_channels == 4 and list(data.modalities) == ["T1", "T1ce", "T2", "FLAIR"] and data.intensity == "mri"
    assert data.labels.mode == "sigmoid" and list(data.labels.names) == ["whole_tumor", "tumor_core", "enhancing_tumor"]
    assert compose("train", ["data=nnunet", f"data.root={root}", "paths.output_dir=unused"]).model.net.out_channels == 3
    # CT by channel name, as nnU-Net picks its normalisation.
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "channel_names": {"0": "CT", "1": "x", "2": "y", "3": "z"}}))
    assert data_config("data=nnunet", f"data.root={root}").intensity == "ct"


def test_nnunet_regions_from_brats_give_the_brats_layouts_targets(brats_tree, tmp_path):
    root = brats_as_nnunet(brats_tree, tmp_path / "Dataset137_BraTS")
    brats, nnunet = data_config(f"data.root={brats_tree}"), data_config("data=nnunet", f"data.root={root}")
    brats_cases, nnunet_cases = find_cases("brats", brats_tree, MODALITIES), find_cases("nnunet", root)
    assert [c["case"] for c in brats_cases] == [c["case"] for c in nnunet_cases]
    for brats_case, nnunet_case in zip(brats_cases[:2], nnunet_cases[:2]):
        a, b = preprocessed(brats, brats_case), preprocessed(nnunet, nnunet_case)
        assert torch.equal(a["image"].as_tensor(), b["image"].as_tensor())
        assert torch.equal(a["label"].as_tensor(), b["label"].as_tensor()) and a["label"].sum() > 0  # wt, tc, et in order


def test_nnunet_regions_from_the_real_brats_samples_give_the_same_targets(tmp_path):
    source = shared_dataset("BraTS_samples")
    root = brats_as_nnunet(source, tmp_path / "Dataset137_BraTS")
    brats, nnunet = data_config(f"data.root={source}"), data_config("data=nnunet", f"data.root={root}")
    case_b, case_n = find_cases("brats", source, MODALITIES)[1], find_cases("nnunet", root)[1]
    a, b = preprocessed(brats, case_b), preprocessed(nnunet, case_n)
    assert torch.equal(a["label"].as_tensor(), b["label"].as_tensor()) and torch.equal(a["image"].as_tensor(), b["image"].as_tensor())
    # Writing regions back gives nnU-Net's values (edema 1, necrosis 2, enhancing 3) where BraTS has 2, 1, 4.
    spec = LabelSpec.from_config(nnunet.labels)
    written = spec.to_labels(b["label"].as_tensor()).numpy()
    original = LabelSpec.from_config(brats.labels).to_labels(a["label"].as_tensor()).numpy()
    mapped = np.zeros_like(original)
    for value, target in BRATS_VALUE_MAP.items():
        mapped[original == value] = target
    assert np.array_equal(written, mapped)


def test_hippocampus_as_nnunet_gives_the_msd_cases_and_arrays(tmp_path):
    source = shared_dataset("Task04_Hippocampus")
    msd_cases = read_msd_datalist(source)[:12]
    root = export_nnunet(msd_cases, tmp_path / "Dataset004_Hippocampus", ["MRI"], {"background": 0, "Anterior": 1, "Posterior": 2})
    msd = data_config("+experiment=hippocampus", f"data.root={source}")
    nnunet = data_config("data=nnunet", f"data.root={root}", f"data.crop_foreground={msd.crop_foreground}")
    assert nnunet.labels.mode == msd.labels.mode and list(nnunet.labels["values"]) == list(msd.labels["values"]) and nnunet.in_channels == 1
    nnunet_cases = find_cases("nnunet", root)
    assert sorted(c["case"] for c in msd_cases) == [c["case"] for c in nnunet_cases]
    by_id = {c["case"]: c for c in msd_cases}
    for case in nnunet_cases[:4]:
        a, b = preprocessed(msd, by_id[case["case"]]), preprocessed(nnunet, case)
        assert torch.equal(a["image"].as_tensor(), b["image"].as_tensor()) and torch.equal(a["label"].as_tensor(), b["label"].as_tensor())
        np.testing.assert_allclose(a["image"].affine, b["image"].affine)


def test_nnunet_problems_name_the_exact_files(brats_tree, tmp_path):
    root = brats_as_nnunet(brats_tree, tmp_path / "Dataset137_BraTS")
    (root / "imagesTr" / "SYN-0001_0002.nii.gz").unlink()
    (root / "labelsTr" / "SYN-0003.nii.gz").unlink()
    (root / "imagesTr" / "SYN-0004_0004.nii.gz").symlink_to((root / "imagesTr" / "SYN-0004_0000.nii.gz").resolve())
    (root / "imagesTr" / "notes.nii.gz").symlink_to((root / "imagesTr" / "SYN-0004_0000.nii.gz").resolve())
    os.symlink((root / "labelsTr" / "SYN-0000.nii.gz").resolve(), root / "labelsTr" / "SYN-0099.nii.gz")
    _, problems = scan_cases("nnunet", root)
    messages = {(p.case, Path(p.path).name): p.message for p in problems}
    assert messages[("SYN-0001", "SYN-0001_0002.nii.gz")] == "missing channel file 0002 (expected SYN-0001_0002.nii.gz)"
    assert messages[("SYN-0003", "SYN-0003.nii.gz")] == "missing label file (expected labelsTr/SYN-0003.nii.gz)"
    assert "not one of dataset.json's channel_names (0000-0003)" in messages[("SYN-0004", "SYN-0004_0004.nii.gz")]
    assert "expected CASE_XXXX.nii.gz" in messages[(None, "notes.nii.gz")]
    assert "label file without images" in messages[("SYN-0099", "SYN-0099.nii.gz")]
    with pytest.raises(DatasetError, match="5 problems"):
        find_cases("nnunet", root)


def test_nnunet_dataset_json_problems(brats_tree, tmp_path):
    root = brats_as_nnunet(brats_tree, tmp_path / "Dataset137_BraTS")
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "numTraining": 7}))
    assert [p.message for p in scan_cases("nnunet", root)[1]] == ["numTraining is 7 but imagesTr/ holds 6 cases"]
    (root / "dataset.json").write_text(json.dumps({**meta, "file_ending": ".mha"}))
    assert "medseg reads NIfTI" in scan_cases("nnunet", root)[1][0].message
    (root / "dataset.json").write_text("{")
    assert "malformed JSON" in scan_cases("nnunet", root)[1][0].message
    (root / "dataset.json").unlink()
    assert "no dataset.json" in scan_cases("nnunet", root)[1][0].message


def test_the_dataset_check_reports_a_missing_nnunet_channel(brats_tree, tmp_path):
    from medseg.data.check import check_dataset

    root = brats_as_nnunet(brats_tree, tmp_path / "Dataset137_BraTS")
    (root / "imagesTr" / "SYN-0002_0001.nii.gz").unlink()
    data = data_config("data=nnunet", f"data.root={root}")
    report = check_dataset("nnunet", root, data.labels, list(data.modalities), data.in_channels, cache_dir=None)
    errors = [p for p in report.problems if p.severity == "error"]
    assert [(p.case, Path(p.path).name) for p in errors] == [("SYN-0002", "SYN-0002_0001.nii.gz")]
    assert "expected SYN-0002_0001.nii.gz" in errors[0].message


def test_folder_layout_matches_channels_by_suffix(brats_tree, tmp_path):
    root = brats_as_folder(brats_tree, tmp_path / "folder")
    cases = find_cases("folder", root, MODALITIES)
    brats_cases = find_brats_cases(brats_tree, MODALITIES)
    # t1ce is not taken for t1 + "ce": every channel is the BraTS layout's file.
    assert [[os.path.realpath(f) for f in c["image"]] for c in cases] == [c["image"] for c in brats_cases]
    assert [c["case"] for c in cases] == [c["case"] for c in brats_cases]
    (root / "images" / "SYN-0001_flair.nii.gz").unlink()
    (root / "labels" / "SYN-0002.nii.gz").unlink()
    _, problems = scan_cases("folder", root, MODALITIES)
    assert sorted((p.case, Path(p.path).name, p.message) for p in problems) == [
        ("SYN-0001", "SYN-0001_flair.nii.gz", "missing modality file 'flair' (expected SYN-0001_flair.nii.gz)"),
        ("SYN-0002", "SYN-0002.nii.gz", "missing label file (expected labels/SYN-0002.nii.gz)"),
    ]


def test_folder_layout_with_one_channel_and_its_defaults(brats_tree, tmp_path):
    root = tmp_path / "single"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for case in find_brats_cases(brats_tree, MODALITIES)[:3]:
        os.symlink(case["image"][3], root / "images" / f"{case['case']}.nii.gz")
        os.symlink(case["label"], root / "labels" / f"{case['case']}.nii.gz")
    data = data_config("data=folder", f"data.root={root}")
    assert data.in_channels == 1 and data.labels.mode == "softmax" and list(data.labels.names) == ["foreground"]
    cases = find_cases("folder", root)
    assert [len(c["image"]) for c in cases] == [1, 1, 1] and all(c["label"] for c in cases)
    assert set(find_label_files(root)) == {c["case"] for c in cases}
    with pytest.raises(DatasetError, match="missing images/ folder"):
        find_cases("folder", tmp_path)


def test_prediction_inputs_of_each_layout(brats_tree, tmp_path):
    nnunet = brats_as_nnunet(brats_tree, tmp_path / "Dataset137_BraTS")
    cases = find_brats_cases(brats_tree, MODALITIES)
    export_nnunet(cases[:2], nnunet, ["T1", "T1ce", "T2", "FLAIR"], BRATS_AS_NNUNET, section="imagesTs")
    whole = find_input_cases(nnunet, MODALITIES, layout="brats")  # the dataset is recognised whatever the checkpoint's layout
    assert [c["case"] for c in whole.cases] == ["SYN-0000", "SYN-0001"] and all(len(c["image"]) == 4 for c in whole.cases)
    assert [c["case"] for c in find_input_cases(nnunet, MODALITIES, "training").cases] == [c["case"] for c in cases]
    flat = find_input_cases(nnunet / "imagesTs", ["T1", "T1ce", "T2", "FLAIR"], layout="nnunet")
    assert [c["image"] for c in flat.cases] == [c["image"] for c in whole.cases]
    (nnunet / "imagesTs" / "SYN-0001_0003.nii.gz").unlink()
    with pytest.raises(DatasetError, match="missing channel file 0003 \\(expected SYN-0001_0003.nii.gz\\)"):
        find_input_cases(nnunet / "imagesTs", ["T1", "T1ce", "T2", "FLAIR"], layout="nnunet")
    folder = brats_as_folder(brats_tree, tmp_path / "folder")
    found = find_input_cases(folder, MODALITIES, layout="folder")
    assert len(found.cases) == 6 and found.cases[0]["image"][1].endswith("SYN-0000_t1ce.nii.gz")


# Check, train, predict and evaluate on each layout: a tiny run of the demo network.
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["nnunet", "folder"])
def test_check_train_predict_evaluate_end_to_end(brats_tree, tmp_path, layout):
    from test_train import tiny_run

    from medseg.evaluate import evaluate
    from medseg.prediction import predict
    from medseg.training import train

    if layout == "nnunet":
        root = brats_as_nnunet(brats_tree, tmp_path / "Dataset137_BraTS")
        export_nnunet(find_brats_cases(brats_tree, MODALITIES)[:2], root, ["T1", "T1ce", "T2", "FLAIR"], BRATS_AS_NNUNET, section="imagesTs")
        overrides, predict_input, names = ["data=nnunet"], root / "imagesTs", ["whole_tumor", "tumor_core", "enhancing_tumor"]
    else:
        root = brats_as_folder(brats_tree, tmp_path / "folder")
        overrides, predict_input, names = ["data=folder", f"data.modalities={MODALITIES}", "data.labels.mode=sigmoid", "data.labels.names=[wt,tc,et]",
                                           "data.labels.values=[0,1,2,4]", "+data.labels.regions={wt:[1,2,4],tc:[1,4],et:[4]}"], root, ["wt", "tc", "et"]
    run = tmp_path / "run"
    cfg = tiny_run(root, run, "trainer.max_epochs=3", "trainer.check_val_every_n_epoch=3", "logger=csv", *overrides)
    metrics = train(cfg)
    assert all(0.0 <= metrics[f"final_val/dice_{n}"] <= 1.0 for n in names)
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "validation" / "evaluation" / "evaluation.csv").is_file()

    out = tmp_path / "pred"
    results = predict(compose("predict", [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"input={predict_input}", f"output={out}"]))
    assert not any("error" in r for r in results)
    expected = ["SYN-0000", "SYN-0001"] if layout == "nnunet" else [f"SYN-000{i}" for i in range(6)]
    assert sorted(r["case"] for r in results) == expected
    values = {0, 1, 2, 3} if layout == "nnunet" else {0, 1, 2, 4}  # the dataset's own convention
    for case in expected:
        predicted = nib.load(out / f"{case}.nii.gz")
        assert predicted.shape == (48, 48, 32) and set(np.unique(np.asarray(predicted.dataobj)).tolist()) <= values
    rows = evaluate(compose("evaluate", [f"pred={out}", f"ref={root}", *[o for o in overrides if o.startswith(("data=", "data.labels", "+data.labels"))], f"output={tmp_path / 'eval'}"]))
    assert {r["case"] for r in rows} == set(expected) and {r["region"] for r in rows} == set(names)
    shutil.rmtree(out)


def test_a_preset_may_rename_the_labels_of_an_nnunet_dataset(tmp_path):
    source = shared_dataset("Task04_Hippocampus")
    root = export_nnunet(read_msd_datalist(source)[:3], tmp_path / "Dataset004_Hippocampus", ["MRI"], {"background": 0, "Anterior": 1, "Posterior": 2})
    data = data_config("+experiment=hippocampus", "data=nnunet", f"data.root={root}")
    assert list(data.labels.names) == ["anterior", "posterior"] and data.labels.mode == "softmax" and list(data.labels["values"]) == [0, 1, 2]


@pytest.mark.slow
def test_hippocampus_as_nnunet_checks_trains_predicts_and_evaluates(tmp_path):
    from medseg.data.check import check_dataset
    from medseg.evaluate import evaluate
    from medseg.prediction import predict
    from medseg.training import train

    source = shared_dataset("Task04_Hippocampus")
    cases = read_msd_datalist(source)
    labels = {"background": 0, "Anterior": 1, "Posterior": 2}
    root = export_nnunet(cases[:8], tmp_path / "Dataset004_Hippocampus", ["MRI"], labels)
    export_nnunet([{**c, "label": None} for c in cases[8:10]], root, ["MRI"], labels, section="imagesTs")
    data = data_config("data=nnunet", f"data.root={root}")
    report = check_dataset("nnunet", root, data.labels, list(data.modalities), data.in_channels, cache_dir=None)
    assert not [p for p in report.problems if p.severity == "error"] and report.cases == 8

    run = tmp_path / "run"
    cfg = compose("train", ["+experiment=hippocampus", "data=nnunet", f"data.root={root}", f"paths.output_dir={run}", "trainer.max_epochs=2", "trainer.check_val_every_n_epoch=2",
                            "data.num_workers=0", "data.preprocess_workers=0", "logger=csv", "~callbacks.model_summary", f"data.check.cache_dir={run / '.checks'}"])
    metrics = train(cfg)
    assert 0.0 <= metrics["final_val/dice_anterior"] <= 1.0 and 0.0 <= metrics["final_val/dice_posterior"] <= 1.0
    out = tmp_path / "pred"
    results = predict(compose("predict", [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"input={root}", f"output={out}"]))
    assert sorted(r["case"] for r in results) == sorted(c["case"] for c in cases[8:10]) and not any("error" in r for r in results)
    for case in cases[8:10]:
        source_image, predicted = nib.load(case["image"][0]), nib.load(out / f"{case['case']}.nii.gz")
        assert predicted.shape == source_image.shape and set(np.unique(np.asarray(predicted.dataobj)).tolist()) <= {0, 1, 2}
    # Evaluate the training cases' reference labels against themselves through the nnU-Net layout.
    reference = tmp_path / "reference"
    reference.mkdir()
    for case in cases[:3]:
        shutil.copy(case["label"], reference / f"{case['case']}.nii.gz")
    with pytest.raises(DatasetError, match="5 case\\(s\\) have a reference but no prediction"):
        evaluate(compose("evaluate", [f"pred={reference}", f"ref={root}", "data=nnunet", f"output={tmp_path / 'eval'}"]))
    rows = evaluate(compose("evaluate", [f"pred={reference}", f"ref={root}", "data=nnunet", f"output={tmp_path / 'eval'}", "missing=zero"]))
    scored = [r for r in rows if not r.get("missing")]
    assert len(rows) == 8 * 2 and len(scored) == 3 * 2 and all(r["dice"] == 1.0 for r in scored)
    assert all(r["dice"] == 0.0 for r in rows if r.get("missing"))  # empty predictions of cases with both classes


def test_nnunet_channel_names_are_read_in_number_order(tmp_path):
    from medseg.data.layouts.nnunet import read_nnunet_json

    names = {str(i): f"c{i}" for i in reversed(range(12))}  # 10 and 11 sort before 2 as text
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": names, "labels": {"background": 0, "a": 1}}))
    assert read_nnunet_json(tmp_path)["channels"] == [f"c{i}" for i in range(12)]
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2", "2": "ADC"}, "labels": {"background": 0, "a": 1}}))
    with pytest.raises(DatasetError, match="numbered from 0"):
        read_nnunet_json(tmp_path)
