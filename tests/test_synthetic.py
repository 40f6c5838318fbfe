"""Tests of the synthetic BraTS-like generator (medseg.data.synthetic)."""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import cc3d
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medseg.data import synthetic
from medseg.data.synthetic import (
    CONTRASTS,
    CSF,
    ED,
    ET,
    GM,
    MANIFEST_NAME,
    NCR,
    SATELLITE_RADIUS_MM,
    SATELLITE_VOXELS,
    SATELLITES,
    WM,
    generate_case,
    generate_dataset,
    write_case,
)

SMALL = {"shape": (64, 64, 48), "spacing": (3.0, 3.0, 3.0)}  # fast, but the whole anatomy
DEMO = {"shape": (96, 96, 64), "spacing": (2.0, 2.0, 2.0)}
FILES = (*CONTRASTS, "seg")
CONNECT_26 = np.ones((3, 3, 3), bool)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _mtimes(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in _files(folder)}


def _load(case_dir: Path) -> dict[str, np.ndarray]:
    return {name: np.asarray(nib.load(case_dir / f"{case_dir.name}_{name}.nii.gz").dataobj) for name in FILES}


def _lesions(label: np.ndarray) -> tuple[np.ndarray, list[int], list[int]]:
    """26-connected lesion components: (component map, main tumour ids, satellite ids)."""
    components, n = ndimage.label(label > 0, structure=CONNECT_26)
    main = sorted(set(np.unique(components[label == NCR]).tolist()))
    return components, main, [k for k in range(1, n + 1) if k not in main]


@pytest.fixture(scope="module")
def demo_cases() -> list[synthetic.SyntheticCase]:
    return [generate_case(np.random.default_rng(seed), **DEMO) for seed in range(3)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, list[Path]]:
    out = tmp_path_factory.mktemp("synthetic")
    return out, generate_dataset(out, 2, seed=7, **SMALL)


# ----------------------------------------------------------------------------- files on disk


def test_dataset_layout_headers_and_manifest(dataset):
    out, cases = dataset
    assert cases == [out / "SYN-0000", out / "SYN-0001"]
    expected_affine = np.array([[3.0, 0, 0, -94.5], [0, 3, 0, -94.5], [0, 0, 3, -70.5], [0, 0, 0, 1]])
    for case in cases:
        assert sorted(p.name for p in case.iterdir()) == sorted(f"{case.name}_{n}.nii.gz" for n in FILES)
        for name in FILES:
            img = nib.load(case / f"{case.name}_{name}.nii.gz")
            assert img.shape == SMALL["shape"]
            assert img.header.get_zooms() == pytest.approx(SMALL["spacing"])
            np.testing.assert_allclose(img.affine, expected_affine)
            assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
            # the volume's centre is the world origin
            np.testing.assert_allclose(img.affine @ [31.5, 31.5, 23.5, 1], [0, 0, 0, 1])
            assert img.get_data_dtype() == (np.uint8 if name == "seg" else np.float32)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["case_ids"] == ["SYN-0000", "SYN-0001"]
    assert (manifest["shape"], manifest["spacing"], manifest["seed"]) == ([64, 64, 48], [3.0, 3.0, 3.0], 7)
    assert sorted(p.name for p in out.iterdir()) == ["SYN-0000", "SYN-0001", MANIFEST_NAME]  # no leftovers


def test_written_arrays_equal_generated_case(dataset):
    out, cases = dataset
    for i, case_dir in enumerate(cases):
        expected = generate_case(np.random.default_rng([7, i]), **SMALL)
        loaded = _load(case_dir)
        for name in CONTRASTS:
            np.testing.assert_array_equal(loaded[name], expected.images[name])
        np.testing.assert_array_equal(loaded["seg"], expected.label)


