"""DICOM in, DICOM SEG out: series written with pydicom from NIfTI volumes (tests/dicom_series.py) read back with their
values and patient geometry, broken series refused with messages naming them, and predictions whose SEG equals the
NIfTI labels voxel for voxel."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

pytest.importorskip("highdicom", reason="the dicom extra (highdicom, pydicom) is not installed: pip install 'medseg[dicom]'")

import highdicom as hd  # noqa: E402
import pydicom  # noqa: E402
from pydicom.pixels import get_decoder  # noqa: E402
from pydicom.uid import JPEGLosslessSV1, JPEGLSLossless, RLELossless  # noqa: E402

from conftest import shared_dataset  # noqa: E402
from dicom_series import write_series, write_structured_report  # noqa: E402
from medseg import __version__  # noqa: E402
from medseg.dicom.seg import read_segmentation  # noqa: E402
from medseg.dicom.series import DicomSeriesError, dicom_cases, find_series, is_dicom_folder, read_series, series_problems, stage_case, to_nifti  # noqa: E402
from medseg.module import SegmentationModule  # noqa: E402
from medseg.prediction import predict  # noqa: E402
from test_predict import predict_config, run_main, untrained_checkpoint  # noqa: E402


def canonical(image: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    """Voxels and affine in RAS+ order: two images of one volume stored in different axis orders compare equal."""
    image = nib.as_closest_canonical(image)
    return np.asarray(image.dataobj, dtype=np.float64), image.affine


def oblique_affine(spacing=(0.9, 1.1, 2.5), degrees=20.0, origin=(-40.0, 25.0, -10.0)) -> np.ndarray:
    """A RAS affine rotated about two axes (no axis of the grid along a patient axis), anisotropic voxels."""
    a, b = np.radians(degrees), np.radians(degrees / 2)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def mr_volume(seed: int = 1, shape=(20, 24, 16)) -> np.ndarray:
    """A known-answer MR volume: a dim block (class 1 for :func:`threshold_network`) and a bright one (class 2)."""
    rng = np.random.default_rng(seed)
    image = np.zeros(shape, np.float32)
    image[2:9, 3:20, 4:10] = rng.uniform(100, 200, (7, 17, 6))
    image[12:18, 5:9, 9:15] = rng.uniform(500, 600, (6, 4, 6))
    return image


def expected_classes(values: np.ndarray) -> np.ndarray:
    """What :func:`threshold_network` predicts on a volume z-scored over its non-zero voxels."""
    inside = values[values != 0]
    return np.select([values > inside.mean(), values != 0], [2, 1], 0)


@pytest.fixture()
def threshold_network(monkeypatch):
    """A network with a known answer on z-scored non-zero voxels: class 1 below the mean, class 2 above."""

    def predict_volume(self, image):  # (1, 1, H, W, D) -> (1, 3, H, W, D)
        x = image[:, 0]
        return torch.stack([torch.where(x == 0, 10.0, -10.0), torch.where(x < 0, 10.0, -10.0), torch.where(x > 0, 10.0, -10.0)], dim=1)

    monkeypatch.setattr(SegmentationModule, "predict_volume", predict_volume)


@pytest.fixture(scope="module")
def softmax_checkpoint(tmp_path_factory) -> Path:
    """An untrained single-channel softmax checkpoint (the hippocampus preset: anterior, posterior)."""
    return untrained_checkpoint(tmp_path_factory.mktemp("hip") / "hippocampus.ckpt", "+experiment=hippocampus", "data.root=unused")


@pytest.fixture()
def no_jpeg_lossless_decoder(monkeypatch):
    """pydicom as it is without python-gdcm or pylibjpeg-libjpeg: no decoder for JPEG Lossless (Process 14, SV1)."""
    import pydicom.pixels

    real = pydicom.pixels.get_decoder

    class Missing:
        is_available = False
        missing_dependencies = ["gdcm - requires gdcm>=3.0.10", "pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1"]

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda uid, *args, **kwargs: Missing() if uid == JPEGLosslessSV1 else real(uid, *args, **kwargs))


# Reading


def test_ct_series_reads_back_hounsfield_units_and_patient_geometry(tmp_path):
    """The shared CT written as shuffled slices stored with slope 0.5 / intercept -1024 reads back as the HU volume
    at the NIfTI's patient position, voxel for voxel."""
    source = nib.load(shared_dataset("CT_abdomen") / "imagesTr" / "abdomen_sm.nii.gz")
    written = write_series(source, tmp_path / "ct", "CT", slope=0.5, intercept=-1024.0)
    (series,) = find_series(tmp_path / "ct")
    assert series.image and series.modality == "CT" and len(series.files) == source.shape[2]
    image = to_nifti(read_series(series))
    values, affine = canonical(image)
    expected_values, expected_affine = canonical(nib.Nifti1Image(written["values"], source.affine))
    np.testing.assert_allclose(affine, expected_affine, atol=1e-4)
    np.testing.assert_array_equal(values, expected_values)
    np.testing.assert_array_equal(values, canonical(source)[0])  # the HU values are integers: no rounding lost
    assert image.shape == source.shape  # (column, row, slice): dcm2niix's axes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_oblique_mr_series_reads_back_whatever_the_file_order(tmp_path, seed):
    """An oblique, anisotropic MR series written in a random file order reads back in patient geometry."""
    values = np.random.default_rng(seed).uniform(0, 1000, (13, 11, 9)).astype(np.float32)
    written = write_series(values, tmp_path / "mr", "MR", affine=oblique_affine(), seed=seed)
    (series,) = find_series(tmp_path)
    got, got_affine = canonical(to_nifti(read_series(series)))
    expected, expected_affine = canonical(nib.Nifti1Image(written["values"], written["affine"]))
    np.testing.assert_allclose(got_affine, expected_affine, atol=1e-4)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda folder: write_series(mr_volume(), folder, "MR", positions=[k for k in range(16) if k not in (5, 6)]), "2 slice(s) missing"),
        (lambda folder: write_series(mr_volume(), folder, "MR", affine=np.diag([1.0, 1.0, 2.0, 1.0]), positions=[0, 1, 2, 3, 4, 5]) and _shift_slice(folder, 0.7), "unevenly spaced slices"),
        (lambda folder: _two_orientations(folder), "mixed orientations"),
        (lambda folder: _duplicate_positions(folder), "16 positions for 32 slices"),
        (lambda folder: write_series(mr_volume(), folder, "MR", positions=[3]), "a single slice"),
        (lambda folder: write_series(mr_volume(), folder, "MR", transfer_syntax=JPEGLosslessSV1), "which no installed decoder reads"),
        (lambda folder: write_series(mr_volume(), folder, "MR") and _set_all(folder, SamplesPerPixel=3, PhotometricInterpretation="RGB"), "colour pixels"),
    ],
    ids=["missing-slice", "uneven-spacing", "mixed-orientations", "repeated-positions", "single-slice", "compressed-without-decoder", "colour"],
)
def test_broken_series_are_refused_with_a_message_naming_them(tmp_path, make, expected, no_jpeg_lossless_decoder):
    make(tmp_path / "series")
    (series,) = find_series(tmp_path / "series")
    problems = series_problems(series)
    assert len(problems) == 1 and expected in problems[0] and series.uid in problems[0], problems
    with pytest.raises(DicomSeriesError, match=re.escape(expected)) as err:
        read_series(series)
    assert series.uid in str(err.value)


