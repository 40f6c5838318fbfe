"""The dataset check on a corpus of broken datasets: each problem gives its own one-line message."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import medseg.data.check as check_module
from medseg.data.check import FactsCache, check_before_training, check_command, check_dataset
from medseg.data.layouts import DatasetError

from conftest import BRATS_LABELS, shared_dataset

MODALITIES = ("t1", "t1ce", "t2", "flair")
SHAPE = (16, 16, 8)
AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])
HIPPOCAMPUS_LABELS = {"mode": "softmax", "names": ["anterior", "posterior"], "values": [0, 1, 2]}


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def image(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).uniform(1.0, 2.0, shape).astype(np.float32)


def lesion(shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    label[4:8, 4:8, 2:4] = 2
    label[5:7, 5:7, 2:4] = 1
    label[6, 6, 3] = 4
    return label


def make_brats(root: Path, cases: int = 3) -> Path:
    """``cases`` clean BraTS-layout cases C000, C001, ... of 16x16x8 voxels."""
    for i in range(cases):
        case = f"C{i:03d}"
        for j, modality in enumerate(MODALITIES):
            write_nifti(root / case / f"{case}_{modality}.nii.gz", image(10 * i + j))
        write_nifti(root / case / f"{case}_seg.nii.gz", lesion())
    return root


def make_msd(root: Path, cases: int = 3, channels: int = 1) -> Path:
    """An MSD task with ``cases`` cases; one (X, Y, Z) or (X, Y, Z, C) image file each."""
    training = []
    for i in range(cases):
        shape = SHAPE if channels == 1 else (*SHAPE, channels)
        write_nifti(root / "imagesTr" / f"hip_{i:03d}.nii.gz", image(i, shape))
        write_nifti(root / "labelsTr" / f"hip_{i:03d}.nii.gz", np.minimum(lesion(), 2))
        training.append({"image": f"./imagesTr/hip_{i:03d}.nii.gz", "label": f"./labelsTr/hip_{i:03d}.nii.gz"})
    write_json(root, {"name": "tiny", "training": training})
    return root


def write_json(root: Path, meta: object) -> None:
    (root / "dataset.json").write_text(json.dumps(meta))


def run_brats(root: Path, **kwargs):
    kwargs.setdefault("in_channels", 4)
    return check_dataset("brats", root, BRATS_LABELS, MODALITIES, num_workers=2, **kwargs)


def run_msd(root: Path, **kwargs):
    kwargs.setdefault("in_channels", 1)
    return check_dataset("msd", root, HIPPOCAMPUS_LABELS, num_workers=2, **kwargs)


def only_error(report) -> str:
    """The one line of a report that must hold exactly one problem, an error."""
    assert len(report.problems) == 1 and len(report.errors) == 1, report.format()
    return report.format()


def brats_file(root: Path, case: str, modality: str) -> Path:
    return root / case / f"{case}_{modality}.nii.gz"


# --- clean datasets -------------------------------------------------------------------------------------


def test_generated_brats_tree_is_clean(brats_tree, tmp_path):
    report = check_dataset("brats", brats_tree, BRATS_LABELS, in_channels=4, cache_dir=tmp_path)
    assert report.problems == [] and (report.cases, report.files) == (6, 30)


def test_generated_msd_tree_is_clean(msd_tree):
    report = check_dataset("msd", msd_tree, BRATS_LABELS, in_channels=2)
    assert report.problems == [] and (report.cases, report.files) == (6, 18)


def test_msd_4d_images_are_normal_and_their_channels_counted(tmp_path):
    root = make_msd(tmp_path / "task", channels=2)
    assert run_msd(root, in_channels=2).problems == []
    report = run_msd(root, in_channels=1)
    line = report.format().splitlines()[0]
    assert len(report.errors) == 3 and "  hip_000  " in line and "hip_000.nii.gz" in line and "expected 1 image channel(s) (data.in_channels), got 2" in line


# --- one problem each -----------------------------------------------------------------------------------


def test_missing_modality_file(tmp_path):
    root = make_brats(tmp_path / "brats")
    brats_file(root, "C001", "t2").unlink()
    line = only_error(run_brats(root))
    assert line.startswith("ERROR") and "C001" in line and "C001_t2.nii.gz: missing modality file 't2'" in line


def test_missing_label_file(tmp_path):
    root = make_brats(tmp_path / "brats")
    brats_file(root, "C002", "seg").unlink()
    assert "C002" in (line := only_error(run_brats(root))) and "C002_seg.nii.gz: missing label file" in line


def test_truncated_gzip(tmp_path):
    root = make_brats(tmp_path / "brats")
    path = brats_file(root, "C000", "flair")
    path.write_bytes(path.read_bytes()[:-200])  # the header still reads; the data do not
    line = only_error(run_brats(root))
    assert "C000" in line and "C000_flair.nii.gz: unreadable NIfTI file (EOFError" in line


def test_bad_header(tmp_path):
    root = make_brats(tmp_path / "brats")
    brats_file(root, "C001", "t1").write_bytes(gzip.compress(b"not a nifti header" * 30))
    line = only_error(run_brats(root))
    assert "C001" in line and "C001_t1.nii.gz: unreadable NIfTI file" in line


def test_label_shape_differs_from_image(tmp_path):
    root = make_brats(tmp_path / "brats")
    write_nifti(brats_file(root, "C001", "seg"), lesion((16, 16, 9)))
    line = only_error(run_brats(root))
    assert "C001_seg.nii.gz: label shape (16, 16, 9) differs from the image shape (16, 16, 8) of C001_t1.nii.gz" in line


def test_modalities_of_a_case_with_different_shapes(tmp_path):
    root = make_brats(tmp_path / "brats")
    write_nifti(brats_file(root, "C000", "t2"), image(0, (16, 15, 8)))
    line = only_error(run_brats(root))
    assert "C000_t2.nii.gz: image shape (16, 15, 8) differs from the image shape (16, 16, 8) of C000_t1.nii.gz" in line


def test_affine_beyond_tolerance(tmp_path):
    root = make_brats(tmp_path / "brats")
    shifted = AFFINE.copy()
    shifted[0, 3] += 0.01
    write_nifti(brats_file(root, "C002", "seg"), lesion(), shifted)
    line = only_error(run_brats(root))
    assert "C002_seg.nii.gz: label affine differs from that of C002_t1.nii.gz by up to 0.01" in line
    assert "data.check.affine_tolerance=0.001" in line
    assert run_brats(root, affine_tolerance=0.02).problems == []


def test_label_value_outside_the_convention(tmp_path):
    root = make_brats(tmp_path / "brats")
    label = lesion()
    label[0, 0, 0] = 3  # BraTS 2023's ET in a BraTS 2021 dataset
    write_nifti(brats_file(root, "C001", "seg"), label)
    line = only_error(run_brats(root))
    assert "C001_seg.nii.gz: unexpected label values [3]; expected a subset of [0, 1, 2, 4]" in line


def test_non_integer_labels(tmp_path):
    root = make_brats(tmp_path / "brats")
    write_nifti(brats_file(root, "C000", "seg"), lesion().astype(np.float32) * 0.5)
    line = only_error(run_brats(root))
    assert "C000_seg.nii.gz: expected integer label values, got non-integers such as [0.5]" in line


def test_nan_and_inf_voxels_are_counted(tmp_path):
    root = make_brats(tmp_path / "brats")
    data = image(3)
    data[0, 0, :2] = np.nan
    data[1, 1, 1] = np.inf
    write_nifti(brats_file(root, "C002", "t1ce"), data)
    line = only_error(run_brats(root))
    assert "C002_t1ce.nii.gz: expected finite voxel values, got 2 NaN and 1 Inf voxel(s)" in line


def test_all_zero_image(tmp_path):
    root = make_brats(tmp_path / "brats")
    write_nifti(brats_file(root, "C001", "flair"), np.zeros(SHAPE, np.int16))
    assert "C001_flair.nii.gz: all-zero image" in only_error(run_brats(root))


def test_empty_label_is_a_warning_where_lesions_are_expected(tmp_path):
    root = make_brats(tmp_path / "brats")
    write_nifti(brats_file(root, "C000", "seg"), np.zeros(SHAPE, np.uint8))
    report = run_brats(root)
    assert report.errors == [] and len(report.warnings) == 1
    assert report.format().startswith("WARNING  C000  ") and "C000_seg.nii.gz: empty label (background only)" in report.format()
    assert run_brats(root, expect_foreground=False).problems == []


def test_wrong_number_of_modalities(tmp_path):
    root = make_brats(tmp_path / "brats")
    line = run_brats(root, in_channels=2).errors[0].format()
    assert "C000_t1.nii.gz: expected 2 image channel(s) (data.in_channels), got 4 in 4 file(s)" in line


@pytest.mark.parametrize(("layout", "make", "message"), [
    ("brats", lambda p: p.mkdir(), "BraTS data root holds no case folders"),
    ("brats", lambda p: None, "BraTS data root does not exist or is not a folder"),
    ("msd", lambda p: p.mkdir(), "no dataset.json found"),
    ("msd", lambda p: (p.mkdir(), write_json(p, {"training": []})), "expected a non-empty list under 'training', got an empty list"),
])
def test_empty_or_missing_dataset(tmp_path, layout, make, message):
    root = tmp_path / "data"
    make(root)
    report = check_dataset(layout, root, BRATS_LABELS)
    line = only_error(report)
    assert line.startswith("ERROR    -  ") and str(root) in line and message in line and report.cases == 0


@pytest.mark.parametrize(("meta", "message"), [
    ("{not json", "malformed JSON (Expecting property name"),
    ({"name": "task"}, "expected a non-empty list under 'training', got NoneType"),
    (["training"], "expected a non-empty list under 'training', got NoneType"),
])
def test_malformed_dataset_json(tmp_path, meta, message):
    root = make_msd(tmp_path / "task")
    (root / "dataset.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    line = only_error(run_msd(root))
    assert f"{root / 'dataset.json'}: {message}" in line


def test_dataset_json_entries_every_problem_named(tmp_path):
    root = make_msd(tmp_path / "task", cases=6)
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][1]["label"] = "./labelsTr/absent.nii.gz"
    meta["training"][2]["image"] = "./imagesTr/gone.nii.gz"
    del meta["training"][3]["label"]
    meta["training"][4] = {"label": "./labelsTr/hip_004.nii.gz"}
    meta["training"].append(dict(meta["training"][0]))  # the same case twice
    write_json(root, meta)
    report = run_msd(root)
    lines = report.format().splitlines()
    assert len(lines) == len(report.errors) == 5, report.format()
    json_path = root / "dataset.json"
    assert lines[0] == f"ERROR    -  {json_path}: training[4]: expected an 'image' path or list of paths, got None"
    assert lines[1].startswith(f"ERROR    hip_000  {json_path}: duplicate case id 'hip_000' (training[0] and training[6])")
    assert lines[2].startswith(f"ERROR    hip_001  {json_path}: training[1].label './labelsTr/absent.nii.gz' points to missing file")
    assert lines[3].startswith(f"ERROR    gone  {json_path}: training[2].image './imagesTr/gone.nii.gz' points to missing file")
    assert lines[4] == f"ERROR    hip_003  {json_path}: training[3] (./imagesTr/hip_003.nii.gz) has no 'label' entry"


def test_msd_per_modality_file_lists(tmp_path):
    root = make_msd(tmp_path / "task")
    meta = json.loads((root / "dataset.json").read_text())
    write_nifti(root / "imagesTr" / "t2_000.nii.gz", image(7, (16, 16, 7)))
    meta["training"][0]["image"] = ["./imagesTr/hip_000.nii.gz", "./imagesTr/t2_000.nii.gz"]
    write_json(root, meta)
    line = only_error(run_msd(root, in_channels=None))
    assert "  hip_000  " in line and "t2_000.nii.gz: image shape (16, 16, 7) differs from the image shape (16, 16, 8) of hip_000.nii.gz" in line


def test_every_problem_reported_at_once(tmp_path):
    root = make_brats(tmp_path / "brats", cases=5)
    brats_file(root, "C000", "t1ce").unlink()
    brats_file(root, "C000", "seg").unlink()
    path = brats_file(root, "C001", "t2")
    path.write_bytes(path.read_bytes()[:100])
    label = lesion()
    label[0, 0, 0] = 3
    write_nifti(brats_file(root, "C002", "seg"), label, np.diag([2.02, 2.0, 3.0, 1.0]))
    write_nifti(brats_file(root, "C003", "t1"), np.zeros(SHAPE, np.float32))
    write_nifti(brats_file(root, "C004", "seg"), np.zeros(SHAPE, np.uint8))
    report = run_brats(root)
    lines = report.format().splitlines()
    assert len(lines) == len(report.problems) == 7 and len(report.errors) == 6
    expected = [
        ("C000", "C000_t1ce.nii.gz", "missing modality file"),
        ("C000", "C000_seg.nii.gz", "missing label file"),
        ("C001", "C001_t2.nii.gz", "unreadable NIfTI"),
        ("C002", "C002_seg.nii.gz", "affine differs"),
        ("C002", "C002_seg.nii.gz", "unexpected label values [3]"),
        ("C003", "C003_t1.nii.gz", "all-zero image"),
        ("C004", "C004_seg.nii.gz", "empty label"),
    ]
    for line, (case, name, words) in zip(lines, expected):
        assert f"  {case}  " in line and f"{name}: " in line and words in line, line
    assert "5 case(s), 23 file(s)" in report.summary() and "6 error(s), 1 warning(s)" in report.summary()


# --- cache ----------------------------------------------------------------------------------------------


def test_second_check_reads_only_changed_files(tmp_path, monkeypatch):
    root = make_brats(tmp_path / "brats")
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    reads = []
    real_read = check_module.read_volume
    monkeypatch.setattr(check_module, "read_volume", lambda path, with_values=False: reads.append(Path(path).name) or real_read(path, with_values))
    cache = tmp_path / "cache"

    first = run_brats(root, cache_dir=cache)
    assert len(reads) == first.files == first.files_read == 15 and first.problems == []
    reads.clear()
    second = run_brats(root, cache_dir=cache)
    assert reads == [] and second.files_read == 0 and second.files == 15

    label = lesion()
    label[0, 0, 0] = 3
    write_nifti(brats_file(root, "C001", "seg"), label)
    os.utime(brats_file(root, "C001", "seg"), ns=(1, 1))  # a changed file is read again, whatever its mtime
    third = run_brats(root, cache_dir=cache)
    assert reads == ["C001_seg.nii.gz"] and "unexpected label values [3]" in only_error(third)
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # nothing written into the dataset
    assert [p.name for p in cache.iterdir()] == [FactsCache(cache, root).path.name] and FactsCache(cache, root).path.name.startswith("brats-")


def test_damaged_cache_is_rebuilt(tmp_path):
    root = make_brats(tmp_path / "brats", cases=1)
    cache = FactsCache(tmp_path / "cache", root)
    cache.path.parent.mkdir()
    cache.path.write_text("{half a json")
    report = run_brats(root, cache_dir=tmp_path / "cache")
    assert report.problems == [] and report.files_read == 5
    assert json.loads(cache.path.read_text())["version"] == check_module.CACHE_VERSION


def test_interrupted_check_keeps_what_the_cache_knew(tmp_path, monkeypatch):
    root = make_brats(tmp_path / "brats")
    cache_dir = tmp_path / "cache"
    check_dataset("brats", root, BRATS_LABELS, cache_dir=cache_dir, num_workers=1)
    os.utime(brats_file(root, "C000", "t1"), ns=(1, 1))
    real_check = check_module._check_case

    def interrupted(case, **kwargs):
        if case["case"] == "C001":
            raise KeyboardInterrupt
        return real_check(case, **kwargs)

    monkeypatch.setattr(check_module, "_check_case", interrupted)
    with pytest.raises(KeyboardInterrupt):
        check_dataset("brats", root, BRATS_LABELS, cache_dir=cache_dir, num_workers=1)
    files = json.loads(FactsCache(cache_dir, root).path.read_text())["files"]
    assert len(files) == 15 and files[str(brats_file(root, "C000", "t1"))]["mtime_ns"] == 1


# --- before training ------------------------------------------------------------------------------------


def gate(root: Path, tmp_path: Path, **options):
    options = {"enabled": True, "num_workers": 2, "cache_dir": str(tmp_path / "cache"), **options}
    return check_before_training("brats", root, BRATS_LABELS, MODALITIES, 4, options)


def test_training_gate_lists_errors_and_names_the_command(tmp_path, monkeypatch):
    root = make_brats(tmp_path / "brats")
    for case in ("C000", "C001", "C002"):
        brats_file(root, case, "t1").unlink()
    monkeypatch.setattr(check_module, "MAX_LISTED", 2)
    with pytest.raises(DatasetError) as err:
        gate(root, tmp_path)
    lines = str(err.value).splitlines()
    assert "has 3 error(s)" in lines[0] and "training will not start" in lines[0]
    assert lines[1].startswith("ERROR    C000  ") and lines[2].startswith("ERROR    C001  ") and lines[3] == "... and 1 more"
    assert lines[4].endswith(f"python -m medseg.data.check +experiment=EXPERIMENT data.root={root}")
    assert gate(root, tmp_path, enabled=False) is None


def test_training_gate_passes_with_warnings(tmp_path, caplog):
    root = make_brats(tmp_path / "brats")
    write_nifti(brats_file(root, "C000", "seg"), np.zeros(SHAPE, np.uint8))
    with caplog.at_level("INFO", logger="medseg"):
        report = gate(root, tmp_path)
    assert len(report.warnings) == 1 and "empty label" in caplog.text and "0 error(s), 1 warning(s)" in caplog.text


def test_unknown_check_option_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match=r"expected data.check keys among .*, got unknown \['tolerance'\]"):
        gate(make_brats(tmp_path / "brats", cases=1), tmp_path, tolerance=1)


def test_check_command_repeats_the_runs_experiment_and_data_overrides():
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from medseg.config import CONFIG_DIR

    overrides = ["+experiment=hippocampus", "data.root=/data/Task04", "trainer.max_epochs=3", "data.check.affine_tolerance=0.01", "paths.log_dir=/logs"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        expected = "python -m medseg.data.check +experiment=hippocampus data.root=/data/Task04 data.check.affine_tolerance=0.01 paths.log_dir=/logs"
        assert check_command("/data/Task04") == expected
    finally:
        HydraConfig.instance().cfg = None


@pytest.mark.slow
def test_training_refuses_a_broken_dataset(tmp_path):
    from medseg.config import compose
    from medseg.training import train

    root = make_brats(tmp_path / "brats")
    label = lesion()
    label[0, 0, 0] = 3
    write_nifti(brats_file(root, "C001", "seg"), label)
    cfg = compose("train", [
        "+experiment=demo", f"data.root={root}", "data.synthetic=null", f"paths.output_dir={tmp_path / 'run'}",
        f"data.check.cache_dir={tmp_path / 'cache'}", "data.num_workers=0", "trainer.max_epochs=1", "~callbacks.model_summary",
    ])
    with pytest.raises(DatasetError, match=r"(?s)C001_seg.nii.gz: unexpected label values \[3\].*python -m medseg.data.check"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


# --- command line ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_command_line_exit_status_and_one_line_per_problem(tmp_path):
    broken = make_brats(tmp_path / "broken")
    brats_file(broken, "C000", "flair").unlink()
    write_nifti(brats_file(broken, "C002", "seg"), np.zeros(SHAPE, np.uint8))
    warned = make_brats(tmp_path / "warned", cases=2)
    write_nifti(brats_file(warned, "C001", "seg"), np.zeros(SHAPE, np.uint8))

    def command(root: Path) -> subprocess.Popen:
        args = [sys.executable, "-m", "medseg.data.check", f"data.root={root}", f"data.check.cache_dir={tmp_path / 'cache'}", "data.num_workers=1"]
        return subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    runs = [command(broken), command(warned)]  # side by side: most of the time is spent importing
    (out, err), (out_ok, err_ok) = (r.communicate(timeout=300) for r in runs)
    assert runs[0].returncode == 1 and runs[1].returncode == 0, err + err_ok
    assert out.splitlines() == [
        f"ERROR    C000  {broken}/C000/C000_flair.nii.gz: missing modality file 'flair' (expected C000_flair.nii.gz)",
        f"WARNING  C002  {broken}/C002/C002_seg.nii.gz: empty label (background only) where the dataset expects foreground in every case (data.check.expect_foreground)",
        f"{broken}: 3 case(s), 14 file(s) (14 read, 0 unchanged since the last check): 1 error(s), 1 warning(s)",
    ]
    assert out_ok.splitlines()[-1].endswith("0 error(s), 1 warning(s)")
    assert "Traceback" not in err + err_ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "cache", "warned"]  # no run folder, no log file


# --- real data ------------------------------------------------------------------------------------------


@pytest.mark.realdata
def test_real_brats_samples_are_clean(tmp_path):
    report = check_dataset("brats", shared_dataset("BraTS_samples"), BRATS_LABELS, in_channels=4, num_workers=2)
    assert report.problems == [] and (report.cases, report.files) == (2, 10)


@pytest.mark.realdata
def test_real_hippocampus_is_clean_and_a_broken_copy_is_not(tmp_path):
    root = shared_dataset("Task04_Hippocampus")
    report = check_dataset("msd", root, HIPPOCAMPUS_LABELS, in_channels=1, num_workers=2)
    assert report.problems == [] and (report.cases, report.files) == (200, 400)

    copy = tmp_path / "task"
    copy.mkdir()
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"] = meta["training"][:2]
    for entry in meta["training"]:
        for key in ("image", "label"):
            (copy / entry[key]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(root / entry[key], copy / entry[key])
    write_json(copy, meta)
    label_path = copy / meta["training"][1]["label"]
    img = nib.load(label_path)
    write_nifti(label_path, np.asanyarray(img.dataobj) * 2, img.affine)  # 2 -> 4: outside the convention
    line = only_error(check_dataset("msd", copy, HIPPOCAMPUS_LABELS, in_channels=1))
    assert "hippocampus_" in line and "unexpected label values [4]" in line
