"""Voxel overlap metrics per case and region: Dice, IoU (Jaccard), recall (sensitivity) and precision.

A functional core (:func:`confusion_counts`, :func:`overlap_scores`) and a :class:`torchmetrics.Metric`
that stores the per-case counts as a concatenated state, so that the value reduced across DDP processes
equals the single-process value exactly. Scores are computed per case, then averaged over cases (the
BraTS convention), not pooled over all voxels of the dataset.

Empty conventions (``empty_score``, default 1.0 as in the BraTS ranking): when a case has no reference
and no predicted voxel of a region, its Dice and IoU are ``empty_score``; recall is ``empty_score`` when
the reference is empty, precision when the prediction is empty. ``empty_score=float("nan")`` leaves such
cases out of the averages instead (the nnU-Net convention).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

SCORES = ("dice", "iou", "recall", "precision")


def binarize(logits: Tensor, mode: Literal["sigmoid", "softmax"], threshold: float = 0.5) -> Tensor:
    """Network outputs to binary foreground channels.

    Args:
        logits: ``(B, C, *spatial)`` raw network outputs.
        mode: ``"sigmoid"`` thresholds each channel's probability at ``threshold`` (overlapping regions);
            ``"softmax"`` takes the argmax and one-hot encodes the foreground classes.

    Returns:
        Boolean ``(B, R, *spatial)``: R = C for sigmoid, C - 1 (background dropped) for softmax.
    """
    if mode == "sigmoid":
        return torch.sigmoid(logits.float()) > threshold
    if mode == "softmax":
        index = logits.argmax(dim=1)  # (B, *spatial)
        return torch.stack([index == c for c in range(1, logits.shape[1])], dim=1)
    raise ValueError(f"expected mode 'sigmoid' or 'softmax', got {mode!r}")


def target_channels(target: Tensor, mode: Literal["sigmoid", "softmax"], num_outputs: int) -> Tensor:
    """Training targets to boolean foreground channels ``(B, R, *spatial)``, matching :func:`binarize`.

    Args:
        target: sigmoid: multi-hot ``(B, R, *spatial)``; softmax: class indices ``(B, 1, *spatial)``.
        num_outputs: network output channels (softmax: classes including background).
    """
    if mode == "sigmoid":
        return target > 0.5
    index = target[:, 0].long()
    return torch.stack([index == c for c in range(1, num_outputs)], dim=1)


def confusion_counts(pred: Tensor, target: Tensor) -> Tensor:
    """True positive, false positive and false negative voxel counts per case and channel.

    Args:
        pred: binary ``(B, C, *spatial)``.
        target: binary ``(B, C, *spatial)``.

    Returns:
        ``(B, C, 3)`` float64 counts ``[tp, fp, fn]``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"expected pred and target of the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.ndim < 3:
        raise ValueError(f"expected (B, C, *spatial) inputs, got shape {tuple(pred.shape)}")
    pred, target = pred.bool().flatten(2), target.bool().flatten(2)  # (B, C, N)
    tp = (pred & target).sum(-1)
    fp = (pred & ~target).sum(-1)
    fn = (~pred & target).sum(-1)
    return torch.stack([tp, fp, fn], dim=-1).double()


def overlap_scores(counts: Tensor, empty_score: float = 1.0) -> dict[str, Tensor]:
    """Dice, IoU, recall and precision from ``[tp, fp, fn]`` counts ``(..., 3)``, with the empty convention.

    Returns:
        ``{"dice", "iou", "recall", "precision"}``, each of shape ``counts.shape[:-1]``.
    """
    tp, fp, fn = counts.unbind(-1)

    def ratio(num: Tensor, den: Tensor) -> Tensor:
        return torch.where(den > 0, num / den.clamp_min(1), torch.full_like(num, empty_score))

    return {
        "dice": ratio(2 * tp, 2 * tp + fp + fn),
        "iou": ratio(tp, tp + fp + fn),
        "recall": ratio(tp, tp + fn),
        "precision": ratio(tp, tp + fp),
    }


class OverlapMetrics(Metric):
    """Per-case Dice, IoU, recall and precision for named regions, averaged over cases.

    Args:
        names: region/class names, one per channel of the inputs (used in the result keys).
        empty_score: score of a case whose reference and prediction are both empty (see module doc).

    ``compute()`` returns ``{"dice_<name>": ..., "dice": mean over regions, "iou_<name>": ..., ...}``.

    Example:
        >>> metric = OverlapMetrics(["wt", "tc", "et"])
        >>> metric.update(pred, target)   # binary (B, 3, H, W, D)
        >>> metric.compute()["dice_et"]
    """

    full_state_update = False

    def __init__(self, names: Sequence[str], empty_score: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if not names:
            raise ValueError("expected at least one region name, got none")
        self.names = tuple(names)
        self.empty_score = float(empty_score)
        self.add_state("counts", default=[], dist_reduce_fx="cat")
        self.last_counts: Tensor | None = None  # the latest update's (B, C, 3) counts (this process; not a state)

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add cases. ``pred`` and ``target``: binary ``(B, C, *spatial)`` with C = ``len(names)``.

        Afterwards :attr:`last_counts` holds their :func:`confusion_counts` ``(B, C, 3)``, for per-case reports
        (:func:`medseg.metrics.cases.case_rows`) that would otherwise count them again."""
        if pred.shape[1] != len(self.names):
            raise ValueError(f"expected {len(self.names)} channels ({', '.join(self.names)}), got {pred.shape[1]}")
        self.last_counts = confusion_counts(pred, target)
        self.counts.append(self.last_counts.to(self.device))  # inputs stitched on the CPU join the states' device

    def sync(self, *args: Any, **kwargs: Any) -> None:
        # A process that saw no case (fewer validation cases than processes) sends an empty (0, C, 3) float64 state,
        # shaped as the others', instead of torchmetrics' 1-D float32 empty tensor, which the gather cannot join.
        if isinstance(self.counts, list) and not self.counts:
            self.counts.append(torch.zeros(0, len(self.names), 3, dtype=torch.float64, device=self.device))
        super().sync(*args, **kwargs)

    def per_case(self) -> dict[str, Tensor]:
        """Scores of every case seen so far, each ``(N, C)``."""
        return overlap_scores(dim_zero_cat(self.counts), self.empty_score)

    def compute(self) -> dict[str, Tensor]:
        result: dict[str, Tensor] = {}
        for score, values in self.per_case().items():  # (N, C)
            per_region = values.nanmean(0)
            for name, value in zip(self.names, per_region):
                result[f"{score}_{name}"] = value.float()
            result[score] = per_region.nanmean().float()
        return result