def _shift_slice(folder: Path, mm: float) -> None:
    """Move the last slice of a series ``mm`` further along the normal (uneven spacing)."""
    files = sorted(folder.glob("*.dcm"), key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))
    ds = pydicom.dcmread(files[-1])
    ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + mm]
    ds.save_as(files[-1])


def _set_all(folder: Path, **elements) -> None:
    """Set header elements in every file of a series."""
    for path in folder.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        for keyword, value in elements.items():
            setattr(ds, keyword, value)
        ds.save_as(path)


def _two_orientations(folder: Path) -> None:
    """One series whose slices come in two orientations (a stack and a localizer sharing a SeriesInstanceUID)."""
    written = write_series(mr_volume(), folder, "MR")
    write_series(mr_volume()[:, :, :4], folder / "localizer", "MR", affine=oblique_affine(spacing=(1.0, 1.0, 3.0)), series_uid=written["series_uid"], study_uid=written["study_uid"])


def _duplicate_positions(folder: Path) -> None:
    """Two echoes of one series: every position twice."""
    written = write_series(mr_volume(), folder, "MR")
    write_series(mr_volume(seed=2), folder / "echo2", "MR", series_uid=written["series_uid"], study_uid=written["study_uid"])


def test_folder_scan_separates_series_and_skips_non_images(tmp_path):
    """Two series mixed in one folder are two series (by SeriesInstanceUID, not folder); an SR is no image series."""
    a = write_series(mr_volume(), tmp_path / "mixed", "MR", description="a", series_number=2)
    b = write_series(mr_volume(seed=3), tmp_path / "mixed", "MR", description="b", series_number=3, study_uid=a["study_uid"], seed=5)
    for i, path in enumerate(sorted((tmp_path / "mixed").glob("*.dcm"))):  # interleave the files' names
        path.rename(path.with_name(f"file{i:03d}"))
    write_structured_report(tmp_path / "mixed" / "report", a["study_uid"])
    assert is_dicom_folder(tmp_path / "mixed") and not is_dicom_folder(tmp_path / "nothing")
    found = find_series(tmp_path / "mixed")
    assert [(s.uid, s.image) for s in found] == sorted([(a["series_uid"], True), (b["series_uid"], True), (found[-1].uid, False)], key=lambda x: not x[1])
    cases, skipped = dicom_cases(tmp_path / "mixed", tmp_path / "staging", in_channels=1)
    assert [c["source"] for c in cases] == [[f"dicom:{a['series_uid']} (16 files)"], [f"dicom:{b['series_uid']} (16 files)"]]
    assert not any("problem" in c for c in cases)
    assert len(skipped) == 1 and "Comprehensive SR" in skipped[0]["reason"] and skipped[0]["series"] in skipped[0]["reason"]


