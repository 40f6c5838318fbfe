"""Lesion matching rules: one-to-one against panoptica, the MSSEG rules against a float64 loop written from the
Anima definitions, known answers (a flood, fragments, perfect and empty predictions), and the one pooling."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from medseg.metrics.lesion import lesion_metrics
from medseg.metrics.matching import MatchingRule, detection_scores

STRUCTURE_26 = np.ones((3, 3, 3), bool)


def ball(shape, centre, radius) -> np.ndarray:
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


def lesion_scene(seed: int, shape=(48, 48, 40), n_lesions: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Many small reference lesions (1 to ~100 voxels) and a prediction that finds, shifts, shrinks, grows, splits
    and merges them, plus false positives: every matching situation occurs."""
    rng = np.random.default_rng(seed)
    ref, pred = np.zeros(shape, bool), np.zeros(shape, bool)
    for _ in range(n_lesions):
        centre = rng.uniform(3, np.array(shape) - 3)
        radius = rng.choice([0.5, 0.9, 1.2, 1.8, 2.5, 3.0, 4.0])
        ref |= ball(shape, centre, radius)
        action = rng.random()
        if action < 0.55:  # found: shifted and rescaled
            pred |= ball(shape, centre + rng.normal(0, 0.5, 3), radius * rng.uniform(0.7, 1.4))
        elif action < 0.7:  # split into two fragments
            for side in (-1, 1):
                pred |= ball(shape, centre + side * np.array([radius * 0.8, 0, 0]), max(radius * 0.45, 0.5))
        elif action < 0.8:  # a large blob covering it and its surroundings
            pred |= ball(shape, centre + rng.normal(0, 1.0, 3), radius * 2.5 + 1)
    for _ in range(n_lesions // 3):  # false positives
        pred |= ball(shape, rng.uniform(3, np.array(shape) - 3), rng.choice([0.5, 1.0, 1.5, 2.0]))
    return pred, ref


def labelled(mask: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """6- or 26-connected components with scipy (independent of cc3d, which medseg uses)."""
    return ndimage.label(mask, structure=STRUCTURE_26 if connectivity == 26 else ndimage.generate_binary_structure(3, 1))


def overlap_matrix(pred: np.ndarray, ref: np.ndarray):
    """Dense float64 tables of the two labellings: sizes and the intersection of every (reference, prediction) pair."""
    pred_labels, n_pred = labelled(pred)
    ref_labels, n_ref = labelled(ref)
    inter = np.zeros((n_ref + 1, n_pred + 1))  # row/col 0: background
    np.add.at(inter, (ref_labels.ravel(), pred_labels.ravel()), 1.0)
    return inter, n_ref, n_pred


# --- one-to-one --------------------------------------------------------------------------------------------------


def panoptica_counts(pred: np.ndarray, ref: np.ndarray, threshold: float) -> tuple[int, int, int]:
    from panoptica import ConnectedComponentsInstanceApproximator, InputType, MaxBipartiteMatching, Metric, Panoptica_Evaluator
    from panoptica.utils.citation_reminder import disable_citation_reminder

    disable_citation_reminder()
    evaluator = Panoptica_Evaluator(
        expected_input=InputType.SEMANTIC,
        instance_approximator=ConnectedComponentsInstanceApproximator(),
        instance_matcher=MaxBipartiteMatching(matching_metric=Metric.IOU, matching_threshold=threshold),
        instance_metrics=[Metric.IOU],
        global_metrics=[],
    )
    result = evaluator.evaluate(pred.astype(np.uint8), ref.astype(np.uint8), verbose=False)
    result = next(iter(result.values())) if isinstance(result, dict) else result
    return int(result.tp), int(result.fp), int(result.fn)


@pytest.mark.parametrize("threshold", [0.1, 0.3, 0.5])
@pytest.mark.parametrize("seed", range(6))
def test_one_to_one_iou_equals_panoptica_max_bipartite_matching(seed, threshold):
    pytest.importorskip("panoptica", reason="panoptica is the independent reference (pip install -e '.[dev]')")
    pred, ref = lesion_scene(seed)
    got = lesion_metrics(pred, ref, matching="one_to_one", match_criterion="iou", match_threshold=threshold, dilation_mm=0.0)
    tp, fp, fn = panoptica_counts(pred, ref, threshold)
    assert tp >= 1 and fp >= 10 and fn >= 10  # a scene with every kind of pair
    assert (got["detected"], got["false_positives"], got["missed"]) == (tp, fp, fn)
    assert got["n_pred_lesions"] - got["false_positives"] == got["detected"]  # one-to-one: TPs are the same on both sides
    assert got["lesion_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))


@pytest.mark.parametrize("criterion, threshold", [("ior", 0.1), ("ior", 0.5), ("iou", 0.2)])
@pytest.mark.parametrize("seed", range(4))
def test_one_to_one_equals_a_dense_assignment_of_all_components(seed, criterion, threshold):
    """The same assignment solved once on the dense (reference x prediction) score matrix of scipy labellings."""
    pred, ref = lesion_scene(seed + 10)
    inter, n_ref, n_pred = overlap_matrix(pred, ref)
    ref_size, pred_size = inter[1:].sum(1), inter[:, 1:].sum(0)
    pair = inter[1:, 1:]
    score = pair / (ref_size[:, None] + pred_size[None, :] - pair) if criterion == "iou" else pair / ref_size[:, None]
    eligible = (pair > 0) & (score >= threshold)
    weights = np.where(eligible, score, 0.0)
    rows, cols = linear_sum_assignment(weights, maximize=True)
    tp = int(eligible[rows, cols].sum())
    got = lesion_metrics(pred, ref, match_criterion=criterion, match_threshold=threshold, dilation_mm=0.0)
    assert (got["n_ref_lesions"], got["n_pred_lesions"]) == (n_ref, n_pred)
    assert (got["detected"], got["false_positives"]) == (tp, n_pred - tp)


def test_a_flood_covering_n_lesions_scores_at_most_2_over_n_plus_1():
    shape = (40, 40, 20)
    ref = np.zeros(shape, bool)
    centres = [(x, y, 10) for x in (8, 20, 32) for y in (8, 20, 32)]
    for c in centres:
        ref |= ball(shape, c, 2)
    flood = np.zeros(shape, bool)
    flood[2:38, 2:38, 6:14] = True  # one component touching all 9 lesions
    n = len(centres)
    for options in ({"match_criterion": "iou"}, {"match_criterion": "ior", "match_threshold": 0.1}, {"matching": "msseg"}):
        got = lesion_metrics(flood, ref, dilation_mm=0.0, **options)
        assert got["lesion_f1"] <= 2 / (n + 1) + 1e-12, options
    assert lesion_metrics(flood, ref, match_criterion="ior", match_threshold=0.1, dilation_mm=0.0)["lesion_f1"] == pytest.approx(2 / (n + 1))
    assert lesion_metrics(flood, ref, matching="overlap", dilation_mm=0.0)["lesion_f1"] == 1.0  # why the overlap rule is gameable


def test_two_fragments_of_one_lesion_are_one_true_positive_and_one_false_positive():
    shape = (30, 20, 20)
    ref = np.zeros(shape, bool)
    ref[5:25, 8:12, 8:12] = True  # a 320-voxel lesion
    pred = np.zeros(shape, bool)
    pred[5:14, 8:12, 8:12] = True
    pred[16:25, 8:12, 8:12] = True  # two fragments of 144 voxels (IoU 0.45 each)
    got = lesion_metrics(pred, ref, dilation_mm=0.0)
    assert (got["detected"], got["missed"], got["n_pred_lesions"], got["false_positives"]) == (1, 0, 2, 1)
    assert got["lesion_f1"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 0))


def test_a_small_lesion_found_with_a_boundary_error_is_detected_at_the_default_threshold():
    shape = (12, 12, 12)
    ref = np.zeros(shape, bool)
    ref[5, 5, 4:9] = True  # 5 voxels
    pred = np.zeros(shape, bool)
    pred[5, 5, 5:9] = True
    pred[5, 6, 5:9] = True  # 8 voxels sharing 4: IoU 4/9
    assert lesion_metrics(pred, ref, dilation_mm=0.0)["detected"] == 1
    assert lesion_metrics(pred, ref, match_threshold=0.5, dilation_mm=0.0)["detected"] == 0


@pytest.mark.parametrize("matching", ["one_to_one", "msseg", "overlap"])
@pytest.mark.parametrize("empty_score", [1.0, float("nan")])
def test_perfect_and_empty_predictions(matching, empty_score):
    pred, ref = lesion_scene(3)
    perfect = lesion_metrics(ref, ref, matching=matching, empty_score=empty_score)
    assert (perfect["lesion_recall"], perfect["lesion_precision"], perfect["lesion_f1"]) == (1.0, 1.0, 1.0)
    nothing = np.zeros_like(ref)
    empty = lesion_metrics(nothing, nothing, matching=matching, empty_score=empty_score)
    for key in ("lesion_recall", "lesion_precision", "lesion_f1"):
        assert empty[key] == empty_score or (math.isnan(empty_score) and math.isnan(empty[key]))
    missed = lesion_metrics(nothing, ref, matching=matching, empty_score=empty_score)
    assert missed["lesion_recall"] == 0.0 and missed["detected"] == 0


# --- MSSEG (Anima) -----------------------------------------------------------------------------------------------


def anima_reference(pred: np.ndarray, ref: np.ndarray, voxel_mm3: float, alpha=0.1, beta=0.7, gamma=0.65, min_mm3=3.0, connectivity: int = 26) -> dict[str, int]:
    """The detection rules of Anima's animaSegPerfAnalyzer (Commowick et al. 2018, section "Detection"), as loops.

    Components of volume <= min_mm3 are removed from both masks (Anima keeps components of at least
    floor(min / voxel) + 1 voxels). A lesion of one side is a true positive when the other side covers more than
    alpha of it and, taking the other side's overlapping components by decreasing overlap until at least gamma of
    the covered part is accounted for, none has more than beta of its voxels outside every lesion of this side.
    """
    min_voxels = math.floor(min_mm3 / voxel_mm3) + 1

    def clean(mask):
        labels, n = labelled(mask, connectivity)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        keep = sizes >= min_voxels
        keep[0] = False
        return labelled(keep[labels], connectivity)

    ref_labels, n_ref = clean(ref)
    pred_labels, n_pred = clean(pred)
    table = np.zeros((n_ref + 1, n_pred + 1), dtype=np.float64)  # [0, :] and [:, 0]: background
    for i, j in zip(ref_labels.ravel(), pred_labels.ravel()):
        table[i, j] += 1.0

    def true_positives(table: np.ndarray) -> int:
        n_own, n_other = table.shape[0] - 1, table.shape[1] - 1
        other_sizes = table[:, 1:].sum(0)  # (n_other,)
        count = 0
        for i in range(1, n_own + 1):
            covered = table[i, 1:].sum()
            size = table[i].sum()
            if not covered / size > alpha:
                continue
            overlapping = sorted(((table[i, j], -j) for j in range(1, n_other + 1) if table[i, j] > 0), reverse=True)
            total, positive = 0.0, True
            for inter, neg_j in overlapping:
                j = -neg_j
                if table[0, j] / other_sizes[j - 1] > beta:  # too much of that component outside this side's lesions
                    positive = False
                    break
                total += inter / covered
                if total >= gamma:  # Anima: while (sum < gamma) ...
                    break
            count += positive
        return count

    return {"n_ref_lesions": n_ref, "detected": true_positives(table), "n_pred_lesions": n_pred, "true_pred": true_positives(table.T.copy())}


@pytest.mark.parametrize("seed", range(8))
def test_msseg_rule_equals_a_loop_written_from_the_anima_definitions(seed):
    pred, ref = lesion_scene(seed + 20)
    spacing = (1.0, 1.0, 1.5)  # 1.5 mm^3 voxels: the 3 mm^3 limit drops components of 1 and 2 voxels
    expected = anima_reference(pred, ref, 1.5)
    got = lesion_metrics(pred, ref, spacing, matching="msseg", dilation_mm=0.0)
    assert (got["n_ref_lesions"], got["detected"], got["n_pred_lesions"]) == (expected["n_ref_lesions"], expected["detected"], expected["n_pred_lesions"])
    assert got["n_pred_lesions"] - got["false_positives"] == expected["true_pred"]
    assert 0 < expected["detected"] < expected["n_ref_lesions"] and 0 < expected["true_pred"] < expected["n_pred_lesions"]  # not a trivial case
    p, r = expected["true_pred"] / expected["n_pred_lesions"], expected["detected"] / expected["n_ref_lesions"]
    assert got["lesion_f1"] == pytest.approx(2 * p * r / (p + r))


def test_msseg_ignores_lesions_of_at_most_3_mm3():
    shape = (10, 10, 10)
    ref = np.zeros(shape, bool)
    ref[2, 2, 2:5] = True  # 3 voxels = 3 mm^3: ignored
    ref[6, 6, 2:6] = True  # 4 voxels: counted
    got = lesion_metrics(np.zeros(shape, bool), ref, matching="msseg")
    assert got["n_ref_lesions"] == 1 and lesion_metrics(np.zeros(shape, bool), ref, matching="one_to_one")["n_ref_lesions"] == 2


# --- options and pooling -----------------------------------------------------------------------------------------


def test_bad_matching_options_are_refused():
    with pytest.raises(ValueError, match="lesion matching"):
        MatchingRule(matching="touching")
    with pytest.raises(ValueError, match="match_criterion"):
        MatchingRule(match_criterion="dice")
    with pytest.raises(ValueError, match="match_threshold"):
        MatchingRule(match_threshold=1.5)
    with pytest.raises(ValueError, match="msseg options"):
        MatchingRule.from_options({"matching": "msseg", "msseg": {"alpah": 0.1}})


def test_detection_scores_is_one_formula_for_numbers_and_arrays():
    assert detection_scores(4, 3, 5, 1, 1.0) == {"lesion_recall": 0.75, "lesion_precision": 0.8, "lesion_f1": pytest.approx(2 * 0.8 * 0.75 / 1.55)}
    assert detection_scores(0, 0, 0, 0, 1.0)["lesion_f1"] == 1.0  # nothing to find, nothing predicted
    assert detection_scores(0, 0, 3, 3, 1.0)["lesion_f1"] == 0.0  # only false positives
    assert math.isnan(detection_scores(0, 0, 0, 0, float("nan"))["lesion_f1"])
    grid = detection_scores(np.array([[4, 0]]), np.array([[3, 0]]), np.array([[5, 3]]), np.array([[1, 3]]), 1.0)
    assert grid["lesion_f1"].shape == (1, 2) and grid["lesion_f1"][0, 0] == pytest.approx(detection_scores(4, 3, 5, 1)["lesion_f1"]) and grid["lesion_f1"][0, 1] == 0.0


def test_msseg_stops_looking_once_gamma_of_the_covered_part_is_accounted_for():
    """Anima examines the next overlapping component only while the share accounted for is below gamma: a lesion
    covered 13 of 20 voxels (exactly 0.65) by a clean component is detected, whatever the next component is."""
    shape = (40, 8, 8)
    ref = np.zeros(shape, bool)
    ref[10:24, 4, 4] = True  # 14 voxels ...
    ref[23:30, 4, 5] = True  # ... and 7 more: one 6-connected lesion of 21 voxels
    pred = np.zeros(shape, bool)
    pred[10:23, 4, 4] = True  # A: 13 voxels, all inside
    pred[23:30, 4, 5] = True  # B: 7 voxels inside (diagonal to A: another 6-connected component) ...
    pred[30:38, 2:7, 5] = True  # ... and 40 outside (85%)
    expected = anima_reference(pred, ref, 1.0, connectivity=6)
    got = lesion_metrics(pred, ref, matching="msseg", dilation_mm=0.0, connectivity=6)
    assert (got["n_ref_lesions"], got["n_pred_lesions"]) == (1, 2)
    assert got["detected"] == expected["detected"] == 1
    assert lesion_metrics(pred, ref, matching="msseg", dilation_mm=0.0, connectivity=6, msseg={"gamma": 0.7})["detected"] == 0  # B examined: too far outside
