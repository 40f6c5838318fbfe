"""The per-lesion table of a prediction: components, volumes, scanner-space centroids and scores."""

from __future__ import annotations

import csv

import cc3d
import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.lesion_table import COLUMNS, lesion_rows


def test_rows_give_volume_centroid_in_scanner_space_and_score():
    masks = np.zeros((1, 20, 16, 12), dtype=bool)
    masks[0, 2:4, 3:5, 4:6] = True  # 8 voxels, centre (2.5, 3.5, 4.5)
    masks[0, 10:15, 8:12, 2:5] = True  # 60 voxels, centre (12, 9.5, 3)
    probs = torch.zeros(1, 20, 16, 12)
    probs[0][masks[0]] = 0.6
    probs[0, 12, 9, 3] = 0.97
    probs[0, 3, 4, 5] = 0.8
    affine = np.array([[0.0, -2.0, 0.0, 10.0], [1.5, 0.0, 0.0, -5.0], [0.0, 0.0, 3.0, 2.0], [0, 0, 0, 1]])  # rotated, anisotropic
    rows = lesion_rows(masks, probs, ["lesion"], "sigmoid", affine, connectivity=26, score="max")
    assert [tuple(r) for r in rows] == [COLUMNS, COLUMNS] and [r["lesion"] for r in rows] == [1, 2]
    large, small = rows
    assert (large["voxels"], small["voxels"]) == (60, 8) and large["volume_mm3"] == pytest.approx(60 * 9.0) and small["volume_mm3"] == pytest.approx(72.0)
    for row, centre in ((large, (12.0, 9.5, 3.0)), (small, (2.5, 3.5, 4.5))):
        expected = affine[:3, :3] @ np.array(centre) + affine[:3, 3]
        assert (row["centroid_x_mm"], row["centroid_y_mm"], row["centroid_z_mm"]) == pytest.approx(tuple(expected), abs=1e-3)
    assert (large["score"], small["score"]) == pytest.approx((0.97, 0.8))
    mean = lesion_rows(masks, probs, ["lesion"], "sigmoid", affine, score="mean")
    assert mean[1]["score"] == pytest.approx((7 * 0.6 + 0.8) / 8)


def test_softmax_rows_score_each_class_with_its_own_probability():
    masks = np.zeros((2, 8, 8, 8), dtype=bool)
    masks[0, 1:3, 1:3, 1:3] = True
    masks[1, 5:7, 5:7, 5:7] = True
    probs = torch.full((3, 8, 8, 8), 0.1)
    probs[1][masks[0]], probs[2][masks[1]] = 0.7, 0.9
    rows = lesion_rows(masks, probs, ["anterior", "posterior"], "softmax", np.eye(4))
    assert [(r["region"], r["score"]) for r in rows] == [("anterior", pytest.approx(0.7)), ("posterior", pytest.approx(0.9))]
    with pytest.raises(ValueError, match="lesion score"):
        lesion_rows(masks, probs, ["anterior", "posterior"], "softmax", np.eye(4), score="median")


def test_predict_writes_a_table_of_the_components_of_each_written_region(brats_tree, tmp_path):
    from test_predict import predict_config, untrained_checkpoint

    from medseg.prediction import predict

    ckpt = untrained_checkpoint(tmp_path / "demo.ckpt", "+experiment=demo", "data.root=unused", "data.synthetic=null", "data.patch_size=[32,32,32]")
    out = tmp_path / "out"
    (result,) = predict(predict_config(ckpt, brats_tree / "SYN-0000", out, "lesion_table=true", "min_component_mm3=0"))
    rows = list(csv.DictReader(open(result["lesion_table"])))
    assert rows and set(rows[0]) == set(COLUMNS) and result["lesions"] == len(rows)
    labels = np.asarray(nib.load(result["prediction"]).dataobj)
    for region, values in (("wt", (1, 2, 4)), ("tc", (1, 4)), ("et", (4,))):
        expected = cc3d.connected_components(np.isin(labels, values), connectivity=26, return_N=True)[1]
        assert sum(r["region"] == region for r in rows) == expected, region
    # predicted again without tables (overwrite=true): the earlier run's table goes with its other files
    predict(predict_config(ckpt, brats_tree / "SYN-0000", out, "overwrite=true", "min_component_mm3=0"))
    assert not list((out / "lesions").glob("*.csv"))


