"""medseg.plan on the real sample scans of ../shared/data: the plans follow the fingerprint rules."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import shared_dataset
from medseg.config import compose

pytestmark = pytest.mark.slow


def plan_shared(tmp_path, experiment: str, folder: str, *overrides: str):
    from medseg.plan import plan

    root = shared_dataset(folder)
    output = tmp_path / "plans" / "experiment" / f"{experiment}_plan.yaml"
    cfg = compose("plan", [f"+experiment={experiment}", f"data.root={root}", f"plan.output={output}", "plan.train_minutes=null", "plan.workers=0",
                           "plan.cpu_memory_gb=4", f"paths.output_dir={tmp_path / 'run'}", *overrides])
    result, _ = plan(cfg, data_group="brats" if experiment == "brats" else "msd")
    import json

    fingerprint = json.loads((output.parent / "fingerprint.json").read_text())
    return result, fingerprint


def test_brats_samples_plan_1mm_mri_and_the_largest_patch_the_budget_holds(tmp_path):
    result, fingerprint = plan_shared(tmp_path, "brats", "BraTS_samples", "data.val_fraction=0.5")
    assert result.value("data.spacing") == [1.0, 1.0, 1.0]
    assert result.value("data.intensity") == "mri"
    patch = np.array(result.value("data.patch_size"))
    median = np.array(fingerprint["dataset"]["median_shape"])
    assert np.all(patch <= np.ceil(median / 16) * 16) and np.prod(patch) >= 64**3
    keys = {c.key for c in result.choices}
    assert "model.lesion_metrics.size_buckets_mm3" in keys or "model.lesion_metrics" in keys  # a decision either way
    assert len(result.value("model.net.strides")) >= 5  # 1 mm, >= 64 voxels per axis: 4 or more down-samplings


def test_ct_abdomen_plan_uses_ct_normalisation_from_the_foreground(tmp_path):
    result, fingerprint = plan_shared(tmp_path, "ct_abdomen", "CT_abdomen")
    assert result.value("data.intensity") == "ct"
    stats = fingerprint["dataset"]["foreground_intensity"][0]
    assert result.value("data.ct_window") == pytest.approx([stats["p0.5"], stats["p99.5"]], abs=0.1)
    assert -200 < result.value("data.ct_window")[0] < result.value("data.ct_window")[1] < 400  # soft tissue, not air or bone
    spacing = np.median([c["spacing"] for c in fingerprint["cases"]], axis=0)
    assert result.value("data.spacing") == pytest.approx(spacing.tolist(), rel=1e-3)


def test_ms_lesions_plan_lesion_size_buckets_from_many_small_components(tmp_path):
    result, fingerprint = plan_shared(tmp_path, "ms_lesions", "MS_lesions", "data.fold=0", "data.num_folds=3")
    region = fingerprint["dataset"]["regions"]["lesion"]
    assert region["components_per_case_median"] >= 10
    small, large = result.value("model.lesion_metrics.size_buckets_mm3")
    assert small < region["component_mm3_percentiles"]["50"] < large
    assert result.value("data.augment.foreground_fraction") == 0.5  # lesions are far under 1% of the voxels
