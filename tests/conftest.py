"""Shared fixtures: small generated datasets in BraTS and MSD layouts, and the real sample data."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BRATS_REGIONS = {"wt": [1, 2, 4], "tc": [1, 4], "et": [4]}
BRATS_LABELS = {"mode": "sigmoid", "names": ["wt", "tc", "et"], "values": [0, 1, 2, 4], "regions": BRATS_REGIONS}


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``gpu`` need CUDA: skipped, with the reason, where there is none."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here); run on a GPU machine: pytest -m gpu")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def shared_dataset(name: str) -> Path:
    """A folder of ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real sample data not available: {path} is absent (tests read ../shared/data beside the repository)")
    return path


@pytest.fixture(scope="session", autouse=True)
def preprocessing_cache(tmp_path_factory) -> Path:
    """Every test's disk caches (paths.cache_dir) in one session folder, not in the repository's outputs/."""
    folder = tmp_path_factory.mktemp("cache")
    previous = os.environ.get("MEDSEG_CACHE")
    os.environ["MEDSEG_CACHE"] = str(folder)  # subprocesses (DDP, SLURM simulations) inherit it
    yield folder
    if previous is None:
        os.environ.pop("MEDSEG_CACHE", None)
    else:
        os.environ["MEDSEG_CACHE"] = previous


@pytest.fixture(autouse=True)
def cpu_without_bf16(monkeypatch) -> None:
    """Every test plans as on a CPU without bf16 (medseg's one reading of the CPU model), so that no test's outcome
    depends on the machine it runs on; tests of the bf16 choice patch it back. ``MEDSEG_TEST_CPU_BF16=1`` runs the
    suite as a bf16 CPU would see it instead, to check that the outcomes are the same."""
    import medseg.precision

    bf16 = os.environ.get("MEDSEG_TEST_CPU_BF16", "0") == "1"
    monkeypatch.setattr(medseg.precision, "cpu_supports_bf16", lambda: bf16)


@pytest.fixture(scope="session")
def brats_tree(tmp_path_factory) -> Path:
    """Six small synthetic cases in the BraTS 2021 layout (48x48x32 voxels at 4 mm)."""
    from medseg.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("brats")
    generate_dataset(root, 6, shape=(48, 48, 32), spacing=(4.0, 4.0, 4.8), seed=3)
    return root


@pytest.fixture()
def brats_copy(brats_tree, tmp_path) -> Path:
    """A private copy of :func:`brats_tree` that a test may break."""
    return Path(shutil.copytree(brats_tree, tmp_path / "brats"))


@pytest.fixture(scope="session")
def msd_tree(brats_tree, tmp_path_factory) -> Path:
    """The synthetic cases as an MSD task: dataset.json with per-modality image lists, paths relative."""
    root = tmp_path_factory.mktemp("msd")
    training = []
    for case in sorted(p for p in brats_tree.iterdir() if p.is_dir()):
        (root / "imagesTr" / case.name).mkdir(parents=True)
        (root / "labelsTr").mkdir(exist_ok=True)
        images = []
        for modality in ("flair", "t1"):
            shutil.copy(case / f"{case.name}_{modality}.nii.gz", root / "imagesTr" / case.name / f"{modality}.nii.gz")
            images.append(f"./imagesTr/{case.name}/{modality}.nii.gz")
        shutil.copy(case / f"{case.name}_seg.nii.gz", root / "labelsTr" / f"{case.name}.nii.gz")
        training.append({"image": images, "label": f"./labelsTr/{case.name}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"name": "synthetic", "labels": {"0": "background"}, "training": training}))
    return root