@pytest.mark.parametrize("rule", ["one_to_one", "msseg", "overlap"])
@pytest.mark.parametrize("seed", [0, 1])
def test_rows_with_a_reference_count_what_lesion_metrics_counts(rule, seed):
    from scipy import ndimage

    from medseg.metrics.lesion import lesion_metrics
    from medseg.metrics.matching import MatchingRule

    rng = np.random.default_rng(seed)
    shape = (28, 24, 20)
    masks = (ndimage.gaussian_filter(rng.random(shape), 1.0) > 0.56)[None]
    reference = (ndimage.gaussian_filter(rng.random(shape), 1.0) > 0.56)[None]
    probs = torch.from_numpy(rng.random((1, *shape))).float()
    options = {"matching": rule, "msseg": {"min_lesion_mm3": 3.0}}
    rows = lesion_rows(masks, probs, ["lesion"], "sigmoid", np.diag([1.0, 1.0, 1.5, 1.0]), connectivity=6, reference=reference, rule=MatchingRule.from_options(options))
    expected = lesion_metrics(masks[0], reference[0], (1.0, 1.0, 1.5), connectivity=6, dilation_mm=0.0, **options)
    kinds = [r["detection"] for r in rows]
    assert kinds.count("true positive") == expected["n_pred_lesions"] - expected["false_positives"] > 0
    assert kinds.count("false positive") == expected["false_positives"]
    assert kinds.count("missed") == expected["n_ref_lesions"] - expected["detected"] > 0
    assert sum(r["lesion"] != "" for r in rows) == cc3d.connected_components(masks[0], connectivity=6, return_N=True)[1]
    ref_labels, n_ref = cc3d.connected_components(reference[0], connectivity=6, return_N=True)
    sizes = np.bincount(ref_labels.ravel())[1:]
    for row in rows:
        linked = [int(q) for q in row["reference_lesions"].split(";") if q]
        assert (row["detection"] == "true positive") <= bool(linked)  # a true positive is linked to a reference lesion
        if row["detection"] == "missed":  # a missed lesion's row describes that reference lesion
            assert linked and row["voxels"] == sorted(sizes, reverse=True)[linked[0] - 1]
        if rule == "one_to_one" and row["detection"] == "true positive":
            assert len(linked) == 1
    if rule == "one_to_one":  # one-to-one: no reference lesion is matched twice
        matched = [r["reference_lesions"] for r in rows if r["detection"] == "true positive"]
        assert len(matched) == len(set(matched))


def test_predict_with_a_reference_marks_each_lesion(brats_tree, tmp_path):
    from test_predict import predict_config, untrained_checkpoint

    from medseg.lesion_table import REFERENCE_COLUMNS
    from medseg.metrics.lesion import lesion_metrics
    from medseg.prediction import predict

    ckpt = untrained_checkpoint(tmp_path / "demo.ckpt", "+experiment=demo", "data.root=unused", "data.synthetic=null", "data.patch_size=[32,32,32]")
    (result,) = predict(predict_config(ckpt, brats_tree / "SYN-0000", tmp_path / "out", f"reference={brats_tree}", "min_component_mm3=0", "threshold=0.3"))
    rows = list(csv.DictReader(open(result["lesion_table"])))
    assert set(rows[0]) == set(COLUMNS) | set(REFERENCE_COLUMNS)
    labels = np.asarray(nib.load(result["prediction"]).dataobj)
    truth = np.asarray(nib.load(next((brats_tree / "SYN-0000").glob("*seg.nii.gz"))).dataobj)
    wt = [r for r in rows if r["region"] == "wt"]
    expected = lesion_metrics(np.isin(labels, (1, 2, 4)), np.isin(truth, (1, 2, 4)), connectivity=26, dilation_mm=0.0)  # the demo's rule: one-to-one
    assert sum(r["detection"] == "missed" for r in wt) == expected["n_ref_lesions"] - expected["detected"]
    assert sum(r["detection"] == "false positive" for r in wt) == expected["false_positives"]
    assert sum(r["detection"] == "true positive" for r in wt) == expected["n_pred_lesions"] - expected["false_positives"]
