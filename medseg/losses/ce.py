"""Cross-entropy baselines: plain (weighted), class-balanced, and top-k (online hard example mining)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medseg.losses._inputs import Mode, autocast_disabled, check_mode, compute_dtype, prepare
from medseg.losses._stats import region_stats
from medseg.losses.focal import focal_elementwise


class CrossEntropyLoss(nn.Module):
    """Binary (sigmoid) or categorical (softmax) cross-entropy on logits, as torch computes it.

    sigmoid: ``F.binary_cross_entropy_with_logits``, mean over all ``B * C * N`` elements, ``weight[c]``
    multiplying channel ``c``. softmax: ``F.cross_entropy``; with class-index targets and ``weight`` the
    mean is weighted (divided by the sum of the voxels' weights), as in torch.

    Args:
        mode: ``"sigmoid"`` or ``"softmax"``.
        weight: optional per-channel weights (``C`` non-negative values).

    Shapes:
        input: logits ``(B, C, *spatial)``. target: as for :class:`medseg.losses.FocalLoss`.

    Raises:
        ValueError: on an unknown mode, negative or wrongly sized weights, shape mismatches or target
            values out of range.
    """

    def __init__(self, mode: Mode, weight: Sequence[float] | None = None) -> None:
        super().__init__()
        self.mode = check_mode(mode)
        if weight is not None:
            weight = torch.as_tensor([float(w) for w in weight])
            if weight.ndim != 1 or weight.numel() == 0 or bool((weight < 0).any()):
                raise ValueError(f"expected weight to be a list of non-negative numbers, one per channel, got {weight.tolist()}")
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """Mean cross-entropy (a scalar)."""
        batch = prepare(input, target, self.mode)
        with autocast_disabled(batch.logits.device):
            x = batch.logits.to(compute_dtype(batch.logits.dtype))  # (B, C, N)
            weight = None
            if self.weight is not None:
                if self.weight.numel() != x.shape[1]:
                    raise ValueError(f"expected weight with one value per output channel ({x.shape[1]}), got {self.weight.numel()} values")
                weight = self.weight.to(x)
            if self.mode == "sigmoid":
                weight = None if weight is None else weight.view(1, -1, 1)
                return F.binary_cross_entropy_with_logits(x, batch.target.to(x.dtype), weight=weight)
            target = batch.target.squeeze(1) if batch.indices else batch.target.to(x.dtype)  # (B, N) or (B, C, N)
            return F.cross_entropy(x, target, weight=weight)


class BalancedCELoss(nn.Module):
    """Class-balanced cross-entropy: every class present in the batch weighs the same.

    softmax: the mean over the classes present in the batch of each class's mean CE over its voxels
    (``sum_{voxels of c} -log p_c / #voxels of c``); absent classes are left out. sigmoid: per channel,
    the mean of the positives' mean BCE and the negatives' mean BCE (HED-style balancing), absent
    parts left out; then the mean over channels. Counts are soft sums for soft targets. Equivalent to
    weighting each voxel by the inverse frequency of its class in the batch, computed on the fly.

    Args:
        mode: ``"sigmoid"`` or ``"softmax"``.

    Raises:
        ValueError: on an unknown mode, shape mismatches or target values out of range.
    """

    def __init__(self, mode: Mode) -> None:
        super().__init__()
        self.mode = check_mode(mode)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """Balanced cross-entropy (a scalar); 0 for an empty batch."""
        batch = prepare(input, target, self.mode)
        with autocast_disabled(batch.logits.device):
            stats = region_stats(batch, self.mode, gamma=0.0, focal=True, dice=False)
            positives = stats.target_sum.sum(0)  # (C,) soft voxel counts per class / channel
            means = [stats.focal_pos.sum(0) / positives.clamp_min(1e-12)]  # (C,) mean CE per class
            present = [positives > 0]
            if self.mode == "sigmoid":
                negatives = batch.logits.shape[0] * stats.num_voxels - positives
                means.append(stats.focal_neg.sum(0) / negatives.clamp_min(1e-12))
                present.append(negatives > 0)
            means, present = torch.stack(means), torch.stack(present)  # (parts, C)
            if self.mode == "sigmoid":  # per channel the mean of its present parts, then over channels
                return ((means * present).sum(0) / present.sum(0).clamp_min(1)).mean()
            return (means * present).sum() / present.sum().clamp_min(1)


class TopKCELoss(nn.Module):
    """Cross-entropy over the hardest ``k`` percent of the elements (online hard example mining).

    The per-element CE (sigmoid: every channel of every voxel; softmax: every voxel) is computed, the
    largest ``ceil(k / 100 * count)`` values are kept and averaged, as nnU-Net's ``TopKLoss`` (k = 10).
    ``k = 100`` is plain mean cross-entropy.

    Args:
        mode: ``"sigmoid"`` or ``"softmax"``.
        k: percentage of elements kept, in (0, 100].

    Raises:
        ValueError: on an unknown mode, ``k`` outside (0, 100], shape mismatches or target values out of
            range.
    """

    def __init__(self, mode: Mode, k: float = 10.0) -> None:
        super().__init__()
        self.mode = check_mode(mode)
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 100:
            raise ValueError(f"expected k, the percentage of elements kept, in (0, 100], got {k!r}")
        self.k = float(k)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """Mean CE of the hardest ``k`` percent (a scalar)."""
        batch = prepare(input, target, self.mode)
        with autocast_disabled(batch.logits.device):
            ce = focal_elementwise(batch, self.mode, gamma=0.0, alpha=None, include_background=True).flatten()
            kept = max(1, math.ceil(self.k / 100 * ce.numel()))
            return ce.topk(kept, sorted=False).values.mean()
