"""Dataset readers on generated trees and on the real sample data."""

from __future__ import annotations

import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from medseg.data.labels import LabelSpec
from medseg.data.layouts import DatasetError, find_brats_cases, find_cases, read_msd_datalist, scan_brats_cases, scan_msd_datalist
from medseg.data.transforms import preprocessing

from conftest import BRATS_LABELS, shared_dataset


def test_brats_cases_in_channel_order(brats_tree):
    cases = find_brats_cases(brats_tree)
    assert [c["case"] for c in cases] == [f"SYN-{i:04d}" for i in range(6)]
    for case in cases:
        assert [os.path.basename(f) for f in case["image"]] == [f"{case['case']}_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair")]
        assert case["label"].endswith(f"{case['case']}_seg.nii.gz")


def test_brats_2023_naming_gives_the_same_channel_order(brats_copy):
    renames = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "seg": "seg"}
    for folder in (p for p in brats_copy.iterdir() if p.is_dir()):
        for old, new in renames.items():
            os.rename(folder / f"{folder.name}_{old}.nii.gz", folder / f"{folder.name}-{new}.nii.gz")
    cases = find_brats_cases(brats_copy)
    assert [os.path.basename(f).split("-")[-1] for f in cases[0]["image"]] == ["t1n.nii.gz", "t1c.nii.gz", "t2w.nii.gz", "t2f.nii.gz"]


