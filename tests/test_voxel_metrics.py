"""Voxel overlap metrics against torchmetrics and a float64 formula, and the empty-mask convention."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.functional.classification import binary_jaccard_index, binary_precision, binary_recall
from torchmetrics.functional.segmentation import dice_score

from medseg.metrics.voxel import OverlapMetrics, binarize, confusion_counts, overlap_scores, target_channels


def random_masks(seed: int, shape=(3, 2, 9, 10, 11), p=0.3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < p, torch.rand(shape, generator=g) < p


@pytest.mark.parametrize("seed", range(5))
def test_per_case_scores_match_torchmetrics(seed):
    pred, target = random_masks(seed)
    scores = overlap_scores(confusion_counts(pred, target))
    reference_dice = dice_score(pred.long(), target.long(), num_classes=2, average="none", input_format="one-hot")  # (B, C)
    torch.testing.assert_close(scores["dice"], reference_dice.double(), rtol=1e-6, atol=0)
    for b in range(pred.shape[0]):
        for c in range(pred.shape[1]):
            p, t = pred[b, c].flatten(), target[b, c].flatten()
            assert scores["iou"][b, c].item() == pytest.approx(binary_jaccard_index(p.long(), t.long()).item(), rel=1e-6)
            assert scores["recall"][b, c].item() == pytest.approx(binary_recall(p.long(), t.long()).item(), rel=1e-6)
            assert scores["precision"][b, c].item() == pytest.approx(binary_precision(p.long(), t.long()).item(), rel=1e-6)


def test_class_metric_averages_cases_then_regions():
    pred, target = random_masks(7, shape=(4, 3, 8, 8, 8))
    metric = OverlapMetrics(["wt", "tc", "et"])
    metric.update(pred[:3], target[:3])
    metric.update(pred[3:], target[3:])
    result = metric.compute()
    p, t = pred.double().flatten(2), target.double().flatten(2)
    tp = (p * t).sum(-1)
    dice64 = 2 * tp / (p.sum(-1) + t.sum(-1))  # (4, 3)
    for i, name in enumerate(["wt", "tc", "et"]):
        assert result[f"dice_{name}"].item() == pytest.approx(dice64[:, i].mean().item(), rel=1e-6)
    assert result["dice"].item() == pytest.approx(dice64.mean().item(), rel=1e-6)
    assert set(result) == {f"{s}{n}" for s in ("dice", "iou", "recall", "precision") for n in ("", "_wt", "_tc", "_et")}


def test_empty_reference_and_prediction():
    empty = torch.zeros(1, 2, 4, 4, 4, dtype=torch.bool)
    target = empty.clone()
    target[0, 1, 0, 0, 0] = True  # channel 1 has a lesion the prediction misses
    scores = overlap_scores(confusion_counts(empty, target))
    assert scores["dice"].tolist() == [[1.0, 0.0]]
    assert scores["recall"].tolist() == [[1.0, 0.0]]
    assert scores["precision"].tolist() == [[1.0, 1.0]]  # nothing predicted, nothing wrongly predicted
    nan_scores = overlap_scores(confusion_counts(empty, target), empty_score=math.nan)
    assert math.isnan(nan_scores["dice"][0, 0]) and nan_scores["dice"][0, 1] == 0.0
    metric = OverlapMetrics(["a", "b"], empty_score=math.nan)
    metric.update(empty, target)
    metric.update(target, target)
    assert metric.compute()["dice_a"].isnan() and metric.compute()["dice_b"].item() == 0.5


def test_binarize_and_targets_agree_for_softmax():
    logits = torch.randn(2, 3, 5, 5, 5)
    index = logits.argmax(1, keepdim=True).float()  # (B, 1, ...) class indices as the pipeline stores them
    assert torch.equal(binarize(logits, "softmax"), target_channels(index, "softmax", 3))
    assert binarize(logits, "softmax").shape == (2, 2, 5, 5, 5)
    assert torch.equal(binarize(logits, "sigmoid"), logits > 0)


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="same shape"):
        confusion_counts(torch.zeros(1, 2, 3, 3, 3), torch.zeros(1, 3, 3, 3, 3))
    with pytest.raises(ValueError, match="expected 3 channels"):
        OverlapMetrics(["a", "b", "c"]).update(torch.zeros(1, 2, 3, 3, 3), torch.zeros(1, 2, 3, 3, 3))
