"""Blob loss (Kofler et al., "blob loss: instance imbalance aware loss functions for semantic segmentation",
IPMI 2023, arXiv:2205.08209): every reference lesion weighs the same, whatever its size.

A global loss over the patch lets one confluent lesion of 40,000 voxels outweigh thirty lesions of ten voxels:
missing all thirty costs less Dice than a thin rim of the big one. Blob loss adds, for each reference lesion
(a connected component of the target), the base loss computed on that lesion with every OTHER lesion masked
out, i.e. over the voxels ``background + lesion k``; these per-lesion losses are averaged, so a missed 10-voxel
lesion costs as much as a missed 10,000-voxel one:

.. math::

    L = \\lambda_{global} L_{base}(p, t) + \\lambda_{blob} \\frac{1}{|\\mathcal{K}|}
        \\sum_{(b, c)} \\frac{1}{K_{bc}} \\sum_{k=1}^{K_{bc}} L_{base}(p_{bc}|_{M_k}, t_{bc}|_{M_k})

with :math:`M_k = \\{v : t_{bc}(v) = 0\\} \\cup \\mathrm{lesion}_k` and :math:`\\mathcal{K}` the (item,
channel) pairs with at least one lesion (pairs without a lesion add nothing to the blob term). The base loss
is focal + Dice (:class:`medseg.losses.FocalDiceLoss`): the per-lesion focal term is the mean over ``M_k``, the
per-lesion Dice is ``(2 I_k + s) / (P_bg + P_k + n_k + s)`` with ``I_k = P_k`` the predicted mass inside lesion
``k``, ``P_bg`` the predicted mass on background voxels and ``n_k`` the lesion's voxel count.

Cost does not grow with the number of lesions: both terms of every lesion follow from per-component sums
(one ``scatter_add`` over the component labels), so 1,000 lesions cost what 10 do (``medseg.bench --only
blob``). Components are found once per target batch with cc3d on the CPU (the target only; no gradient).

Modes: ``sigmoid`` (each output channel is a region; its lesions are the components of ``target[:, c]``);
``softmax`` (each foreground class ``c``; its lesions are the components of ``target == c``, scored one-vs-rest
on the softmax probability ``p_c``, with ``-log(1 - p_c)`` computed from the log-softmax without cancellation).
"""

from __future__ import annotations

from collections.abc import Sequence

import cc3d
import numpy as np
import torch
from scipy import ndimage
from torch import Tensor, nn

from medseg.losses._inputs import Mode, autocast_disabled, check_nonnegative, compute_dtype, prepare
from medseg.losses.compound import FocalDiceLoss
from medseg.losses.focal import _log1mexp, alpha_weights

_CONNECTIVITIES = (6, 18, 26)


def lesion_components(target: Tensor, connectivity: int = 26, regions_of_influence: bool = False) -> tuple[Tensor, Tensor]:
    """Connected components of every (item, channel) of a binary target, numbered across the batch.

    Args:
        target: boolean ``(B, R, *spatial)`` (2D or 3D spatial).
        connectivity: 6, 18 or 26 (3D; cc3d uses 4 or 8 for 2D inputs: 6 -> 4, otherwise 8).
        regions_of_influence: label every voxel of a pair with lesions by its nearest lesion (the Voronoi cells of
            the components, Euclidean distance in voxels), not only the lesions' own voxels.

    Returns:
        ``labels``: int64 ``(B, R, N)`` (flattened spatial), 0 on background (or in pairs without a lesion) and
        ``1 + global lesion index`` inside a lesion (or its cell); ``owner``: int64 ``(K,)``, the flat (item,
        channel) index ``b * R + r`` of each lesion. Both on ``target``'s device.
    """
    batch, regions = target.shape[:2]
    masks = target.detach().to("cpu", torch.bool).numpy()
    spatial_dims = masks.ndim - 2
    if spatial_dims not in (2, 3):
        raise ValueError(f"expected a target of shape (B, R, H, W) or (B, R, H, W, D) (lesions need a spatial layout), got {tuple(target.shape)}")
    conn = connectivity if spatial_dims == 3 else (4 if connectivity == 6 else 8)
    labels = np.zeros((batch, regions, int(np.prod(masks.shape[2:]))), dtype=np.int64)
    owners: list[np.ndarray] = []
    offset = 0
    for b in range(batch):
        for r in range(regions):
            if not masks[b, r].any():
                continue
            comp, n = cc3d.connected_components(masks[b, r], connectivity=conn, return_N=True)
            if regions_of_influence:  # every voxel takes the component of its nearest lesion voxel
                nearest = ndimage.distance_transform_edt(comp == 0, return_distances=False, return_indices=True)
                comp = comp[tuple(nearest)]
            flat = comp.reshape(-1).astype(np.int64)
            labels[b, r] = np.where(flat > 0, flat + offset, 0)
            owners.append(np.full(n, b * regions + r, dtype=np.int64))
            offset += n
    owner = np.concatenate(owners) if owners else np.zeros(0, dtype=np.int64)
    return torch.from_numpy(labels).to(target.device), torch.from_numpy(owner).to(target.device)


