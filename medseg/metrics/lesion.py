"""Lesion-wise detection metrics and BraTS 2023 lesion-wise Dice on binary masks.

Definitions (all on one binary mask pair of shape ``(D, H, W)``; volumes use the voxel ``spacing``):

* **Lesions** are connected components (``connectivity`` 6, 18 or 26; 26 by default) found with cc3d.
* **Detection** follows the matching rule ``matching`` (``one_to_one`` by default, ``msseg``, or the gameable
  ``overlap``; :mod:`medseg.metrics.matching` defines them and cites their standards): it decides which reference
  lesions are *detected* and which predicted components are *true positives*; the others are misses and
  *false positives*. ``lesion_recall = detected / n_ref_lesions``,
  ``lesion_precision = (n_pred_lesions - false_positives) / n_pred_lesions`` and ``lesion_f1 = 2 P R / (P + R)``
  (:func:`medseg.metrics.matching.detection_scores`, the one pooling); pooled over cases they use the pooled
  counts. Under ``msseg``, components of at most 3 mm^3 are not counted on either side.
* **Size buckets.** A reference lesion of volume ``v`` mm^3 falls in bucket ``i`` when
  ``edges[i-1] <= v < edges[i]`` (defaults: small ``v < 50``, medium ``50 <= v < 500``, large ``v >= 500``);
  ``lesion_recall_<bucket>`` is the detection recall within the bucket.
* **Lesion-wise Dice** follows the BraTS 2023 definition (Moawad et al., "The Brain Tumor Segmentation -
  Metastases (BraTS-METS) Challenge 2023", arXiv:2306.00838; reference code
  https://github.com/rachitsaluja/BraTS-2023-Metrics, ``get_LesionWiseScores``). The reference mask is
  dilated by ``dilation_mm`` and reference lesions that fall in one connected dilated blob are merged into
  one lesion; each merged lesion is scored by the Dice between it and the union of all predicted components
  that overlap its dilated blob; predicted components overlapping no dilated blob are false positives with
  score 0; merged lesions of volume ``<= min_lesion_volume_mm3`` are dropped (their matched predictions are
  not false positives). ``lesion_dice = sum(scores of kept lesions) / (n kept lesions + n false positives)``.
  Difference from the reference code: BraTS dilates with 3 iterations of the 18-neighbourhood cross in
  voxels; here the structuring element is an ellipsoid of radius ``dilation_mm`` in millimetres (every voxel
  whose centre lies within ``dilation_mm`` of a lesion voxel), so anisotropic spacing is handled. Defaults
  (3 mm, 50 mm^3) are the BraTS 2023 glioma values; the volume threshold drops lesions of up to 50 mm^3
  from the lesion Dice, while the small-lesion bucket recall still counts them.
* **Empty convention.** Any ratio whose denominator is zero (recall with no reference lesion, precision with
  no predicted component, a bucket without lesions, lesion Dice with no entry) takes the value
  ``empty_score``: 1.0 by default (BraTS scores an empty prediction of an empty reference as perfect); pass
  ``float("nan")`` to leave such cases out of later averages.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import cc3d
import numpy as np
import torch
from scipy import ndimage
from torch import Tensor
from torchmetrics import Metric

from medseg.metrics.matching import MatchingRule, component_pairs, detect, detection_counts, detection_scores

_CONNECTIVITIES = (6, 18, 26)


def as_binary_mask(mask: np.ndarray | Tensor, name: str) -> np.ndarray:
    """Convert a 0/1 numpy array or tensor to a C-contiguous boolean numpy array.

    Raises:
        TypeError: if ``mask`` is neither a numpy array nor a tensor.
        ValueError: if ``mask`` holds values other than 0 and 1.
    """
    if isinstance(mask, Tensor):
        mask = mask.detach().cpu().numpy()
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"expected {name} to be a numpy array or torch tensor, got {type(mask).__name__}")
    if mask.dtype != bool:
        if ((mask != 0) & (mask != 1)).any():
            raise ValueError(
                f"expected {name} to be a binary mask (values 0/1), got values in [{mask.min()}, {mask.max()}];"
                " threshold or argmax the prediction first"
            )
        mask = mask != 0
    return np.ascontiguousarray(mask)


def validate_spacing(spacing: Sequence[float] | np.ndarray | Tensor, ndim: int = 3) -> tuple[float, ...]:
    """Return ``spacing`` as a tuple of ``ndim`` positive finite floats (mm per voxel along each array axis)."""
    values = spacing.tolist() if isinstance(spacing, (Tensor, np.ndarray)) else list(spacing)
    if len(values) != ndim or not all(math.isfinite(float(s)) and float(s) > 0 for s in values):
        raise ValueError(f"expected spacing to be {ndim} positive finite numbers (mm), got {spacing!r}")
    return tuple(float(s) for s in values)


def _validate_options(
    connectivity: int,
    size_buckets_mm3: Sequence[float],
    dilation_mm: float,
    bucket_names: Sequence[str] | None = None,
) -> None:
    if connectivity not in _CONNECTIVITIES:
        raise ValueError(f"expected connectivity in {_CONNECTIVITIES}, got {connectivity}")
    if not (math.isfinite(dilation_mm) and dilation_mm >= 0):
        raise ValueError(f"expected dilation_mm >= 0, got {dilation_mm}")
    edges = [float(e) for e in size_buckets_mm3]
    if any(b <= a for a, b in zip(edges, edges[1:])) or any(e <= 0 for e in edges):
        raise ValueError(f"expected size_buckets_mm3 to be positive and strictly increasing, got {size_buckets_mm3}")
    if bucket_names is None:
        return
    if len(bucket_names) != len(edges) + 1 or len(set(bucket_names)) != len(bucket_names):
        raise ValueError(
            f"expected {len(edges) + 1} distinct bucket_names for {len(edges)} bucket edges, got {bucket_names}"
        )


def ellipsoid_structure(radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Boolean structuring element of the voxel offsets within ``radius_mm`` (1e-6 mm tolerance) of the centre.

    Returns:
        Array of shape ``(2 r_0 + 1, 2 r_1 + 1, 2 r_2 + 1)`` with ``r_i = floor(radius_mm / spacing_i)``.
    """
    tol = 1e-6
    radii = [int(math.floor((radius_mm + tol) / s)) for s in spacing]
    grids = np.ogrid[tuple(slice(-r, r + 1) for r in radii)]
    dist2 = sum((g * s) ** 2 for g, s in zip(grids, spacing))
    return dist2 <= (radius_mm + tol) ** 2


