"""The evaluation core: predicted and reference label files -> per-case rows -> pooled metrics -> the report.

One code path for every number medseg reports on labelled cases: the final evaluation after training
(:mod:`medseg.final_evaluation`, on the label files it writes for the validation cases), ``medseg.evaluate``
(on any prediction folder) and ``medseg.ablation`` (on the rows they write). A prediction is always scored as the
label file a user gets, in the case's original geometry, against the original reference label file:

* :func:`score_labels`: one case's predicted and reference labels (dataset values) -> one row per region
  (:func:`medseg.metrics.cases.case_rows`: Dice, IoU, recall, precision, HD95 in mm, lesion counts under the
  configured matching rule, lesion F1, lesion Dice);
* :func:`evaluate_case`: the same from two NIfTI files (shapes and affines checked);
* :func:`summarise`: rows -> per-region means over cases and lesion detection pooled over cases
  (:func:`medseg.metrics.matching.detection_scores`, the one pooling);
* :func:`write_report`: ``evaluation.csv``, ``summary.json``, ``dice_per_case.png``, ``recall_by_lesion_size.png``.

The spacing of a case is the voxel size of its first image's header (which a prediction file keeps), the same
number post-processing turns ``min_component_mm3`` into voxels with (:func:`spacing_mm`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from medseg.data.labels import LabelSpec, check_label_values
from medseg.io import write_csv_atomic, write_json_atomic
from medseg.metrics.cases import case_rows, pooled_detection, region_means
from medseg.metrics.lesion import _ratio
from medseg.metrics.matching import MatchingRule

log = logging.getLogger("medseg")
AFFINE_TOLERANCE_MM = 1e-3
# Per-case scores averaged over cases per region (NaN left out), besides the pooled lesion scores.
CASE_MEAN_COLUMNS = ("dice", "iou", "recall", "precision", "hd95_mm", "lesion_f1")
# Numeric columns that name a row rather than measure it (cross-validation adds the fold of each case): never averaged.
IDENTIFIER_COLUMNS = frozenset({"fold"})


def spacing_mm(image: nib.Nifti1Image) -> tuple[float, float, float]:
    """Voxel size in mm along the array axes, from the header (what a prediction file written from it keeps)."""
    return tuple(float(z) for z in image.header.get_zooms()[:3])  # type: ignore[return-value]


def label_channels(image: nib.Nifti1Image, spec: LabelSpec, source: str) -> torch.Tensor:
    """Boolean channels ``(R, X, Y, Z)`` of a label image in the dataset's convention (values checked).

    Raises:
        ValueError: naming ``source``, when the file holds values outside ``spec.values`` or non-integers.
    """
    label = torch.from_numpy(np.asarray(image.dataobj)).unsqueeze(0)  # (1, X, Y, Z)
    check_label_values(label, spec, source)
    return spec.to_channels(label)


def score_labels(
    case: str,
    pred: torch.Tensor,
    ref: torch.Tensor,
    spacing: Sequence[float],
    spec: LabelSpec,
    lesion_options: Mapping[str, Any] | None,
    empty_score: float,
) -> list[dict[str, Any]]:
    """One row per region of one case.

    Args:
        pred, ref: boolean channels ``(R, X, Y, Z)`` (:meth:`medseg.data.labels.LabelSpec.to_channels` of the labels).
        spacing: mm per voxel along the three axes.
        lesion_options: ``model.lesion_metrics`` (``None``: no lesion columns).
    """
    return case_rows([case], pred[None], ref[None], torch.tensor([list(spacing)]), spec.names, lesion_options, empty_score)


def evaluate_case(case: str, pred_path: str | Path, ref_path: str | Path, spec: LabelSpec, lesion_options: Mapping[str, Any] | None, empty_score: float) -> list[dict[str, Any]]:
    """:func:`score_labels` of a prediction file against its reference label file.

    Raises:
        ValueError: naming the files, when shapes or affines differ or a file has unexpected label values.
    """
    pred_img, ref_img = nib.load(pred_path), nib.load(ref_path)
    if pred_img.shape != ref_img.shape:
        raise ValueError(f"{pred_path}: shape {pred_img.shape} differs from the reference {ref_path} {ref_img.shape}")
    if not np.allclose(pred_img.affine, ref_img.affine, atol=AFFINE_TOLERANCE_MM):
        raise ValueError(f"{pred_path}: affine differs from the reference {ref_path} (predictions must be in the reference geometry)")
    pred, ref = label_channels(pred_img, spec, str(pred_path)), label_channels(ref_img, spec, str(ref_path))
    return score_labels(case, pred, ref, spacing_mm(pred_img), spec, lesion_options, empty_score)


def score_missing_case(case: str, ref_path: str | Path, spec: LabelSpec, lesion_options: Mapping[str, Any] | None, empty_score: float) -> list[dict[str, Any]]:
    """:func:`score_labels` of an empty prediction against ``ref_path``: a case without a prediction scored as one
    that found nothing (``medseg.evaluate missing=zero``)."""
    ref_img = nib.load(ref_path)
    ref = label_channels(ref_img, spec, str(ref_path))
    return score_labels(case, torch.zeros_like(ref), ref, spacing_mm(ref_img), spec, lesion_options, empty_score)


def summarise(rows: Sequence[Mapping[str, Any]], spec: LabelSpec, lesion_options: Mapping[str, Any] | None, empty_score: float) -> dict[str, Any]:
    """The summary of per-case rows (as ``summary.json`` and a run's ``metrics.json`` hold it).

    Returns:
        ``cases``; ``metrics``: flat ``<score>_<region>`` values (voxel scores, HD95 and per-case lesion F1:
        means over cases; lesion recall, precision, F1, recall per size bucket, false positives per case and
        lesion Dice: pooled over cases) and ``dice``, ``iou``, ``recall``, ``precision`` averaged over regions;
        ``region_means`` (every numeric column's mean per region); with lesion metrics, ``lesion_matching``
        (the rule, described), ``lesion_detection`` and ``lesion_recall_by_size`` per region.
    """
    names = list(spec.names)
    numeric = [k for k, v in (rows[0] if rows else {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in IDENTIFIER_COLUMNS]
    means = region_means(rows, numeric)
    metrics: dict[str, float] = {}
    for name in names:
        for column in CASE_MEAN_COLUMNS:
            if column in means.get(name, {}):
                metrics[f"{column.replace('lesion_f1', 'lesion_f1_case_mean')}_{name}"] = means[name][column]
    for score in ("dice", "iou", "recall", "precision"):
        values = [metrics[f"{score}_{n}"] for n in names if f"{score}_{n}" in metrics and not math.isnan(metrics[f"{score}_{n}"])]
        metrics[score] = float(np.mean(values)) if values else float("nan")
    summary: dict[str, Any] = {"cases": len({r["case"] for r in rows}), "metrics": metrics, "region_means": means}
    if lesion_options is None:
        return summary
    buckets = list(lesion_options.get("bucket_names", ("small", "medium", "large")))
    summary["lesion_matching"] = MatchingRule.from_options(lesion_options).describe()
    summary["lesion_detection"], summary["lesion_recall_by_size"] = {}, {}
    for name in names:
        subset = [r for r in rows if r["region"] == name]
        detection = pooled_detection(subset, name, empty_score)
        summary["lesion_detection"][name] = detection
        metrics.update({f"{k}_{name}": float(detection[k]) for k in ("lesion_recall", "lesion_precision", "lesion_f1", "fp_per_case")})
        by_size = {}
        for b in buckets:
            detected, n_ref = (sum(float(r[f"{k}_{b}"]) for r in subset) for k in ("detected", "n_ref_lesions"))
            by_size[b] = {"detected": int(detected), "reference": int(n_ref), "recall": _ratio(detected, n_ref, empty_score)}
            metrics[f"lesion_recall_{b}_{name}"], metrics[f"n_ref_lesions_{b}_{name}"] = by_size[b]["recall"], float(n_ref)
        summary["lesion_recall_by_size"][name] = by_size
        # BraTS 2023 lesion Dice pooled over the entries (kept lesions and false positives) of every case.
        entries = np.array([float(r["n_dice_lesions"]) + float(r["n_dice_false_positives"]) for r in subset])
        scores = np.array([float(r["lesion_dice"]) for r in subset])
        metrics[f"lesion_dice_{name}"] = _ratio(float((scores * entries)[entries > 0].sum()), float(entries.sum()), empty_score)
    return summary


def write_report(rows: Sequence[Mapping[str, Any]], out: str | Path, spec: LabelSpec, lesion_options: Mapping[str, Any] | None, empty_score: float, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``evaluation.csv``, ``summary.json`` (:func:`summarise`, plus ``extra``), ``dice_per_case.png`` and (with
    lesion metrics) ``recall_by_lesion_size.png`` in ``out``; returns the summary."""
    from medseg.viz import plot_case_dice, plot_recall_by_size, save_figure  # matplotlib only when writing a report

    out = Path(out)
    summary = {**summarise(rows, spec, lesion_options, empty_score), **(extra or {})}
    write_csv_atomic(list(rows), out / "evaluation.csv")
    save_figure(plot_case_dice(rows), out / "dice_per_case.png")
    if lesion_options is not None:
        buckets = lesion_options.get("bucket_names", ("small", "medium", "large"))
        save_figure(plot_recall_by_size(rows, buckets, lesion_options.get("size_buckets_mm3", (50.0, 500.0))), out / "recall_by_lesion_size.png")
    write_json_atomic(out / "summary.json", summary)
    return summary
