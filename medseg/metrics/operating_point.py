"""Operating-point sweep: Dice and lesion detection at every (threshold, minimum component size, minimum component
score) point.

For each validation case and region, the prediction is thresholded at every threshold of the grid (softmax:
the argmax, once) and its connected components are labelled and scored (:func:`medseg.postprocess.component_scores`)
ONCE per threshold; every minimum size and minimum score of the grid then only drops components, so a grid of
T thresholds x M sizes x S scores costs T labellings, not T x M x S. Per grid point the counts are exactly those of
:func:`medseg.metrics.lesion.lesion_metrics` on the post-processed mask under the configured matching rule (tested;
:mod:`medseg.metrics.matching`): each size and score only changes which predicted components take part in the rule,
on an overlap table built once per threshold.

:class:`OperatingPointSweep` sums these counts over cases (exact under DDP) and :func:`choose_operating_point`
picks, per region, the point maximising the criterion: ``"dice"`` (mean voxel Dice over cases) or
``"lesion_f1"`` (pooled detection F1). Ties go to the point nearest the untuned default (``model.threshold``,
no size or score filter), so that a flat criterion changes nothing.
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

from medseg.metrics.lesion import _ratio, validate_spacing
from medseg.metrics.matching import MatchingRule, component_pairs, detect, detection_counts, detection_scores
from medseg.postprocess import COMPONENT_SCORES, OperatingPoint, component_scores, foreground_masks, min_component_voxels, region_probability

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
    rule: MatchingRule | None = None,
    min_component_score: Sequence[float] = (0.0,),
    component_score: str = "max",
) -> np.ndarray:
    """Counts of one case at every grid point.

    Args:
        probs: ``(C_out, *spatial)`` probabilities (sigmoid per region, softmax per class).
        target: boolean ``(R, *spatial)`` reference masks.
        thresholds: sigmoid thresholds (softmax: only the first is used, the argmax needs none).
        min_component_mm3: minimum component volumes of the grid.
        rule: the lesion matching rule (``None``: the default one-to-one rule).
        min_component_score: minimum component scores of the grid (0: no score filter).
        component_score: ``"max"`` or ``"mean"`` probability inside a component.

    Returns:
        float64 ``(R, T, M, S, len(FIELDS) + 2 * n_buckets)``: :data:`FIELDS`, then ``detected_<bucket>`` and
        ``n_ref_<bucket>`` per bucket (T = 1 in softmax mode).
    """
    spacing = validate_spacing(spacing)
    rule = rule or MatchingRule()
    voxel_mm3 = float(np.prod(spacing))
    counted_voxels = rule.min_counted_voxels(voxel_mm3)
    edges = np.asarray(size_buckets_mm3, dtype=np.float64)
    n_buckets = len(edges) + 1
    grid_t = list(thresholds) if mode == "sigmoid" else list(thresholds)[:1]
    sizes_vox = [min_component_voxels(m, voxel_mm3) for m in min_component_mm3]  # (M,), as postprocess() rounds
    min_scores = [float(c) for c in min_component_score]
    out = np.zeros((target.shape[0], len(grid_t), len(sizes_vox), len(min_scores), len(FIELDS) + 2 * n_buckets))
    per_threshold = [foreground_masks(probs, mode, [t] * target.shape[0]) for t in grid_t]  # T x (R, *spatial)
    for r in range(target.shape[0]):
        ref = np.ascontiguousarray(target[r])
        ref_labels, n_ref = cc3d.connected_components(ref, connectivity=connectivity, return_N=True)
        ref_sizes = np.bincount(ref_labels.ravel(), minlength=n_ref + 1)[1:]  # (n_ref,)
        ref_bucket = np.searchsorted(edges, ref_sizes * voxel_mm3, side="right")  # (n_ref,)
        ref_counted = ref_sizes >= counted_voxels
        ref_per_bucket = np.bincount(ref_bucket[ref_counted], minlength=n_buckets)
        ref_voxels = int(ref_sizes.sum())
        for i, masks in enumerate(per_threshold):
            pred_labels, n_pred = cc3d.connected_components(np.ascontiguousarray(masks[r]), connectivity=connectivity, return_N=True)
            pred_sizes = np.bincount(pred_labels.ravel(), minlength=n_pred + 1)[1:]  # (n_pred,)
            pair_pred, pair_ref, intersection = component_pairs(pred_labels, n_pred, ref_labels, n_ref)  # labelled once per threshold
            overlap = np.bincount(pair_pred, weights=intersection, minlength=n_pred)  # tp voxels per predicted component
            scores = component_scores(pred_labels, n_pred, region_probability(probs, mode, r).numpy(), component_score) if any(min_scores) else np.ones(n_pred)
            done: dict[bytes, tuple[int, int, int, int]] = {}  # points that keep the same components have the same counts
            for j, min_voxels in enumerate(sizes_vox):
                for k, min_score in enumerate(min_scores):
                    keep = (pred_sizes >= min_voxels) & (scores >= min_score)  # the post-processing's size and score filters
                    key = np.packbits(keep).tobytes()
                    if key in done:
                        out[r, i, j, k] = out[done[key]]
                        continue
                    done[key] = (r, i, j, k)
                    tp, pred_voxels = int(overlap[keep].sum()), int(pred_sizes[keep].sum())
                    pred_counted = keep & (pred_sizes >= counted_voxels)
                    ref_detected, pred_true = detect(rule, pair_pred, pair_ref, intersection, pred_sizes, ref_sizes, pred_counted, ref_counted)
                    counts = detection_counts(ref_detected, pred_true, pred_counted, ref_counted)
                    dice = _ratio(2 * tp, pred_voxels + ref_voxels, empty_score)
                    # A NaN Dice (empty_score nan: empty reference and prediction) is left out of the mean, as
                    # OverlapMetrics leaves it out; dice_cases counts the cases that have one.
                    row = [0.0 if math.isnan(dice) else dice, 0.0 if math.isnan(dice) else 1.0, tp, pred_voxels, ref_voxels,
                           counts["n_ref_lesions"], counts["detected"], counts["n_pred_lesions"], counts["false_positives"]]
                    out[r, i, j, k, : len(FIELDS)] = row
                    out[r, i, j, k, len(FIELDS) :: 2] = np.bincount(ref_bucket[ref_detected], minlength=n_buckets)
                    out[r, i, j, k, len(FIELDS) + 1 :: 2] = ref_per_bucket
    return out


def grid_scores(counts: np.ndarray, n_cases: int, empty_score: float = 1.0) -> dict[str, np.ndarray]:
    """Scores at every grid point from summed counts ``(R, T, M, S, F)``: each ``(R, T, M, S)``.

    ``dice`` (mean over cases), ``lesion_recall``, ``lesion_precision``, ``lesion_f1`` (pooled, by
    :func:`medseg.metrics.matching.detection_scores`), ``fp_per_case``.
    """
    f = {name: counts[..., k] for k, name in enumerate(FIELDS)}
    detection = detection_scores(f["n_ref_lesions"], f["detected"], f["n_pred_lesions"], f["false_positives"], empty_score)
    return {
        "dice": np.where(f["dice_cases"] > 0, f["dice_sum"] / np.maximum(f["dice_cases"], 1), np.nan),
        **detection,
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
        rule: the lesion matching rule of the detection counts (``model.lesion_metrics.matching``).
        min_component_score: the minimum-component-score grid (in [0, 1]; 0: no score filter).
        component_score: how a component is scored, ``"max"`` or ``"mean"`` probability inside it.
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
        rule: MatchingRule | None = None,
        min_component_score: Sequence[float] = (0.0,),
        component_score: str = "max",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.rule = rule or MatchingRule()
        thresholds, sizes, min_scores = [float(t) for t in thresholds], [float(m) for m in min_component_mm3], [float(c) for c in min_component_score]
        if not thresholds or not all(0.0 < t < 1.0 for t in thresholds):
            raise ValueError(f"expected a non-empty threshold grid in (0, 1), got {thresholds}")
        if not sizes or not all(m >= 0 and math.isfinite(m) for m in sizes):
            raise ValueError(f"expected a non-empty min_component_mm3 grid of volumes >= 0, got {sizes}")
        if not min_scores or not all(0.0 <= c <= 1.0 for c in min_scores):
            raise ValueError(f"expected a non-empty min_component_score grid of scores in [0, 1], got {min_scores}")
        if component_score not in COMPONENT_SCORES:
            raise ValueError(f"expected component_score one of {COMPONENT_SCORES}, got {component_score!r}")
        self.names, self.mode = tuple(names), mode
        self.thresholds = tuple(thresholds) if mode == "sigmoid" else tuple(thresholds[:1])
        self.min_component_mm3 = tuple(sizes)
        self.min_component_score, self.component_score = tuple(min_scores), component_score
        self.connectivity = connectivity
        self.size_buckets_mm3 = tuple(float(e) for e in size_buckets_mm3)
        self.bucket_names = tuple(bucket_names) if bucket_names else tuple(f"bucket{i}" for i in range(len(self.size_buckets_mm3) + 1))
        self.empty_score = float(empty_score)
        shape = (len(self.names), len(self.thresholds), len(self.min_component_mm3), len(self.min_component_score), len(FIELDS) + 2 * len(self.bucket_names))
        self.add_state("counts", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_cases", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, probs: Tensor, target: Tensor, spacing: Tensor | Sequence[float] | None = None) -> None:
        """Add a batch: probabilities ``(B, C_out, *spatial)``, boolean targets ``(B, R, *spatial)``, spacing ``(B, 3)``."""
        spacings = [[1.0, 1.0, 1.0]] * probs.shape[0] if spacing is None else torch.as_tensor(spacing).reshape(-1, 3).tolist()
        truth = target.detach().cpu().numpy().astype(bool)
        for b in range(probs.shape[0]):
            self.add(self.case_counts(probs[b].detach(), truth[b], spacings[b if len(spacings) > 1 else 0]))

    def case_counts(self, probs: Tensor, target: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
        """:func:`sweep_case` of one case with this sweep's grid and options (no state changes: worker threads may
        count cases while another is added)."""
        return sweep_case(probs, target, self.mode, spacing, self.thresholds, self.min_component_mm3, self.connectivity, self.size_buckets_mm3, self.empty_score, self.rule,
                          self.min_component_score, self.component_score)

    def grid(self) -> dict[str, Any]:
        """What the counts' axes hold: stored counts of another grid cannot be added (see
        :mod:`medseg.crossvalidation`)."""
        return {"names": list(self.names), "mode": self.mode, "thresholds": list(self.thresholds), "min_component_mm3": list(self.min_component_mm3),
                "min_component_score": list(self.min_component_score), "component_score": self.component_score, "connectivity": self.connectivity,
                "size_buckets_mm3": list(self.size_buckets_mm3), "empty_score": self.empty_score, "rule": repr(self.rule)}

    def add(self, counts: np.ndarray, cases: int = 1) -> None:
        """Add one case's :meth:`case_counts` (or the summed counts of ``cases`` cases)."""
        self.counts += torch.from_numpy(counts).to(self.counts.device)
        self.n_cases += cases

    def compute(self) -> dict[str, Tensor]:
        """The scores of :func:`grid_scores`, each ``(R, T, M, S)``."""
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
                    for k, c in enumerate(self.min_component_score):
                        row: dict[str, Any] = {"region": name, "threshold": t, "min_component_mm3": m, "min_component_score": c}
                        row.update({key: float(v[r, i, j, k]) for key, v in scores.items()})
                        for b, bucket in enumerate(self.bucket_names):
                            detected, n_ref = counts[r, i, j, k, len(FIELDS) + 2 * b], counts[r, i, j, k, len(FIELDS) + 2 * b + 1]
                            row[f"lesion_recall_{bucket}"] = _ratio(detected, n_ref, self.empty_score)
                        rows.append(row)
        return rows

    def choose(self, criterion: str, default_threshold: float = 0.5) -> OperatingPoint:
        """The best grid point per region for ``criterion`` (see :func:`choose_operating_point`)."""
        if criterion not in CRITERIA:
            raise ValueError(f"expected an operating-point criterion in {CRITERIA}, got {criterion!r}")
        return choose_operating_point(self._scores()[criterion], criterion, self.names, self.thresholds, self.min_component_mm3, default_threshold,
                                      self.min_component_score, self.component_score)


