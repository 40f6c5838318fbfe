"""The planning rules: target spacing, network topology and patch size from a dataset's figures.

Pure functions of numbers (no files, no torch), after the rules nnU-Net derives its plans with (Isensee et al.
2021, *nnU-Net: a self-configuring method for deep learning-based biomedical image segmentation*):

* :func:`target_spacing`: the median spacing, except for the low-resolution axis of a strongly anisotropic
  dataset, which gets the 10th percentile of its spacings (fewer interpolated slices);
* :func:`network_topology`: per stage, the convolution kernel and stride of a ``monai.networks.nets.DynUNet``:
  an axis is down-sampled while its spacing is within a factor 2 of the finest and its feature map stays at
  least ``min_feature_map_size`` voxels; an axis much coarser than the others gets kernel 1 until pooling
  the others has brought it within that factor;
* :func:`initial_patch_size` and :func:`fit_patch_to_budget`: a patch with the aspect ratio of the spacing,
  no larger than the median case, shrunk along its axis largest relative to the median shape until a training
  step's estimated memory fits the budget; then the batch size the budget leaves room for.

Axes are in the order of the arrays given (the toolkit's ``(H, W, D)``, RAS).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# The fewest stages a planned network has: MONAI's DynUNet needs at least three (two down-samplings).
MIN_STAGES = 3


@dataclass(frozen=True)
class Topology:
    """A U-Net's per-stage layout (``num_stages`` = number of down-samplings + 1).

    Attributes:
        kernel_sizes: per stage, the convolution kernel per axis (3, or 1 along a much coarser axis).
        strides: per stage, the down-sampling stride per axis; the first stage's is all 1.
        patch_size: the patch, rounded up to a multiple of ``divisible_by`` per axis.
        divisible_by: ``2 ** pools`` per axis: what a patch or an inferred volume must be a multiple of.
    """

    kernel_sizes: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]
    patch_size: tuple[int, ...]
    divisible_by: tuple[int, ...]

    @property
    def num_stages(self) -> int:
        return len(self.strides)

    @property
    def pools_per_axis(self) -> tuple[int, ...]:
        return tuple(int(round(math.log2(d))) for d in self.divisible_by)

    def feature_map_shapes(self) -> list[tuple[int, ...]]:
        """The feature map shape at each stage for :attr:`patch_size`."""
        shapes, shape = [], np.array(self.patch_size, dtype=np.int64)
        for stride in self.strides:
            shape = np.ceil(shape / np.array(stride)).astype(np.int64)
            shapes.append(tuple(int(s) for s in shape))
        return shapes


def _check_axes(name: str, values: np.ndarray) -> None:
    if values.ndim != 2 or values.shape[1] != 3 or len(values) == 0:
        raise ValueError(f"expected {name} as (N, 3) with N >= 1, got shape {values.shape}")
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"expected positive finite {name}, got {values.tolist()}")


def target_spacing(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]], anisotropy_threshold: float = 3.0) -> np.ndarray:
    """The spacing to resample every case to ``(3,)`` mm, from per-case ``spacings`` and ``shapes`` ``(N, 3)``.

    The median spacing per axis, unless the coarsest axis is both more than ``anisotropy_threshold`` times
    coarser than the others and has fewer than ``1 / anisotropy_threshold`` of their voxels (a stack of thick
    slices, e.g. 0.8 x 0.8 x 5 mm): then that axis gets the 10th percentile of its spacings, but never finer
    than the other axes.
    """
    spacings, shapes = np.asarray(spacings, dtype=np.float64), np.asarray(shapes, dtype=np.float64)
    _check_axes("spacings", spacings)
    _check_axes("shapes", shapes)
    if len(spacings) != len(shapes):
        raise ValueError(f"expected one shape per spacing, got {len(spacings)} spacings and {len(shapes)} shapes")
    target = np.median(spacings, axis=0)
    median_shape = np.median(shapes, axis=0)
    coarse = int(np.argmax(target))
    others = [a for a in range(3) if a != coarse]
    anisotropic_spacing = target[coarse] > anisotropy_threshold * target[others].max()
    few_slices = median_shape[coarse] * anisotropy_threshold < median_shape[others].min()
    if anisotropic_spacing and few_slices:
        target[coarse] = max(float(np.percentile(spacings[:, coarse], 10)), float(target[others].max()))
    return target


def network_topology(spacing: Sequence[float], patch_size: Sequence[int], min_feature_map_size: int = 4, max_pools: int = 5) -> Topology:
    """Kernels and strides per stage for ``patch_size`` voxels of ``spacing`` mm (see the module docstring).

    Down-sampling stops along an axis once its feature map would fall below ``min_feature_map_size`` voxels or
    after ``max_pools`` down-samplings; an axis left alone to be pooled needs ``3 * min_feature_map_size``
    voxels. The bottleneck stage has kernel 3 along every axis.
    """
    spacing = [float(s) for s in spacing]
    size = [float(p) for p in patch_size]
    if len(spacing) != 3 or len(size) != 3 or min(spacing) <= 0 or min(size) < 1:
        raise ValueError(f"expected a positive 3D spacing and patch size, got {spacing} and {list(patch_size)}")
    if min_feature_map_size < 1 or max_pools < 0:
        raise ValueError(f"expected min_feature_map_size >= 1 and max_pools >= 0, got {min_feature_map_size} and {max_pools}")
    current = list(spacing)
    pools = [0, 0, 0]
    kernel = [1, 1, 1]
    kernels: list[tuple[int, ...]] = []
    strides: list[tuple[int, ...]] = [(1, 1, 1)]
    while True:
        poolable = [a for a in range(3) if size[a] >= 2 * min_feature_map_size and pools[a] < max_pools]
        if not poolable:
            break
        finest = min(current[a] for a in poolable)
        poolable = [a for a in poolable if current[a] / finest < 2]
        if len(poolable) == 1 and size[poolable[0]] < 3 * min_feature_map_size:
            break
        # A kernel turns 3 once its axis is within a factor 2 of the finest spacing, and stays 3.
        kernel = [3 if kernel[a] == 3 or current[a] / min(current) < 2 else 1 for a in range(3)]
        kernels.append(tuple(kernel))
        stride = tuple(2 if a in poolable else 1 for a in range(3))
        strides.append(stride)
        for a in poolable:
            pools[a] += 1
            current[a] *= 2
            size[a] = math.ceil(size[a] / 2)
    kernels.append((3, 3, 3))
    divisible_by = tuple(2**p for p in pools)
    padded = tuple(int(math.ceil(int(p) / d) * d) for p, d in zip(patch_size, divisible_by))
    return Topology(tuple(kernels), tuple(strides), padded, divisible_by)


def initial_patch_size(spacing: Sequence[float], median_shape: Sequence[float], volume: float = 256.0**3) -> np.ndarray:
    """A patch of ``volume`` voxels with the aspect ratio of ``1 / spacing`` (isotropic in mm), clipped to the
    median case ``median_shape``; the start of :func:`fit_patch_to_budget`."""
    inverse = 1.0 / np.asarray(spacing, dtype=np.float64)
    patch = np.round(inverse * (volume / np.prod(inverse)) ** (1.0 / 3.0))
    return np.minimum(patch, np.asarray(median_shape, dtype=np.float64)).astype(np.int64)


@dataclass(frozen=True)
class PatchPlan:
    """What :func:`fit_patch_to_budget` chose: the topology (with the patch size), the batch size and the
    estimated peak memory of a training step at that batch size, in bytes."""

    topology: Topology
    batch_size: int
    estimated_bytes: float


def fit_patch_to_budget(
    spacing: Sequence[float],
    median_shape: Sequence[float],
    estimate_bytes: Callable[[Topology, int], float],
    budget_bytes: float,
    min_batch_size: int = 2,
    max_batch_size: int | None = None,
    min_feature_map_size: int = 4,
    max_pools: int = 5,
) -> PatchPlan:
    """The largest patch (and then batch) whose training step fits ``budget_bytes``.

    Args:
        spacing: the target spacing ``(3,)`` mm.
        median_shape: the median case shape at the target spacing ``(3,)``.
        estimate_bytes: ``(topology, batch_size) -> bytes``, the memory model of one training step.
        budget_bytes: the memory a training step may use.
        min_batch_size: the patch shrinks until this batch fits; the batch then grows while it fits.
        max_batch_size: cap on the batch size (e.g. so that one batch covers at most a few % of the dataset).

    Raises:
        ValueError: if the case is too small for a network of :data:`MIN_STAGES` stages, or if even the smallest
            such patch does not fit the budget (the message names the budget and that patch's estimate).
    """
    if budget_bytes <= 0 or min_batch_size < 1:
        raise ValueError(f"expected a positive budget and min_batch_size >= 1, got {budget_bytes} and {min_batch_size}")
    median_shape = np.asarray(median_shape, dtype=np.float64)
    patch = initial_patch_size(spacing, median_shape)
    topology = network_topology(spacing, patch, min_feature_map_size, max_pools)
    if topology.num_stages < MIN_STAGES:
        raise ValueError(f"the median case ({'x'.join(str(int(s)) for s in median_shape)} voxels at the target spacing) is too small for a "
                         f"{MIN_STAGES}-stage network with feature maps of at least plan.min_feature_map_size={min_feature_map_size} voxels; lower it")
    while estimate_bytes(topology, min_batch_size) > budget_bytes:
        # Shrink the axis that is largest relative to the case, by one step of what it must be divisible by
        # (recomputed for the smaller patch, so that no valid size in between is skipped).
        patch = np.array(topology.patch_size, dtype=np.int64)
        axis = int(np.argmax(patch / median_shape))
        smaller = patch.copy()
        smaller[axis] -= topology.divisible_by[axis]
        step = network_topology(spacing, np.maximum(smaller, 1), min_feature_map_size, max_pools).divisible_by[axis]
        patch[axis] -= step
        shrunk = network_topology(spacing, np.maximum(patch, 1), min_feature_map_size, max_pools) if patch[axis] >= min_feature_map_size else None
        if shrunk is None or shrunk.num_stages < MIN_STAGES:
            # The current topology is the smallest that keeps MIN_STAGES stages: refuse rather than plan a network
            # that cannot be built.
            smallest = estimate_bytes(topology, min_batch_size)
            raise ValueError(
                f"no network fits the {budget_bytes / 2**30:.2f} GiB memory budget: the smallest planned network "
                f"({topology.num_stages} stages, patch {'x'.join(map(str, topology.patch_size))}, batch {min_batch_size}) needs an estimated "
                f"{smallest / 2**30:.2f} GiB; give a larger plan.memory_gb (or plan.cpu_memory_gb without a GPU)"
            )
        topology = shrunk
    batch = min_batch_size
    while (max_batch_size is None or batch < max_batch_size) and estimate_bytes(topology, batch + 1) <= budget_bytes:
        batch += 1
    return PatchPlan(topology, batch, float(estimate_bytes(topology, batch)))
