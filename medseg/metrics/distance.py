"""Surface distance metrics in millimetres: the 95th-percentile Hausdorff distance (HD95).

HD95 is computed by MONAI's ``compute_hausdorff_distance(percentile=95, spacing=...)``: surface voxels are the
mask voxels with a 6-neighbour outside the mask (or outside the volume), and the result is the larger of the
two directed 95th percentiles (linear interpolation) of the distances from each surface voxel of one mask
to the nearest surface voxel of the other, with voxel coordinates scaled by the spacing. MONAI returns
NaN/inf with warnings when a mask is empty; here the empty cases are explicit arguments instead:

* both masks empty: ``both_empty`` (default 0.0, as BraTS 2023);
* exactly one mask empty: ``one_empty``; the default ``None`` uses the diagonal of the volume in mm, the
  largest distance possible inside it (BraTS 2023 uses the constant 374 mm, about the diagonal of its
  240x240x155 1-mm volumes, 373.1 mm). Pass ``float("nan")`` or ``float("inf")`` to flag such cases instead.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance
from torch import Tensor

from medseg.metrics.lesion import as_binary_mask, validate_spacing


def hausdorff_distance_95(
    pred: np.ndarray | Tensor,
    target: np.ndarray | Tensor,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    both_empty: float = 0.0,
    one_empty: float | None = None,
) -> float:
    """95th-percentile symmetric Hausdorff distance in mm between two binary masks.

    Args:
        pred: predicted binary mask (numpy array or tensor, 0/1 or bool), shape ``(D, H, W)``.
        target: reference binary mask, shape ``(D, H, W)``.
        spacing: voxel size in mm along the three array axes (same order as the array dimensions).
        both_empty: value when neither mask has a foreground voxel.
        one_empty: value when exactly one mask is empty; ``None`` = the volume diagonal in mm,
            ``sqrt(sum((shape_i * spacing_i) ** 2))``.

    Returns:
        HD95 in mm (a Python float; MONAI computes it in float32).

    Raises:
        ValueError: on non-binary masks, mismatched shapes or invalid spacing.
    """
    pred_np, target_np = as_binary_mask(pred, "pred"), as_binary_mask(target, "target")
    if pred_np.ndim != 3 or pred_np.shape != target_np.shape:
        raise ValueError(
            f"expected pred and target of the same shape (D, H, W), got {pred_np.shape} and {target_np.shape}"
        )
    spacing = validate_spacing(spacing)
    pred_any, target_any = bool(pred_np.any()), bool(target_np.any())
    if not pred_any and not target_any:
        return float(both_empty)
    if not pred_any or not target_any:
        if one_empty is None:
            return math.sqrt(sum((n * s) ** 2 for n, s in zip(pred_np.shape, spacing)))
        return float(one_empty)
    with warnings.catch_warnings():
        # MONAI >= 1.5 warns about its own internal use of a deprecated argument of get_mask_edges
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        hd = compute_hausdorff_distance(
            torch.from_numpy(pred_np)[None, None],  # (1, 1, D, H, W)
            torch.from_numpy(target_np)[None, None],
            include_background=True,  # the single channel is the foreground
            percentile=95.0,
            spacing=list(spacing),
        )  # (1, 1)
    return float(hd[0, 0])