def test_channel_mapping_forms_cases_per_study_and_names_what_does_not_fit(tmp_path):
    study = write_series(mr_volume(), tmp_path / "s" / "flair", "MR", description="AX FLAIR", series_number=1)["study_uid"]
    write_series(mr_volume(seed=2), tmp_path / "s" / "t1", "MR", description="T1 MPRAGE", series_number=2, study_uid=study)
    write_series(mr_volume(seed=3), tmp_path / "s" / "t1c", "MR", description="T1 MPRAGE post", series_number=3, study_uid=study)
    with pytest.raises(ValueError, match="dicom_channels"):
        dicom_cases(tmp_path / "s", tmp_path / "st", in_channels=2, modalities=["flair", "t1"])
    cases, _ = dicom_cases(tmp_path / "s", tmp_path / "st", in_channels=2, modalities=["flair", "t1"], channels={"flair": "*flair*", "t1": "t1 mprage"})
    assert len(cases) == 1 and [s.description for s in cases[0]["dicom"]] == ["AX FLAIR", "T1 MPRAGE"] and "problem" not in cases[0]
    cases, _ = dicom_cases(tmp_path / "s", tmp_path / "st", in_channels=2, modalities=["flair", "t1"], channels={"flair": "*flair*", "t1": "t1*"})
    assert "2 series match channel t1" in cases[0]["problem"] and "T1 MPRAGE post" in cases[0]["problem"]
    with pytest.raises(ValueError, match="exactly the model's channels"):
        dicom_cases(tmp_path / "s", tmp_path / "st", in_channels=2, modalities=["flair", "t1"], channels={"flair": "*flair*"})


# Prediction


def test_predict_dicom_folder_writes_nifti_and_seg_that_agree_and_refuses_broken_series(tmp_path, softmax_checkpoint, threshold_network, no_jpeg_lossless_decoder):
    """A folder with two good series (one oblique), a series missing a slice, a JPEG series no decoder reads and an SR:
    the good ones get a NIfTI and a SEG equal voxel for voxel and with the known answer; the broken ones an error
    naming their series and no file; the SR is skipped; the exit status says a case failed."""
    root = tmp_path / "dicom"
    good = write_series(mr_volume(), root / "a", "MR", affine=np.diag([-1.0, 1.5, 2.0, 1.0]), description="t1", series_number=3)
    oblique = write_series(mr_volume(seed=4), root / "b", "MR", affine=oblique_affine(), description="t1 oblique", series_number=4, study_uid=good["study_uid"])
    missing = write_series(mr_volume(), root / "c", "MR", positions=[k for k in range(16) if k != 7], series_number=5, study_uid=good["study_uid"])
    jpeg = write_series(mr_volume(), root / "d", "MR", transfer_syntax=JPEGLosslessSV1, series_number=6, study_uid=good["study_uid"])
    write_structured_report(root / "report.dcm", good["study_uid"])
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}

    assert run_main(f"ckpt_path={softmax_checkpoint}", f"input={root}", f"output={tmp_path / 'out'}", "output_format=both") == 1
    record = json.loads((tmp_path / "out" / "predictions.json").read_text())
    by_series = {c["image"][0].removeprefix("dicom:").split()[0]: c for c in record["cases"]}
    assert set(by_series) == {good["series_uid"], oblique["series_uid"], missing["series_uid"], jpeg["series_uid"]}
    assert "slice(s) missing" in by_series[missing["series_uid"]]["error"] and missing["series_uid"] in by_series[missing["series_uid"]]["error"]
    assert "no installed decoder" in by_series[jpeg["series_uid"]]["error"] and jpeg["series_uid"] in by_series[jpeg["series_uid"]]["error"]
    assert len(record["skipped"]) == 1 and "SR" in record["skipped"][0]["reason"]
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == sorted([*(Path(by_series[s["series_uid"]]["prediction"]).name for s in (good, oblique)), *(Path(by_series[s["series_uid"]]["dicom_seg"]).name for s in (good, oblique)), "predictions.json"])
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before  # the input folder is untouched

    for source in (good, oblique):
        entry = by_series[source["series_uid"]]
        prediction = nib.load(entry["prediction"])
        labels = np.asarray(prediction.dataobj)
        got, got_affine = canonical(prediction)
        expected_values, expected_affine = canonical(nib.Nifti1Image(source["values"], source["affine"]))
        np.testing.assert_allclose(got_affine, expected_affine, atol=1e-4)  # the scanner's geometry
        np.testing.assert_array_equal(got, expected_classes(expected_values))  # the known answer
        segments = read_segmentation(entry["dicom_seg"], prediction)  # (2, X, Y, Z) on the NIfTI's grid
        np.testing.assert_array_equal(segments, np.stack([labels == 1, labels == 2]))
        seg = hd.seg.segread(entry["dicom_seg"])
        assert [s.SegmentLabel for s in seg.SegmentSequence] == ["anterior", "posterior"]
        algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmVersion == __version__ and algorithm.AlgorithmName == softmax_checkpoint.stem
        referenced = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source["series_uid"]
        assert referenced == {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in (root / ("a" if source is good else "b")).glob("*.dcm")}
        assert seg.StudyInstanceUID == good["study_uid"] and seg.PatientID == "PAT001"


