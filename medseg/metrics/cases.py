"""Per-case metric rows (one per case and region), their means per region and their pooled lesion detection."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from medseg.metrics.distance import hausdorff_distance_95
from medseg.metrics.lesion import lesion_metrics
from medseg.metrics.matching import detection_scores
from medseg.metrics.voxel import confusion_counts, overlap_scores


def case_rows(
    cases: Sequence[str] | None,
    pred: Tensor,
    target: Tensor,
    spacing: Tensor | None,
    names: Sequence[str],
    lesion_options: Mapping[str, Any] | None = None,
    empty_score: float = 1.0,
    counts: Tensor | None = None,
    lesions: Sequence[Sequence[Mapping[str, Any]]] | None = None,
) -> list[dict[str, Any]]:
    """One row per case and region: voxel scores, HD95 (mm), lesion-wise metrics.

    Args:
        cases: case ids of the batch (``None``: numbered ``case0``, ``case1``, ...).
        pred, target: binary ``(B, R, *spatial)``.
        spacing: ``(B, 3)`` voxel spacing in mm (``None``: 1 mm).
        names: region names, one per channel.
        lesion_options: options of :func:`medseg.metrics.lesion.lesion_metrics`; ``None`` skips lesion columns.
        counts: ``confusion_counts(pred, target)`` ``(B, R, 3)`` when already computed
            (:attr:`medseg.metrics.voxel.OverlapMetrics.last_counts`); ``None`` computes them.
        lesions: per region, per case, the :func:`medseg.metrics.lesion.lesion_metrics` results of these masks
            with ``lesion_options`` and ``spacing`` when already computed
            (:attr:`medseg.metrics.lesion.LesionMetrics.last_cases`); ``None`` computes them.
    """
    scores = overlap_scores(confusion_counts(pred, target) if counts is None else counts, empty_score)  # each (B, R)
    spacings = spacing.tolist() if spacing is not None else [[1.0, 1.0, 1.0]] * pred.shape[0]
    rows = []
    for b in range(pred.shape[0]):
        p, t = pred[b].cpu().numpy(), target[b].cpu().numpy()
        for r, name in enumerate(names):
            row: dict[str, Any] = {"case": cases[b] if cases else f"case{b}", "region": name}
            row.update({score: float(values[b, r]) for score, values in scores.items()})
            row["reference_voxels"], row["predicted_voxels"] = int(t[r].sum()), int(p[r].sum())
            row["hd95_mm"] = hausdorff_distance_95(p[r], t[r], spacing=spacings[b])
            if lesion_options is not None:
                row.update(lesion_metrics(p[r], t[r], spacing=spacings[b], **lesion_options) if lesions is None else lesions[r][b])
            rows.append(row)
    return rows


def region_means(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> dict[str, dict[str, float]]:
    """Mean of each numeric column per region over cases (NaN values left out)."""
    means: dict[str, dict[str, float]] = {}
    for region in dict.fromkeys(r["region"] for r in rows):
        subset = [r for r in rows if r["region"] == region]
        means[region] = {}
        for column in columns:
            values = torch.tensor([float(r[column]) for r in subset if column in r], dtype=torch.float64)
            means[region][column] = float(values.nanmean()) if len(values) else float("nan")
    return means


def pooled_detection(rows: Sequence[Mapping[str, Any]], region: str, empty_score: float = 1.0) -> dict[str, float]:
    """Lesion detection of one region pooled over case rows (:func:`medseg.metrics.matching.detection_scores`:
    a ratio with no denominator takes ``empty_score``).

    Returns:
        ``lesion_recall`` (detected / reference lesions), ``lesion_precision`` (true-positive / predicted
        components), ``lesion_f1`` (of those two), ``fp_per_case`` (false-positive components, mean over cases),
        ``n_cases`` and ``n_ref_lesions``.
    """
    subset = [r for r in rows if r["region"] == region]

    def total(column: str) -> float:
        return sum(float(r[column]) for r in subset)

    scores = detection_scores(total("n_ref_lesions"), total("detected"), total("n_pred_lesions"), total("false_positives"), empty_score)
    return {
        **scores,
        "fp_per_case": total("false_positives") / len(subset) if subset else float("nan"),
        "n_cases": float(len(subset)),
        "n_ref_lesions": total("n_ref_lesions"),
    }
