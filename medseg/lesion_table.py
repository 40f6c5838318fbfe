"""The predicted lesions of a case, one row each: what a reader checks lesion by lesion.

For every region (sigmoid) or class (softmax) of a prediction, the connected components of its final mask (after
the operating point's threshold and size filter, with the model's connectivity) are listed with their volume, their
centroid in scanner coordinates (the input file's affine: RAS+ millimetres for NIfTI) and a score: the maximum (or
mean) probability of the region inside the component, the evidence a detection threshold on components would use.
``medseg.predict lesion_table=true`` writes ``<output>/lesions/<case>.csv``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import cc3d
import numpy as np
from scipy import ndimage
from torch import Tensor

SCORES = ("max", "mean")
COLUMNS = ("region", "lesion", "volume_mm3", "voxels", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm", "score")


def lesion_rows(masks: np.ndarray, probs: Tensor, names: Sequence[str], mode: str, affine: np.ndarray, connectivity: int = 26, score: Literal["max", "mean"] = "max") -> list[dict[str, Any]]:
    """One row per connected component of every region's mask.

    Args:
        masks: boolean ``(R, X, Y, Z)``: the final masks (as :func:`medseg.postprocess.postprocess` returns them).
        probs: ``(C_out, X, Y, Z)`` probabilities on the same grid: sigmoid per region, softmax per class (background
            first: region ``r`` is class ``r + 1``).
        names: the region or class names, one per mask.
        affine: ``(4, 4)`` voxel-to-scanner matrix of the grid.
        connectivity: of the components (6, 18, 26).
        score: ``max`` or ``mean`` probability of the region inside a component.

    Returns:
        Rows with :data:`COLUMNS`: ``lesion`` numbers the components of a region from 1, largest first.
    """
    if score not in SCORES:
        raise ValueError(f"expected lesion score one of {SCORES}, got {score!r}")
    if masks.shape[0] != len(names):
        raise ValueError(f"expected one name per mask, got {len(names)} names for {masks.shape[0]} masks")
    voxel_mm3 = float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])))
    rows: list[dict[str, Any]] = []
    for r, name in enumerate(names):
        if not masks[r].any():
            continue
        components, n = cc3d.connected_components(masks[r], connectivity=connectivity, return_N=True)
        stats = cc3d.statistics(components)
        channel = (probs[r] if mode == "sigmoid" else probs[r + 1]).detach().cpu().numpy()
        ids = np.arange(1, n + 1)
        scores = (ndimage.maximum if score == "max" else ndimage.mean)(channel, components, ids)
        counts = np.asarray(stats["voxel_counts"])[1:]
        centroids = np.asarray(stats["centroids"])[1:]  # voxel coordinates
        scanner = centroids @ np.asarray(affine, dtype=np.float64)[:3, :3].T + np.asarray(affine, dtype=np.float64)[:3, 3]
        for rank, k in enumerate(np.argsort(-counts, kind="stable"), start=1):
            rows.append({
                "region": name, "lesion": rank, "volume_mm3": round(float(counts[k]) * voxel_mm3, 4), "voxels": int(counts[k]),
                "centroid_x_mm": round(float(scanner[k, 0]), 3), "centroid_y_mm": round(float(scanner[k, 1]), 3), "centroid_z_mm": round(float(scanner[k, 2]), 3),
                "score": round(float(np.asarray(scores)[k]), 6),
            })  # fmt: skip
    return rows