def test_fractional_seg_holds_the_probabilities(tmp_path, softmax_checkpoint, threshold_network):
    source = write_series(mr_volume(), tmp_path / "dicom", "MR", affine=oblique_affine())
    (result,) = predict(predict_config(softmax_checkpoint, tmp_path / "dicom", tmp_path / "out", "output_format=dicom_seg", "dicom_seg_type=fractional", "save_probabilities=true"))
    assert "prediction" not in result and Path(result["dicom_seg"]).is_file() and not list((tmp_path / "out").glob("*.nii.gz"))
    probabilities = nib.load(result["probabilities"])  # (X, Y, Z, 3) on the input's grid
    fractions = read_segmentation(result["dicom_seg"], probabilities)  # (2, X, Y, Z)
    np.testing.assert_allclose(fractions, np.moveaxis(np.asarray(probabilities.dataobj)[..., 1:], -1, 0), atol=0.5 / 255 + 1e-6)
    assert source["series_uid"] in result["image"][0]


def test_seg_output_needs_dicom_input_and_a_known_format(tmp_path, softmax_checkpoint):
    image = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(mr_volume(), np.eye(4)), image)
    assert run_main(f"ckpt_path={softmax_checkpoint}", f"input={image}", f"output={tmp_path / 'out'}", "output_format=dicom_seg") == 1
    assert run_main(f"ckpt_path={softmax_checkpoint}", f"input={image}", f"output={tmp_path / 'out'}", "output_format=dicom") == 1
    assert not (tmp_path / "out").exists()


def test_data_check_reports_the_problems_of_a_dicom_folder(tmp_path):
    from medseg.data.check import check_dicom_folder

    root = tmp_path / "dicom"
    good = write_series(mr_volume(), root / "a", "MR", series_number=1)
    broken = write_series(mr_volume(), root / "b", "MR", positions=[k for k in range(16) if k != 3], series_number=2, study_uid=good["study_uid"])
    write_structured_report(root / "sr.dcm", good["study_uid"])
    report = check_dicom_folder(root)
    assert report.layout == "dicom" and report.cases == 2 and report.files == 16 + 15 + 1
    assert [(p.severity, p.case) for p in report.errors] == [("error", broken["series_uid"])] and "slice(s) missing" in report.errors[0].message
    assert len(report.warnings) == 1 and "SR" in report.warnings[0].message
    shutil.rmtree(root / "b")
    assert not check_dicom_folder(root).errors


