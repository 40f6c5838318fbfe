"""The predicted lesions of a case, one row each: what a reader checks lesion by lesion.

For every region (sigmoid) or class (softmax) of a prediction, the connected components of its final mask (after
the operating point's threshold, size and score filters, with the model's connectivity) are listed with their
volume, their centroid in scanner coordinates (the input file's affine: RAS+ millimetres for NIfTI) and a score: the
maximum (or mean) probability of the region inside the component (:func:`medseg.postprocess.component_scores`), the
score the operating point's minimum component score thresholds.

With a reference label of the case, each predicted lesion also says whether it is a true or a false positive under
the model's lesion matching rule (:mod:`medseg.metrics.matching`, the rule its reports count with) and which
reference lesions it is linked to (``one_to_one``: the matched one; ``msseg`` and ``overlap``: the overlapping ones),
and every reference lesion the rule counts as missed gets a row of its own (its score: the highest probability
inside it, how near the model came). ``medseg.predict lesion_table=true [reference=<labels>]`` writes
``<output>/lesions/<case>.csv``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import cc3d
import numpy as np
from torch import Tensor

from medseg.metrics.matching import MatchingRule, component_pairs, detect, one_to_one_pairs
from medseg.postprocess import COMPONENT_SCORES, component_scores, region_probability

SCORES = COMPONENT_SCORES
COLUMNS = ("region", "lesion", "volume_mm3", "voxels", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm", "score")
# Added with a reference: "true positive", "false positive", "missed" (a reference lesion's row) or "not counted"
# (a component the rule leaves out, e.g. msseg's lesions of 3 mm^3 or less), and the linked reference lesions.
REFERENCE_COLUMNS = ("detection", "reference_lesions")


def lesion_rows(
    masks: np.ndarray,
    probs: Tensor,
    names: Sequence[str],
    mode: str,
    affine: np.ndarray,
    connectivity: int = 26,
    score: Literal["max", "mean"] = "max",
    reference: np.ndarray | None = None,
    rule: MatchingRule | None = None,
) -> list[dict[str, Any]]:
    """One row per connected component of every region's mask (and per missed reference lesion, with a reference).

    Args:
        masks: boolean ``(R, X, Y, Z)``: the final masks (as :func:`medseg.postprocess.postprocess` returns them).
        probs: ``(C_out, X, Y, Z)`` probabilities on the same grid: sigmoid per region, softmax per class (background
            first: region ``r`` is class ``r + 1``).
        names: the region or class names, one per mask.
        affine: ``(4, 4)`` voxel-to-scanner matrix of the grid.
        connectivity: of the components (6, 18, 26).
        score: ``max`` or ``mean`` probability of the region inside a component.
        reference: boolean ``(R, X, Y, Z)`` reference masks on the same grid, or ``None``.
        rule: the lesion matching rule (``None``: the default one-to-one rule).

    Returns:
        Rows with :data:`COLUMNS` (and :data:`REFERENCE_COLUMNS` with a reference): ``lesion`` numbers the predicted
        components of a region from 1, largest first; reference lesions are numbered the same way among themselves
        (``reference_lesions``; a missed one's row has an empty ``lesion``).
    """
    if score not in SCORES:
        raise ValueError(f"expected lesion score one of {SCORES}, got {score!r}")
    if masks.shape[0] != len(names):
        raise ValueError(f"expected one name per mask, got {len(names)} names for {masks.shape[0]} masks")
    if reference is not None and reference.shape != masks.shape:
        raise ValueError(f"expected reference masks of the prediction's shape {masks.shape}, got {reference.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    rule = rule or MatchingRule()
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    rows: list[dict[str, Any]] = []
    for r, name in enumerate(names):
        if not masks[r].any() and (reference is None or not reference[r].any()):
            continue
        probability = region_probability(probs, mode, r).numpy()
        pred = _components(masks[r], probability, connectivity, score)
        detection: list[str] = [""] * pred["n"]
        links: list[list[int]] = [[] for _ in range(pred["n"])]
        missed: list[int] = []
        if reference is not None:
            ref = _components(reference[r], probability, connectivity, "max")
            counted_voxels = rule.min_counted_voxels(voxel_mm3)
            pred_counted, ref_counted = pred["voxels"] >= counted_voxels, ref["voxels"] >= counted_voxels
            pair_pred, pair_ref, intersection = component_pairs(pred["labels"], pred["n"], ref["labels"], ref["n"])
            ref_detected, pred_true = detect(rule, pair_pred, pair_ref, intersection, pred["voxels"], ref["voxels"], pred_counted, ref_counted)
            counted = pred_counted[pair_pred] & ref_counted[pair_ref]
            linked = (pair_pred[counted], pair_ref[counted])  # msseg, overlap: every overlapping pair of counted components
            if rule.matching == "one_to_one":
                linked = one_to_one_pairs(rule, *linked, intersection[counted], pred["voxels"], ref["voxels"])
            for p, q in zip(*linked):
                links[p].append(int(ref["rank"][q]))
            detection = ["true positive" if t else "false positive" if c else "not counted" for t, c in zip(pred_true, pred_counted)]
            missed = [q for q in ref["order"] if ref_counted[q] and not ref_detected[q]]
        for k in pred["order"]:
            row = _row(name, int(pred["rank"][k]), pred, k, affine, voxel_mm3)
            if reference is not None:
                row.update(detection=detection[k], reference_lesions=";".join(str(q) for q in sorted(links[k])))
            rows.append(row)
        for q in missed:
            rows.append({**_row(name, "", ref, q, affine, voxel_mm3), "detection": "missed", "reference_lesions": str(int(ref["rank"][q]))})
    return rows


def _components(mask: np.ndarray, probability: np.ndarray, connectivity: int, score: str) -> dict[str, Any]:
    """A mask's components: ``labels``, ``n``, ``voxels`` ``(n,)``, voxel ``centroids`` ``(n, 3)``, ``scores`` ``(n,)``,
    ``order`` (largest first) and ``rank`` ``(n,)`` (1 = largest)."""
    labels, n = cc3d.connected_components(np.ascontiguousarray(mask), connectivity=connectivity, return_N=True)
    stats = cc3d.statistics(labels) if n else {"voxel_counts": [0], "centroids": np.zeros((1, 3))}
    voxels = np.asarray(stats["voxel_counts"], dtype=np.int64)[1 : n + 1]
    order = np.argsort(-voxels, kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(1, n + 1)
    return {"labels": labels, "n": n, "voxels": voxels, "centroids": np.asarray(stats["centroids"], dtype=np.float64)[1 : n + 1],
            "scores": component_scores(labels, n, probability, score), "order": order, "rank": rank}


def _row(region: str, lesion: int | str, components: dict[str, Any], k: int, affine: np.ndarray, voxel_mm3: float) -> dict[str, Any]:
    """The :data:`COLUMNS` of component ``k`` (0-based) of :func:`_components`."""
    scanner = affine[:3, :3] @ components["centroids"][k] + affine[:3, 3]
    voxels = int(components["voxels"][k])
    return {"region": region, "lesion": lesion, "volume_mm3": round(voxels * voxel_mm3, 4), "voxels": voxels,
            "centroid_x_mm": round(float(scanner[0]), 3), "centroid_y_mm": round(float(scanner[1]), 3), "centroid_z_mm": round(float(scanner[2]), 3),
            "score": round(float(components["scores"][k]), 6)}
