"""Deep supervision: one loss over the outputs of a network at several resolutions."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medseg.losses._inputs import check_nonnegative


class DeepSupervisionLoss(nn.Module):
    r"""Weighted sum of a loss over the outputs of a deeply supervised network (nnU-Net style).

    Accepted network outputs:

    - a stacked tensor ``(B, S, C, *spatial)``: MONAI ``DynUNet`` in training mode with
      ``deep_supervision=True``; all ``S`` heads are already upsampled to the full size, so each is
      compared with the full target;
    - a list/tuple of logits ``(B, C, *spatial_i)`` at decreasing resolutions, the full-size one first;
      the target is downsampled with nearest-neighbour interpolation to each size;
    - plain logits ``(B, C, *spatial)`` (e.g. the same network in eval mode, as in validation): the
      wrapped loss alone, whatever ``weights`` says.

    Output ``i`` (0 = full resolution) weighs ``w_i = 2^{-i} / \sum_j 2^{-j}`` (weights summing to 1;
    nnU-Net additionally zeroes the lowest resolution's weight: pass ``weights`` to do the same).

    Args:
        loss: the loss applied to every output (e.g. :class:`medseg.losses.FocalDiceLoss`).
        weights: one non-negative weight per output, full resolution first, used as given; None:
            the normalised ``1 / 2^i`` above, for however many outputs arrive.
        spatial_dims: number of spatial axes, which tells a stacked ``(B, S, C, *spatial)`` tensor
            (``spatial_dims + 3`` axes) from plain logits (``spatial_dims + 2``).

    :meth:`forward_with_terms` returns the total and, when ``loss`` has ``forward_with_terms``, its parts
    combined with the same weights (so ``total == sum_k lambda_k * part_k`` still holds); else no parts.

    Raises:
        ValueError: on negative weights or ``spatial_dims < 1``; in ``forward`` on an empty list, a
            number of outputs other than ``len(weights)``, or an input of unexpected rank.
    """

    def __init__(self, loss: nn.Module, weights: Sequence[float] | None = None, spatial_dims: int = 3) -> None:
        super().__init__()
        if not callable(loss):
            raise ValueError(f"expected a loss module, got {loss!r}")
        self.loss = loss
        self.weights = None if weights is None else [check_nonnegative("each deep supervision weight", w) for w in weights]
        if isinstance(spatial_dims, bool) or not isinstance(spatial_dims, int) or spatial_dims < 1:
            raise ValueError(f"expected spatial_dims to be a positive integer, got {spatial_dims!r}")
        self.spatial_dims = spatial_dims

    def output_weights(self, count: int) -> list[float]:
        """The weight of each of ``count`` outputs, full resolution first."""
        if self.weights is None:
            raw = [0.5**i for i in range(count)]
            return [w / sum(raw) for w in raw]
        if len(self.weights) != count:
            raise ValueError(f"expected {len(self.weights)} deep supervision outputs (one per weight), got {count}")
        return self.weights

    def forward_with_terms(self, input: Tensor | Sequence[Tensor], target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted total and the weighted sum of the wrapped loss's parts (if it has any)."""
        if self._plain(input):  # one output (eval mode): the wrapped loss alone, whatever the weights
            if hasattr(self.loss, "forward_with_terms"):
                return self.loss.forward_with_terms(input, target)
            return self.loss(input, target), {}
        outputs = self._outputs(input)
        total: Tensor | float = 0.0
        parts: dict[str, Tensor] = {}
        for weight, logits in zip(self.output_weights(len(outputs)), outputs, strict=True):
            level_target = self._resize(target, tuple(logits.shape[2:]))
            if hasattr(self.loss, "forward_with_terms"):
                value, level_parts = self.loss.forward_with_terms(logits, level_target)
            else:
                value, level_parts = self.loss(logits, level_target), {}
            total = total + weight * value
            for name, part in level_parts.items():
                parts[name] = parts[name] + weight * part if name in parts else weight * part
        return total, parts  # type: ignore[return-value]

    def forward(self, input: Tensor | Sequence[Tensor], target: Tensor) -> Tensor:
        """The weighted total (a scalar)."""
        if self._plain(input):
            return self.loss(input, target)
        return self.forward_with_terms(input, target)[0]

    def _plain(self, input: Tensor | Sequence[Tensor]) -> bool:
        return isinstance(input, Tensor) and input.ndim == self.spatial_dims + 2  # (B, C, *spatial)

    def _outputs(self, input: Tensor | Sequence[Tensor]) -> list[Tensor]:
        if isinstance(input, Tensor):
            if input.ndim == self.spatial_dims + 3:  # (B, S, C, *spatial)
                return list(input.unbind(1))
            raise ValueError(
                f"expected logits (B, C, *spatial) or stacked (B, S, C, *spatial) with {self.spatial_dims} spatial axes, "
                f"got shape {tuple(input.shape)}"
            )
        outputs = list(input)
        if not outputs:
            raise ValueError("expected at least one network output, got an empty sequence")
        return outputs

    def _resize(self, target: Tensor, size: tuple[int, ...]) -> Tensor:
        """``target`` (``(B, K, *spatial)`` or ``(B, *spatial)``) at ``size`` by nearest neighbour."""
        if tuple(target.shape[-self.spatial_dims :]) == size:
            return target
        no_channel = target.ndim == self.spatial_dims + 1  # class indices (B, *spatial)
        resized = target.unsqueeze(1) if no_channel else target
        dtype = resized.dtype
        # nearest interpolation needs a floating tensor; class indices and 0/1 values survive the round trip
        resized = F.interpolate(resized if dtype.is_floating_point else resized.to(torch.float32), size=size, mode="nearest")
        resized = resized.to(dtype)
        return resized.squeeze(1) if no_channel else resized