def test_brats_missing_modality_names_the_case_and_file(brats_copy):
    (brats_copy / "SYN-0002" / "SYN-0002_t1ce.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"SYN-0002.*missing modality.*t1ce"):
        find_brats_cases(brats_copy)


def test_brats_missing_label_is_an_error_only_when_required(brats_copy):
    (brats_copy / "SYN-0001" / "SYN-0001_seg.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"SYN-0001.*missing label"):
        find_brats_cases(brats_copy)
    cases = {c["case"]: c for c in find_brats_cases(brats_copy, require_label=False)}
    assert cases["SYN-0001"]["label"] is None and cases["SYN-0000"]["label"] is not None


@pytest.mark.parametrize("layout", ["brats", "msd"])
def test_wrong_root_names_the_path_and_where_to_get_data(tmp_path, layout):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as err:
        find_cases(layout, missing)
    message = str(err.value)
    assert str(missing) in message and "data.root=" in message
    assert ("synapse" in message) if layout == "brats" else ("medicaldecathlon" in message)


def test_empty_brats_root(tmp_path):
    with pytest.raises(DatasetError, match="holds no case folders"):
        find_brats_cases(tmp_path)


def test_msd_paths_are_relative_to_the_json(msd_tree):
    cases = read_msd_datalist(msd_tree)
    assert len(cases) == 6
    assert cases[0]["case"] == "imagesTr/SYN-0000"  # file names repeat across cases: the folder names the case
    assert all(os.path.isabs(f) and os.path.isfile(f) for c in cases for f in [*c["image"], c["label"]])
    assert [os.path.basename(f) for f in cases[0]["image"]] == ["flair.nii.gz", "t1.nii.gz"]


def test_msd_errors_name_the_json(msd_tree, tmp_path):
    broken = shutil.copytree(msd_tree, tmp_path / "task")
    meta = json.loads((broken / "dataset.json").read_text())
    meta["training"][1]["label"] = "./labelsTr/absent.nii.gz"
    (broken / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"dataset.json.*training\[1\]\.label.*absent"):
        read_msd_datalist(broken)
    (broken / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="malformed JSON"):
        read_msd_datalist(broken)
    (broken / "dataset.json").write_text(json.dumps({"training": []}))
    with pytest.raises(DatasetError, match="non-empty list"):
        read_msd_datalist(broken)


def test_preprocessing_channel_order_and_regions_on_generated_case(brats_tree):
    spec = LabelSpec.from_config(BRATS_LABELS)
    case = find_brats_cases(brats_tree)[0]
    out = preprocessing(spec, crop_foreground=False, intensity="none")(case)
    # Files are written RAS with a diagonal affine, so the loaded arrays match nibabel's exactly.
    for channel, path in enumerate(case["image"]):
        np.testing.assert_allclose(out["image"][channel].numpy(), nib.load(path).get_fdata(), rtol=1e-6)
    seg = nib.load(case["label"]).get_fdata()
    expected = np.stack([np.isin(seg, r) for r in ([1, 2, 4], [1, 4], [4])])
    np.testing.assert_array_equal(out["label"].numpy().astype(bool), expected)


@pytest.mark.realdata
def test_real_brats_samples():
    root = shared_dataset("BraTS_samples")
    spec = LabelSpec.from_config(BRATS_LABELS)
    cases = find_brats_cases(root)
    assert [c["case"] for c in cases] == ["TCGA-DU-7294", "TCGA-FG-6692"]
    case = cases[1]
    seg = np.asarray(nib.load(case["label"]).dataobj)
    assert nib.load(case["image"][0]).shape == (240, 240, 155)
    out = preprocessing(spec)(case)  # cropped to the brain, z-scored
    image, label = out["image"], out["label"]
    assert image.shape[0] == 4 and label.shape[0] == 3 and image.shape[1:] == label.shape[1:]
    # Region conversion against the file: voxel counts of WT, TC, ET are kept through RAS + crop.
    assert label.sum(dim=(1, 2, 3)).tolist() == [float(np.isin(seg, r).sum()) for r in ([1, 2, 4], [1, 4], [4])]
    # Channel order: t1ce (channel 1) is brightest in enhancing tumour relative to the brain, not t1 (channel 0).
    et = label[2].bool()
    assert image[1][et].mean() > image[0][et].mean() + 0.5
    # z-score over the brain (non-zero voxels)
    brain = image[3] != 0
    assert abs(float(image[3][brain].mean())) < 1e-3 and abs(float(image[3][brain].std()) - 1) < 1e-2


@pytest.mark.realdata
def test_real_brats_case_without_enhancing_tumour():
    spec = LabelSpec.from_config(BRATS_LABELS)
    case = find_brats_cases(shared_dataset("BraTS_samples"))[0]
    assert case["case"] == "TCGA-DU-7294"
    label = preprocessing(spec)(case)["label"]
    assert float(label[2].sum()) == 0 and float(label[0].sum()) > 0


@pytest.mark.realdata
def test_real_hippocampus_msd():
    root = shared_dataset("Task04_Hippocampus")
    spec = LabelSpec("softmax", ("anterior", "posterior"), (0, 1, 2))
    cases = read_msd_datalist(root)
    assert len(cases) == 200 and cases[0]["case"] == "hippocampus_001"
    out = preprocessing(spec, crop_foreground=False)(cases[0])
    seg = np.asarray(nib.load(cases[0]["label"]).dataobj)
    assert out["image"].shape == (1, *seg.shape) == tuple(out["label"].shape)
    assert sorted(out["label"].unique().tolist()) == [0.0, 1.0, 2.0]
    assert [float((out["label"] == v).sum()) for v in (1, 2)] == [float((seg == v).sum()) for v in (1, 2)]


def test_every_missing_brats_file_is_listed_at_once(brats_copy):
    (brats_copy / "SYN-0001" / "SYN-0001_t2.nii.gz").unlink()
    (brats_copy / "SYN-0001" / "SYN-0001_seg.nii.gz").unlink()
    (brats_copy / "SYN-0004" / "SYN-0004_flair.nii.gz").unlink()
    cases, problems = scan_brats_cases(brats_copy)
    assert len(cases) == 6 and cases[1]["image"][2] is None and cases[1]["label"] is None
    assert [(p.case, os.path.basename(p.path)) for p in problems] == [("SYN-0001", "SYN-0001_t2.nii.gz"), ("SYN-0001", "SYN-0001_seg.nii.gz"), ("SYN-0004", "SYN-0004_flair.nii.gz")]
    with pytest.raises(DatasetError, match=r"has 3 problems:\n.*SYN-0001_t2.*missing modality file 't2'.*\n.*SYN-0001_seg.*missing label.*\n.*SYN-0004_flair"):
        find_brats_cases(brats_copy)


def test_missing_brats_2023_file_is_named_in_2023_naming(brats_copy):
    for old, new in {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "seg": "seg"}.items():
        os.rename(brats_copy / "SYN-0000" / f"SYN-0000_{old}.nii.gz", brats_copy / "SYN-0000" / f"SYN-0000-{new}.nii.gz")
    (brats_copy / "SYN-0000" / "SYN-0000_flair.nii.gz").unlink()
    _, problems = scan_brats_cases(brats_copy)
    assert [os.path.basename(p.path) for p in problems] == ["SYN-0000-t2f.nii.gz"]


def test_msd_scan_lists_every_entry_problem(msd_tree, tmp_path):
    broken = shutil.copytree(msd_tree, tmp_path / "task")
    meta = json.loads((broken / "dataset.json").read_text())
    meta["training"][0]["image"][1] = "./imagesTr/absent.nii.gz"
    meta["training"][2]["label"] = "./labelsTr/absent.nii.gz"
    meta["training"].append(meta["training"][3])
    (broken / "dataset.json").write_text(json.dumps(meta))
    cases, problems = scan_msd_datalist(broken)
    assert len(cases) == 7 and cases[0]["image"][1] is None and cases[2]["label"] is None
    assert [p.case for p in problems] == ["imagesTr/SYN-0000", "imagesTr/SYN-0002", "imagesTr/SYN-0003"]
    assert "duplicate case id 'imagesTr/SYN-0003' (training[3] and training[6])" in problems[2].message
    with pytest.raises(DatasetError, match=r"dataset.json has 3 problems"):
        read_msd_datalist(broken)


def test_a_case_listed_twice_keeps_file_name_ids(tmp_path):
    root = tmp_path / "task"
    (root / "imagesTr").mkdir(parents=True)
    for name in ("a", "b"):
        (root / "imagesTr" / f"{name}.nii.gz").write_bytes(b"")
    entries = [{"image": f"./imagesTr/{n}.nii.gz"} for n in ("a", "b", "a")]
    (root / "dataset.json").write_text(json.dumps({"training": entries}))
    cases, problems = scan_msd_datalist(root, require_label=False)
    assert [c["case"] for c in cases] == ["a", "b", "a"] and [p.case for p in problems] == ["a"]