def test_multichannel_model_predicts_a_study_through_the_channel_mapping(tmp_path):
    """A 4-channel BraTS model (a network with a known answer: region r where channel r is non-zero) predicts a study
    of four oblique series mapped by description exactly as it predicts the same volumes as a NIfTI case folder."""
    from test_predict import write_case

    ckpt = untrained_checkpoint(tmp_path / "demo.ckpt", "+experiment=demo", "data.root=unused", "data.synthetic=null", "data.spacing=null", "data.patch_size=[32,32,32]")
    shape, affine = (24, 20, 16), oblique_affine(spacing=(1.5, 1.5, 2.0))
    rng = np.random.default_rng(0)
    volumes = {name: np.zeros(shape, np.float32) for name in ("t1", "t1ce", "t2", "flair")}
    for name, box in (("flair", np.s_[2:22, 2:18, 2:14]), ("t1", np.s_[4:18, 4:16, 3:12]), ("t1ce", np.s_[6:14, 6:12, 4:10]), ("t2", np.s_[8:12, 7:10, 5:8])):
        volumes[name][box] = np.round(rng.uniform(100, 300, volumes[name][box].shape))  # t1: WT, t1ce: TC, t2: ET (z-scoring keeps zeros)
    descriptions = {"t1": "T1 SE", "t1ce": "T1 SE +C", "t2": "T2 TSE", "flair": "AX FLAIR"}
    study = None
    for number, (name, volume) in enumerate(volumes.items(), start=1):
        study = write_series(volume, tmp_path / "dicom" / name, "MR", affine=affine, description=descriptions[name], series_number=number, study_uid=study, seed=number)["study_uid"]
    write_case(tmp_path / "nifti", "case", volumes, affine, ("R", "A", "S"))
    mapping = "dicom_channels={t1: 't1 se', t1ce: 't1 se +c', t2: 't2*', flair: '*flair*'}"

    def known_answer(self, image):  # (1, 4, H, W, D) -> (1, 3, H, W, D)
        return torch.where(image[:, :3] != 0, 10.0, -10.0)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SegmentationModule, "predict_volume", known_answer)
        (from_dicom,) = predict(predict_config(ckpt, tmp_path / "dicom", tmp_path / "out_dicom", mapping, "output_format=both"))
        (from_nifti,) = predict(predict_config(ckpt, tmp_path / "nifti" / "case", tmp_path / "out_nifti"))
    got, got_affine = canonical(nib.load(from_dicom["prediction"]))
    expected, expected_affine = canonical(nib.load(from_nifti["prediction"]))
    np.testing.assert_allclose(got_affine, expected_affine, atol=1e-4)
    np.testing.assert_array_equal(got, expected)
    assert set(np.unique(got)) == {0, 1, 2, 4}
    segments = read_segmentation(from_dicom["dicom_seg"], nib.load(from_dicom["prediction"]))  # (3, X, Y, Z): WT, TC, ET
    labels = np.asarray(nib.load(from_dicom["prediction"]).dataobj)
    np.testing.assert_array_equal(segments, np.stack([np.isin(labels, [1, 2, 4]), np.isin(labels, [1, 4]), labels == 4]))
    assert [s.SegmentLabel for s in hd.seg.segread(from_dicom["dicom_seg"]).SegmentSequence] == ["wt", "tc", "et"]


def test_real_scanner_series_shipped_with_pydicom(tmp_path):
    """pydicom's own test tree of (downsampled) scanner exports: the complete CT series reads as the volume pydicom's
    pixels and headers give, slice by slice; the sparse CT, the multi-stack MR and the single MR slice are refused,
    each naming its series; the directory records and reports are skipped, not read as images."""
    from pydicom.data import get_testdata_file

    tree = Path(get_testdata_file("DICOMDIR")).parent
    shutil.copytree(tree, tmp_path / "export")
    shutil.copy(get_testdata_file("test-SR.dcm"), tmp_path / "export" / "report.dcm")
    found = find_series(tmp_path / "export")
    by_folder: dict[str, list] = {}
    for series in found:
        by_folder.setdefault(Path(series.folder).name, []).append(series)
    (ct,) = by_folder["CT5N"]
    datasets = sorted((pydicom.dcmread(f) for f in ct.files), key=lambda d: float(np.dot(d.ImagePositionPatient, np.cross(d.ImageOrientationPatient[:3], d.ImageOrientationPatient[3:]))))
    expected = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in datasets])  # (slice, row, column)
    volume = read_series(ct)
    normal = np.cross(datasets[0].ImageOrientationPatient[:3], datasets[0].ImageOrientationPatient[3:])
    first = volume.affine[:3, 3]  # LPS position of voxel (0, 0, 0)
    if np.dot(volume.affine[:3, 0], normal) < 0:  # highdicom may stack the slices in descending order
        expected, datasets = expected[::-1], datasets[::-1]
    np.testing.assert_allclose(volume.array, expected)
    np.testing.assert_allclose(first, np.asarray(datasets[0].ImagePositionPatient, dtype=float), atol=1e-3)
    row_spacing, column_spacing = map(float, datasets[0].PixelSpacing)
    np.testing.assert_allclose(volume.affine[:3, 2], np.asarray(datasets[0].ImageOrientationPatient[:3], dtype=float) * column_spacing, atol=1e-4)
    np.testing.assert_allclose(volume.affine[:3, 1], np.asarray(datasets[0].ImageOrientationPatient[3:], dtype=float) * row_spacing, atol=1e-4)
    assert "slice(s) missing" in series_problems(by_folder["CT2"][0])[0]
    assert any("mixed orientations" in p for s in by_folder["MR2"] for p in series_problems(s))
    assert any("a single slice" in p for s in by_folder["MR1"] for p in series_problems(s))
    skipped = [s for s in found if not s.image]
    assert any("SR" in s.modality for s in skipped) and all(not s.image for s in skipped)
    assert all(s.image for s in found if s.modality in ("CT", "MR") and Path(s.folder).name in ("CT5N", "CT2"))


