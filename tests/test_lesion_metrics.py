"""Lesion-wise metrics: known answers, an independent reference implementation, real MS masks and DDP."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from medseg.metrics.lesion import LesionMetrics, lesion_metrics, lesion_table

MS_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "MS_lesions"
NO_DICE_MIN = {"min_lesion_volume_mm3": 0.0}  # keep every lesion in the lesion Dice for hand-built cases


def _box(shape, *slices) -> np.ndarray:
    vol = np.zeros(shape, dtype=bool)
    for sl in slices:
        vol[sl] = True
    return vol


def _same(a: float, b: float) -> bool:
    """Equality that treats NaN as equal to NaN."""
    return a == b or (math.isnan(a) and math.isnan(b))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


# --- hand-built volumes with known answers -------------------------------------------------------------------


def test_two_lesions_one_missed():
    a, b = np.s_[2:5, 2:5, 2:5], np.s_[20:24, 20:24, 20:24]  # 27 and 64 voxels, far apart
    target = _box((30, 30, 30), a, b)
    pred = _box((30, 30, 30), a)
    out = lesion_metrics(pred, target, **NO_DICE_MIN)
    assert (out["n_ref_lesions"], out["n_pred_lesions"], out["detected"], out["missed"]) == (2, 1, 1, 1)
    assert out["false_positives"] == 0
    assert out["lesion_recall"] == 0.5 and out["lesion_precision"] == 1.0
    assert out["lesion_dice"] == pytest.approx((1.0 + 0.0) / 2)
    assert (out["n_ref_lesions_small"], out["detected_small"], out["lesion_recall_small"]) == (1, 1, 1.0)
    assert (out["n_ref_lesions_medium"], out["detected_medium"], out["missed_medium"]) == (1, 0, 1)
    assert out["lesion_recall_medium"] == 0.0
    assert out["n_ref_lesions_large"] == 0 and out["lesion_recall_large"] == 1.0  # empty bucket: empty_score


def test_lesion_split_in_two_predicted_components():
    target = _box((20, 20, 20), np.s_[5:10, 5:10, 5:10])  # 125 voxels
    pred = target.copy()
    pred[7] = False  # a cut plane splits the prediction into two components
    out = lesion_metrics(pred, target, matching="overlap", **NO_DICE_MIN)
    assert (out["n_ref_lesions"], out["n_pred_lesions"], out["detected"], out["false_positives"]) == (1, 2, 1, 0)
    assert out["lesion_recall"] == 1.0 and out["lesion_precision"] == 1.0
    # one to one, the second fragment is a false positive
    assert lesion_metrics(pred, target, **NO_DICE_MIN)["false_positives"] == 1
    # both fragments overlap the (dilated) lesion, so they are merged before the Dice
    assert out["lesion_dice"] == pytest.approx(_dice(pred, target))
    assert lesion_table(pred, target)[0]["n_overlapping_pred"] == 2


def test_one_false_positive():
    target = _box((30, 30, 30), np.s_[2:5, 2:5, 2:5])
    pred = _box((30, 30, 30), np.s_[2:5, 2:5, 2:4], np.s_[20:22, 20:22, 20:22])
    out = lesion_metrics(pred, target, **NO_DICE_MIN)
    assert (out["n_pred_lesions"], out["false_positives"], out["n_dice_false_positives"]) == (2, 1, 1)
    assert out["lesion_recall"] == 1.0 and out["lesion_precision"] == 0.5
    assert out["lesion_dice"] == pytest.approx(2 * 18 / (18 + 27) / 2)  # one lesion + one zero-score FP


def test_prediction_near_but_outside_a_lesion():
    # 2 voxels from the lesion: a detection false positive, but inside the 3 mm dilation, so not a Dice FP
    target = _box((20, 20, 20), np.s_[5:8, 5:8, 5:8])
    pred = _box((20, 20, 20), np.s_[10:12, 5:8, 5:8])
    out = lesion_metrics(pred, target, **NO_DICE_MIN)
    assert (out["detected"], out["false_positives"], out["n_dice_false_positives"]) == (0, 1, 0)
    assert out["lesion_dice"] == 0.0 and out["lesion_precision"] == 0.0


@pytest.mark.parametrize("empty_score", [1.0, float("nan")])
def test_empty_prediction_and_empty_reference(empty_score):
    empty = np.zeros((10, 10, 10), dtype=bool)
    out = lesion_metrics(empty, empty, empty_score=empty_score)
    counts = ("n_ref_lesions", "n_pred_lesions", "detected", "missed", "false_positives", "n_dice_lesions")
    assert all(out[k] == 0 for k in counts)
    for key in ("lesion_recall", "lesion_precision", "lesion_dice", "lesion_recall_small", "lesion_recall_large"):
        assert _same(out[key], empty_score), key


@pytest.mark.parametrize("empty_score", [1.0, float("nan")])
def test_empty_prediction_with_lesions(empty_score):
    target = _box((20, 20, 20), np.s_[2:4, 2:4, 2:4], np.s_[10:16, 10:16, 10:16])
    out = lesion_metrics(np.zeros_like(target), target, empty_score=empty_score, **NO_DICE_MIN)
    assert (out["n_ref_lesions"], out["detected"], out["missed"], out["n_pred_lesions"]) == (2, 0, 2, 0)
    assert out["lesion_recall"] == 0.0 and out["lesion_dice"] == 0.0
    assert _same(out["lesion_precision"], empty_score)  # nothing predicted


def test_prediction_without_reference_lesions():
    pred = _box((20, 20, 20), np.s_[2:4, 2:4, 2:4])
    out = lesion_metrics(pred, np.zeros_like(pred))
    assert (out["false_positives"], out["n_dice_false_positives"]) == (1, 1)
    assert out["lesion_recall"] == 1.0 and out["lesion_precision"] == 0.0 and out["lesion_dice"] == 0.0
    assert math.isnan(lesion_metrics(pred, np.zeros_like(pred), empty_score=float("nan"))["lesion_recall"])


def test_lesion_on_the_volume_border():
    target = _box((12, 12, 12), np.s_[0:3, 0:3, 0:3], np.s_[9:12, 5:8, 10:12])  # touches faces and a corner
    out = lesion_metrics(target, target, **NO_DICE_MIN)
    assert (out["n_ref_lesions"], out["detected"], out["false_positives"]) == (2, 2, 0)
    assert out["lesion_dice"] == 1.0
    rows = lesion_table(target, target)
    assert [r["bbox"] for r in rows] == [((0, 3), (0, 3), (0, 3)), ((9, 12), (5, 8), (10, 12))]
    assert rows[0]["volume_mm3"] == 27.0 and rows[1]["centroid"] == (10.0, 6.0, 10.5)


@pytest.mark.parametrize(
    ("spacing", "bucket"),
    [((1.0, 1.0, 1.0), "medium"), ((0.5, 0.5, 0.5), "small"), ((2.0, 2.0, 2.0), "large"), ((0.5, 0.5, 8.0), "medium")],
)
def test_anisotropic_spacing_moves_lesion_between_size_buckets(spacing, bucket):
    target = _box((16, 16, 16), np.s_[4:8, 4:8, 4:8])  # 64 voxels
    out = lesion_metrics(np.zeros_like(target), target, spacing=spacing)
    volume = 64 * float(np.prod(spacing))
    assert lesion_table(target, target, spacing=spacing)[0]["volume_mm3"] == volume
    for name in ("small", "medium", "large"):
        assert out[f"n_ref_lesions_{name}"] == (name == bucket)
        assert out[f"missed_{name}"] == (name == bucket)


def test_bucket_edges_are_left_closed():
    target = _box((20, 20, 20), np.s_[2:7, 2:7, 2:4])  # 50 voxels = exactly the small/medium edge
    out = lesion_metrics(target, target)
    assert (out["n_ref_lesions_small"], out["n_ref_lesions_medium"]) == (0, 1)
    custom = lesion_metrics(target, target, size_buckets_mm3=(100.0,), bucket_names=("tiny", "big"))
    assert (custom["n_ref_lesions_tiny"], custom["lesion_recall_tiny"], custom["n_ref_lesions_big"]) == (1, 1.0, 0)


@pytest.mark.parametrize(
    ("b_start", "spacing", "merged"),
    [
        (11, (1.0, 1.0, 1.0), True),  # dilated blobs reach x <= 7 and x >= 8: adjacent, one merged lesion
        (12, (1.0, 1.0, 1.0), False),  # x <= 7 and x >= 9: separate
        (11, (2.0, 1.0, 1.0), False),  # 3 mm is 1 voxel along axis 0: x <= 5 and x >= 10
        (14, (0.5, 1.0, 1.0), True),  # 3 mm is 6 voxels along axis 0: x <= 10 and x >= 8
    ],
)
def test_dilation_merges_nearby_reference_lesions(b_start, spacing, merged):
    a, b = np.s_[2:5, 4:7, 4:7], np.s_[b_start : b_start + 3, 4:7, 4:7]
    target = _box((24, 12, 12), a, b)
    pred = _box((24, 12, 12), a)  # finds lesion A only
    out = lesion_metrics(pred, target, spacing=spacing, **NO_DICE_MIN)
    assert (out["n_ref_lesions"], out["detected"]) == (2, 1)  # detection never merges
    if merged:  # one entry: Dice of A vs A + B
        assert out["n_dice_lesions"] == 1 and out["lesion_dice"] == pytest.approx(2 * 27 / (27 + 54))
    else:  # two entries: 1 and 0
        assert out["n_dice_lesions"] == 2 and out["lesion_dice"] == pytest.approx(0.5)
    groups = [r["group"] for r in lesion_table(pred, target, spacing=spacing, **NO_DICE_MIN)]
    assert (groups[0] == groups[1]) == merged
    no_dilation = lesion_metrics(pred, target, spacing=spacing, dilation_mm=0.0, **NO_DICE_MIN)
    assert no_dilation["n_dice_lesions"] == 2 and no_dilation["lesion_dice"] == pytest.approx(0.5)


def test_min_lesion_volume_ignores_small_reference_lesions_in_dice_only():
    # 27 voxels (ignored: <= 50) found by a prediction; 64 voxels (kept) missed; 50 voxels ignored (strict >)
    small, kept, edge = np.s_[2:5, 2:5, 2:5], np.s_[20:24, 20:24, 20:24], np.s_[2:7, 20:25, 20:22]
    target = _box((30, 30, 30), small, kept, edge)
    pred = _box((30, 30, 30), small)
    out = lesion_metrics(pred, target)  # default min_lesion_volume_mm3=50
    assert (out["n_ref_lesions"], out["detected"], out["n_dice_lesions"], out["n_dice_false_positives"]) == (3, 1, 1, 0)
    assert out["lesion_dice"] == 0.0  # only the missed 64-voxel lesion counts; the found one is not a FP
    rows = lesion_table(pred, target)
    assert sorted((r["n_voxels"], r["in_lesion_dice"], r["detected"]) for r in rows) == [
        (27, False, True),
        (50, False, False),
        (64, True, False),
    ]
    everything_small = lesion_metrics(pred, _box((30, 30, 30), small))
    assert everything_small["n_dice_lesions"] == 0 and everything_small["lesion_dice"] == 1.0  # no entry


def test_connectivity():
    target = np.zeros((6, 6, 6), dtype=bool)
    target[1, 1, 1] = target[2, 2, 2] = True  # touching by a corner only
    assert lesion_metrics(target, target, connectivity=26)["n_ref_lesions"] == 1
    assert lesion_metrics(target, target, connectivity=18)["n_ref_lesions"] == 2
    assert lesion_metrics(target, target, connectivity=6)["n_ref_lesions"] == 2


def test_tensor_and_integer_inputs_match_numpy():
    rng = np.random.default_rng(0)
    pred, target = _random_case(rng, (24, 20, 16))
    expected = lesion_metrics(pred, target)
    assert lesion_metrics(torch.from_numpy(pred).float(), torch.from_numpy(target).to(torch.uint8)) == expected
    assert lesion_metrics(pred.astype(np.int64), target.astype(np.float32)) == expected


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pred": np.full((4, 4, 4), 0.5)}, "binary"),
        ({"pred": np.zeros((4, 4, 5))}, "same shape"),
        ({"pred": np.zeros((4, 4))}, "same shape"),
        ({"pred": [[[0]]]}, "numpy array or torch tensor"),
        ({"connectivity": 8}, "connectivity"),
        ({"spacing": (1.0, 0.0, 1.0)}, "spacing"),
        ({"spacing": (1.0, 1.0)}, "spacing"),
        ({"size_buckets_mm3": (500.0, 50.0)}, "increasing"),
        ({"bucket_names": ("a", "b")}, "bucket_names"),
        ({"dilation_mm": -1.0}, "dilation_mm"),
    ],
)
def test_invalid_inputs_raise(kwargs, match):
    args = {"pred": np.zeros((4, 4, 4)), "target": np.zeros((4, 4, 4))} | kwargs
    with pytest.raises((ValueError, TypeError), match=match):
        lesion_metrics(**args)


# --- random blob volumes against an independent reference ----------------------------------------------------


def _random_case(rng: np.random.Generator, shape) -> tuple[np.ndarray, np.ndarray]:
    """Random ellipsoid lesions (some on the border, some close together) and a perturbed prediction."""
    grid = np.indices(shape, dtype=np.float64)  # (3, D, H, W)

    def blob(centre, radii):
        return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0

    target, pred = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool)
    for _ in range(rng.integers(0, 14)):
        centre, radii = rng.uniform(0, np.array(shape) - 1), rng.uniform(0.4, 3.5, size=3)
        target |= blob(centre, radii)
        if rng.random() < 0.7:  # detected, with a jittered position and size
            pred |= blob(centre + rng.integers(-1, 2, size=3), radii * rng.uniform(0.6, 1.4, size=3))
    for _ in range(rng.integers(0, 4)):  # false positives
        pred |= blob(rng.uniform(0, np.array(shape) - 1), rng.uniform(0.4, 2.5, size=3))
    if rng.random() < 0.5:  # a cut plane splits some predicted lesions
        pred[rng.integers(0, shape[0])] = False
    return pred, target


def _reference_lesion_metrics(pred, target, spacing, connectivity, edges, dilation_mm, min_volume):
    """Straightforward float64 re-implementation with scipy.ndimage.label, Euclidean distance maps and loops."""
    structure = ndimage.generate_binary_structure(3, {6: 1, 18: 2, 26: 3}[connectivity])
    ref_lab, n_ref = ndimage.label(target, structure)
    pred_lab, n_pred = ndimage.label(pred, structure)
    voxel = float(np.prod(np.asarray(spacing, dtype=np.float64)))

    def within(mask):  # voxels within dilation_mm of mask (Euclidean, in mm)
        if dilation_mm == 0:
            return mask
        return ndimage.distance_transform_edt(~mask, sampling=spacing) <= dilation_mm + 1e-6

    n_buckets = len(edges) + 1
    ref_counts, det_counts = [0] * n_buckets, [0] * n_buckets
    dilated = np.zeros_like(target)
    for i in range(1, n_ref + 1):
        lesion = ref_lab == i
        volume = lesion.sum() * voxel
        bucket = sum(volume >= e for e in edges)
        ref_counts[bucket] += 1
        det_counts[bucket] += int(pred[lesion].any())
        dilated |= within(lesion)
    fp = sum(1 for j in range(1, n_pred + 1) if not target[pred_lab == j].any())

    blob_lab, n_blob = ndimage.label(dilated, structure) if dilation_mm > 0 else (ref_lab, n_ref)
    scores, matched = [], set()
    for b in range(1, n_blob + 1):
        merged = target & (blob_lab == b)
        comps = set(np.unique(pred_lab[within(merged)]).tolist()) - {0}  # dilate the merged lesion itself
        matched |= comps
        predicted = np.isin(pred_lab, list(comps))
        if merged.sum() * voxel > min_volume:
            scores.append(_dice(predicted, merged))
    n_entries = len(scores) + n_pred - len(matched)
    return {
        "n_ref_lesions": n_ref,
        "n_pred_lesions": n_pred,
        "detected": sum(det_counts),
        "false_positives": fp,
        "n_dice_lesions": len(scores),
        "n_dice_false_positives": n_pred - len(matched),
        "lesion_recall": sum(det_counts) / n_ref if n_ref else 1.0,
        "lesion_precision": (n_pred - fp) / n_pred if n_pred else 1.0,
        "lesion_dice": sum(scores) / n_entries if n_entries else 1.0,
        # F1 from the counts: 2 TP / (2 TP + FN + FP) with TP counted on each side (detected references,
        # matched predictions), which is 2PR / (P + R) written without the ratios
        "lesion_f1": _f1_from_counts(sum(det_counts), n_ref, n_pred - fp, n_pred),
        "n_ref_lesions_b": ref_counts,
        "detected_b": det_counts,
    }


def _f1_from_counts(detected: int, n_ref: int, matched: int, n_pred: int) -> float:
    if n_ref == 0 or n_pred == 0:  # a ratio with no denominator takes the empty score (1.0)
        p = matched / n_pred if n_pred else 1.0
        r = detected / n_ref if n_ref else 1.0
        return 2 * p * r / (p + r) if p + r else 0.0
    # 2PR/(P+R) = 2 d m / (d n_pred + m n_ref)
    return 2 * detected * matched / (detected * n_pred + matched * n_ref) if detected and matched else 0.0


@pytest.mark.parametrize("seed", range(12))
def test_random_blobs_match_reference_implementation(seed):
    rng = np.random.default_rng(seed)
    shape = (28, 24, 20)
    pred, target = _random_case(rng, shape)
    spacing = [(1.0, 1.0, 1.0), (0.8, 1.2, 2.5), (2.0, 0.5, 1.0)][seed % 3]
    connectivity = [26, 18, 6][seed % 3 if seed < 9 else 0]
    dilation_mm = [3.0, 1.5, 0.0, 4.2][seed % 4]
    edges, names = (5.0, 30.0), ("s", "m", "l")
    out = lesion_metrics(
        pred, target, spacing, connectivity, edges, names, dilation_mm=dilation_mm, min_lesion_volume_mm3=10.0, matching="overlap"
    )  # the reference below implements the any-overlap rule (tests/test_lesion_matching.py: the other rules)
    ref = _reference_lesion_metrics(pred, target, spacing, connectivity, edges, dilation_mm, 10.0)
    for key in ("n_ref_lesions", "n_pred_lesions", "detected", "false_positives", "n_dice_lesions"):
        assert out[key] == ref[key], key
    assert out["n_dice_false_positives"] == ref["n_dice_false_positives"]
    for key in ("lesion_recall", "lesion_precision", "lesion_dice", "lesion_f1"):
        assert out[key] == pytest.approx(ref[key], rel=1e-12), key
    assert [out[f"n_ref_lesions_{n}"] for n in names] == ref["n_ref_lesions_b"]
    assert [out[f"detected_{n}"] for n in names] == ref["detected_b"]


def test_random_blobs_exercise_merges_false_positives_and_splits():
    """Guard the comparison above against testing only trivial cases."""
    merged = fps = multi = 0
    for seed in range(12):
        pred, target = _random_case(np.random.default_rng(seed), (28, 24, 20))
        out = lesion_metrics(pred, target, min_lesion_volume_mm3=0.0)
        merged += out["n_dice_lesions"] < out["n_ref_lesions"]
        fps += out["false_positives"] > 0
        multi += any(r["n_overlapping_pred"] > 1 for r in lesion_table(pred, target))
    assert merged >= 3 and fps >= 3 and multi >= 1


# --- the class metric ----------------------------------------------------------------------------------------


def _cases(n: int, shape=(20, 18, 16), seed: int = 0):
    rng = np.random.default_rng(seed)
    return [_random_case(rng, shape) for _ in range(n)]


def test_class_pools_counts_over_cases():
    cases = _cases(5)
    spacings = [(1.0, 1.0, 1.0), (0.5, 1.0, 2.0), (1.0, 1.0, 1.0), (2.0, 2.0, 1.0), (1.0, 1.0, 1.0)]
    metric = LesionMetrics(min_lesion_volume_mm3=5.0)
    preds = torch.from_numpy(np.stack([p for p, _ in cases]))  # (B, D, H, W)
    targets = torch.from_numpy(np.stack([t for _, t in cases]))
    metric.update(preds[:2, None], targets[:2, None], spacing=torch.tensor(spacings[:2]))  # (B, 1, D, H, W)
    metric.update(preds[2:3], targets[2:3])  # default spacing
    metric.update(preds[3:], targets[3:], spacing=np.array(spacings[3:]))
    out = metric.compute()

    per_case = [lesion_metrics(p, t, s, min_lesion_volume_mm3=5.0) for (p, t), s in zip(cases, spacings)]
    counts = ["n_ref_lesions", "n_pred_lesions", "detected", "missed", "false_positives", "n_dice_lesions"]
    counts += [f"{k}_{b}" for k in ("n_ref_lesions", "detected", "missed") for b in ("small", "medium", "large")]
    for key in counts:
        assert int(out[key]) == sum(c[key] for c in per_case), key
        assert out[key].dtype == torch.long
    total = lambda key: sum(c[key] for c in per_case)  # noqa: E731
    assert float(out["lesion_recall"]) == pytest.approx(total("detected") / total("n_ref_lesions"))
    n_pred = total("n_pred_lesions")
    assert float(out["lesion_precision"]) == pytest.approx((n_pred - total("false_positives")) / n_pred)
    dice_sum = sum(c["lesion_dice"] * (c["n_dice_lesions"] + c["n_dice_false_positives"]) for c in per_case)
    entries = total("n_dice_lesions") + total("n_dice_false_positives")
    assert float(out["lesion_dice"]) == pytest.approx(dice_sum / entries, rel=1e-6)
    assert float(out["lesion_dice_case_mean"]) == pytest.approx(np.mean([c["lesion_dice"] for c in per_case]))
    assert float(out["lesion_recall_case_mean"]) == pytest.approx(np.mean([c["lesion_recall"] for c in per_case]))
    precision, recall = float(out["lesion_precision"]), float(out["lesion_recall"])
    assert float(out["lesion_f1"]) == pytest.approx(2 * precision * recall / (precision + recall))  # pooled, not a mean
    assert float(out["lesion_f1_case_mean"]) == pytest.approx(np.mean([c["lesion_f1"] for c in per_case]))
    assert int(out["n_cases"]) == 5
    assert set(per_case[0]) <= set(out)


def test_the_case_rows_reuse_the_metrics_matching_and_counts():
    # What the test step does: the metrics' per-case results fill the rows, instead of a second matching.
    from medseg.metrics.cases import case_rows
    from medseg.metrics.voxel import OverlapMetrics, confusion_counts

    cases = _cases(6, seed=3)
    pred = torch.from_numpy(np.stack([p for p, _ in cases])).view(3, 2, 20, 18, 16)  # (B, R, D, H, W)
    target = torch.from_numpy(np.stack([t for _, t in cases])).view(3, 2, 20, 18, 16)
    spacing = torch.tensor([(1.0, 1.0, 1.0), (0.5, 1.0, 2.0), (2.0, 2.0, 1.0)])
    options = {"min_lesion_volume_mm3": 5.0, "empty_score": 1.0}
    overlap = OverlapMetrics(["a", "b"])
    overlap.update(pred, target)
    assert torch.equal(overlap.last_counts, confusion_counts(pred, target))
    lesions = []
    for r in range(2):
        metric = LesionMetrics(**options)
        metric.update(pred[:, r], target[:, r], spacing=spacing)
        assert metric.last_cases == [lesion_metrics(pred[b, r], target[b, r], spacing[b].tolist(), **options) for b in range(3)]
        lesions.append(metric.last_cases)
    names = ["x", "y", "z"]
    fresh = case_rows(names, pred, target, spacing, ["a", "b"], options)
    reused = case_rows(names, pred, target, spacing, ["a", "b"], options, counts=overlap.last_counts, lesions=lesions)
    assert len(fresh) == 6 and all(fresh[i].keys() == reused[i].keys() and all(_same(fresh[i][k], reused[i][k]) if isinstance(fresh[i][k], float) else fresh[i][k] == reused[i][k] for k in fresh[i]) for i in range(6))
    metric.update(pred[:1, 0], target[:1, 0])
    assert len(metric.last_cases) == 1  # the latest batch's cases only


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric LesionMetrics was called before")
def test_class_empty_convention_and_case_mean_skips_nan():
    empty = torch.zeros(1, 8, 8, 8)
    one = empty.clone()
    one[0, 2:4, 2:4, 2:4] = 1
    nan_metric = LesionMetrics(empty_score=float("nan"), min_lesion_volume_mm3=0.0)
    nan_metric.update(empty, empty)
    assert all(math.isnan(float(nan_metric.compute()[k])) for k in ("lesion_recall", "lesion_dice"))
    nan_metric.update(one, one)
    out = nan_metric.compute()
    assert float(out["lesion_dice_case_mean"]) == 1.0 and float(out["lesion_recall"]) == 1.0  # NaN case left out
    one_metric = LesionMetrics(min_lesion_volume_mm3=0.0)
    one_metric.update(torch.cat([empty, empty]), torch.cat([empty, one]))
    out = one_metric.compute()
    assert float(out["lesion_dice_case_mean"]) == 0.5 and float(out["lesion_dice"]) == 0.0
    one_metric.reset()
    assert float(one_metric.compute()["lesion_recall"]) == 1.0 and int(one_metric.compute()["n_cases"]) == 0


def test_class_rejects_bad_shapes_and_spacing():
    metric = LesionMetrics()
    with pytest.raises(ValueError, match="shape"):
        metric.update(torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 5))
    with pytest.raises(ValueError, match="shape"):
        metric.update(torch.zeros(2, 2, 4, 4, 4), torch.zeros(2, 2, 4, 4, 4))
    with pytest.raises(ValueError, match="spacing"):
        metric.update(torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 4), spacing=[(1.0, 1.0, 1.0)] * 3)
    with pytest.raises(ValueError, match="bucket_names"):
        LesionMetrics(bucket_names=("small",))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, cases, spacings, out_path: str) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        metric = LesionMetrics(min_lesion_volume_mm3=5.0)
        for i in range(rank, len(cases), world_size):  # each rank sees a different share of the cases
            pred, target = cases[i]
            metric.update(torch.from_numpy(pred)[None], torch.from_numpy(target)[None], spacing=spacings[i])
        out = metric.compute()  # torchmetrics all-reduces the sum states here
        if rank == 0:
            torch.save(out, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_equal_single_process(tmp_path):
    import torch.multiprocessing as mp

    cases = _cases(7, seed=3)
    spacings = [(1.0, 1.0, 1.0), (0.7, 0.7, 2.0)] * 4
    single = LesionMetrics(min_lesion_volume_mm3=5.0)
    for (pred, target), spacing in zip(cases, spacings):
        single.update(torch.from_numpy(pred)[None], torch.from_numpy(target)[None], spacing=spacing)
    expected = single.compute()

    out_path = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, _free_port(), cases, spacings[:7], out_path), nprocs=2, join=True)
    got = torch.load(out_path)
    assert set(got) == set(expected)
    for key, value in expected.items():
        if value.dtype == torch.long:
            assert torch.equal(got[key], value), key
        else:
            assert torch.allclose(got[key], value, rtol=1e-6), key


# --- real multiple-sclerosis lesion masks --------------------------------------------------------------------


def _ms_cases():
    if not (MS_DIR / "dataset.json").is_file():
        pytest.skip(f"real data not found: {MS_DIR.resolve()} (the shared data folder is absent)")
    import nibabel as nib

    entries = json.loads((MS_DIR / "dataset.json").read_text())["training"]
    for entry in entries:
        img = nib.load(MS_DIR / entry["label"])
        yield entry["label"], np.asarray(img.dataobj) > 0, tuple(float(z) for z in img.header.get_zooms()[:3])


@pytest.mark.realdata
def test_ms_reference_against_itself_scores_one():
    for name, mask, spacing in _ms_cases():
        out = lesion_metrics(mask, mask, spacing=spacing)
        assert 19 <= out["n_ref_lesions"] <= 98, name
        assert out["lesion_recall"] == out["lesion_precision"] == out["lesion_dice"] == 1.0, name
        assert out["false_positives"] == out["missed"] == 0, name


@pytest.mark.realdata
def test_ms_deleting_lesions_gives_recall_of_fraction_kept():
    for name, mask, spacing in _ms_cases():
        labels, n = ndimage.label(mask, ndimage.generate_binary_structure(3, 3))
        deleted = np.zeros(n + 1, dtype=bool)
        deleted[1::3] = True  # every third lesion
        pred = mask & ~deleted[labels]
        out = lesion_metrics(pred, mask, spacing=spacing)
        n_kept = n - int(deleted.sum())
        assert out["n_ref_lesions"] == n and out["detected"] == n_kept, name
        assert out["lesion_recall"] == n_kept / n, name
        assert out["lesion_precision"] == 1.0 and out["false_positives"] == 0, name
        volumes = np.bincount(labels.ravel(), minlength=n + 1) * float(np.prod(spacing))
        buckets = np.digitize(volumes, (50.0, 500.0))  # small < 50 <= medium < 500 <= large
        for i, bucket in enumerate(("small", "medium", "large")):
            in_bucket = buckets[1:] == i
            assert out[f"n_ref_lesions_{bucket}"] == in_bucket.sum(), (name, bucket)
            assert out[f"detected_{bucket}"] == (in_bucket & ~deleted[1:]).sum(), (name, bucket)
            n_b = int(in_bucket.sum())
            expected = (in_bucket & ~deleted[1:]).sum() / n_b if n_b else 1.0  # empty bucket: empty_score
            assert out[f"lesion_recall_{bucket}"] == pytest.approx(expected), (name, bucket)
