"""medseg.build: composed configs to the model and the preprocessing, the same for training, prediction and
the benchmarks; the entry points import library modules only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hydra.utils import instantiate

from medseg.build import preprocessing_from_config, preprocessing_options_from_config
from medseg.config import CONFIG_DIR, compose
from medseg.data.transforms import DEFAULT_CT_WINDOW

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
ENTRY_POINTS = ("train", "predict", "evaluate", "plan", "crossval", "ablation")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_the_preprocessing_of_a_data_node_is_the_data_modules(experiment, tmp_path):
    cfg = compose("train", [f"+experiment={experiment}", f"paths.output_dir={tmp_path}", "data.root=unused", "data.synthetic=null"])
    options = preprocessing_options_from_config(cfg.data)
    assert options == instantiate(cfg.data).preprocess_options  # hence also the cache key
    assert [type(t).__name__ for t in preprocessing_from_config(cfg.data).transforms] == [type(t).__name__ for t in instantiate(cfg.data).preprocessing.transforms]


def test_a_saved_data_node_without_the_newer_keys_takes_the_defaults():
    # a checkpoint's config from before ct_zscore and ct_window existed: a plain dict
    data = {"labels": {"mode": "softmax", "names": ["a"], "values": [0, 1]}, "spacing": [2, 2, 2], "intensity": "ct"}
    assert preprocessing_options_from_config(data) == {"spacing": [2.0, 2.0, 2.0], "intensity": "ct", "ct_window": list(DEFAULT_CT_WINDOW), "crop_foreground": True}
    names = [type(t).__name__ for t in preprocessing_from_config(data, with_label=False).transforms]
    assert "Spacingd" in names and "ScaleIntensityRanged" in names and "ConvertLabelsd" not in names


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    return imported | {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_entry_points_import_library_modules_only(entry_point):
    assert imported_modules(Path(__file__).parents[1] / "medseg" / f"{entry_point}.py") & {f"medseg.{e}" for e in ENTRY_POINTS} == set()


def test_no_library_module_imports_an_entry_point():
    package = Path(__file__).parents[1] / "medseg"
    entry_files = {package / f"{e}.py" for e in ENTRY_POINTS}
    offenders = {str(p.relative_to(package)): sorted(imported_modules(p) & {f"medseg.{e}" for e in ENTRY_POINTS})
                 for p in package.rglob("*.py") if p not in entry_files}
    assert {k: v for k, v in offenders.items() if v} == {}