def test_dicom_input_without_the_extra_is_one_clear_message(tmp_path, softmax_checkpoint, monkeypatch, caplog):
    import medseg.dicom.series
    from medseg.dicom import DICOM_EXTRA_HELP

    write_series(mr_volume(), tmp_path / "dicom", "MR")

    def missing() -> None:
        raise ImportError(f"{DICOM_EXTRA_HELP} (No module named 'highdicom')")

    monkeypatch.setattr(medseg.dicom.series, "require_dicom", missing)
    assert run_main(f"ckpt_path={softmax_checkpoint}", f"input={tmp_path / 'dicom'}", f"output={tmp_path / 'out'}") == 1
    assert "pip install 'medseg[dicom]'" in caplog.text and not (tmp_path / "out").exists()


def test_enhanced_multiframe_object_reads_as_its_single_frame_series(tmp_path):
    """The same slices as one enhanced (legacy converted, multi-frame) MR object read back identically."""
    values = np.random.default_rng(0).uniform(0, 1000, (13, 11, 9)).astype(np.float32)
    write_series(values, tmp_path / "single", "MR", affine=oblique_affine())
    frames = [pydicom.dcmread(f) for f in sorted((tmp_path / "single").glob("*.dcm"))]
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(legacy_datasets=frames, series_instance_uid=hd.UID(), series_number=9, sop_instance_uid=hd.UID(), instance_number=1)
    (tmp_path / "multi").mkdir()
    enhanced.save_as(tmp_path / "multi" / "enhanced.dcm")
    (single,) = find_series(tmp_path / "single")
    (multi,) = find_series(tmp_path / "multi")
    assert multi.image and len(multi.files) == 1 and not series_problems(multi)
    a, b = canonical(to_nifti(read_series(single))), canonical(to_nifti(read_series(multi)))
    np.testing.assert_allclose(b[1], a[1], atol=1e-4)
    np.testing.assert_array_equal(b[0], a[0])


def test_localizer_series_are_skipped_not_failed(tmp_path):
    written = write_series(mr_volume(), tmp_path / "scout", "MR", positions=[0, 1, 2], description="scout", series_number=1)
    for path in (tmp_path / "scout").glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.save_as(path)
    write_series(mr_volume(), tmp_path / "axial", "MR", description="axial", series_number=2, study_uid=written["study_uid"])
    cases, skipped = dicom_cases(tmp_path, tmp_path / "staging", in_channels=1)
    assert [c["dicom"][0].description for c in cases] == ["axial"] and "problem" not in cases[0]
    assert len(skipped) == 1 and skipped[0]["series"] == written["series_uid"] and "localizer" in skipped[0]["reason"]


