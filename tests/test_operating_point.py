"""The operating-point sweep against lesion_metrics on post-processed masks, the choice, and the train ->
checkpoint -> predict round trip of the tuned point."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import ndimage

from medseg.checkpoint_io import AtomicCheckpointIO
from medseg.metrics.lesion import lesion_metrics
from medseg.metrics.operating_point import FIELDS, OperatingPointSweep, choose_operating_point, sweep_case
from medseg.metrics.voxel import OverlapMetrics
from medseg.postprocess import CHECKPOINT_KEY, OperatingPoint, min_component_voxels, postprocess

THRESHOLDS = (0.3, 0.5, 0.7)
SIZES = (0.0, 6.0, 20.0, 60.0)
MIN_SCORES = (0.0, 0.6, 0.75)
EDGES = (10.0, 50.0)


def random_case(seed: int, regions: int = 2, shape=(24, 20, 16)):
    """Smooth random probabilities (blobs of many sizes) and a reference of random blobs, per region."""
    rng = np.random.default_rng(seed)
    probs = np.stack([ndimage.gaussian_filter(rng.random(shape), 1.2) for _ in range(regions)])
    probs = (probs - probs.min()) / (np.ptp(probs) + 1e-9)  # (R, *shape) in [0, 1]
    target = np.stack([ndimage.gaussian_filter(rng.random(shape), 1.0) > 0.56 for _ in range(regions)])
    return torch.from_numpy(probs).float(), target


RULES = {
    "one_to_one": {"matching": "one_to_one"},
    "one_to_one_ior": {"matching": "one_to_one", "match_criterion": "ior", "match_threshold": 0.3},
    "msseg": {"matching": "msseg", "msseg": {"min_lesion_mm3": 7.0}},
    "overlap": {"matching": "overlap"},
}


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sweep_counts_equal_lesion_metrics_of_the_postprocessed_mask(seed, rule):
    from medseg.metrics.matching import MatchingRule

    options = RULES[rule]
    probs, target = random_case(seed)
    spacing = (1.0, 1.5, 2.0)  # 3 mm^3 voxels: sizes are volumes, not voxel counts
    statistic = ("max", "mean")[seed % 2]
    counts = sweep_case(probs, target, "sigmoid", spacing, THRESHOLDS, SIZES, 26, EDGES, rule=MatchingRule.from_options(options), min_component_score=MIN_SCORES, component_score=statistic)
    assert counts.shape[:4] == (2, len(THRESHOLDS), len(SIZES), len(MIN_SCORES))
    checked, scored_away = 0, 0
    for i, t in enumerate(THRESHOLDS):
        for j, m in enumerate(SIZES):
            for k, c in enumerate(MIN_SCORES):
                point = OperatingPoint(("a", "b"), (t, t), (m, m), min_component_score=(c, c), component_score=statistic)
                masks = postprocess(probs, "sigmoid", point, voxel_mm3=3.0)
                for r in range(2):
                    ref = lesion_metrics(masks[r], target[r], spacing, size_buckets_mm3=EDGES, bucket_names=("tiny", "small", "big"), dilation_mm=0.0, **options)
                    tp = (masks[r] & target[r]).sum()
                    dice = 2 * tp / (masks[r].sum() + target[r].sum())
                    got = dict(zip(FIELDS, counts[r, i, j, k, : len(FIELDS)]))
                    assert (got["dice_sum"], got["dice_cases"]) == (pytest.approx(dice), 1.0)
                    assert (got["n_ref_lesions"], got["detected"], got["n_pred_lesions"], got["false_positives"]) == (ref["n_ref_lesions"], ref["detected"], ref["n_pred_lesions"], ref["false_positives"])
                    assert list(counts[r, i, j, k, len(FIELDS) :: 2]) == [ref[f"detected_{b}"] for b in ("tiny", "small", "big")]
                    checked += ref["n_pred_lesions"] > 0
                    scored_away += got["n_pred_lesions"] < counts[r, i, j, 0, FIELDS.index("n_pred_lesions")]
    assert checked > 10  # the grid is not all empty predictions
    assert scored_away > 3  # and the score filter removes components somewhere on it


def test_component_scores_against_a_per_component_loop():
    from medseg.postprocess import component_scores, filter_components

    rng = np.random.default_rng(3)
    probability = rng.random((20, 18, 16))
    mask = ndimage.gaussian_filter(rng.random((20, 18, 16)), 1.0) > 0.55
    components, n = ndimage.label(mask)
    assert n > 5
    for statistic, reduce in (("max", np.max), ("mean", np.mean)):
        expected = np.array([reduce(probability[components == k]) for k in range(1, n + 1)])
        np.testing.assert_allclose(component_scores(components, n, probability, statistic), expected, rtol=1e-12)
    # a 6-connected labelling (scipy's default) and the filter's agree: kept = components scoring >= 0.9
    scores = component_scores(components, n, probability, "max")
    kept = filter_components(mask, 0, 6, probability.astype(np.float32), 0.9, "max")
    np.testing.assert_array_equal(kept, np.isin(components, 1 + np.flatnonzero(scores >= 0.9)))
    assert 0 < kept.sum() < mask.sum()
    with pytest.raises(ValueError, match="probabilities"):
        filter_components(mask, 0, 6, None, 0.5)


def test_softmax_sweep_uses_the_argmax_once():
    rng = np.random.default_rng(5)
    logits = torch.from_numpy(ndimage.gaussian_filter(rng.standard_normal((3, 16, 16, 16)), (0, 1.5, 1.5, 1.5)) * 8)
    probs = torch.softmax(logits, 0).float()
    target = np.stack([ndimage.gaussian_filter(rng.random((16, 16, 16)), 1.0) > 0.55 for _ in range(2)])
    counts = sweep_case(probs, target, "softmax", (1, 1, 1), THRESHOLDS, SIZES, 26)
    assert counts.shape[1] == 1
    for j, m in enumerate(SIZES):
        masks = postprocess(probs, "softmax", OperatingPoint(("x", "y"), (0.5, 0.5), (m, m)), 1.0)
        for r in range(2):
            ref = lesion_metrics(masks[r], target[r], size_buckets_mm3=(), bucket_names=("all",), dilation_mm=0.0)
            got = dict(zip(FIELDS, counts[r, 0, j, 0]))
            assert (got["detected"], got["false_positives"]) == (ref["detected"], ref["false_positives"])


def test_metric_pools_cases_and_chooses_the_best_point():
    from medseg.metrics.matching import MatchingRule

    options = RULES["one_to_one_ior"]
    sweep = OperatingPointSweep(("a", "b"), "sigmoid", THRESHOLDS, SIZES, size_buckets_mm3=EDGES, bucket_names=("tiny", "small", "big"), rule=MatchingRule.from_options(options))
    cases = [random_case(s) for s in (10, 11, 12)]
    for probs, target in cases:
        sweep.update(probs[None], torch.from_numpy(target)[None], torch.tensor([[1.0, 1.0, 1.0]]))
    scores = sweep.compute()
    for criterion in ("dice", "lesion_f1"):
        point = sweep.choose(criterion)
        for r, name in enumerate(("a", "b")):
            i, j = THRESHOLDS.index(point.threshold[r]), SIZES.index(point.min_component_mm3[r])
            assert scores[criterion][r, i, j, 0] == pytest.approx(scores[criterion][r].max().item())
            assert point.score[r] == pytest.approx(scores[criterion][r].max().item())
    # pooled F1 from the per-case lesion metrics at one grid point
    n_ref = detected = n_pred = fp = 0
    for probs, target in cases:
        masks = postprocess(probs, "sigmoid", OperatingPoint(("a", "b"), (0.5, 0.5), (20.0, 20.0)), 1.0)
        ref = lesion_metrics(masks[0], target[0], dilation_mm=0.0, **options)
        n_ref, detected, n_pred, fp = n_ref + ref["n_ref_lesions"], detected + ref["detected"], n_pred + ref["n_pred_lesions"], fp + ref["false_positives"]
    precision, recall = (n_pred - fp) / n_pred, detected / n_ref
    assert detected > 0
    assert scores["lesion_f1"][0, 1, 2, 0].item() == pytest.approx(2 * precision * recall / (precision + recall))
    rows = sweep.table()
    assert len(rows) == 2 * len(THRESHOLDS) * len(SIZES) and {"lesion_recall_tiny", "fp_per_case", "lesion_f1"} <= set(rows[0])


def test_ties_go_to_the_default_point_and_bad_criteria_fail():
    flat = np.ones((1, 3, 4))
    point = choose_operating_point(flat, "dice", ["r"], THRESHOLDS, SIZES)
    assert (point.threshold, point.min_component_mm3) == ((0.5,), (0.0,))
    point = choose_operating_point(flat, "dice", ["r"], THRESHOLDS, SIZES, default_threshold=0.3)  # model.threshold 0.3
    assert point.threshold == (0.3,)
    with pytest.raises(ValueError, match="criterion"):
        choose_operating_point(flat, "accuracy", ["r"], THRESHOLDS, SIZES)
    # with a score axis: ties to no score filter; a strict maximum anywhere wins
    grid = np.ones((1, 3, 4, 3))
    point = choose_operating_point(grid, "lesion_f1", ["r"], THRESHOLDS, SIZES, 0.5, MIN_SCORES, "mean")
    assert (point.threshold, point.min_component_mm3, point.min_component_score, point.component_score) == ((0.5,), (0.0,), (0.0,), "mean")
    grid[0, 0, 2, 2] = 1.5
    point = choose_operating_point(grid, "lesion_f1", ["r"], THRESHOLDS, SIZES, 0.5, MIN_SCORES)
    assert (point.threshold, point.min_component_mm3, point.min_component_score, point.score) == ((0.3,), (20.0,), (0.75,), (1.5,))


def test_nan_empty_score_leaves_empty_cases_out_of_the_dice_as_overlap_metrics_do():
    # Case A: a lesion predicted at 0.9. Case B: no lesion, one voxel at 0.3. At threshold 0.5 case B is
    # empty-empty (NaN, left out): Dice 1.0 from case A alone; at 0.2 case B is a false positive (Dice 0).
    shape = (8, 8, 8)
    probs_a, target_a = torch.zeros(1, *shape), np.zeros((1, *shape), dtype=bool)
    probs_a[0, 2:5, 2:5, 2:5], target_a[0, 2:5, 2:5, 2:5] = 0.9, True
    probs_b, target_b = torch.zeros(1, *shape), np.zeros((1, *shape), dtype=bool)
    probs_b[0, 6, 6, 6] = 0.3
    sweep = OperatingPointSweep(("lesion",), "sigmoid", (0.2, 0.5), (0.0,), empty_score=float("nan"))
    for probs, target in ((probs_a, target_a), (probs_b, target_b)):
        sweep.update(probs[None], torch.from_numpy(target)[None])
    dice = sweep.compute()["dice"][0, :, 0, 0]
    for i, t in enumerate((0.2, 0.5)):
        overlap = OverlapMetrics(["lesion"], empty_score=float("nan"))
        for probs, target in ((probs_a, target_a), (probs_b, target_b)):
            overlap.update((probs[None] > t), torch.from_numpy(target)[None])
        assert dice[i].item() == pytest.approx(overlap.compute()["dice"].item())
    assert sweep.choose("dice").threshold == (0.5,)


def test_a_component_at_the_size_limit_is_kept_whatever_the_float_precision():
    # 25 voxels of 0.6 x 0.6 x 1.3 mm = 11.7 mm^3: exactly the limit, computed in float32 and float64.
    spacing = (0.6, 0.6, 1.3)
    v64, v32 = float(np.prod(spacing)), float(torch.tensor(spacing).prod())
    assert min_component_voxels(11.7, v64) == min_component_voxels(11.7, v32) == 25
    assert min_component_voxels(11.7 * 1.001, v64) == 26 and min_component_voxels(0.0, v64) == 0
    probs, target = torch.zeros(1, 10, 10, 10), np.zeros((1, 10, 10, 10), dtype=bool)
    probs[0, 1:6, 1:6, 1] = 0.9  # 25 voxels
    target[0, 1:6, 1:6, 1] = True
    point = OperatingPoint(("lesion",), (0.5,), (11.7,))
    for voxel_mm3 in (v64, v32):
        assert postprocess(probs, "sigmoid", point, voxel_mm3).sum() == 25
    counts = dict(zip(FIELDS, sweep_case(probs, target, "sigmoid", spacing, (0.5,), (11.7,))[0, 0, 0, 0]))
    assert (counts["n_pred_lesions"], counts["dice_sum"]) == (1, pytest.approx(1.0))
    with pytest.raises(ValueError, match="voxel volume"):
        min_component_voxels(1.0, 0.0)


def test_operating_point_round_trip_and_validation():
    point = OperatingPoint(("wt", "tc"), (0.4, 0.6), (10.0, 0.0), "lesion_f1", (0.5, 0.7), min_component_score=(0.8, 0.0), component_score="mean")
    assert OperatingPoint.from_dict(json.loads(json.dumps(point.to_dict()))) == point
    assert point.with_overrides(threshold=0.3) == OperatingPoint(("wt", "tc"), (0.3, 0.3), (10.0, 0.0), min_component_score=(0.8, 0.0), component_score="mean")
    assert point.with_overrides(min_component_score=0.9).min_component_score == (0.9, 0.9)
    # a point stored before the component score: no score filter
    old = {"criterion": "dice", "regions": {"wt": {"threshold": 0.4, "min_component_mm3": 10.0}}}
    assert OperatingPoint.from_dict(old) == OperatingPoint(("wt",), (0.4,), (10.0,), "dice") and OperatingPoint.from_dict(old).min_component_score == (0.0,)
    with pytest.raises(ValueError, match="min_component_score in"):
        OperatingPoint(("a",), (0.5,), (0.0,), min_component_score=(1.5,))
    with pytest.raises(ValueError, match="component_score one of"):
        OperatingPoint(("a",), (0.5,), (0.0,), component_score="median")
    with pytest.raises(ValueError, match="thresholds in"):
        OperatingPoint(("a",), (1.0,), (0.0,))
    with pytest.raises(ValueError, match="one threshold"):
        OperatingPoint(("a", "b"), (0.5,), (0.0, 0.0))


@pytest.mark.slow
def test_training_tunes_stores_and_prediction_applies_the_point(brats_tree, tmp_path):
    from test_train import tiny_run

    from medseg.prediction import load_model, predict
    from medseg.config import compose
    from medseg.training import train

    run = tmp_path / "run"
    # One region (whole tumour): regions filtered independently, as the sweep counts them, so the sweep's values at a
    # point are those of the label files written at it (nested regions are kept nested in the files).
    cfg = tiny_run(
        brats_tree, run, "trainer.max_epochs=4", "trainer.check_val_every_n_epoch=4", "model.operating_point.criterion=lesion_f1", "data.labels.names=[wt]",
        "model.operating_point.thresholds=[0.2,0.5,0.8]", "model.operating_point.min_component_mm3=[0,100,1000]",
    )
    metrics = train(cfg)
    chosen = json.loads((run / "operating_point.json").read_text())
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["operating_point"]["regions"] == chosen["regions"] and chosen["criterion"] == "lesion_f1"
    sweep = list(csv.DictReader((run / "operating_point_sweep.csv").open()))
    assert len(sweep) == 1 * 3 * 3  # regions x thresholds x sizes
    before = summary["before_postprocessing"]
    for region, values in chosen["regions"].items():
        best = max(float(r["lesion_f1"]) for r in sweep if r["region"] == region)
        assert values["score"] == pytest.approx(best)
        default = next(r for r in sweep if r["region"] == region and float(r["threshold"]) == 0.5 and float(r["min_component_mm3"]) == 0)
        assert before[f"lesion_f1_{region}"] == pytest.approx(float(default["lesion_f1"]))  # the untuned point's files
        assert before[f"fp_per_case_{region}"] == pytest.approx(float(default["fp_per_case"]))
        assert metrics[f"final_val/lesion_f1_{region}"] == pytest.approx(best)  # the chosen point's files
    assert (run / "validation" / "evaluation_before_postprocessing" / "evaluation.csv").is_file() and (run / "operating_point_sweep.png").stat().st_size > 0
    checkpoint = AtomicCheckpointIO().load_checkpoint(summary["checkpoint"])
    assert checkpoint[CHECKPOINT_KEY]["regions"] == chosen["regions"]
    model, _ = load_model(summary["checkpoint"])
    assert model.postprocessing == OperatingPoint.from_dict(chosen)
    assert model.connectivity == 26
    # Training on from the tuned weights (resume, fine-tune) keeps the configured point.
    untuned = OperatingPoint.uniform(model.label_spec.names, model.hparams.threshold)
    model.postprocessing, model._trainer = untuned, SimpleNamespace(state=SimpleNamespace(fn="fit"))
    model.on_load_checkpoint(checkpoint)
    assert model.postprocessing == untuned
    model._trainer = None
    model.on_load_checkpoint(checkpoint)
    assert model.postprocessing == OperatingPoint.from_dict(chosen)

    case = sorted(p for p in brats_tree.iterdir() if p.is_dir())[0]
    common = [f"ckpt_path={summary['checkpoint']}", f"input={case}"]
    predict(compose("predict", [*common, f"output={tmp_path / 'tuned'}"]))
    options = json.loads((tmp_path / "tuned" / "predictions.json").read_text())["options"]
    assert options["operating_point"]["regions"] == chosen["regions"]
    predict(compose("predict", [*common, f"output={tmp_path / 'overridden'}", "threshold=0.5", "min_component_mm3=0"]))
    options = json.loads((tmp_path / "overridden" / "predictions.json").read_text())["options"]
    assert {v["threshold"] for v in options["operating_point"]["regions"].values()} == {0.5}


def test_sweep_picture_shows_the_score_axis_and_the_chosen_point():
    from medseg.viz import plot_operating_point

    sweep = OperatingPointSweep(("a", "b"), "sigmoid", THRESHOLDS, SIZES, size_buckets_mm3=EDGES, bucket_names=("tiny", "small", "big"), min_component_score=MIN_SCORES)
    for seed in (20, 21):
        probs, target = random_case(seed)
        sweep.update(probs[None], torch.from_numpy(target)[None])
    rows, point = sweep.table(), sweep.choose("lesion_f1")
    fig = plot_operating_point(rows, point.to_dict()["regions"], "lesion_f1")
    axes = fig.axes
    assert len(axes) == 2 * 4 and axes[3].get_xlabel() == "minimum component score"  # a score panel per region
    circled = axes[3].lines[-1]  # the chosen point, circled at its score and criterion value
    assert (circled.get_xdata()[0], circled.get_ydata()[0]) == pytest.approx((point.min_component_score[0], point.score[0]))
    single = OperatingPointSweep(("a",), "sigmoid", THRESHOLDS, SIZES)
    single.update(*(x[None] for x in (random_case(22, regions=1)[0], torch.from_numpy(random_case(22, regions=1)[1]))))
    assert len(plot_operating_point(single.table(), single.choose("dice").to_dict()["regions"], "dice").axes) == 3  # no score axis: no panel
