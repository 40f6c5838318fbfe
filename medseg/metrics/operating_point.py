"""Operating-point sweep: Dice and lesion detection at every (threshold, minimum component size) pair.

For each validation case and region, the prediction is thresholded at every threshold of the grid (softmax:
the argmax, once) and its connected components are labelled ONCE per threshold; every minimum component size
of the grid then only drops components by size, so a grid of T thresholds x M sizes costs T labellings, not
T x M. Per grid point the counts are exactly those of :func:`medseg.metrics.lesion.lesion_metrics` on the
post-processed mask (tested): a reference lesion is detected when a kept predicted component overlaps it, a
kept component overlapping no reference voxel is a false positive.

:class:`OperatingPointSweep` sums these counts over cases (exact under DDP) and :func:`choose_operating_point`
picks, per region, the pair maximising the criterion: ``"dice"`` (mean voxel Dice over cases) or
``"lesion_f1"`` (pooled detection F1). Ties go to the pair nearest the untuned default (``model.threshold``,
no size filter), so that a flat criterion changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import cc3d
import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from medseg.metrics.lesion import _ratio, lesion_f1, validate_spacing
from medseg.postprocess import OperatingPoint, foreground_masks, min_component_voxels

CRITERIA = ("dice", "lesion_f1")
# Count fields per grid point, then detected and reference lesions per size bucket.
FIELDS = ("dice_sum", "dice_cases", "tp_voxels", "pred_voxels", "ref_voxels", "n_ref_lesions", "detected", "n_pred_lesions", "false_positives")


def sweep_case(
    probs: Tensor,
    target: np.ndarray,
    mode: str,
    spacing: Sequence[float],
    thresholds: Sequence[float],
    min_component_mm3: Sequence[float],
    connectivity: int = 26,
    size_buckets_mm3: Sequence[float] = (),
    empty_score: float = 1.0,
) -> np.ndarray:
    """Counts of one case at every grid point.

    Args:
        probs: ``(C_out, *spatial)`` probabilities (sigmoid per region, softmax per class).
        target: boolean ``(R, *spatial)`` reference masks.
        thresholds: sigmoid thresholds (softmax: only the first is used, the argmax needs none).
        min_component_mm3: minimum component volumes of the grid.

    Returns:
        float64 ``(R, T, M, len(FIELDS) + 2 * n_buckets)``: :data:`FIELDS`, then ``detected_<bucket>`` and
        ``n_ref_<bucket>`` per bucket (T = 1 in softmax mode).
    """
    spacing = validate_spacing(spacing)
    voxel_mm3 = float(np.prod(spacing))
    edges = np.asarray(size_buckets_mm3, dtype=np.float64)
    n_buckets = len(edges) + 1
    grid_t = list(thresholds) if mode == "sigmoid" else list(thresholds)[:1]
    sizes_vox = [min_component_voxels(m, voxel_mm3) for m in min_component_mm3]  # (M,), as postprocess() rounds
    out = np.zeros((target.shape[0], len(grid_t), len(sizes_vox), len(FIELDS) + 2 * n_buckets))
    per_threshold = [foreground_masks(probs, mode, [t] * target.shape[0]) for t in grid_t]  # T x (R, *spatial)
    for r in range(target.shape[0]):
        ref = np.ascontiguousarray(target[r])
        ref_labels, n_ref = cc3d.connected_components(ref, connectivity=connectivity, return_N=True)
        ref_sizes = np.bincount(ref_labels.ravel(), minlength=n_ref + 1)[1:]  # (n_ref,)
        ref_bucket = np.searchsorted(edges, ref_sizes * voxel_mm3, side="right")  # (n_ref,)
        ref_voxels = int(ref_sizes.sum())
        for i, masks in enumerate(per_threshold):
            pred_labels, n_pred = cc3d.connected_components(np.ascontiguousarray(masks[r]), connectivity=connectivity, return_N=True)
            pred_sizes = np.bincount(pred_labels.ravel(), minlength=n_pred + 1)  # (n_pred + 1,), [0] background
            both = (pred_labels > 0) & (ref_labels > 0)
            pred_ids, ref_ids = pred_labels[both], ref_labels[both]
            overlap = np.bincount(pred_ids, minlength=n_pred + 1)  # tp voxels per predicted component
            pairs = np.unique(pred_ids.astype(np.int64) * (n_ref + 1) + ref_ids)  # (predicted, reference) overlaps
            pair_pred, pair_ref = pairs // (n_ref + 1), pairs % (n_ref + 1)
            for j, min_voxels in enumerate(sizes_vox):
                keep = pred_sizes >= min_voxels
                keep[0] = False
                tp, pred_voxels = int(overlap[keep].sum()), int(pred_sizes[keep].sum())
                detected_ids = np.unique(pair_ref[keep[pair_pred]])  # 1-based reference lesion ids
                detected_bucket = np.bincount(ref_bucket[detected_ids - 1], minlength=n_buckets)
                dice = _ratio(2 * tp, pred_voxels + ref_voxels, empty_score)
                # A NaN Dice (empty_score nan: empty reference and prediction) is left out of the mean, as
                # OverlapMetrics leaves it out; dice_cases counts the cases that have one.
                row = [0.0 if math.isnan(dice) else dice, 0.0 if math.isnan(dice) else 1.0, tp, pred_voxels, ref_voxels, n_ref, detected_ids.size, int(keep.sum()), int((keep & (overlap == 0)).sum())]
                out[r, i, j, : len(FIELDS)] = row
                out[r, i, j, len(FIELDS) :: 2] = detected_bucket
                out[r, i, j, len(FIELDS) + 1 :: 2] = np.bincount(ref_bucket, minlength=n_buckets)
    return out


def grid_scores(counts: np.ndarray, n_cases: int, empty_score: float = 1.0) -> dict[str, np.ndarray]:
    """Scores at every grid point from summed counts ``(R, T, M, F)``: each ``(R, T, M)``.

    ``dice`` (mean over cases), ``lesion_recall``, ``lesion_precision``, ``lesion_f1`` (pooled),
    ``fp_per_case``.
    """
    f = {name: counts[..., k] for k, name in enumerate(FIELDS)}
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(f["n_ref_lesions"] > 0, f["detected"] / f["n_ref_lesions"], empty_score)
        precision = np.where(f["n_pred_lesions"] > 0, (f["n_pred_lesions"] - f["false_positives"]) / f["n_pred_lesions"], empty_score)
    f1 = np.vectorize(lesion_f1)(precision, recall) if recall.size else recall
    return {
        "dice": np.where(f["dice_cases"] > 0, f["dice_sum"] / np.maximum(f["dice_cases"], 1), np.nan),
        "lesion_recall": recall,
        "lesion_precision": precision,
        "lesion_f1": f1,
        "fp_per_case": f["false_positives"] / max(n_cases, 1),
    }


class OperatingPointSweep(Metric):
    """Sums of :func:`sweep_case` counts over cases, for :func:`choose_operating_point` (DDP: sums).

    Args:
        names: region/class names, in output order.
        mode: ``"sigmoid"`` or ``"softmax"``.
        thresholds: the threshold grid (sigmoid); values in (0, 1).
        min_component_mm3: the minimum-component-volume grid (mm^3, >= 0).
        connectivity: component connectivity (6, 18, 26).
        size_buckets_mm3: lesion size bucket edges (mm^3), for per-bucket recall in the sweep table.
        empty_score: the value of a ratio with a zero denominator.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(
        self,
        names: Sequence[str],
        mode: str,
        thresholds: Sequence[float] = (0.5,),
        min_component_mm3: Sequence[float] = (0.0,),
        connectivity: int = 26,
        size_buckets_mm3: Sequence[float] = (),
        bucket_names: Sequence[str] | None = None,
        empty_score: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        thresholds, sizes = [float(t) for t in thresholds], [float(m) for m in min_component_mm3]
        if not thresholds or not all(0.0 < t < 1.0 for t in thresholds):
            raise ValueError(f"expected a non-empty threshold grid in (0, 1), got {thresholds}")
        if not sizes or not all(m >= 0 and math.isfinite(m) for m in sizes):
            raise ValueError(f"expected a non-empty min_component_mm3 grid of volumes >= 0, got {sizes}")
        self.names, self.mode = tuple(names), mode
        self.thresholds = tuple(thresholds) if mode == "sigmoid" else tuple(thresholds[:1])
        self.min_component_mm3 = tuple(sizes)
        self.connectivity = connectivity
        self.size_buckets_mm3 = tuple(float(e) for e in size_buckets_mm3)
        self.bucket_names = tuple(bucket_names) if bucket_names else tuple(f"bucket{i}" for i in range(len(self.size_buckets_mm3) + 1))
        self.empty_score = float(empty_score)
        shape = (len(self.names), len(self.thresholds), len(self.min_component_mm3), len(FIELDS) + 2 * len(self.bucket_names))
        self.add_state("counts", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_cases", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, probs: Tensor, target: Tensor, spacing: Tensor | Sequence[float] | None = None) -> None:
        """Add a batch: probabilities ``(B, C_out, *spatial)``, boolean targets ``(B, R, *spatial)``, spacing ``(B, 3)``."""
        spacings = [[1.0, 1.0, 1.0]] * probs.shape[0] if spacing is None else torch.as_tensor(spacing).reshape(-1, 3).tolist()
        truth = target.detach().cpu().numpy().astype(bool)
        for b in range(probs.shape[0]):
            counts = sweep_case(probs[b].detach(), truth[b], self.mode, spacings[b if len(spacings) > 1 else 0], self.thresholds, self.min_component_mm3, self.connectivity, self.size_buckets_mm3, self.empty_score)
            self.counts += torch.from_numpy(counts).to(self.counts.device)
            self.n_cases += 1

    def compute(self) -> dict[str, Tensor]:
        """The scores of :func:`grid_scores`, each ``(R, T, M)``."""
        return {k: torch.from_numpy(v) for k, v in self._scores().items()}

    def _scores(self) -> dict[str, np.ndarray]:
        # From the states as they stand, so that table() and choose() also work inside a caller's
        # sync_context(), where compute() would try to sync a second time.
        return grid_scores(self.counts.cpu().numpy(), int(self.n_cases), self.empty_score)

    def table(self) -> list[dict[str, Any]]:
        """One row per region and grid point: the scores and per-bucket recall (the sweep CSV)."""
        counts = self.counts.cpu().numpy()
        scores = self._scores()
        rows = []
        for r, name in enumerate(self.names):
            for i, t in enumerate(self.thresholds):
                for j, m in enumerate(self.min_component_mm3):
                    row: dict[str, Any] = {"region": name, "threshold": t, "min_component_mm3": m}
                    row.update({k: float(v[r, i, j]) for k, v in scores.items()})
                    for k, bucket in enumerate(self.bucket_names):
                        detected, n_ref = counts[r, i, j, len(FIELDS) + 2 * k], counts[r, i, j, len(FIELDS) + 2 * k + 1]
                        row[f"lesion_recall_{bucket}"] = _ratio(detected, n_ref, self.empty_score)
                    rows.append(row)
        return rows

    def choose(self, criterion: str, default_threshold: float = 0.5) -> OperatingPoint:
        """The best grid point per region for ``criterion`` (see :func:`choose_operating_point`)."""
        if criterion not in CRITERIA:
            raise ValueError(f"expected an operating-point criterion in {CRITERIA}, got {criterion!r}")
        return choose_operating_point(self._scores()[criterion], criterion, self.names, self.thresholds, self.min_component_mm3, default_threshold)


def choose_operating_point(scores: np.ndarray, criterion: str, names: Sequence[str], thresholds: Sequence[float], min_component_mm3: Sequence[float], default_threshold: float = 0.5) -> OperatingPoint:
    """Per region, the (threshold, size) maximising ``scores[r]`` ``(T, M)``; ties to the pair nearest the default.

    Raises:
        ValueError: on an unknown criterion.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"expected an operating-point criterion in {CRITERIA}, got {criterion!r}")
    chosen_t, chosen_m, best = [], [], []
    for r in range(len(names)):
        grid = np.nan_to_num(scores[r], nan=-np.inf)  # (T, M)
        top = grid.max()
        candidates = [(abs(t - default_threshold), m, i, j) for i, t in enumerate(thresholds) for j, m in enumerate(min_component_mm3) if grid[i, j] >= top - 1e-12]
        _, _, i, j = min(candidates)
        chosen_t.append(float(thresholds[i]))
        chosen_m.append(float(min_component_mm3[j]))
        best.append(float(scores[r][i, j]))
    return OperatingPoint(tuple(names), tuple(chosen_t), tuple(chosen_m), criterion, tuple(best))
