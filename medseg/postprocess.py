"""Post-processing shared by the final evaluation and ``medseg.predict``: probabilities -> binary masks.

One operating point per region (sigmoid) or class (softmax): a probability ``threshold`` (sigmoid only; a
softmax class is its argmax), a minimum connected-component volume ``min_component_mm3`` below which a
predicted component is removed, and a minimum component score ``min_component_score``: each component of the
thresholded mask is scored by the maximum (or mean, ``component_score``) probability of its region inside it, as
detection practice scores candidate lesions, and components scoring lower are removed (a low voxel threshold for
the extent of a lesion, a high component score for whether it is one). Training's final evaluation tunes the point on the validation cases
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
# How a predicted component is scored: the maximum or the mean probability of its region inside it.
COMPONENT_SCORES = ("max", "mean")


@dataclass(frozen=True)
class OperatingPoint:
    """Per-region post-processing: ``threshold[r]``, ``min_component_mm3[r]`` and ``min_component_score[r]`` for
    region/class ``r``.

    Attributes:
        names: region (sigmoid) or foreground class (softmax) names, in output order.
        threshold: probability above which a sigmoid region is foreground (ignored in softmax mode).
        min_component_mm3: predicted components smaller than this volume are removed (0 keeps all).
        criterion: what the point was chosen to maximise (``"dice"``, ``"lesion_f1"``), or ``None`` if untuned.
        score: the criterion's value at the point on the tuning cases (NaN if untuned).
        tta_flip_axes: the test-time flips of the probabilities the point was tuned on (``None``: not recorded);
            prediction uses the same unless told otherwise.
        min_component_score: predicted components whose score is lower are removed (0 keeps all; ``()``: 0 for
            every region). A component's max (and mean) probability is above the threshold already, so only
            scores above the threshold remove anything.
        component_score: ``"max"`` or ``"mean"`` probability of the region inside a component (softmax: of the class).
    """

    names: tuple[str, ...]
    threshold: tuple[float, ...]
    min_component_mm3: tuple[float, ...]
    criterion: str | None = None
    score: tuple[float, ...] = ()
    tta_flip_axes: tuple[int, ...] | None = None
    min_component_score: tuple[float, ...] = ()
    component_score: str = "max"

    def __post_init__(self) -> None:
        if not self.min_component_score:
            object.__setattr__(self, "min_component_score", (0.0,) * len(self.names))
        if not (len(self.names) == len(self.threshold) == len(self.min_component_mm3) == len(self.min_component_score)):
            raise ValueError(f"expected one threshold, min_component_mm3 and min_component_score per region {list(self.names)}, "
                             f"got {list(self.threshold)}, {list(self.min_component_mm3)} and {list(self.min_component_score)}")
        for t in self.threshold:
            if not (0.0 < t < 1.0):
                raise ValueError(f"expected thresholds in (0, 1), got {list(self.threshold)}")
        for m in self.min_component_mm3:
            if not (m >= 0 and math.isfinite(m)):
                raise ValueError(f"expected min_component_mm3 >= 0, got {list(self.min_component_mm3)}")
        for s in self.min_component_score:
            if not (0.0 <= s <= 1.0):
                raise ValueError(f"expected min_component_score in [0, 1], got {list(self.min_component_score)}")
        if self.component_score not in COMPONENT_SCORES:
            raise ValueError(f"expected component_score one of {COMPONENT_SCORES}, got {self.component_score!r}")

    @classmethod
    def uniform(cls, names: Sequence[str], threshold: float = 0.5, min_component_mm3: float = 0.0, min_component_score: float = 0.0, component_score: str = "max") -> OperatingPoint:
        """The same threshold, minimum size and minimum component score for every region (the untuned default)."""
        n = len(names)
        return cls(tuple(names), (float(threshold),) * n, (float(min_component_mm3),) * n, min_component_score=(float(min_component_score),) * n, component_score=component_score)

    @property
    def filters_components(self) -> bool:
        """Whether any component is removed by size or score (else the masks are the thresholded probabilities)."""
        return any(self.min_component_mm3) or any(self.min_component_score)

    def to_dict(self) -> dict[str, Any]:
        """Plain containers (for JSON and for ``torch.load(weights_only=True)``)."""
        return {
            "criterion": self.criterion,
            "component_score": self.component_score,
            "regions": {
                name: {"threshold": t, "min_component_mm3": m, "min_component_score": c, **({"score": s} if self.score else {})}
                for name, t, m, c, s in zip(self.names, self.threshold, self.min_component_mm3, self.min_component_score, self.score or [None] * len(self.names))
            },
            **({"tta_flip_axes": list(self.tta_flip_axes)} if self.tta_flip_axes is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OperatingPoint:
        """The point of :meth:`to_dict` (points stored before the component score: no score filter)."""
        regions = data["regions"]
        names = tuple(regions)
        score = tuple(float(regions[n]["score"]) for n in names) if all("score" in regions[n] for n in names) else ()
        flips = tuple(int(a) for a in data["tta_flip_axes"]) if data.get("tta_flip_axes") is not None else None
        return cls(names, tuple(float(regions[n]["threshold"]) for n in names), tuple(float(regions[n]["min_component_mm3"]) for n in names), data.get("criterion"), score, flips,
                   tuple(float(regions[n].get("min_component_score", 0.0)) for n in names), str(data.get("component_score", "max")))

    def with_overrides(self, threshold: float | None = None, min_component_mm3: float | None = None, min_component_score: float | None = None) -> OperatingPoint:
        """This point with one threshold, minimum size and/or minimum component score for every region (a user's
        explicit choice: the point is no longer the tuned one, so its criterion and score are dropped)."""
        n = len(self.names)
        untouched = threshold is None and min_component_mm3 is None and min_component_score is None
        return OperatingPoint(
            self.names,
            self.threshold if threshold is None else (float(threshold),) * n,
            self.min_component_mm3 if min_component_mm3 is None else (float(min_component_mm3),) * n,
            self.criterion if untouched else None,
            self.score if untouched else (),
            self.tta_flip_axes,
            self.min_component_score if min_component_score is None else (float(min_component_score),) * n,
            self.component_score,
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


def component_scores(components: np.ndarray, n: int, probability: np.ndarray, statistic: str = "max") -> np.ndarray:
    """The score of each labelled component: the ``"max"`` or ``"mean"`` of ``probability`` inside it.

    Args:
        components: integer ``(X, Y, Z)`` component ids ``1..n``, 0 = background.
        n: the number of components.
        probability: ``(X, Y, Z)`` probabilities of the region (float).

    Returns:
        float64 ``(n,)``: the score of component ``k`` at index ``k - 1``.
    """
    if statistic not in COMPONENT_SCORES:
        raise ValueError(f"expected component_score one of {COMPONENT_SCORES}, got {statistic!r}")
    if n == 0:
        return np.zeros(0)
    ids = components.ravel()
    inside = ids != 0  # the components' voxels only: a few percent of a scan
    ids, values = ids[inside], np.asarray(probability).ravel()[inside].astype(np.float64)
    if statistic == "max":
        best = np.full(n + 1, -np.inf)
        np.maximum.at(best, ids, values)
        return best[1:]
    return np.bincount(ids, weights=values, minlength=n + 1)[1:] / np.maximum(np.bincount(ids, minlength=n + 1)[1:], 1)


def filter_components(mask: np.ndarray, min_voxels: float, connectivity: int = 26, probability: np.ndarray | None = None, min_score: float = 0.0, statistic: str = "max") -> np.ndarray:
    """``mask`` without its connected components of fewer than ``min_voxels`` voxels or scoring below ``min_score``
    (:func:`component_scores` of ``probability``).

    Args:
        mask: boolean ``(X, Y, Z)``.
        probability: ``(X, Y, Z)`` probabilities of the region; needed when ``min_score > 0``.

    Returns:
        Boolean ``(X, Y, Z)``.
    """
    if (min_voxels <= 1 and min_score <= 0) or not mask.any():  # every component has at least one voxel
        return mask
    components, n = cc3d.connected_components(mask, connectivity=connectivity, return_N=True)  # (X, Y, Z) ids, 0 = background
    keep = np.bincount(components.ravel(), minlength=n + 1) >= min_voxels  # by voxels per component id
    if min_score > 0:
        if probability is None:
            raise ValueError("a minimum component score needs the probabilities")
        keep[1:] &= component_scores(components, n, probability, statistic) >= min_score
    keep[0] = False
    return keep[components]


def remove_small_components(mask: np.ndarray, min_voxels: float, connectivity: int = 26) -> np.ndarray:
    """``mask`` without its connected components of fewer than ``min_voxels`` voxels (boolean ``(X, Y, Z)``)."""
    return filter_components(mask, min_voxels, connectivity)


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
    """Probabilities to the final binary masks of ``point``: threshold (or argmax), then the components smaller than
    the minimum size or scoring below the minimum component score removed.

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
        min_score = point.min_component_score[r]
        probability = region_probability(probs, mode, r).numpy() if min_score > 0 else None
        masks[r] = filter_components(masks[r], min_component_voxels(point.min_component_mm3[r], voxel_mm3), connectivity, probability, min_score, point.component_score)
        for i in inners[r]:
            masks[i] &= masks[r]  # components removed from the outer region take their inner voxels with them
    return masks


def region_probability(probs: Tensor, mode: str, region: int) -> Tensor:
    """The probability map ``(*spatial)`` of region/class ``region`` of ``probs`` ``(C_out, *spatial)`` on the CPU:
    channel ``region`` (sigmoid) or ``region + 1`` (softmax, background first)."""
    return probs[region if mode == "sigmoid" else region + 1].detach().cpu()


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
