"""Focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017, arXiv:1708.02002)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medseg.losses._inputs import (
    Batch,
    Mode,
    autocast_disabled,
    check_mode,
    check_nonnegative,
    check_reduction,
    compute_dtype,
    parse_alpha,
    prepare,
)
from medseg.losses._stats import RegionStats, region_stats


class FocalLoss(nn.Module):
    r"""Focal loss for multi-label (sigmoid) or multi-class (softmax) segmentation.

    Each voxel's cross-entropy is multiplied by :math:`(1 - p_t)^\gamma`, which shrinks the loss of the
    many easy (mostly background) voxels so the few hard lesion voxels dominate the gradient:

    .. math:: FL = -\alpha_t (1 - p_t)^\gamma \log p_t

    - sigmoid: per element, :math:`p_t = p` and :math:`\alpha_t = \alpha` where the target is 1,
      :math:`p_t = 1 - p` and :math:`\alpha_t = 1 - \alpha` where it is 0 (RetinaNet). A soft target
      :math:`t \in [0, 1]` mixes the two: :math:`t \cdot FL_{pos} + (1 - t) \cdot FL_{neg}`.
    - softmax: per voxel, :math:`p_t` is the softmax probability of the true class :math:`y` and
      :math:`\alpha_t = \alpha_y`; a one-hot or soft target :math:`t` gives :math:`\sum_c t_c FL_c`.

    ``gamma = 0`` with ``alpha = None`` is exactly ``BCEWithLogitsLoss`` / ``CrossEntropyLoss``. Everything
    is computed from log-sigmoid / log-softmax of the logits, in float32 (float64 for float64 logits) even
    under bf16/fp16 autocast, and logits of any magnitude give finite values and gradients.

    Worked example (one channel, three voxels)::

        >>> logits = torch.tensor([[0.8], [-1.5], [0.1]])
        >>> target = torch.tensor([[1.0], [0.0], [1.0]])
        >>> FocalLoss(gamma=1.5, alpha=0.25, mode="sigmoid")(logits, target)  # mean over the 3 elements
        tensor(0.0268)
        >>> FocalLoss(gamma=1.5, alpha=0.25, mode="sigmoid", reduction="sum")(logits, target)
        tensor(0.0805)

    that is 0.026843 and 0.080528; the latter is the figure a popular detection library prints for this
    example, because its focal loss sums over the rows.

    Args:
        gamma: focusing exponent :math:`\gamma \ge 0`; 0 gives (alpha-weighted) cross-entropy.
        alpha: class balance. None: no weighting. A number in [0, 1]: sigmoid: ``alpha`` for positives
            and ``1 - alpha`` for negatives of every channel; softmax: ``1 - alpha`` for the background
            class 0 and ``alpha`` for every other class. A sequence of one value per output channel
            (``C`` values, also when ``include_background`` is False): sigmoid: ``alpha[c]`` for the
            positives and ``1 - alpha[c]`` for the negatives of channel ``c`` (so a number equals the
            same number repeated; MONAI instead leaves negatives unweighted); softmax: ``alpha[c]``
            for the voxels of class ``c``.
        mode: ``"sigmoid"`` (independent channels, multi-hot target) or ``"softmax"`` (mutually
            exclusive classes, channel 0 = background).
        reduction: ``"mean"``: the mean over the elements of the ``"none"`` output (sigmoid: ``B * C *
            N`` elements, softmax: ``B * N`` voxels); ``"sum"``: their sum; ``"none"``: sigmoid
            ``(B, C, *spatial)``, softmax ``(B, *spatial)`` (``(N, C)`` / ``(N,)`` for ``(N, C)`` logits).
        include_background: if False, sigmoid: channel 0 is dropped (output and mean over ``C - 1``
            channels); softmax: voxels of class 0 contribute 0 (the mean still divides by all voxels).

    Shapes:
        input: logits ``(B, C, *spatial)`` or ``(N, C)``.
        target: sigmoid: the logits' shape, values in [0, 1]; softmax: class indices ``(B, 1, *spatial)``
        or ``(B, *spatial)`` (integer or integer-valued float), or one-hot of the logits' shape.

    Raises:
        ValueError: on bad arguments (negative gamma, alpha outside [0, 1], unknown mode or
            reduction) here, and in ``forward`` on a shape mismatch, an alpha sequence whose length is
            not ``C``, or target values outside ``[0, 1]`` / ``[0, C - 1]``.
    """

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: float | Sequence[float] | None = None,
        mode: Mode = "sigmoid",
        reduction: str = "mean",
        include_background: bool = True,
    ) -> None:
        super().__init__()
        self.gamma = check_nonnegative("gamma", gamma)
        self.mode = check_mode(mode)
        self.reduction = check_reduction(reduction)
        if not isinstance(include_background, bool):
            raise ValueError(f"expected include_background to be true or false, got {include_background!r}")
        self.include_background = include_background
        # A buffer, so that it follows .to(device); not persistent: the config is its source of truth.
        self.register_buffer("alpha", parse_alpha(alpha), persistent=False)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """Focal loss of logits ``input`` against ``target`` (shapes in the class docstring)."""
        batch = prepare(input, target, self.mode)
        with autocast_disabled(batch.logits.device):
            if self.reduction == "none":
                return focal_elementwise(batch, self.mode, self.gamma, self.alpha, self.include_background)
            stats = region_stats(batch, self.mode, self.gamma, focal=True, dice=False)
            return reduce_focal(stats, self.mode, self.alpha, self.include_background, self.reduction)

    def extra_repr(self) -> str:
        alpha = None if self.alpha is None else self.alpha.tolist()
        return (
            f"gamma={self.gamma}, alpha={alpha}, mode={self.mode!r}, reduction={self.reduction!r}, "
            f"include_background={self.include_background}"
        )


def alpha_weights(alpha: Tensor | None, mode: Mode, channels: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel weights ``(w_pos, w_neg)``, each ``(C,)`` (softmax: ``w_neg`` is unused).

    Raises:
        ValueError: if ``alpha`` holds one value per channel but not ``C`` of them.
    """
    ones = torch.ones(channels, dtype=like.dtype, device=like.device)
    if alpha is None:
        return ones, ones
    alpha = alpha.to(like)
    if alpha.ndim == 1 and alpha.numel() != channels:
        raise ValueError(f"expected alpha with one value per output channel ({channels}), got {alpha.numel()} values")
    if mode == "sigmoid":
        pos = alpha.expand(channels)
        return pos, 1 - pos
    if alpha.ndim == 0:  # background 1 - alpha, foreground classes alpha
        return torch.cat([(1 - alpha).view(1), alpha.expand(channels - 1)]), ones
    return alpha, ones