def _dilate_lesions(labels: np.ndarray, bboxes: Sequence[tuple[slice, ...]], structure: np.ndarray) -> np.ndarray:
    """Dilate every labelled lesion inside its own padded bounding box (far cheaper than a full-volume dilation).

    Args:
        labels: lesion labels, shape ``(D, H, W)``, 0 = background, lesions ``1..N``.
        bboxes: bounding box of each lesion ``1..N`` (``bboxes[i - 1]`` for label ``i``).
        structure: odd-sized boolean structuring element.
    """
    dilated = np.zeros(labels.shape, dtype=bool)  # (D, H, W)
    pad = [n // 2 for n in structure.shape]
    for label, bbox in enumerate(bboxes, start=1):
        region = tuple(
            slice(max(sl.start - p, 0), min(sl.stop + p, size)) for sl, p, size in zip(bbox, pad, labels.shape)
        )
        # voxels outside the volume are irrelevant, so clipping the padded box is exact
        dilated[region] |= ndimage.binary_dilation(labels[region] == label, structure=structure)
    return dilated


@dataclass
class LesionMatch:
    """Per-lesion results of matching one prediction to one reference (numpy arrays indexed by lesion).

    Attributes:
        ref_n_voxels: number of voxels of each reference lesion, shape ``(N_ref,)``.
        ref_volume_mm3: volume of each reference lesion, shape ``(N_ref,)``.
        ref_bucket: size-bucket index of each reference lesion, shape ``(N_ref,)``.
        ref_counted: whether each reference lesion takes part in detection (all but ``msseg``'s tiny ones).
        ref_detected: whether each reference lesion is detected under the matching rule, shape ``(N_ref,)``.
        ref_n_overlapping: number of predicted components overlapping each reference lesion, ``(N_ref,)``.
        ref_group: merged (dilation) lesion of each reference lesion, values ``0..N_group-1``, ``(N_ref,)``.
        ref_bboxes: bounding box (tuple of slices) of each reference lesion.
        ref_centroids: centroid in voxel coordinates of each reference lesion, shape ``(N_ref, 3)``.
        n_pred: number of counted predicted components.
        false_positives: counted predicted components that are not true positives under the rule.
        pred_true: whether each predicted component is a true positive, shape ``(N_pred_all,)``.
        group_volume_mm3: volume of each merged lesion, shape ``(N_group,)``.
        group_dice: BraTS lesion-wise Dice of each merged lesion, shape ``(N_group,)``.
        group_kept: whether each merged lesion enters the lesion Dice (volume > minimum), ``(N_group,)``.
        dice_false_positives: predicted components overlapping no dilated reference blob.
    """

    ref_n_voxels: np.ndarray
    ref_volume_mm3: np.ndarray
    ref_bucket: np.ndarray
    ref_counted: np.ndarray
    ref_detected: np.ndarray
    ref_n_overlapping: np.ndarray
    ref_group: np.ndarray
    ref_bboxes: list[tuple[slice, ...]]
    ref_centroids: np.ndarray
    n_pred: int
    false_positives: int
    pred_true: np.ndarray
    group_volume_mm3: np.ndarray
    group_dice: np.ndarray
    group_kept: np.ndarray
    dice_false_positives: int


def match_lesions(
    pred: np.ndarray | Tensor,
    target: np.ndarray | Tensor,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    connectivity: int = 26,
    size_buckets_mm3: Sequence[float] = (50.0, 500.0),
    dilation_mm: float = 3.0,
    min_lesion_volume_mm3: float = 50.0,
    rule: MatchingRule | None = None,
) -> LesionMatch:
    """Label, match and score the lesions of one case (the shared core of the lesion metrics).

    Args:
        pred: predicted binary mask, shape ``(D, H, W)``.
        target: reference binary mask, shape ``(D, H, W)``.
        spacing: voxel size in mm along the three array axes.
        connectivity: 6, 18 or 26 (cc3d connectivity of lesions and of dilated blobs).
        size_buckets_mm3: increasing bucket edges in mm^3.
        dilation_mm: radius of the ellipsoidal dilation of the reference lesions before matching (0 = none).
        min_lesion_volume_mm3: merged reference lesions of volume ``<=`` this are left out of the lesion Dice.
        rule: the detection rule (:class:`medseg.metrics.matching.MatchingRule`; ``None``: the default).

    Raises:
        ValueError: on non-binary masks, mismatched shapes or invalid options.
    """
    pred_np, target_np = as_binary_mask(pred, "pred"), as_binary_mask(target, "target")
    if pred_np.ndim != 3 or pred_np.shape != target_np.shape:
        raise ValueError(
            f"expected pred and target of the same shape (D, H, W), got {pred_np.shape} and {target_np.shape}"
        )
    spacing = validate_spacing(spacing)
    _validate_options(connectivity, size_buckets_mm3, dilation_mm)
    rule = rule or MatchingRule()
    voxel_mm3 = float(np.prod(spacing))

    ref_labels, n_ref = cc3d.connected_components(target_np, connectivity=connectivity, return_N=True)
    pred_labels, n_pred = cc3d.connected_components(pred_np, connectivity=connectivity, return_N=True)
    ref_flat, pred_flat = ref_labels.reshape(-1), pred_labels.reshape(-1)  # (V,)

    t_idx = np.flatnonzero(target_np)  # reference voxels
    ref_at_t = ref_flat[t_idx].astype(np.int64)
    hit = pred_flat[t_idx] > 0  # reference voxels that are also predicted

    ref_sizes = np.bincount(ref_at_t, minlength=n_ref + 1)[1:]  # (N_ref,)
    pred_sizes = np.bincount(pred_flat, minlength=n_pred + 1)[1:]  # (N_pred,)
    ref_volume = ref_sizes * voxel_mm3
    ref_bucket = np.searchsorted(np.asarray(size_buckets_mm3, dtype=np.float64), ref_volume, side="right")
    pair_pred, pair_ref, intersection = component_pairs(pred_labels, n_pred, ref_labels, n_ref)
    ref_n_overlapping = np.bincount(pair_ref, minlength=n_ref)
    min_voxels = rule.min_counted_voxels(voxel_mm3)
    ref_counted, pred_counted = ref_sizes >= min_voxels, pred_sizes >= min_voxels
    ref_detected, pred_true = detect(rule, pair_pred, pair_ref, intersection, pred_sizes, ref_sizes, pred_counted, ref_counted)
    counts = detection_counts(ref_detected, pred_true, pred_counted, ref_counted)

    if n_ref:
        stats = cc3d.statistics(ref_labels)
        ref_bboxes = list(stats["bounding_boxes"][1:])
        ref_centroids = np.asarray(stats["centroids"][1:], dtype=np.float64)  # (N_ref, 3)
    else:
        ref_bboxes, ref_centroids = [], np.zeros((0, 3))

    # BraTS merge rule: lesions in one connected blob of the dilated reference form one merged lesion
    if dilation_mm > 0 and n_ref:
        dilated = _dilate_lesions(ref_labels, ref_bboxes, ellipsoid_structure(dilation_mm, spacing))
        blob_labels, n_group = cc3d.connected_components(dilated, connectivity=connectivity, return_N=True)
    else:
        blob_labels, n_group = ref_labels, n_ref
    blob_flat = blob_labels.reshape(-1)
    group_at_t = blob_flat[t_idx].astype(np.int64)
    ref_group = np.zeros(n_ref + 1, dtype=np.int64)
    ref_group[ref_at_t] = group_at_t
    group_size = np.bincount(group_at_t, minlength=n_group + 1)[1:]  # (N_group,)
    group_inter = np.bincount(group_at_t[hit], minlength=n_group + 1)[1:]

    # predicted components matched to each blob: any of their voxels inside the dilated blob
    p_idx = np.flatnonzero(pred_np)
    pred_at_p = pred_flat[p_idx].astype(np.int64)
    blob_at_p = blob_flat[p_idx].astype(np.int64)
    inside = blob_at_p > 0
    pairs = np.unique(pred_at_p[inside] * (n_group + 1) + blob_at_p[inside])
    blob_pred, blob_group = pairs // (n_group + 1), pairs % (n_group + 1)
    group_pred_size = np.bincount(blob_group, weights=pred_sizes[blob_pred - 1] if blob_pred.size else None, minlength=n_group + 1)[1:]
    dice_false_positives = n_pred - np.unique(blob_pred).size

    group_dice = 2.0 * group_inter / (group_size + group_pred_size)  # group_size > 0 for every blob
    group_volume = group_size * voxel_mm3
    return LesionMatch(
        ref_n_voxels=ref_sizes,
        ref_volume_mm3=ref_volume,
        ref_bucket=ref_bucket,
        ref_counted=ref_counted,
        ref_detected=ref_detected,
        ref_n_overlapping=ref_n_overlapping,
        ref_group=ref_group[1:] - 1,
        ref_bboxes=ref_bboxes,
        ref_centroids=ref_centroids,
        n_pred=counts["n_pred_lesions"],
        false_positives=counts["false_positives"],
        pred_true=pred_true,
        group_volume_mm3=group_volume,
        group_dice=group_dice,
        group_kept=group_volume > min_lesion_volume_mm3,
        dice_false_positives=int(dice_false_positives),
    )


def _ratio(num: float, den: float, empty_score: float) -> float:
    return float(num) / float(den) if den > 0 else float(empty_score)


def matching_rule(matching: str = "one_to_one", match_criterion: str = "iou", match_threshold: float = 0.1, msseg: Mapping[str, float] | None = None) -> MatchingRule:
    """The :class:`medseg.metrics.matching.MatchingRule` of the lesion-metric options (validated)."""
    return MatchingRule.from_options({"matching": matching, "match_criterion": match_criterion, "match_threshold": match_threshold, "msseg": msseg or {}})


def lesion_metrics(
    pred: np.ndarray | Tensor,
    target: np.ndarray | Tensor,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    connectivity: int = 26,
    size_buckets_mm3: Sequence[float] = (50.0, 500.0),
    bucket_names: Sequence[str] = ("small", "medium", "large"),
    dilation_mm: float = 3.0,
    min_lesion_volume_mm3: float = 50.0,
    empty_score: float = 1.0,
    matching: str = "one_to_one",
    match_criterion: str = "iou",
    match_threshold: float = 0.1,
    msseg: Mapping[str, float] | None = None,
) -> dict[str, float | int]:
    """Lesion-wise detection recall/precision/F1, recall per size bucket and BraTS 2023 lesion-wise Dice.

    See the module docstring for the exact definitions and conventions.

    Args:
        pred: predicted binary mask (numpy array or tensor, 0/1 or bool), shape ``(D, H, W)``.
        target: reference binary mask, shape ``(D, H, W)``.
        spacing: voxel size in mm along the three array axes (same order as the array dimensions).
        connectivity: connected-component connectivity, 6, 18 or 26.
        size_buckets_mm3: increasing bucket edges in mm^3; ``len(bucket_names) == len(size_buckets_mm3) + 1``.
        bucket_names: names used in the per-bucket keys.
        dilation_mm: radius (mm) of the dilation of reference lesions before Dice matching; 0 disables it.
        min_lesion_volume_mm3: merged reference lesions of volume ``<=`` this are ignored by the lesion Dice
            (BraTS 2023: 50); detection counts include every lesion the matching rule counts.
        empty_score: value of a ratio whose denominator is zero (1.0, or ``float("nan")``).
        matching, match_criterion, match_threshold, msseg: the detection rule
            (:mod:`medseg.metrics.matching`).

    Returns:
        Dict with counts ``n_ref_lesions``, ``n_pred_lesions``, ``detected``, ``missed``, ``false_positives``,
        ``n_dice_lesions`` (merged lesions in the lesion Dice), ``n_dice_false_positives``; scores
        ``lesion_recall``, ``lesion_precision``, ``lesion_f1``, ``lesion_dice``; and for each bucket ``b``:
        ``n_ref_lesions_b``, ``detected_b``, ``missed_b``, ``lesion_recall_b``.

    Raises:
        ValueError: on non-binary masks, mismatched shapes or invalid options.
    """
    _validate_options(connectivity, size_buckets_mm3, dilation_mm, bucket_names)
    rule = matching_rule(matching, match_criterion, match_threshold, msseg)
    m = match_lesions(pred, target, spacing, connectivity, size_buckets_mm3, dilation_mm, min_lesion_volume_mm3, rule)
    return _summarise(**_counts(m, len(bucket_names)), bucket_names=bucket_names, empty_score=empty_score)


def _counts(m: LesionMatch, n_buckets: int) -> dict:
    """Additive per-case counts of a match (what the class metric sums over cases)."""
    return {
        "ref_counts": np.bincount(m.ref_bucket[m.ref_counted], minlength=n_buckets),
        "detected_counts": np.bincount(m.ref_bucket[m.ref_detected], minlength=n_buckets),
        "n_pred": m.n_pred,
        "false_positives": m.false_positives,
        "dice_sum": float(m.group_dice[m.group_kept].sum()),
        "n_dice_lesions": int(m.group_kept.sum()),
        "n_dice_false_positives": m.dice_false_positives,
    }


def _summarise(
    ref_counts: np.ndarray,
    detected_counts: np.ndarray,
    n_pred: int,
    false_positives: int,
    dice_sum: float,
    n_dice_lesions: int,
    n_dice_false_positives: int,
    bucket_names: Sequence[str],
    empty_score: float,
) -> dict[str, float | int]:
    """Turn (per-case or pooled) counts into the result dict shared by the function and the class."""
    n_ref, detected = int(ref_counts.sum()), int(detected_counts.sum())
    out: dict[str, float | int] = {
        "n_ref_lesions": n_ref,
        "n_pred_lesions": int(n_pred),
        "detected": detected,
        "missed": n_ref - detected,
        "false_positives": int(false_positives),
        "n_dice_lesions": int(n_dice_lesions),
        "n_dice_false_positives": int(n_dice_false_positives),
        **detection_scores(n_ref, detected, n_pred, false_positives, empty_score),
        "lesion_dice": _ratio(dice_sum, n_dice_lesions + n_dice_false_positives, empty_score),
    }
    for name, n_b, det_b in zip(bucket_names, ref_counts.tolist(), detected_counts.tolist()):
        out[f"n_ref_lesions_{name}"] = int(n_b)
        out[f"detected_{name}"] = int(det_b)
        out[f"missed_{name}"] = int(n_b - det_b)
        out[f"lesion_recall_{name}"] = _ratio(det_b, n_b, empty_score)
    return out


def lesion_table(
    pred: np.ndarray | Tensor,
    target: np.ndarray | Tensor,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    connectivity: int = 26,
    size_buckets_mm3: Sequence[float] = (50.0, 500.0),
    bucket_names: Sequence[str] = ("small", "medium", "large"),
    dilation_mm: float = 3.0,
    min_lesion_volume_mm3: float = 50.0,
    matching: str = "one_to_one",
    match_criterion: str = "iou",
    match_threshold: float = 0.1,
    msseg: Mapping[str, float] | None = None,
) -> list[dict]:
    """One row per reference lesion, for inspection and visualisation (same definitions as ``lesion_metrics``).

    Args: as :func:`lesion_metrics`.

    Returns:
        List of dicts, in cc3d label order, with keys ``id`` (1-based lesion label), ``volume_mm3``, ``n_voxels``,
        ``bucket`` (name), ``centroid`` (voxel coordinates, tuple of 3 floats), ``bbox`` (tuple of 3
        ``(start, stop)`` voxel ranges), ``counted`` (taking part in detection: all but ``msseg``'s smallest),
        ``detected`` (under the matching rule), ``n_overlapping_pred`` (predicted components overlapping
        the lesion), ``group`` (1-based merged lesion after dilation; lesions sharing a group share their
        Dice), ``in_lesion_dice`` (merged volume above ``min_lesion_volume_mm3``) and ``lesion_dice`` (BraTS
        Dice of the merged lesion).
    """
    _validate_options(connectivity, size_buckets_mm3, dilation_mm, bucket_names)
    rule = matching_rule(matching, match_criterion, match_threshold, msseg)
    m = match_lesions(pred, target, spacing, connectivity, size_buckets_mm3, dilation_mm, min_lesion_volume_mm3, rule)
    rows = []
    for i in range(m.ref_volume_mm3.size):
        g = int(m.ref_group[i])
        rows.append(
            {
                "id": i + 1,
                "volume_mm3": float(m.ref_volume_mm3[i]),
                "n_voxels": int(m.ref_n_voxels[i]),
                "bucket": bucket_names[int(m.ref_bucket[i])],
                "centroid": tuple(float(c) for c in m.ref_centroids[i]),
                "bbox": tuple((int(sl.start), int(sl.stop)) for sl in m.ref_bboxes[i]),
                "counted": bool(m.ref_counted[i]),
                "detected": bool(m.ref_detected[i]),
                "n_overlapping_pred": int(m.ref_n_overlapping[i]),
                "group": g + 1,
                "in_lesion_dice": bool(m.group_kept[g]),
                "lesion_dice": float(m.group_dice[g]),
            }
        )
    return rows


class LesionMetrics(Metric):
    """Lesion-wise metrics accumulated over cases, exact under DDP (all states are sums).

    ``compute()`` returns the keys of :func:`lesion_metrics` as tensors, **pooled** over all cases: recall is
    ``sum(detected) / sum(n_ref_lesions)`` over every reference lesion of every case (so a case with 90
    lesions weighs 90 times a case with one), precision pools predicted components, and ``lesion_dice`` pools
    the BraTS entries (kept merged lesions and false positives) of all cases. It also returns ``n_cases`` and
    the per-case means ``lesion_dice_case_mean`` (what the BraTS ranking averages),
    ``lesion_recall_case_mean`` and ``lesion_f1_case_mean``; per-case values equal to NaN (``empty_score=nan``) are left out of those
    means. A ratio with a zero denominator, pooled or per-case, takes ``empty_score``.

    After each ``update``, :attr:`last_cases` holds that batch's per-case results (the dicts
    :func:`lesion_metrics` returns for the same options), so that per-case reports
    (:func:`medseg.metrics.cases.case_rows`) need not match the lesions again.

    Args:
        spacing: default voxel size in mm along the three spatial axes (overridable per ``update``).
        connectivity, size_buckets_mm3, bucket_names, dilation_mm, min_lesion_volume_mm3, empty_score, matching,
            match_criterion, match_threshold, msseg: as in :func:`lesion_metrics`.

    Raises:
        ValueError: on invalid options.
    """

    is_differentiable = False
    higher_is_better = None  # recall/precision/Dice go up, counts of misses and false positives go down
    full_state_update = False

    def __init__(
        self,
        spacing: Sequence[float] = (1.0, 1.0, 1.0),
        connectivity: int = 26,
        size_buckets_mm3: Sequence[float] = (50.0, 500.0),
        bucket_names: Sequence[str] = ("small", "medium", "large"),
        dilation_mm: float = 3.0,
        min_lesion_volume_mm3: float = 50.0,
        empty_score: float = 1.0,
        matching: str = "one_to_one",
        match_criterion: str = "iou",
        match_threshold: float = 0.1,
        msseg: Mapping[str, float] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        _validate_options(connectivity, size_buckets_mm3, dilation_mm, bucket_names)
        self.rule = matching_rule(matching, match_criterion, match_threshold, msseg)
        self.spacing = validate_spacing(spacing)
        self.connectivity = connectivity
        self.size_buckets_mm3 = tuple(float(e) for e in size_buckets_mm3)
        self.bucket_names = tuple(bucket_names)
        self.dilation_mm = float(dilation_mm)
        self.min_lesion_volume_mm3 = float(min_lesion_volume_mm3)
        self.empty_score = float(empty_score)
        n_buckets = len(self.bucket_names)
        self.add_state("ref_counts", torch.zeros(n_buckets, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("detected_counts", torch.zeros(n_buckets, dtype=torch.long), dist_reduce_fx="sum")
        for name in ("n_pred", "false_positives", "n_dice_lesions", "n_dice_false_positives", "n_cases"):
            self.add_state(name, torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        for name in ("n_case_dice", "n_case_recall", "n_case_f1"):
            self.add_state(name, torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        for name in ("dice_sum", "case_dice_sum", "case_recall_sum", "case_f1_sum"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.last_cases: list[dict[str, float | int]] = []  # the latest update's cases (this process; not a state)

    def _case_spacings(self, spacing: Sequence[float] | np.ndarray | Tensor | None, batch: int) -> list:
        if spacing is None:
            return [self.spacing] * batch
        arr = np.asarray(spacing.detach().cpu() if isinstance(spacing, Tensor) else spacing, dtype=np.float64)
        if arr.shape == (3,):
            return [validate_spacing(arr)] * batch
        if arr.shape == (batch, 3):
            return [validate_spacing(row) for row in arr]
        raise ValueError(f"expected spacing of shape (3,) or (B, 3) = ({batch}, 3), got shape {arr.shape}")

    def update(self, pred: Tensor, target: Tensor, spacing: Sequence[float] | Tensor | None = None) -> None:
        """Add a batch of cases.

        Args:
            pred: predicted binary masks, shape ``(B, D, H, W)`` or ``(B, 1, D, H, W)``.
            target: reference binary masks, same shape as ``pred``.
            spacing: ``None`` (the constructor's spacing), one spacing ``(3,)`` for the batch, or ``(B, 3)``.

        Raises:
            ValueError: on mismatched or unsupported shapes, non-binary masks or invalid spacing.
        """
        if pred.shape != target.shape:
            raise ValueError(
                f"expected pred and target of the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
            )
        if pred.ndim == 5 and pred.shape[1] == 1:
            pred, target = pred[:, 0], target[:, 0]  # (B, D, H, W)
        if pred.ndim != 4:
            raise ValueError(f"expected masks of shape (B, D, H, W) or (B, 1, D, H, W), got {tuple(pred.shape)}")
        pred_np, target_np = as_binary_mask(pred, "pred"), as_binary_mask(target, "target")  # (B, D, H, W)
        n_buckets = len(self.bucket_names)
        self.last_cases = []
        for b, spacing_b in enumerate(self._case_spacings(spacing, pred_np.shape[0])):
            m = match_lesions(
                pred_np[b], target_np[b], spacing_b, self.connectivity, self.size_buckets_mm3,
                self.dilation_mm, self.min_lesion_volume_mm3, self.rule,
            )  # fmt: skip
            counts = _counts(m, n_buckets)
            case = _summarise(**counts, bucket_names=self.bucket_names, empty_score=self.empty_score)
            self.last_cases.append(case)
            self.ref_counts += torch.as_tensor(counts["ref_counts"], dtype=torch.long, device=self.device)
            self.detected_counts += torch.as_tensor(counts["detected_counts"], dtype=torch.long, device=self.device)
            self.n_pred += counts["n_pred"]
            self.false_positives += counts["false_positives"]
            self.n_dice_lesions += counts["n_dice_lesions"]
            self.n_dice_false_positives += counts["n_dice_false_positives"]
            self.dice_sum += counts["dice_sum"]
            self.n_cases += 1
            if not math.isnan(case["lesion_dice"]):
                self.case_dice_sum += case["lesion_dice"]
                self.n_case_dice += 1
            if not math.isnan(case["lesion_recall"]):
                self.case_recall_sum += case["lesion_recall"]
                self.n_case_recall += 1
            if not math.isnan(case["lesion_f1"]):
                self.case_f1_sum += case["lesion_f1"]
                self.n_case_f1 += 1

    def compute(self) -> dict[str, Tensor]:
        """Pooled lesion metrics over all cases seen (see the class docstring), as 0-d tensors."""
        pooled = _summarise(
            ref_counts=self.ref_counts.cpu().numpy(),
            detected_counts=self.detected_counts.cpu().numpy(),
            n_pred=int(self.n_pred),
            false_positives=int(self.false_positives),
            dice_sum=float(self.dice_sum),
            n_dice_lesions=int(self.n_dice_lesions),
            n_dice_false_positives=int(self.n_dice_false_positives),
            bucket_names=self.bucket_names,
            empty_score=self.empty_score,
        )
        pooled["n_cases"] = int(self.n_cases)
        pooled["lesion_dice_case_mean"] = _ratio(float(self.case_dice_sum), int(self.n_case_dice), self.empty_score)
        pooled["lesion_recall_case_mean"] = _ratio(
            float(self.case_recall_sum), int(self.n_case_recall), self.empty_score
        )
        pooled["lesion_f1_case_mean"] = _ratio(float(self.case_f1_sum), int(self.n_case_f1), self.empty_score)
        return {
            key: torch.tensor(
                value, dtype=torch.long if isinstance(value, int) else torch.get_default_dtype(), device=self.device
            )
            for key, value in pooled.items()
        }