def component_inputs(input: Tensor, target: Tensor, mode: Mode, connectivity: int, regions_of_influence: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """What a per-lesion loss term needs: logits ``x`` ``(B, C, N)`` in the compute dtype, the foreground targets
    and ``(log p, log(1 - p))`` per region ``(B, R, N)`` each, and :func:`lesion_components`' labels and owners.
    Call under :func:`medseg.losses._inputs.autocast_disabled`."""
    batch = prepare(input, target, mode)
    x = batch.logits.to(compute_dtype(batch.logits.dtype))  # (B, C, N)
    fg, log_p, log_q = _foreground_log_probs(x, batch, mode)  # (B, R, N) each
    spatial = batch.spatial or (x.shape[-1],)
    labels, owner = lesion_components(fg.reshape(*fg.shape[:2], *spatial), connectivity, regions_of_influence)
    return x, fg, log_p, log_q, labels, owner


class BlobLoss(nn.Module):
    r"""``lambda_global * (focal + Dice) + lambda_blob * mean over lesions of (focal + Dice) on that lesion``.

    See the module docstring for the definition. The global term is :class:`medseg.losses.FocalDiceLoss`
    with the same options; the blob term uses the same ``gamma``, ``alpha``, ``lambda_focal``, ``lambda_dice``
    and ``smooth``. Defaults ``lambda_global = 2``, ``lambda_blob = 1`` are the paper's best mix on MS lesions.

    :meth:`forward_with_terms` returns ``{"focal", "dice", "blob"}`` (unweighted): ``total == lambda_global *
    (lambda_focal * focal + lambda_dice * dice) + lambda_blob * blob``.

    Args:
        mode: ``"sigmoid"`` or ``"softmax"``.
        lambda_global: weight of the global focal + Dice term (>= 0).
        lambda_blob: weight of the per-lesion term (>= 0).
        gamma, alpha, lambda_focal, lambda_dice, include_background, batch_dice, smooth, squared: as
            :class:`medseg.losses.FocalDiceLoss` (``batch_dice``, ``squared`` and ``include_background`` affect
            the global term only; the blob term covers every foreground region or class).
        connectivity: lesion connectivity, 6, 18 or 26 (26: voxels touching at a corner are one lesion).

    Shapes:
        input: logits ``(B, C, *spatial)``. target: sigmoid: binary ``(B, C, *spatial)``; softmax: class
        indices ``(B, 1, *spatial)`` / ``(B, *spatial)`` or one-hot ``(B, C, *spatial)``.

    Raises:
        ValueError: on bad arguments, shape mismatches or target values out of range.
    """

    def __init__(
        self,
        mode: Mode,
        lambda_global: float = 2.0,
        lambda_blob: float = 1.0,
        gamma: float = 2.0,
        alpha: float | Sequence[float] | None = None,
        lambda_focal: float = 1.0,
        lambda_dice: float = 1.0,
        include_background: bool | None = None,
        batch_dice: bool = False,
        smooth: float = 1e-5,
        squared: bool = False,
        connectivity: int = 26,
    ) -> None:
        super().__init__()
        self.base = FocalDiceLoss(mode, gamma, alpha, lambda_focal, lambda_dice, include_background, batch_dice, smooth, squared)
        self.mode = self.base.mode
        self.lambda_global = check_nonnegative("lambda_global", lambda_global)
        self.lambda_blob = check_nonnegative("lambda_blob", lambda_blob)
        if connectivity not in _CONNECTIVITIES:
            raise ValueError(f"expected connectivity in {_CONNECTIVITIES}, got {connectivity!r}")
        self.connectivity = connectivity

    def forward_with_terms(self, input: Tensor, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The total and its unweighted parts ``{"focal", "dice", "blob"}`` (scalars, with graph)."""
        base_total, terms = self.base.forward_with_terms(input, target)
        blob = self.blob_term(input, target)
        return self.lambda_global * base_total + self.lambda_blob * blob, {**terms, "blob": blob}

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """The total loss (a scalar)."""
        return self.forward_with_terms(input, target)[0]

    def blob_term(self, input: Tensor, target: Tensor) -> Tensor:
        """The mean per-lesion focal + Dice (a scalar; 0, with graph, when the target has no lesion)."""
        with autocast_disabled(input.device):
            x, fg, log_p, log_q, labels, owner = component_inputs(input, target, self.mode, self.connectivity)  # labels (B, R, N), owner (K,)
            if owner.numel() == 0:
                return x.sum() * 0.0
            return self._per_lesion_mean(fg, log_p, log_q, labels, owner)

    def _per_lesion_mean(self, fg: Tensor, log_p: Tensor, log_q: Tensor, labels: Tensor, owner: Tensor) -> Tensor:
        batch, regions = fg.shape[:2]
        n_lesions = owner.numel()
        gamma, smooth = self.base.gamma, self.base.smooth
        p = log_p.exp()  # (B, R, N)
        # Per-voxel focal parts: positives (inside lesions) and negatives (background), alpha-weighted per channel.
        first = 1 if (self.mode == "softmax") else 0  # alpha is given per output channel, background first
        w_pos, w_neg = alpha_weights(self.base.alpha, self.mode, regions + first, p)
        w_pos, w_neg = w_pos[first:].view(1, -1, 1), w_neg[first:].view(1, -1, 1)
        if self.mode == "softmax":
            w_neg = torch.ones_like(w_neg)  # softmax alpha weighs a voxel by its true class only
        focal_pos = w_pos * torch.exp(gamma * log_q) * -log_p  # (B, R, N): (1 - p)^gamma * -log p
        focal_neg = w_neg * torch.exp(gamma * log_p) * -log_q  # (B, R, N): p^gamma * -log(1 - p)
        background = ~fg
        # Per-(item, channel) background sums, then per-lesion sums by scatter over the component labels.
        bg_p = (p * background).sum(-1).reshape(-1)  # (B*R,)
        bg_focal = (focal_neg * background).sum(-1).reshape(-1)
        bg_count = background.sum(-1).reshape(-1).to(p.dtype)
        index = labels.reshape(-1)  # (B*R*N,) 0 = not a lesion
        inside = index > 0
        lesion_index = index[inside] - 1
        lesion_p = p.new_zeros(n_lesions).index_add(0, lesion_index, p.reshape(-1)[inside])
        lesion_focal = p.new_zeros(n_lesions).index_add(0, lesion_index, focal_pos.reshape(-1)[inside])
        lesion_count = p.new_zeros(n_lesions).index_add(0, lesion_index, torch.ones_like(lesion_p[:1]).expand(lesion_index.numel()))
        focal = (bg_focal[owner] + lesion_focal) / (bg_count[owner] + lesion_count)  # (K,) mean over M_k
        dice = (2 * lesion_p + smooth) / (bg_p[owner] + lesion_p + lesion_count + smooth)  # (K,)
        per_lesion = self.base.lambda_focal * focal + self.base.lambda_dice * (1 - dice)  # (K,)
        # Mean over lesions within each (item, channel), then over the pairs that have lesions.
        pairs = batch * regions
        pair_sum = per_lesion.new_zeros(pairs).index_add(0, owner, per_lesion)
        pair_count = torch.bincount(owner, minlength=pairs).to(per_lesion.dtype)
        has = pair_count > 0
        return (pair_sum[has] / pair_count[has]).mean()

    def extra_repr(self) -> str:
        return f"lambda_global={self.lambda_global}, lambda_blob={self.lambda_blob}, connectivity={self.connectivity}"


def _foreground_log_probs(x: Tensor, batch, mode: Mode) -> tuple[Tensor, Tensor, Tensor]:
    """Binary foreground targets and ``(log p, log(1 - p))`` per foreground region or class, each ``(B, R, N)``.

    sigmoid: ``R = C``, ``p = sigmoid(x)``; softmax: ``R = C - 1`` (classes 1..C-1), ``p = softmax(x)_c``.
    """
    if mode == "sigmoid":
        fg = batch.target > 0.5  # (B, C, N)
        log_p = torch.nn.functional.logsigmoid(x)
        log_q = torch.nn.functional.logsigmoid(-x)
    else:
        logp = torch.log_softmax(x, dim=1)[:, 1:]  # (B, C-1, N)
        if batch.indices:
            fg = batch.target == torch.arange(1, x.shape[1], device=x.device).view(1, -1, 1)
        else:
            fg = batch.target[:, 1:] > 0.5
        log_p = logp
        log_q = _log1mexp(logp)
    return fg, log_p, log_q
