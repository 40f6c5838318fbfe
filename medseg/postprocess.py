"""Post-processing shared by the final evaluation and ``medseg.predict``: probabilities -> binary masks.

One operating point per region (sigmoid) or class (softmax): a probability ``threshold`` (sigmoid only; a
softmax class is its argmax) and a minimum connected-component volume ``min_component_mm3`` below which a
predicted component is removed. Training's final evaluation tunes the point on the validation cases
(:mod:`medseg.metrics.operating_point`), stores it in the run folder and its checkpoints, and prediction applies
it from there. Both post-process the probabilities mapped back to each case's own voxel grid with
:func:`postprocess`, and the final evaluation scores the label files it writes, so the reported numbers are those
of the masks a user gets.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import cc3d
import numpy as np
import torch
from torch import Tensor

# Key of the tuned operating point inside a checkpoint file, and the key naming the checkpoint it was tuned on.
CHECKPOINT_KEY = "medseg_operating_point"
TUNED_ON = "tuned_on"


@dataclass(frozen=True)
class OperatingPoint:
    """Per-region post-processing: ``threshold[r]`` and ``min_component_mm3[r]`` for region/class ``r``.

    Attributes:
        names: region (sigmoid) or foreground class (softmax) names, in output order.
        threshold: probability above which a sigmoid region is foreground (ignored in softmax mode).
        min_component_mm3: predicted components smaller than this volume are removed (0 keeps all).
        criterion: what the point was chosen to maximise (``"dice"``, ``"lesion_f1"``), or ``None`` if untuned.
        score: the criterion's value at the point on the tuning cases (NaN if untuned).
        tta_flip_axes: the test-time flips of the probabilities the point was tuned on (``None``: not recorded);
            prediction uses the same unless told otherwise.
    """

    names: tuple[str, ...]
    threshold: tuple[float, ...]
    min_component_mm3: tuple[float, ...]
    criterion: str | None = None
    score: tuple[float, ...] = ()
    tta_flip_axes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not (len(self.names) == len(self.threshold) == len(self.min_component_mm3)):
            raise ValueError(f"expected one threshold and one min_component_mm3 per region {list(self.names)}, got {list(self.threshold)} and {list(self.min_component_mm3)}")
        for t in self.threshold:
            if not (0.0 < t < 1.0):
                raise ValueError(f"expected thresholds in (0, 1), got {list(self.threshold)}")
        for m in self.min_component_mm3:
            if not (m >= 0 and math.isfinite(m)):
                raise ValueError(f"expected min_component_mm3 >= 0, got {list(self.min_component_mm3)}")

    @classmethod
    def uniform(cls, names: Sequence[str], threshold: float = 0.5, min_component_mm3: float = 0.0) -> OperatingPoint:
        """The same threshold and minimum size for every region (the untuned default)."""
        return cls(tuple(names), (float(threshold),) * len(names), (float(min_component_mm3),) * len(names))

    def to_dict(self) -> dict[str, Any]:
        """Plain containers (for JSON and for ``torch.load(weights_only=True)``)."""
        return {
            "criterion": self.criterion,
            "regions": {
                name: {"threshold": t, "min_component_mm3": m, **({"score": s} if self.score else {})}
                for name, t, m, s in zip(self.names, self.threshold, self.min_component_mm3, self.score or [None] * len(self.names))
            },
            **({"tta_flip_axes": list(self.tta_flip_axes)} if self.tta_flip_axes is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OperatingPoint:
        regions = data["regions"]
        names = tuple(regions)
        score = tuple(float(regions[n]["score"]) for n in names) if all("score" in regions[n] for n in names) else ()
        flips = tuple(int(a) for a in data["tta_flip_axes"]) if data.get("tta_flip_axes") is not None else None
        return cls(names, tuple(float(regions[n]["threshold"]) for n in names), tuple(float(regions[n]["min_component_mm3"]) for n in names), data.get("criterion"), score, flips)

    def with_overrides(self, threshold: float | None = None, min_component_mm3: float | None = None) -> OperatingPoint:
        """This point with one threshold and/or minimum size for every region (a user's explicit choice)."""
        n = len(self.names)
        return OperatingPoint(
            self.names,
            self.threshold if threshold is None else (float(threshold),) * n,
            self.min_component_mm3 if min_component_mm3 is None else (float(min_component_mm3),) * n,
            self.criterion if threshold is None and min_component_mm3 is None else None,
            self.score if threshold is None and min_component_mm3 is None else (),
            self.tta_flip_axes,
        )


def min_component_voxels(min_component_mm3: float, voxel_mm3: float) -> int:
    """The fewest voxels a kept component has: ``min_component_mm3`` in voxels of ``voxel_mm3`` mm^3, rounded up.

    One rounding for every caller (the report, the operating-point sweep, ``medseg.predict``), with a relative
    tolerance of 1e-6 so that a component whose volume equals the limit is kept whether the voxel volume came
    from float32 or float64 spacing (25 voxels of 0.6 x 0.6 x 1.3 mm against 11.7 mm^3).
    """
    if min_component_mm3 <= 0:
        return 0
    if not voxel_mm3 > 0:
        raise ValueError(f"expected a positive voxel volume (mm^3), got {voxel_mm3}")
    return max(math.ceil(min_component_mm3 / voxel_mm3 * (1.0 - 1e-6)), 1)


def remove_small_components(mask: np.ndarray, min_voxels: float, connectivity: int = 26) -> np.ndarray:
    """``mask`` without its connected components of fewer than ``min_voxels`` voxels.

    Args:
        mask: boolean ``(X, Y, Z)``.

    Returns:
        Boolean ``(X, Y, Z)``.
    """
    if min_voxels <= 1 or not mask.any():  # every component has at least one voxel
        return mask
    components = cc3d.connected_components(mask, connectivity=connectivity)  # (X, Y, Z) ids, 0 = background
    sizes = np.bincount(components.ravel())  # voxels per component id
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[components]


def foreground_masks(probs: Tensor, mode: str, threshold: Sequence[float]) -> np.ndarray:
    """Binary masks per region/class from probabilities, before any component filtering.

    Args:
        probs: ``(C_out, *spatial)``: sigmoid probabilities per region, or softmax probabilities per class
            (background first).
        threshold: sigmoid: one threshold per region; ignored for softmax (argmax).

    Returns:
        Boolean ``(R, *spatial)``: ``R = C_out`` (sigmoid) or ``C_out - 1`` (softmax, background dropped).
    """
    if mode == "sigmoid":
        cut = torch.as_tensor(list(threshold), dtype=probs.dtype).view(-1, *([1] * (probs.ndim - 1)))
        return (probs.cpu() > cut).numpy()
    index = class_index(probs)  # (*spatial)
    return np.stack([index == c for c in range(1, probs.shape[0])])


def class_index(probs: Tensor, slab_voxels: int = 2**24) -> np.ndarray:
    """The argmax over classes of ``(C, *spatial)`` probabilities as the smallest integer type (``uint8`` below 256
    classes), computed in slabs along the first spatial axis: no full-size int64 volume."""
    dtype = np.uint8 if probs.shape[0] <= 256 else np.int16
    index = np.empty(tuple(probs.shape[1:]), dtype=dtype)
    step = max(1, slab_voxels // max(1, int(np.prod(probs.shape[2:]))))
    for start in range(0, probs.shape[1], step):
        index[start : start + step] = probs[:, start : start + step].argmax(dim=0).cpu().numpy()
    return index


def postprocess(probs: Tensor, mode: str, point: OperatingPoint, voxel_mm3: float, connectivity: int = 26, nesting: Sequence[tuple[int, int]] = ()) -> np.ndarray:
    """Probabilities to the final binary masks of ``point``: threshold (or argmax), then small components removed.

    Nested regions (``nesting``: ``(outer, inner)`` channel pairs, :attr:`medseg.data.labels.LabelSpec.nesting`, e.g.
    BraTS WT ⊇ TC ⊇ ET) stay nested, so that the masks survive the trip to dataset labels and back unchanged: an
    inner region's voxels also count for its outer regions (as nnU-Net writes region labels, inner ones last), and
    components are removed from the outermost region first, a removed component taking its inner voxels with it.

    Args:
        probs: ``(C_out, *spatial)`` probabilities (see :func:`foreground_masks`).
        point: the operating point, one entry per region/class.
        voxel_mm3: the volume of one voxel of ``probs``' grid, to turn ``min_component_mm3`` into voxels.
        nesting: ``(outer, inner)`` pairs of sigmoid regions; ``()``: regions are filtered independently.

    Returns:
        Boolean ``(R, *spatial)``.
    """
    masks = foreground_masks(probs, mode, point.threshold)
    if len(point.names) != masks.shape[0]:
        raise ValueError(f"expected an operating point for {masks.shape[0]} regions, got one for {list(point.names)}")
    inners = {r: [i for o, i in nesting if o == r] for r in range(masks.shape[0])}
    order = sorted(range(masks.shape[0]), key=lambda r: -len(inners[r]))  # outermost (most inner regions) first
    for r in reversed(order):  # innermost first: each region takes in its inner regions' voxels
        for i in inners[r]:
            masks[r] |= masks[i]
    for r in order:
        masks[r] = remove_small_components(masks[r], min_component_voxels(point.min_component_mm3[r], voxel_mm3), connectivity)
        for i in inners[r]:
            masks[i] &= masks[r]  # components removed from the outer region take their inner voxels with them
    return masks


def probabilities(logits: Tensor, mode: str, inplace: bool = False) -> Tensor:
    """Sigmoid or softmax (over channels) probabilities, float32, of logits ``(B, C, *spatial)``.

    ``inplace``: computed in the logits' own memory (float32 logits that nothing else reads, such as a sliding
    window's output), so that a whole volume's probabilities need no second volume."""
    logits = logits.float()
    if not inplace:
        return torch.sigmoid(logits) if mode == "sigmoid" else torch.softmax(logits, dim=1)
    if mode == "sigmoid":
        return logits.sigmoid_()
    logits.sub_(logits.amax(dim=1, keepdim=True)).exp_()
    return logits.div_(logits.sum(dim=1, keepdim=True))


def logits_of(probs: Tensor, mode: str, eps: float = 1e-6) -> Tensor:
    """Logits whose :func:`probabilities` are ``probs`` ``(B, C, *spatial)`` (up to clamping to ``[eps, 1 - eps]``):
    log-odds for sigmoid, log-probabilities for softmax (whose softmax is the probabilities again)."""
    probs = probs.float().clamp(eps, 1.0 - eps)
    return torch.log(probs) - torch.log1p(-probs) if mode == "sigmoid" else torch.log(probs)


def flip_averaged_probabilities(predict: Callable[[Tensor], Tensor], image: Tensor, mode: str, flip_axes: Sequence[int] = ()) -> Tensor:
    """Probabilities ``(B, C_out, H, W, D)`` of ``predict`` (logits of ``(B, C_in, H, W, D)``), averaged over every
    combination of flips of the spatial ``flip_axes`` (0, 1, 2), each prediction flipped back first: mirroring
    test-time augmentation, 2^len(flip_axes) passes; none without axes."""
    if any(int(a) not in (0, 1, 2) for a in flip_axes) or len(set(flip_axes)) != len(flip_axes):
        raise ValueError(f"expected distinct test-time flip axes among 0, 1, 2, got {list(flip_axes)}")
    dims = tuple(2 + int(a) for a in flip_axes)  # spatial axes of (B, C, H, W, D)
    total = None
    flips = [axes for k in range(len(dims) + 1) for axes in combinations(dims, k)]
    for axes in flips:
        logits = predict(image.flip(axes) if axes else image)
        # In place unless the logits are (a view of) the caller's image: a sliding window's output is a new volume.
        probs = probabilities(logits, mode, inplace=logits.untyped_storage().data_ptr() != image.untyped_storage().data_ptr())
        del logits
        probs = probs.flip(axes) if axes else probs
        total = probs if total is None else total.add_(probs.to(total.device))  # a pass stitched elsewhere joins
        del probs
    return total.div_(len(flips)) if len(flips) > 1 else total