def test_channels_on_other_grids_are_resampled_in_patient_space(tmp_path):
    """A second channel acquired on another grid (rotated, other spacing) in the study's frame of reference lands on
    the first channel's grid with the values of patient space: a linear field, which trilinear resampling keeps exactly
    (up to the stored integers' rounding); without a shared FrameOfReferenceUID the case is refused by name."""
    gradient, offset = np.array([3.0, -2.0, 5.0]), 500.0

    def field(shape, affine):  # value = gradient . (RAS position of the voxel) + offset
        ijk = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1).reshape(-1, 3)
        return ((ijk @ affine[:3, :3].T + affine[:3, 3]) @ gradient + offset).reshape(shape)

    grid_a = np.diag([2.0, 2.0, 3.0, 1.0])
    grid_b = oblique_affine(spacing=(1.5, 1.7, 1.6), origin=(-3.0, -2.0, -4.0))
    flair = write_series(field((20, 18, 12), grid_a), tmp_path / "dicom" / "flair", "MR", affine=grid_a, description="flair", series_number=1)
    t1 = write_series(field((30, 28, 26), grid_b), tmp_path / "dicom" / "t1", "MR", affine=grid_b, description="t1", series_number=2,
                      study_uid=flair["study_uid"], frame_of_reference_uid=flair["frame_of_reference_uid"])  # fmt: skip
    (case,), _ = dicom_cases(tmp_path / "dicom", tmp_path / "staging", 2, ["flair", "t1"], {"flair": "flair", "t1": "t1"})
    stage_case(case)
    staged_flair, staged_t1 = (nib.load(f) for f in case["image"])
    assert staged_t1.shape == staged_flair.shape and np.allclose(staged_t1.affine, staged_flair.affine)
    expected = field(staged_flair.shape, staged_flair.affine)
    values = np.asarray(staged_t1.dataobj)
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in staged_flair.shape), indexing="ij"), -1).reshape(-1, 3)
    in_t1 = np.linalg.solve(grid_b, np.c_[ijk @ staged_flair.affine[:3, :3].T + staged_flair.affine[:3, 3], np.ones(len(ijk))].T)[:3].T  # t1 voxel coordinates
    inside = np.all((in_t1 > 1e-3) & (in_t1 < np.array([29, 27, 25]) - 1e-3), axis=1).reshape(staged_flair.shape)  # the t1 field of view
    assert 0.3 < inside.mean() < 1
    np.testing.assert_allclose(values[inside], expected[inside], atol=0.51)  # the series stores rounded integers
    np.testing.assert_array_equal(values[~inside & (np.abs(values - t1["values"].min()) > 1e-3)], [])  # outside: the t1's lowest value
    other = write_series(field((30, 28, 26), grid_b), tmp_path / "other" / "t1", "MR", affine=grid_b, description="t1", series_number=2, study_uid=flair["study_uid"])
    shutil.copytree(tmp_path / "dicom" / "flair", tmp_path / "other" / "flair")
    (case,), _ = dicom_cases(tmp_path / "other", tmp_path / "staging2", 2, ["flair", "t1"], {"flair": "flair", "t1": "t1"})
    with pytest.raises(DicomSeriesError, match="FrameOfReferenceUID") as err:
        stage_case(case)
    assert other["series_uid"] in str(err.value)
    assert t1["series_uid"] != other["series_uid"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("experiment", "dataset", "image", "modality"),
    [("hippocampus", "Task04_Hippocampus", "imagesTr/hippocampus_001.nii.gz", "MR"), ("ct_abdomen", "CT_abdomen", "imagesTr/abdomen_sm.nii.gz", "CT")],
)
def test_real_scan_predicts_the_same_from_dicom_as_from_nifti(tmp_path, experiment, dataset, image, modality):
    """A real scan (integer-valued, so DICOM stores it exactly) exported as a shuffled DICOM series is predicted by the
    preset's network (random weights: any network is a test of the path) exactly as its NIfTI file is."""
    source = nib.load(shared_dataset(dataset) / image)
    ckpt = untrained_checkpoint(tmp_path / f"{experiment}.ckpt", f"+experiment={experiment}", "data.root=unused")
    write_series(source, tmp_path / "dicom", modality, slope=1.0, intercept=-1024.0 if modality == "CT" else 0.0)
    (from_dicom,) = predict(predict_config(ckpt, tmp_path / "dicom", tmp_path / "out_dicom", "save_probabilities=true"))
    (from_nifti,) = predict(predict_config(ckpt, [shared_dataset(dataset) / image], tmp_path / "out_nifti", "save_probabilities=true"))
    got, got_affine = canonical(nib.load(from_dicom["prediction"]))
    expected, expected_affine = canonical(nib.load(from_nifti["prediction"]))
    np.testing.assert_allclose(got_affine, expected_affine, atol=1e-4)
    np.testing.assert_array_equal(got, expected)
    probabilities = [nib.as_closest_canonical(nib.load(r["probabilities"])).get_fdata() for r in (from_dicom, from_nifti)]
    np.testing.assert_allclose(probabilities[0], probabilities[1], atol=1e-5)