def test_write_case_is_atomic(tmp_path, monkeypatch, demo_cases):
    case_dir = write_case(demo_cases[0], tmp_path, "A")
    before = _mtimes(tmp_path)

    def broken_save(img, filename):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(synthetic.nib, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_case(demo_cases[1], tmp_path, "A")  # overwrite fails: old files stay intact
    with pytest.raises(OSError, match="disk full"):
        write_case(demo_cases[1], tmp_path, "B")  # new case fails: no final file appears
    assert _mtimes(tmp_path) == before
    assert not any((tmp_path / "B").iterdir())
    np.testing.assert_array_equal(_load(case_dir)["seg"], demo_cases[0].label)


# ----------------------------------------------------------------------------- anatomy and lesions


def _assert_tumour_and_satellites(label: np.ndarray) -> None:
    assert label.dtype == np.uint8
    assert set(np.unique(label).tolist()) == {0, NCR, ED, ET}
    components, main, satellites = _lesions(label)
    assert len(main) == 1, "NCR belongs to exactly one (main tumour) component"
    assert {ED, ET} <= set(np.unique(label[components == main[0]]).tolist())
    assert len(satellites) >= 3
    sizes = ndimage.sum_labels(np.ones_like(label), components, satellites)
    assert SATELLITE_VOXELS[0] <= sizes.min() and sizes.max() <= SATELLITE_VOXELS[1]
    for k in satellites:
        values = set(np.unique(label[components == k]).tolist())
        assert ET in values and values <= {ED, ET}


@pytest.mark.parametrize("index", range(3))
def test_labels_tumour_and_satellites(demo_cases, index):
    assert demo_cases[index].label.shape == DEMO["shape"]
    _assert_tumour_and_satellites(demo_cases[index].label)


@pytest.mark.parametrize(
    ("shape", "spacing"), [((32, 32, 32), (1.0, 1.0, 1.0)), ((96, 96, 32), (1.0, 1.0, 4.0))]
)
def test_smallest_and_anisotropic_volumes_keep_all_lesions(shape, spacing):
    for seed in range(3):
        case = generate_case(np.random.default_rng(seed), shape, spacing)
        assert case.label.shape == shape
        _assert_tumour_and_satellites(case.label)


@pytest.mark.slow
def test_full_size_case_scale_and_satellite_span():
    case = generate_case(np.random.default_rng(1))  # 240 x 240 x 155 @ 1 mm
    assert case.label.shape == case.tissue.shape == (240, 240, 155)
    brain_ml = (case.tissue > 0).sum() / 1000
    assert 900 < brain_ml < 1800, "an adult cerebrum"
    components, _, satellites = _lesions(case.label)
    sizes = ndimage.sum_labels(np.ones_like(case.label), components, satellites)
    assert len(satellites) >= 3
    assert sizes.min() < 50 and sizes.max() > 100, "satellites span a few to a few hundred voxels"
    assert sizes.max() <= SATELLITE_VOXELS[1]


def test_anatomy_has_the_same_physical_size_at_any_resolution():
    coarse = generate_case(np.random.default_rng(5), (64, 64, 48), (2.0, 2.0, 2.0))
    fine = generate_case(np.random.default_rng(5), (128, 128, 96), (1.0, 1.0, 1.0))
    coarse_ml, fine_ml = (coarse.tissue > 0).sum() * 8 / 1000, (fine.tissue > 0).sum() / 1000
    assert coarse_ml == pytest.approx(fine_ml, rel=0.1)
    assert fine_ml < 0.5 * 128 * 128 * 96 / 1000, "the brain fits inside the field of view"


def _healthy_mean(case: synthetic.SyntheticCase, image: np.ndarray, tissue: int) -> float:
    return float(image[(case.tissue == tissue) & (case.label == 0)].mean())


def test_contrast_orderings(demo_cases):
    for case in demo_cases:
        t1, t1ce, t2, flair = (case.images[c] for c in CONTRASTS)
        mean = functools.partial(_healthy_mean, case)
        assert mean(t1, WM) > mean(t1, GM) > mean(t1, CSF)
        assert mean(t2, CSF) > mean(t2, GM) > mean(t2, WM)
        assert mean(flair, GM) > mean(flair, WM) > mean(flair, CSF)
        assert flair[case.label == ED].mean() > 1.5 * mean(flair, WM)
        assert t1ce[case.label == ET].mean() > 2 * t1ce[case.label == NCR].mean()
        assert t1ce[case.label == ET].mean() > 1.3 * mean(t1ce, WM)


def test_skull_stripped_background_and_intensities(demo_cases):
    for case in demo_cases:
        brain = case.tissue > 0
        assert set(np.unique(case.tissue).tolist()) == {0, CSF, GM, WM}
        assert not case.label[~brain].any()
        assert not brain[[0, -1]].any() and not brain[:, [0, -1]].any() and not brain[:, :, [0, -1]].any()
        for name in CONTRASTS:
            img = case.images[name]
            assert img.dtype == np.float32 and img.shape == DEMO["shape"]
            assert (img[~brain] == 0).all() and (img >= 0).all()
            assert (img[brain] > 0).mean() > 0.999
        assert np.corrcoef(case.images["t1"][brain], case.images["t2"][brain])[0, 1] < 0, "T1 and T2 invert"


def test_generate_case_is_deterministic(demo_cases):
    again = generate_case(np.random.default_rng(0), **DEMO)
    for name in CONTRASTS:
        np.testing.assert_array_equal(again.images[name], demo_cases[0].images[name])
    np.testing.assert_array_equal(again.label, demo_cases[0].label)
    np.testing.assert_array_equal(again.tissue, demo_cases[0].tissue)
    assert not np.array_equal(demo_cases[0].label, demo_cases[1].label)


def test_case_does_not_depend_on_number_of_cases(tmp_path, dataset):
    _, two = dataset
    four = generate_dataset(tmp_path, 4, seed=7, **SMALL)
    assert len(four) == 4
    for a, b in zip(two, four[:2], strict=True):
        loaded_a, loaded_b = _load(a), _load(b)
        for name in FILES:
            np.testing.assert_array_equal(loaded_a[name], loaded_b[name])


# ----------------------------------------------------------------------------- satellite options

# Computed with the generator before satellites and satellite_radius_mm existed: the defaults must give the
# same cases. Labels and tissue exactly (sha256 of their bytes); images to float tolerance, as another BLAS
# may round the smooth noise fields differently.
BEFORE_SATELLITE_OPTIONS = [
    ((96, 96, 64), (2.0, 2.0, 2.4), [0, 0], "966a4999bc3d2e7c6f31f0266bec8235908dc13827944b2839188d97521b7fdc", (23607532.7, 35024564.2, 55867346.3, 109207700.7)),
    ((64, 64, 48), (3.0, 3.0, 3.0), [7, 1], "a1188f400e89283a34d06b89fe4d870d1c14d4751d556b576883411a94e0afba", (23350060.7, 40891490.4, 16746268.7, 21529851.5)),
    ((96, 96, 32), (1.0, 1.0, 4.0), [2], "e5d4fee0d0ec1899fe1b85d4cc4e128830eebe85c4eba2b473a5506c4feca9b9", (20519491.3, 34665566.8, 31015981.8, 14234136.2)),
]
SMALL_LESIONS = {"shape": (88, 104, 76), "spacing": (2.0, 2.0, 2.0)}  # conf/experiment/small_lesions.yaml: unshrunk anatomy


@pytest.mark.parametrize(("shape", "spacing", "seed", "label_sha256", "image_sums"), BEFORE_SATELLITE_OPTIONS)
def test_default_satellite_options_give_the_cases_of_before(shape, spacing, seed, label_sha256, image_sums):
    for case in (
        generate_case(np.random.default_rng(seed), shape, spacing),
        generate_case(np.random.default_rng(seed), shape, spacing, satellites=SATELLITES, satellite_radius_mm=SATELLITE_RADIUS_MM),
    ):
        assert hashlib.sha256(case.label.tobytes() + case.tissue.tobytes()).hexdigest() == label_sha256
        sums = [float(case.images[c].astype(np.float64).sum()) for c in CONTRASTS]
        assert sums == pytest.approx(image_sums, rel=1e-6)


def _satellite_components(label: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """26-connected components (cc3d) and the ids of those without necrosis (the satellites)."""
    components = cc3d.connected_components(label > 0, connectivity=26)
    glioma = set(np.unique(components[label == NCR]).tolist())
    return components, [k for k in range(1, int(components.max()) + 1) if k not in glioma]


def _ball_voxels(radius: float) -> int:
    """Voxels whose centre lies within ``radius`` voxels of a voxel centre."""
    r = int(np.ceil(radius))
    grid = np.mgrid[-r : r + 1, -r : r + 1, -r : r + 1]
    return int(((grid**2).sum(0) < radius**2).sum())


@pytest.mark.parametrize("seed", range(3))
def test_requested_satellite_count_and_sizes(seed):
    # At 2 mm and full scale, radii of 2.4-5.0 mm are 1.2-2.5 voxels; the boundary noise scales the
    # radius by 1 +- 0.12 and an oedema rim adds one voxel.
    case = generate_case(np.random.default_rng(seed), **SMALL_LESIONS, satellites=(12, 12), satellite_radius_mm=(2.4, 5.0))
    components, satellites = _satellite_components(case.label)
    assert len(satellites) == 12
    et = ndimage.sum_labels(case.label == ET, components, satellites)  # ET voxels of each satellite
    whole = ndimage.sum_labels(np.ones_like(case.label), components, satellites)
    assert et.min() >= _ball_voxels(1.2 * 0.88) == 7
    assert et.max() <= _ball_voxels(2.5 * 1.12)
    assert whole.max() <= _ball_voxels(3.5 * 1.12)


def test_satellite_radius_sets_the_size_range():
    smallest = []
    for seed in range(3):
        case = generate_case(np.random.default_rng(seed), **SMALL_LESIONS, satellites=(10, 10), satellite_radius_mm=(4.0, 5.0))
        components, satellites = _satellite_components(case.label)
        smallest.append(ndimage.sum_labels(case.label == ET, components, satellites).min())
    assert min(smallest) >= _ball_voxels(2.0 * 0.88) == 27  # 4 mm = 2 voxels: no 7-voxel satellites any more


def test_satellite_count_is_drawn_in_the_range():
    counts = [len(_satellite_components(generate_case(np.random.default_rng(seed), **SMALL, satellites=(5, 7)).label)[1]) for seed in range(6)]
    assert set(counts) <= {5, 6, 7} and len(set(counts)) > 1, counts


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"satellites": (5, 3)}, "expected satellites"),
        ({"satellites": (-1, 3)}, "expected satellites"),
        ({"satellites": (2.0, 3)}, "expected satellites"),
        ({"satellites": 4}, "expected satellites"),
        ({"satellite_radius_mm": (3.0, 1.0)}, "expected satellite_radius_mm"),
        ({"satellite_radius_mm": (0.0, 1.0)}, "expected satellite_radius_mm"),
        ({"satellite_radius_mm": (1.0, float("inf"))}, "expected satellite_radius_mm"),
        ({"satellite_contrast": 0.0}, "expected satellite_contrast"),
        ({"satellite_contrast": 1.5}, "expected satellite_contrast"),
        ({"confluent": (2, 1)}, "expected confluent"),
        ({"confluent_radius_mm": (0.0, 4.0)}, "expected confluent_radius_mm"),
    ],
)
def test_bad_satellite_options(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_case(np.random.default_rng(0), **SMALL, **kwargs)
    with pytest.raises(ValueError, match=message):
        generate_dataset(tmp_path / "out", 1, **SMALL, **kwargs)
    assert not (tmp_path / "out").exists()


def test_faint_satellites_keep_their_geometry_and_lose_contrast():
    """satellite_contrast changes only the satellites' intensities (same random draws, same labels), towards the
    tissue they lie in; the glioma and everything else are untouched."""
    full = generate_case(np.random.default_rng(7), **SMALL, satellites=(6, 6))
    faint = generate_case(np.random.default_rng(7), **SMALL, satellites=(6, 6), satellite_contrast=0.3)
    np.testing.assert_array_equal(full.label, faint.label)
    components, n = cc3d.connected_components(full.label > 0, connectivity=26, return_N=True)
    glioma = components == 1 + int(np.argmax(np.bincount(components.ravel())[1:]))
    satellites = (full.label > 0) & ~glioma
    for contrast in ("t1ce", "flair"):
        np.testing.assert_array_equal(full.images[contrast][~satellites], faint.images[contrast][~satellites])
        healthy = (full.tissue >= 2) & (full.label == 0)
        tissue_mean = full.images[contrast][healthy].mean()
        gap_full = abs(full.images[contrast][satellites].mean() - tissue_mean)
        gap_faint = abs(faint.images[contrast][satellites].mean() - tissue_mean)
        assert gap_faint < 0.6 * gap_full, contrast


def test_confluent_lesions_are_large_separate_components():
    plain = generate_case(np.random.default_rng(3), **SMALL, satellites=(4, 4))
    case = generate_case(np.random.default_rng(3), **SMALL, satellites=(4, 4), confluent=(2, 2), confluent_radius_mm=(10.0, 12.0))
    sizes = lambda c: sorted(np.bincount(cc3d.connected_components(c.label > 0, connectivity=26).ravel())[1:].tolist())
    assert len(sizes(case)) == len(sizes(plain)) + 2
    largest_satellite = sizes(plain)[-2]  # the largest is the glioma
    assert sum(v > 2 * largest_satellite for v in sizes(case)) == 3  # the glioma and the two confluent lesions


def test_satellite_options_are_part_of_the_manifest(tmp_path):
    options = {"satellites": (4, 4), "satellite_radius_mm": (2.0, 3.0)}
    cases = generate_dataset(tmp_path, 1, seed=2, **SMALL, **options)
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert (manifest["satellites"], manifest["satellite_radius_mm"]) == ([4, 4], [2.0, 3.0])
    expected = generate_case(np.random.default_rng([2, 0]), **SMALL, **options).label
    np.testing.assert_array_equal(_load(cases[0])["seg"], expected)
    with pytest.raises(ValueError, match="satellites=\\[3, 8\\].*got satellites=\\[4, 4\\]"):
        generate_dataset(tmp_path, 1, seed=2, **SMALL)  # the defaults are other parameters


def test_manifest_without_satellite_options_holds_the_defaults(tmp_path):
    # A dataset generated before the satellite options existed (data/demo_brats) is reused, not regenerated.
    generate_dataset(tmp_path, 1, seed=2, **SMALL)
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    del manifest["satellites"], manifest["satellite_radius_mm"]
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    before = _mtimes(tmp_path)
    generate_dataset(tmp_path, 1, seed=2, **SMALL, satellites=SATELLITES, satellite_radius_mm=SATELLITE_RADIUS_MM)
    assert _mtimes(tmp_path) == before
    with pytest.raises(ValueError, match="satellites"):
        generate_dataset(tmp_path, 1, seed=2, **SMALL, satellites=(4, 4))


def test_cli_passes_satellite_options(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["--out", str(out), "--cases", "1", "--shape", "64", "64", "48", "--spacing", "3", "3", "3"]
    assert synthetic.main([*args, "--satellites", "6", "6", "--satellite-radius-mm", "2", "3"]) == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert (manifest["satellites"], manifest["satellite_radius_mm"]) == ([6, 6], [2.0, 3.0])
    with pytest.raises(SystemExit) as info:
        synthetic.main([*args, "--satellites", "6", "2"])
    assert info.value.code == 2 and "expected satellites" in capsys.readouterr().err


# ----------------------------------------------------------------------------- cache


def test_cache_reuse_refusal_and_repair(tmp_path):
    cases = generate_dataset(tmp_path, 2, seed=3, **SMALL)
    before = _mtimes(tmp_path)
    assert generate_dataset(tmp_path, 2, seed=3, **SMALL) == cases
    assert _mtimes(tmp_path) == before, "a second call must not rewrite anything"

    for changed in ({"seed": 4}, {"shape": (64, 64, 64)}, {"spacing": (2.0, 3.0, 3.0)}, {"n_cases": 3}):
        kwargs = {"n_cases": 2, "seed": 3, **SMALL, **changed}
        with pytest.raises(ValueError, match="expected") as info:
            generate_dataset(tmp_path, **kwargs)
        assert str(tmp_path) in str(info.value) and next(iter(changed)) in str(info.value)
    assert _mtimes(tmp_path) == before

    original = _load(cases[1])
    for path in _files(cases[1]):
        path.unlink()
    cases[1].rmdir()
    generate_dataset(tmp_path, 2, seed=3, **SMALL)
    after = _mtimes(tmp_path)
    assert {p: t for p, t in after.items() if cases[1] not in p.parents} == {
        p: t for p, t in before.items() if cases[1] not in p.parents
    }, "only the missing case is written"
    assert len(after) == len(before)
    for name in FILES:
        np.testing.assert_array_equal(_load(cases[1])[name], original[name])


def test_interrupted_run_resumes_and_folder_without_manifest_regenerates(tmp_path, monkeypatch):
    real_write = synthetic.write_case
    calls = []

    def interrupted(case, out_dir, case_id):
        calls.append(case_id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_write(case, out_dir, case_id)

    monkeypatch.setattr(synthetic, "write_case", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(tmp_path, 2, **SMALL)
    monkeypatch.setattr(synthetic, "write_case", real_write)
    assert not (tmp_path / MANIFEST_NAME).exists(), "the manifest is written last"
    first = _mtimes(tmp_path / "SYN-0000")

    generate_dataset(tmp_path, 2, **SMALL)  # same parameters: keeps the finished case
    assert _mtimes(tmp_path / "SYN-0000") == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SYN-0000", "SYN-0001", MANIFEST_NAME]

    (tmp_path / MANIFEST_NAME).unlink()  # unknown provenance: everything is regenerated
    generate_dataset(tmp_path, 2, seed=1, **SMALL)
    assert all(_mtimes(tmp_path / "SYN-0000")[p] != t for p, t in first.items())
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["seed"] == 1


# ----------------------------------------------------------------------------- arguments and CLI


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_cases": 0},
        {"n_cases": 1.5},
        {"seed": -1},
        {"shape": (0, 64, 48)},
        {"shape": (64, -64, 48)},
        {"shape": (64, 64)},
        {"shape": (64.0, 64, 48)},
        {"spacing": (1.0, 0.0, 1.0)},
        {"spacing": (1.0, float("nan"), 1.0)},
        {"shape": (33, 87, 55), "spacing": (0.5, 3.4, 3.4)},  # brain only 3 voxels thick
    ],
)
def test_generate_dataset_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError, match="expected"):
        generate_dataset(tmp_path / "out", **{"n_cases": 1, **SMALL, **kwargs})
    assert not (tmp_path / "out").exists()


def test_generate_case_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"expected shape .*got \(96, 0, 64\)"):
        generate_case(np.random.default_rng(0), (96, 0, 64))
    with pytest.raises(ValueError, match="expected spacing"):
        generate_case(np.random.default_rng(0), (96, 96, 64), (2.0, -2.0, 2.0))
    with pytest.raises(TypeError, match="expected rng"):
        generate_case(0, (96, 96, 64))