def choose_operating_point(
    scores: np.ndarray,
    criterion: str,
    names: Sequence[str],
    thresholds: Sequence[float],
    min_component_mm3: Sequence[float],
    default_threshold: float = 0.5,
    min_component_score: Sequence[float] = (0.0,),
    component_score: str = "max",
) -> OperatingPoint:
    """Per region, the (threshold, size, score) maximising ``scores[r]`` ``(T, M, S)`` (or ``(T, M)``: no score axis);
    ties to the point nearest the default: the threshold nearest ``default_threshold``, then the smallest size, then
    the smallest score.

    Raises:
        ValueError: on an unknown criterion.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"expected an operating-point criterion in {CRITERIA}, got {criterion!r}")
    scores = np.asarray(scores)
    scores = scores[..., None] if scores.ndim == 3 else scores  # (R, T, M, S)
    chosen_t, chosen_m, chosen_s, best = [], [], [], []
    for r in range(len(names)):
        grid = np.nan_to_num(scores[r], nan=-np.inf)  # (T, M, S)
        top = grid.max()
        candidates = [(abs(t - default_threshold), m, c, i, j, k) for i, t in enumerate(thresholds) for j, m in enumerate(min_component_mm3)
                      for k, c in enumerate(min_component_score) if grid[i, j, k] >= top - 1e-12]
        *_, i, j, k = min(candidates)
        chosen_t.append(float(thresholds[i]))
        chosen_m.append(float(min_component_mm3[j]))
        chosen_s.append(float(min_component_score[k]))
        best.append(float(scores[r][i, j, k]))
    return OperatingPoint(tuple(names), tuple(chosen_t), tuple(chosen_m), criterion, tuple(best), min_component_score=tuple(chosen_s), component_score=component_score)