def _first_channel(include_background: bool, channels: int) -> int:
    """0, or 1 when channel 0 is excluded (which needs at least 2 channels)."""
    if include_background:
        return 0
    if channels < 2:
        raise ValueError(f"expected at least 2 channels when include_background is False (channel 0 is dropped), got {channels}")
    return 1


def reduce_focal(stats: RegionStats, mode: Mode, alpha: Tensor | None, include_background: bool, reduction: str) -> Tensor:
    """Reduce the fused focal sums ``(B, C)`` to the ``"mean"`` or ``"sum"`` focal loss (a scalar)."""
    batch, channels = stats.focal_pos.shape
    first = _first_channel(include_background, channels)
    w_pos, w_neg = alpha_weights(alpha, mode, channels, stats.focal_pos)
    per_channel = w_pos * stats.focal_pos  # (B, C)
    if mode == "sigmoid":
        per_channel = per_channel + w_neg * stats.focal_neg
        count = batch * (channels - first) * stats.num_voxels  # elements of the 'none' output
    else:
        count = batch * stats.num_voxels  # voxels
    total = per_channel[:, first:].sum()
    return total if reduction == "sum" else total / count


def focal_elementwise(batch: Batch, mode: Mode, gamma: float, alpha: Tensor | None, include_background: bool) -> Tensor:
    """The unreduced focal loss (``reduction="none"``), with ordinary autograd.

    Returns:
        sigmoid: ``(B, C', *spatial)`` with ``C' = C`` or ``C - 1`` without background; softmax:
        ``(B, *spatial)``. In float32 (float64 for float64 logits).
    """
    dtype = compute_dtype(batch.logits.dtype)
    x = batch.logits.to(dtype)  # (B, C, N)
    channels = x.shape[1]
    first = _first_channel(include_background, channels)
    w_pos, w_neg = alpha_weights(alpha, mode, channels, x)
    if mode == "sigmoid":
        t = batch.target.to(dtype)  # (B, C, N)
        sp = F.softplus(x)  # -log(1 - p); not nlp + x, which cancels for x << 0
        nlp = F.softplus(-x)  # -log p
        # q**gamma = exp(-gamma * sp) and p**gamma = exp(-gamma * nlp): finite gradients at p = 0 or 1
        pos = torch.exp(-gamma * sp) * nlp
        neg = torch.exp(-gamma * nlp) * sp
        loss = w_pos.view(1, -1, 1) * t * pos + w_neg.view(1, -1, 1) * (1 - t) * neg  # (B, C, N)
        return loss[:, first:].reshape(x.shape[0], channels - first, *batch.spatial)
    w = w_pos.clone()
    w[:first] = 0  # softmax without background: class-0 voxels contribute 0
    logp = torch.log_softmax(x, dim=1)  # (B, C, N)
    if batch.indices:
        logp_y = logp.gather(1, batch.target)  # (B, 1, N)
        loss = w[batch.target] * torch.exp(gamma * _log1mexp(logp_y)) * -logp_y  # (B, 1, N)
    else:
        t = batch.target.to(dtype)  # (B, C, N)
        loss = (w.view(1, -1, 1) * t * torch.exp(gamma * _log1mexp(logp)) * -logp).sum(1)  # (B, N)
    return loss.reshape(x.shape[0], *batch.spatial)


def _log1mexp(a: Tensor) -> Tensor:
    """``log(1 - exp(a))`` for ``a <= 0``, stable (Maechler 2012), with finite gradients everywhere.

    ``a`` is clamped just below 0 (at ``p = 1`` the true value is ``-inf``); both branches get inputs in
    their own range so that the branch torch.where discards cannot produce NaN gradients.
    """
    cut = -math.log(2.0)
    tiny = torch.finfo(a.dtype).tiny ** 0.25  # ~1e-10 in float32; log(1 - exp(-tiny)) is finite
    near = torch.log(-torch.expm1(a.clamp(cut, -tiny)))
    far = torch.log1p(-torch.exp(a.clamp(max=cut)))
    return torch.where(a > cut, near, far)
