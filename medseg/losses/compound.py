"""Compound losses: focal + Dice, and Dice + cross-entropy (nnU-Net's default), from one activation."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from medseg.losses._inputs import Mode, autocast_disabled, check_mode, check_nonnegative, check_optional_bool, parse_alpha, prepare
from medseg.losses._stats import region_stats
from medseg.losses.dice import dice_include_background, reduce_dice
from medseg.losses.focal import reduce_focal


class FocalDiceLoss(nn.Module):
    r"""``lambda_focal * focal + lambda_dice * Dice``, both terms from the same activation.

    The focal term is :class:`medseg.losses.FocalLoss` with ``reduction="mean"``, the Dice term
    :class:`medseg.losses.DiceLoss`; ``mode`` selects sigmoid or softmax for BOTH (unlike MONAI's
    ``DiceFocalLoss(softmax=True)``, whose focal term stays sigmoid: MONAI issue #8242). One fused pass
    computes the sums of both terms, so the pair costs little more than either.

    :meth:`forward_with_terms` also returns the two terms, unweighted: ``total == lambda_focal *
    terms["focal"] + lambda_dice * terms["dice"]``; the training module logs them as
    ``train/loss_focal`` and ``train/loss_dice``.

    Args:
        mode: ``"sigmoid"`` or ``"softmax"``.
        gamma: focal exponent (>= 0).
        alpha: focal class balance (see :class:`medseg.losses.FocalLoss`).
        lambda_focal: weight of the focal term (>= 0).
        lambda_dice: weight of the Dice term (>= 0).
        include_background: None (default): each term's own default: the focal term covers every
            channel (like nnU-Net's cross-entropy) and the Dice term drops channel 0 in softmax mode
            (nnU-Net's ``do_bg=False``); in sigmoid mode both cover every channel. True/False: applies
            to both terms.
        batch_dice: Dice over the whole batch per channel (see :class:`medseg.losses.DiceLoss`).
        smooth: Dice smoothing (see :class:`medseg.losses.DiceLoss`).
        squared: squared Dice denominator.

    Shapes:
        input: logits ``(B, C, *spatial)``. target: as for :class:`medseg.losses.FocalLoss`.

    Raises:
        ValueError: on bad arguments here or in the parts, and in ``forward`` on a shape mismatch or
            target values out of range.
    """

    def __init__(
        self,
        mode: Mode,
        gamma: float = 2.0,
        alpha: float | Sequence[float] | None = None,
        lambda_focal: float = 1.0,
        lambda_dice: float = 1.0,
        include_background: bool | None = None,
        batch_dice: bool = False,
        smooth: float = 1e-5,
        squared: bool = False,
    ) -> None:
        super().__init__()
        self.mode = check_mode(mode)
        self.gamma = check_nonnegative("gamma", gamma)
        self.register_buffer("alpha", parse_alpha(alpha), persistent=False)
        self.lambda_focal = check_nonnegative("lambda_focal", lambda_focal)
        self.lambda_dice = check_nonnegative("lambda_dice", lambda_dice)
        include_background = check_optional_bool("include_background", include_background)
        self.focal_background = True if include_background is None else include_background
        self.dice_background = dice_include_background(self.mode, include_background)
        self.batch_dice = bool(batch_dice)
        self.smooth = check_nonnegative("smooth", smooth)
        self.squared = bool(squared)

    def forward_with_terms(self, input: Tensor, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The total and its unweighted parts ``{"focal": ..., "dice": ...}`` (all scalars, with graph)."""
        focal, dice = _focal_and_dice(self, input, target, self.gamma, self.alpha)
        return self.lambda_focal * focal + self.lambda_dice * dice, {"focal": focal, "dice": dice}

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """``lambda_focal * focal + lambda_dice * dice`` (a scalar)."""
        return self.forward_with_terms(input, target)[0]

    def extra_repr(self) -> str:
        alpha = None if self.alpha is None else self.alpha.tolist()
        return (
            f"mode={self.mode!r}, gamma={self.gamma}, alpha={alpha}, lambda_focal={self.lambda_focal}, lambda_dice={self.lambda_dice}, "
            f"focal_background={self.focal_background}, dice_background={self.dice_background}, batch_dice={self.batch_dice}"
        )


class DiceCELoss(FocalDiceLoss):
    r"""``lambda_ce * cross-entropy + lambda_dice * Dice`` (nnU-Net's ``DC_and_CE_loss``), one activation.

    :class:`FocalDiceLoss` with ``gamma = 0`` and no ``alpha`` (the focal term is then exactly cross-entropy):
    the mean binary CE over all elements (sigmoid) or the mean CE over voxels (softmax), as torch computes
    it; Dice is :class:`medseg.losses.DiceLoss`. :meth:`forward_with_terms` returns the unweighted parts
    ``{"ce": ..., "dice": ...}``: ``total == lambda_ce * ce + lambda_dice * dice``.

    Args:
        mode: ``"sigmoid"`` or ``"softmax"``.
        lambda_ce: weight of the cross-entropy term (>= 0).
        lambda_dice: weight of the Dice term (>= 0).
        include_background: None (default): CE over every channel, Dice without channel 0 in softmax
            mode; True/False: applies to both terms (see :class:`FocalDiceLoss`).
        batch_dice: Dice over the whole batch per channel.
        smooth: Dice smoothing.
        squared: squared Dice denominator.

    Raises:
        ValueError: on bad arguments, shape mismatches or target values out of range.
    """

    def __init__(
        self,
        mode: Mode,
        lambda_ce: float = 1.0,
        lambda_dice: float = 1.0,
        include_background: bool | None = None,
        batch_dice: bool = False,
        smooth: float = 1e-5,
        squared: bool = False,
    ) -> None:
        check_nonnegative("lambda_ce", lambda_ce)  # named as the caller wrote it
        super().__init__(mode, 0.0, None, lambda_ce, lambda_dice, include_background, batch_dice, smooth, squared)
        self.lambda_ce = self.lambda_focal

    def forward_with_terms(self, input: Tensor, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The total and its unweighted parts ``{"ce": ..., "dice": ...}`` (all scalars, with graph)."""
        total, terms = super().forward_with_terms(input, target)
        return total, {"ce": terms["focal"], "dice": terms["dice"]}

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode!r}, lambda_ce={self.lambda_ce}, lambda_dice={self.lambda_dice}, "
            f"ce_background={self.focal_background}, dice_background={self.dice_background}, batch_dice={self.batch_dice}"
        )


def _focal_and_dice(
    loss: FocalDiceLoss, input: Tensor, target: Tensor, gamma: float, alpha: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The mean focal (CE for gamma = 0) and Dice terms of ``loss``'s settings, from one fused pass."""
    batch = prepare(input, target, loss.mode)
    with autocast_disabled(batch.logits.device):
        stats = region_stats(batch, loss.mode, gamma, focal=True, dice=True, squared=loss.squared)
        focal = reduce_focal(stats, loss.mode, alpha, loss.focal_background, "mean")
        dice = reduce_dice(stats, loss.dice_background, loss.smooth, loss.batch_dice)
    return focal, dice
