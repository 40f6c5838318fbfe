"""Soft Dice loss (Milletari et al., "V-Net", 3DV 2016, arXiv:1606.04797; nnU-Net's SoftDiceLoss)."""

from __future__ import annotations

from torch import Tensor, nn

from medseg.losses._inputs import Mode, autocast_disabled, check_mode, check_nonnegative, check_optional_bool, prepare
from medseg.losses._stats import RegionStats, region_stats

# Keeps 0 / 0 out of the Dice ratio when smooth = 0 and a channel is empty in target and prediction.
_MIN_DENOMINATOR = 1e-8


def dice_include_background(mode: Mode, include_background: bool | None) -> bool:
    """The effective Dice ``include_background``: None means True for sigmoid, False for softmax."""
    return (mode == "sigmoid") if include_background is None else include_background


class DiceLoss(nn.Module):
    r"""Soft Dice loss on sigmoid or softmax probabilities: ``1 - mean(Dice)``.

    Per batch item ``b`` and channel ``c`` (over the voxels; over the batch too if ``batch_dice``):

    .. math:: Dice_{bc} = \frac{2 \sum p t + s}{\sum p + \sum t + s}

    (``p**2`` and ``t**2`` in the denominator if ``squared``), and the loss is ``1 - mean_{b,c} Dice``.

    Empty masks: the convention is set by ``smooth`` (``s``). A channel with an empty target scores
    ``s / (sum p + s)``: 1 (loss 0) if the prediction is empty too, about 0 (loss about 1, with a tiny
    gradient) otherwise, since ``sum p`` over a patch dwarfs the default ``s = 1e-5``. With ``s = 0`` an
    empty/empty channel scores 0 (the denominator is clamped at 1e-8 rather than giving NaN).

    Args:
        mode: ``"sigmoid"`` (independent channels) or ``"softmax"`` (classes, channel 0 = background).
        include_background: whether channel 0 counts. None (default): True for sigmoid, where every
            channel is a foreground region, False for softmax, where channel 0 is the background class
            (nnU-Net's ``do_bg=False``: the background Dice is large and uninformative).
        smooth: ``s`` above, added to numerator and denominator (nnU-Net and MONAI use 1e-5).
        batch_dice: sum over the batch before the ratio (one Dice per channel; nnU-Net's batch Dice),
            instead of one Dice per item and channel.
        squared: squares in the denominator (V-Net) instead of plain sums.

    Shapes:
        input: logits ``(B, C, *spatial)``. target: as for :class:`medseg.losses.FocalLoss`.

    Raises:
        ValueError: on an unknown mode or a negative smooth, and in ``forward`` on a shape mismatch or
            target values out of range.
    """

    def __init__(
        self,
        mode: Mode,
        include_background: bool | None = None,
        smooth: float = 1e-5,
        batch_dice: bool = False,
        squared: bool = False,
    ) -> None:
        super().__init__()
        self.mode = check_mode(mode)
        self.include_background = dice_include_background(self.mode, check_optional_bool("include_background", include_background))
        self.smooth = check_nonnegative("smooth", smooth)
        self.batch_dice = bool(batch_dice)
        self.squared = bool(squared)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """Dice loss (a scalar) of logits ``input`` against ``target``."""
        batch = prepare(input, target, self.mode)
        with autocast_disabled(batch.logits.device):
            stats = region_stats(batch, self.mode, focal=False, dice=True, squared=self.squared)
            return reduce_dice(stats, self.include_background, self.smooth, self.batch_dice)

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode!r}, include_background={self.include_background}, smooth={self.smooth}, "
            f"batch_dice={self.batch_dice}, squared={self.squared}"
        )


def reduce_dice(stats: RegionStats, include_background: bool, smooth: float, batch_dice: bool) -> Tensor:
    """``1 - mean Dice`` from the fused sums ``(B, C)``.

    Raises:
        ValueError: if channel 0 is to be excluded from a single-channel output.
    """
    inter, pred, true = stats.intersection, stats.pred_sum, stats.target_sum  # (B, C) each
    if not include_background:
        if inter.shape[1] < 2:
            raise ValueError(f"expected at least 2 channels when include_background is False (channel 0 is dropped), got {inter.shape[1]}")
        inter, pred, true = inter[:, 1:], pred[:, 1:], true[:, 1:]
    if batch_dice:
        inter, pred, true = inter.sum(0), pred.sum(0), true.sum(0)  # (C,)
    dice = (2 * inter + smooth) / (pred + true + smooth).clamp_min(_MIN_DENOMINATOR)
    return 1 - dice.mean()
