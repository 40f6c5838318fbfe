"""Connected-component Dice + CE (the CC-DiceCE loss of the connected-component metrics family: Jaus et al.,
"CC-Metrics", arXiv:2410.18684, and its training loss, arXiv:2511.17146): every reference lesion is scored in its
own region of influence, so that a missed small lesion costs as much as a missed large one, and predictions far
from any lesion are charged to the lesion nearest to them.

The volume of each (item, channel) is split into the Voronoi cells of its reference components: voxel ``v``
belongs to the cell of the component nearest to it (Euclidean distance in voxels, to the component's nearest
voxel). In cell :math:`\\Omega_k` of component ``k``, with probabilities ``p`` and binary target ``t``:

.. math::

    D_k = 1 - \\frac{2 \\sum_{\\Omega_k} p t + s}{\\sum_{\\Omega_k} p + \\sum_{\\Omega_k} t + s}, \\qquad
    CE_k = -\\frac{1}{|\\Omega_k|} \\sum_{\\Omega_k} \\left[t \\log p + (1 - t) \\log(1 - p)\\right]

    L = \\lambda_{global} L_{DiceCE}(p, t) + \\lambda_{cc} \\frac{1}{K} \\sum_k \\left(\\lambda_{dice} D_k +
        \\lambda_{ce} CE_k\\right)

over the ``K`` components of the whole batch (every lesion weighs the same; items and channels without a lesion
add only to the global term). Unlike blob loss, which masks the other lesions out, every voxel lies in exactly
one cell, so false positives between lesions are charged to the nearest lesion's term.

Modes as :class:`medseg.losses.BlobLoss`: ``sigmoid`` (the components of each channel) and ``softmax`` (each
foreground class one-vs-rest on ``p_c``). The partition is computed on the CPU from the target (no gradient):
one connected-component labelling and one Euclidean distance transform per (item, channel) with lesions; the
loss terms are per-cell sums (one ``index_add`` each), so their cost does not grow with the lesion count.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from medseg.losses._inputs import Mode, autocast_disabled, check_nonnegative
from medseg.losses.blob import _CONNECTIVITIES, component_inputs, lesion_components
from medseg.losses.compound import DiceCELoss


def influence_regions(target: Tensor, connectivity: int = 26) -> tuple[Tensor, Tensor]:
    """The Voronoi cells of the reference components of every (item, channel), numbered across the batch:
    :func:`medseg.losses.blob.lesion_components` with ``regions_of_influence``. ``cells`` ``(B, R, N)``: ``1 + global
    component index`` of the cell each voxel lies in, 0 in pairs without a component; ``owner`` ``(K,)``."""
    return lesion_components(target, connectivity, regions_of_influence=True)


class ConnectedComponentDiceCELoss(nn.Module):
    r"""``lambda_global * (Dice + CE) + lambda_cc * mean over reference components of (Dice + CE) in its Voronoi cell``.

    See the module docstring for the definition. The global term is :class:`medseg.losses.DiceCELoss` with the same
    ``lambda_ce``, ``lambda_dice``, ``include_background``, ``batch_dice`` and ``smooth``; the component term covers
    every foreground region or class. :meth:`forward_with_terms` returns ``{"ce", "dice", "cc"}`` (unweighted):
    ``total == lambda_global * (lambda_ce * ce + lambda_dice * dice) + lambda_cc * cc``.

    Args:
        mode: ``"sigmoid"`` or ``"softmax"``.
        lambda_global: weight of the global Dice + CE term (>= 0).
        lambda_cc: weight of the per-component term (>= 0).
        lambda_ce, lambda_dice: weights of CE and Dice inside both terms (>= 0).
        include_background, batch_dice, smooth: as :class:`medseg.losses.DiceCELoss` (global term; ``smooth`` also
            in each component's Dice).
        connectivity: of the reference components, 6, 18 or 26.

    Shapes:
        input: logits ``(B, C, *spatial)``. target: sigmoid: binary ``(B, C, *spatial)``; softmax: class indices
        ``(B, 1, *spatial)`` / ``(B, *spatial)`` or one-hot ``(B, C, *spatial)``.

    Raises:
        ValueError: on bad arguments, shape mismatches or target values out of range.
    """

    def __init__(
        self,
        mode: Mode,
        lambda_global: float = 1.0,
        lambda_cc: float = 1.0,
        lambda_ce: float = 1.0,
        lambda_dice: float = 1.0,
        include_background: bool | None = None,
        batch_dice: bool = False,
        smooth: float = 1e-5,
        connectivity: int = 26,
    ) -> None:
        super().__init__()
        self.base = DiceCELoss(mode, lambda_ce, lambda_dice, include_background, batch_dice, smooth)
        self.mode = self.base.mode
        self.lambda_global = check_nonnegative("lambda_global", lambda_global)
        self.lambda_cc = check_nonnegative("lambda_cc", lambda_cc)
        if connectivity not in _CONNECTIVITIES:
            raise ValueError(f"expected connectivity in {_CONNECTIVITIES}, got {connectivity!r}")
        self.connectivity = connectivity

    def forward_with_terms(self, input: Tensor, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The total and its unweighted parts ``{"ce", "dice", "cc"}`` (scalars, with graph)."""
        base_total, terms = self.base.forward_with_terms(input, target)
        cc = self.component_term(input, target)
        return self.lambda_global * base_total + self.lambda_cc * cc, {**terms, "cc": cc}

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """The total loss (a scalar)."""
        return self.forward_with_terms(input, target)[0]

    def component_term(self, input: Tensor, target: Tensor) -> Tensor:
        """The mean over reference components of Dice + CE in their cells (a scalar; 0, with graph, without any)."""
        with autocast_disabled(input.device):
            x, fg, log_p, log_q, cells, owner = component_inputs(input, target, self.mode, self.connectivity, regions_of_influence=True)  # cells (B, R, N)
            if owner.numel() == 0:
                return x.sum() * 0.0
            n = owner.numel()
            t = fg.to(log_p.dtype)
            index = cells.reshape(-1)
            inside = index > 0  # voxels of pairs with components
            cell = index[inside] - 1

            def per_cell(values: Tensor) -> Tensor:  # (B, R, N) -> (K,) sums over each cell
                return values.new_zeros(n).index_add(0, cell, values.reshape(-1)[inside])

            p = log_p.exp()
            intersection, predicted, reference = per_cell(p * t), per_cell(p), per_cell(t)
            cross_entropy = per_cell(-(t * log_p + (1 - t) * log_q))
            size = per_cell(torch.ones_like(p))
            dice = 1 - (2 * intersection + self.base.smooth) / (predicted + reference + self.base.smooth)
            per_component = self.base.lambda_dice * dice + self.base.lambda_ce * cross_entropy / size  # (K,)
            return per_component.mean()

    def extra_repr(self) -> str:
        return f"lambda_global={self.lambda_global}, lambda_cc={self.lambda_cc}, connectivity={self.connectivity}"