@pytest.mark.parametrize("syntax", [JPEGLSLossless, RLELossless], ids=["jpeg-ls", "rle"])
def test_compressed_series_read_back_exactly(tmp_path, syntax):
    """A series compressed losslessly (as PACS exports often are) reads back as its uncompressed values."""
    if not get_decoder(syntax).is_available:
        pytest.skip(f"no decoder for {syntax.name} installed (the dicom extra's python-gdcm decodes it)")
    values = np.random.default_rng(0).integers(0, 3000, (13, 11, 9)).astype(np.float32)
    written = write_series(values, tmp_path / "series", "CT", slope=1.0, intercept=-1024.0, affine=oblique_affine())
    for path in (tmp_path / "series").glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.compress(syntax)
        ds.save_as(path)
    (series,) = find_series(tmp_path / "series")
    assert pydicom.dcmread(series.files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    got, _ = canonical(to_nifti(read_series(series)))
    np.testing.assert_array_equal(got, canonical(nib.Nifti1Image(written["values"], written["affine"]))[0])


def test_every_seg_frame_refers_to_the_source_slice_at_its_position(tmp_path, softmax_checkpoint, threshold_network):
    """Read with pydicom alone (not highdicom): each frame of the SEG names the source instance at its own plane
    position, and its pixels are that slice's mask, so a viewer overlaying frame on slice shows the prediction."""
    source = write_series(mr_volume(), tmp_path / "dicom", "MR", affine=oblique_affine(), seed=7)
    (result,) = predict(predict_config(softmax_checkpoint, tmp_path / "dicom", tmp_path / "out", "output_format=both"))
    slices = {}
    for path in (tmp_path / "dicom").glob("*.dcm"):
        ds = pydicom.dcmread(path)
        slices[str(ds.SOPInstanceUID)] = (np.asarray(ds.ImagePositionPatient, dtype=float), int(ds.InstanceNumber) - 1)  # position, k
    labels = np.asarray(nib.load(result["prediction"]).dataobj)  # on the NIfTI grid; the series' slice k is (column i, row j)
    written = nib.as_closest_canonical(nib.Nifti1Image(labels, nib.load(result["prediction"]).affine))
    reference = nib.as_closest_canonical(nib.Nifti1Image(np.zeros(source["values"].shape), source["affine"]))
    assert np.allclose(written.affine, reference.affine, atol=1e-4)
    # Labels in the source volume's own (i, j, k) order: undo the canonical reorientation of the written grid.
    in_source = np.asarray(written.as_reoriented(nib.orientations.io_orientation(source["affine"])).dataobj)  # (i, j, k)
    seg = pydicom.dcmread(result["dicom_seg"])
    pixels = seg.pixel_array if seg.NumberOfFrames > 1 else seg.pixel_array[None]  # (frames, rows, columns)
    seen = set()
    for frame, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        uid = str(group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        position, k = slices[uid]
        np.testing.assert_allclose(np.asarray(group.PlanePositionSequence[0].ImagePositionPatient, dtype=float), position, atol=1e-3)
        segment = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)  # 1: anterior (label 1), 2: posterior
        np.testing.assert_array_equal(pixels[frame].astype(bool), (in_source[:, :, k] == segment).T)  # (rows=j, columns=i)
        seen.add((segment, k))
    for segment in (1, 2):  # every slice holding the label has its frame (empty ones may be left out)
        assert {k for k in range(labels.shape[2]) if (in_source[:, :, k] == segment).any()} <= {k for s, k in seen if s == segment}


def test_a_rerun_keeps_finished_seg_cases_and_redoes_a_missing_or_grown_one(tmp_path, softmax_checkpoint, threshold_network):
    """Resuming into the same folder: a case whose SEG is there is kept, one whose SEG was removed is predicted again,
    and a series that gained slices since is predicted again (its record names the file count)."""
    write_series(mr_volume(), tmp_path / "dicom" / "a", "MR", series_number=1)
    write_series(mr_volume(seed=2), tmp_path / "dicom" / "b", "MR", series_number=2, positions=range(12))
    args = (softmax_checkpoint, tmp_path / "dicom", tmp_path / "out", "output_format=dicom_seg")
    first = {r["case"]: r for r in predict(predict_config(*args))}
    stamps = {case: Path(r["dicom_seg"]).stat().st_mtime_ns for case, r in first.items()}
    again = {r["case"]: r for r in predict(predict_config(*args))}
    assert again == first and {c: Path(r["dicom_seg"]).stat().st_mtime_ns for c, r in again.items()} == stamps  # kept as they were
    case_a, case_b = sorted(first)
    Path(first[case_a]["dicom_seg"]).unlink()
    b = next(iter(find_series(tmp_path / "dicom" / "b")))
    write_series(mr_volume(seed=2), tmp_path / "dicom" / "b" / "later", "MR", series_number=2, positions=range(12, 16), series_uid=b.uid, study_uid=b.study_uid,
                 frame_of_reference_uid=b.frame_of_reference)  # the rest of the series arrives  # fmt: skip
    third = {r["case"]: r for r in predict(predict_config(*args))}
    assert Path(third[case_a]["dicom_seg"]).is_file()  # the removed SEG written again
    assert third[case_b]["image"] == [f"dicom:{b.uid} (16 files)"] and first[case_b]["image"] == [f"dicom:{b.uid} (12 files)"]
    assert Path(third[case_b]["dicom_seg"]).stat().st_mtime_ns != stamps[case_b]
