"""Where training patches are cut: a per-case sampling index, patch positions drawn from it, patch reads.

The index is computed once per case, when its preprocessing is cached (:mod:`medseg.data.cache`), so that
picking a patch never scans the volume. For every region (sigmoid) or class (softmax) it holds

* ``voxels_<name>`` ``(n, 3)`` int32: a uniform random subset of the region's voxel coordinates, at most
  ``max_voxels`` of them (nnU-Net keeps 10,000 per class as well);
* ``component_size_<name>`` ``(m,)`` int64: the voxel count of each connected component (lesion);
* ``component_bbox_<name>`` ``(m, 6)`` int32: its bounding box, ``(lo_h, lo_w, lo_d, hi_h, hi_w, hi_d)``,
  ``hi`` exclusive;
* ``component_voxels_<name>`` ``(m, k, 3)`` int32: ``k`` random voxels inside it (repeated when it has
  fewer), so that a sampler can centre a patch on a given lesion, whatever its size.

:class:`PatchSampler` draws patch positions as nnU-Net does: with probability ``foreground_fraction`` the
patch is centred on a stored voxel of a region picked uniformly among the regions present in the case, so
that a rare region (enhancing tumour, a small lesion class) is seen as often as a large one; otherwise the
patch lies anywhere in the volume. Patches that would leave the volume are moved inside it; volumes
smaller than the patch are padded symmetrically with zeros (as MONAI's ``SpatialPad``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import cc3d
import numpy as np
from monai.transforms import Randomizable


@dataclass(frozen=True)
class IndexOptions:
    """What the sampling index keeps per case (the ``data.sampling`` config node).

    Attributes:
        max_voxels: voxel coordinates kept per region (a uniform random subset of larger regions).
        voxels_per_component: random voxels kept per connected component.
        connectivity: 6, 18 or 26: the voxel neighbourhood of connected components.
    """

    max_voxels: int = 10_000
    voxels_per_component: int = 8
    connectivity: int = 26

    def __post_init__(self) -> None:
        if self.max_voxels < 1 or self.voxels_per_component < 1:
            raise ValueError(f"expected data.sampling.max_voxels and voxels_per_component >= 1, got {self.max_voxels} and {self.voxels_per_component}")
        if self.connectivity not in (6, 18, 26):
            raise ValueError(f"expected data.sampling.connectivity 6, 18 or 26, got {self.connectivity}")

    @classmethod
    def from_config(cls, node: Mapping[str, object] | None) -> IndexOptions:
        return cls(**dict(node or {}))


def region_masks(target: np.ndarray, mode: str, names: Sequence[str]) -> dict[str, np.ndarray]:
    """One boolean mask ``(H, W, D)`` per region name, from a training target.

    Args:
        target: sigmoid: multi-hot ``(R, H, W, D)``; softmax: class indices ``(1, H, W, D)`` (0 background).
    """
    if mode == "sigmoid":
        return {name: target[r] > 0 for r, name in enumerate(names)}
    return {name: target[0] == r + 1 for r, name in enumerate(names)}


def build_sampling_index(target: np.ndarray, mode: str, names: Sequence[str], options: IndexOptions = IndexOptions(), seed: int = 0) -> dict[str, np.ndarray]:
    """The sampling index of one case (see the module docstring for its arrays).

    Args:
        target: the case's training target (see :func:`region_masks`).
        mode, names: the label convention (:class:`medseg.data.labels.LabelSpec`).
        seed: seed of the random subsets; the same target and seed give the same index.
    """
    rng = np.random.default_rng(seed)
    index: dict[str, np.ndarray] = {}
    k = options.voxels_per_component
    for name, mask in region_masks(np.asarray(target), mode, names).items():
        shape = mask.shape
        flat = np.flatnonzero(mask)  # increasing flat indices of the region's voxels
        keep = flat if flat.size <= options.max_voxels else np.sort(rng.choice(flat, options.max_voxels, replace=False))
        index[f"voxels_{name}"] = np.stack(np.unravel_index(keep, shape), axis=1).astype(np.int32).reshape(-1, 3)
        components, count = cc3d.connected_components(mask, connectivity=options.connectivity, return_N=True)
        if count == 0:
            index[f"component_size_{name}"] = np.zeros(0, dtype=np.int64)
            index[f"component_bbox_{name}"] = np.zeros((0, 6), dtype=np.int32)
            index[f"component_voxels_{name}"] = np.zeros((0, k, 3), dtype=np.int32)
            continue
        stats = cc3d.statistics(components)
        sizes = np.asarray(stats["voxel_counts"][1:], dtype=np.int64)  # label 0 is the background
        boxes = [stats["bounding_boxes"][c] for c in range(1, count + 1)]
        index[f"component_size_{name}"] = sizes
        index[f"component_bbox_{name}"] = np.array([[s.start for s in b] + [s.stop for s in b] for b in boxes], dtype=np.int32)
        # k random voxels per component: shuffle the region's voxels, group them by component (stable sort
        # keeps the shuffled order within a group), take the first k of each group, cycling short groups.
        ids = components.ravel()[flat]
        shuffled = rng.permutation(flat.size)
        grouped = shuffled[np.argsort(ids[shuffled], kind="stable")]
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        picks = grouped[starts[:, None] + np.arange(k)[None, :] % sizes[:, None]]  # (m, k)
        coords = np.stack(np.unravel_index(flat[picks], shape), axis=-1)  # (m, k, 3)
        index[f"component_voxels_{name}"] = coords.astype(np.int32)
    return index


def read_patch(array: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """Copy of ``array[:, start:start + size]`` ``(C, *size)``; the part outside the volume is zero.

    Only the patch is read, so ``array`` may be a memory-mapped file.

    Args:
        array: ``(C, H, W, D)``.
        start: first voxel of the patch (negative or past the end where the patch leaves the volume).
        size: patch size ``(h, w, d)``.
    """
    out = np.zeros((array.shape[0], *size), dtype=array.dtype)
    source = tuple(slice(max(s, 0), min(s + p, n)) for s, p, n in zip(start, size, array.shape[1:]))
    target = tuple(slice(src.start - s, src.stop - s) for src, s in zip(source, start))
    out[(slice(None), *target)] = array[(slice(None), *source)]
    return out


SAMPLING_MODES = ("voxel", "lesion")
LESION_WEIGHTINGS = ("uniform", "inverse_size")


class PatchSampler(Randomizable):
    """Random patch positions for one case from its sampling index (see the module docstring).

    Args:
        patch_size: ``(h, w, d)`` in voxels.
        names: the region names of the index.
        foreground_fraction: probability that a patch is centred on a region voxel. Small lesions are a
            tiny fraction of the volume; uniform positions would almost never show them to the network.
        sampling: how a foreground centre is picked. ``"voxel"``: a random stored voxel of a region picked
            uniformly among those present, so most centres land on the largest lesions. ``"lesion"``: with
            probability ``lesion_fraction`` a connected component (lesion) is picked first, then one of its
            stored voxels, so a tiny lesion is shown as often as a confluent one (the rest as ``"voxel"``).
        lesion_fraction: with ``sampling="lesion"``, the share of foreground centres picked by lesion.
        lesion_weighting: ``"uniform"`` (every lesion of the region alike) or ``"inverse_size"`` (weights
            1 / voxel count: the smallest lesions most often).
    """

    def __init__(
        self,
        patch_size: Sequence[int],
        names: Sequence[str],
        foreground_fraction: float = 0.67,
        sampling: str = "voxel",
        lesion_fraction: float = 1.0,
        lesion_weighting: str = "uniform",
    ) -> None:
        if not 0.0 <= foreground_fraction <= 1.0:
            raise ValueError(f"expected data.augment.foreground_fraction in [0, 1], got {foreground_fraction}")
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"expected data.augment.sampling one of {list(SAMPLING_MODES)}, got {sampling!r}")
        if not 0.0 <= lesion_fraction <= 1.0:
            raise ValueError(f"expected data.augment.lesion_fraction in [0, 1], got {lesion_fraction}")
        if lesion_weighting not in LESION_WEIGHTINGS:
            raise ValueError(f"expected data.augment.lesion_weighting one of {list(LESION_WEIGHTINGS)}, got {lesion_weighting!r}")
        self.patch_size = tuple(int(p) for p in patch_size)
        self.names = tuple(names)
        self.foreground_fraction = foreground_fraction
        self.sampling = sampling
        self.lesion_fraction = lesion_fraction
        self.lesion_weighting = lesion_weighting

    def randomize(self, data: object = None) -> None:  # positions are drawn in starts()
        pass

    def _lesion_centre(self, index: Mapping[str, np.ndarray], region: str) -> np.ndarray:
        """A stored voxel of a lesion of ``region``, the lesion drawn by ``lesion_weighting``."""
        voxels = index[f"component_voxels_{region}"]  # (m, k, 3)
        if self.lesion_weighting == "uniform":
            lesion = self.R.randint(len(voxels))
        else:
            weights = 1.0 / index[f"component_size_{region}"].astype(np.float64)
            lesion = self.R.choice(len(voxels), p=weights / weights.sum())
        return voxels[lesion, self.R.randint(voxels.shape[1])]

    def starts(self, shape: Sequence[int], index: Mapping[str, np.ndarray], count: int) -> list[tuple[int, int, int]]:
        """``count`` patch start voxels for a volume of spatial ``shape`` ``(H, W, D)``.

        A start is negative along an axis shorter than the patch: the volume is then centred in the patch.
        """
        patch = np.array(self.patch_size)
        shape = np.array(shape)
        pad_before = np.maximum(patch - shape, 0) // 2
        highest = np.maximum(shape - patch, 0)  # last start that keeps the patch inside the (padded) volume
        present = [n for n in self.names if len(index.get(f"voxels_{n}", ())) > 0]
        starts = []
        for _ in range(count):
            if present and self.R.rand() < self.foreground_fraction:
                region = present[self.R.randint(len(present))]
                if self.sampling == "lesion" and len(index.get(f"component_voxels_{region}", ())) and self.R.rand() < self.lesion_fraction:
                    centre = self._lesion_centre(index, region)
                else:
                    voxels = index[f"voxels_{region}"]
                    centre = voxels[self.R.randint(len(voxels))]
                start = np.clip(centre - patch // 2, 0, highest)
            else:
                start = np.array([self.R.randint(h + 1) for h in highest])
            starts.append(tuple(int(v) for v in start - pad_before))
        return starts