def test_write_case_rejects_bad_case_id(tmp_path, demo_cases):
    for bad in ("", "..", "a/b"):
        with pytest.raises(ValueError, match="expected case_id"):
            write_case(demo_cases[0], tmp_path, bad)


def test_cli_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as info:
        synthetic.main(["--help"])
    assert info.value.code == 0
    assert "--cases" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        synthetic.main(["--out", "unused", "--cases", "0"])
    assert info.value.code == 2
    assert "expected n_cases" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_writes_dataset(tmp_path):
    out = tmp_path / "cli"
    args = [
        "--out",
        str(out),
        "--cases",
        "1",
        "--shape",
        "48",
        "48",
        "40",
        "--spacing",
        "4",
        "4",
        "4",
        "--seed",
        "2",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "medseg.data.synthetic", *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert str(out.resolve()) in result.stdout
    img = nib.load(out / "SYN-0000" / "SYN-0000_flair.nii.gz")
    assert img.shape == (48, 48, 40) and img.header.get_zooms() == pytest.approx((4.0, 4.0, 4.0))
    label = np.asarray(nib.load(out / "SYN-0000" / "SYN-0000_seg.nii.gz").dataobj)
    expected = generate_case(np.random.default_rng([2, 0]), (48, 48, 40), (4.0, 4.0, 4.0)).label
    np.testing.assert_array_equal(label, expected)
    before = _mtimes(out)
    generate_dataset(out, 1, (48, 48, 40), (4.0, 4.0, 4.0), seed=2)  # the library reuses the CLI's cache
    assert _mtimes(out) == before
