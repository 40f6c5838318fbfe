"""MONAI transform pipelines: a deterministic, cacheable preprocessing part and a random training part.

Preprocessing (cached by :class:`monai.data.CacheDataset`): load NIfTI -> channel first -> RAS orientation
-> optional resampling to a target spacing -> crop to the non-zero foreground (skull-stripped MRI) ->
intensity normalisation (per-channel z-score over non-zero voxels for MRI; Hounsfield window for CT)
-> label check and conversion (:class:`medseg.data.labels.ConvertLabelsd`).

Training adds padding to the patch size, foreground-biased random patches (so that small lesions are
seen often enough), random flips and intensity augmentation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from monai import transforms as T

from medseg.data.labels import ConvertLabelsd, LabelSpec

IMAGE, LABEL = "image", "label"
# Axis labels of NIfTI world space (RAS+), given explicitly so that orientation never depends on metadata.
NIFTI_AXIS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def check_intensity(intensity: str, ct_window: Sequence[float]) -> None:
    """Validate ``data.intensity`` and, for CT, ``data.ct_window`` (two finite Hounsfield values, low < high).

    Raises:
        ValueError: naming the key and the value found.
    """
    if intensity not in ("mri", "ct", "none"):
        raise ValueError(f"expected data.intensity 'mri', 'ct' or 'none', got {intensity!r}")
    if intensity != "ct":
        return
    window = list(ct_window) if isinstance(ct_window, Sequence) and not isinstance(ct_window, str) else [ct_window]
    if len(window) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in window) or not window[0] < window[1]:
        raise ValueError(f"expected data.ct_window = [low, high] in Hounsfield units with low < high, got {window}")


def preprocessing(
    labels: LabelSpec,
    with_label: bool = True,
    spacing: Sequence[float] | None = None,
    intensity: Literal["mri", "ct", "none"] = "mri",
    ct_window: Sequence[float] = (-175.0, 250.0),
    crop_foreground: bool = True,
) -> T.Compose:
    """The deterministic part of the pipeline, applied to case records from :mod:`medseg.data.layouts`.

    Args:
        labels: the dataset's label convention.
        with_label: load and convert ``label`` (False for inference on images alone).
        spacing: target voxel spacing in mm, ``None`` keeps the native spacing.
        intensity: ``"mri"`` z-scores each channel over its non-zero voxels; ``"ct"`` clips Hounsfield
            units to ``ct_window`` and scales them to [0, 1]; ``"none"`` leaves intensities alone.
        ct_window: (low, high) Hounsfield window for ``intensity="ct"``.
        crop_foreground: crop to the bounding box of non-zero image voxels (background of skull-stripped
            MRI), which saves memory and time without losing any label voxel of the brain.

    Returns:
        A transform mapping ``{"image": [files], "label": file}`` to ``image`` ``(C, H, W, D)`` float32 and
        ``label`` ``(R, H, W, D)`` multi-hot (sigmoid) or ``(1, H, W, D)`` class indices (softmax).
    """
    check_intensity(intensity, ct_window)
    keys = [IMAGE, LABEL] if with_label else [IMAGE]
    steps: list[Any] = [
        T.LoadImaged(keys, reader="NibabelReader", image_only=True, ensure_channel_first=True),
        T.EnsureTyped(IMAGE, dtype=np.float32, track_meta=True),
        T.Orientationd(keys, axcodes="RAS", labels=NIFTI_AXIS_LABELS),
    ]
    if spacing is not None:
        steps.append(T.Spacingd(keys, pixdim=tuple(spacing), mode=("bilinear", "nearest")[: len(keys)]))
    if crop_foreground:
        steps.append(T.CropForegroundd(keys, source_key=IMAGE, allow_smaller=True))  # voxels > 0
    if intensity == "mri":
        steps.append(T.NormalizeIntensityd(IMAGE, nonzero=True, channel_wise=True))
    elif intensity == "ct":
        low, high = ct_window
        steps.append(T.ScaleIntensityRanged(IMAGE, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True))
    if with_label:
        steps.append(ConvertLabelsd(LABEL, labels))
    return T.Compose(steps)


def augmentation(
    patch_size: Sequence[int],
    samples_per_volume: int = 2,
    foreground_fraction: float = 0.67,
    flip_prob: float = 0.5,
    flip_axes: Sequence[int] = (0, 1, 2),
    intensity_scale_prob: float = 0.3,
    intensity_shift_prob: float = 0.3,
    intensity_scale: float = 0.1,
    intensity_shift: float = 0.1,
) -> T.Compose:
    """The random part of the training pipeline.

    Args:
        patch_size: training patch ``(H, W, D)`` in voxels.
        samples_per_volume: patches drawn from each loaded volume (the batch holds ``batch_size * this``).
        foreground_fraction: probability that a patch is centred on a labelled voxel. Small lesions are a
            tiny fraction of the volume; uniform sampling would almost never show them to the network.
        flip_prob: probability of a flip along each axis.
        flip_axes: the axes (0, 1, 2 = L-R, P-A, I-S after RAS orientation) that may be flipped; leave out an
            axis along which classes differ by position (hippocampus anterior/posterior: only ``(0,)``).
        intensity_scale_prob, intensity_scale: probability and range of a random intensity scaling.
        intensity_shift_prob, intensity_shift: probability and range of a random intensity offset.
    """
    if not 0.0 <= foreground_fraction <= 1.0:
        raise ValueError(f"expected data.augment.foreground_fraction in [0, 1], got {foreground_fraction}")
    if not set(flip_axes) <= {0, 1, 2}:
        raise ValueError(f"expected data.augment.flip_axes among 0, 1, 2, got {list(flip_axes)}")
    keys = [IMAGE, LABEL]
    patch = tuple(int(p) for p in patch_size)
    return T.Compose(
        [
            T.SpatialPadd(keys, spatial_size=patch),
            T.RandCropByPosNegLabeld(
                keys,
                label_key=LABEL,
                spatial_size=patch,
                pos=foreground_fraction,
                neg=1.0 - foreground_fraction,
                num_samples=samples_per_volume,
                allow_smaller=False,
            ),
            *(T.RandFlipd(keys, prob=flip_prob, spatial_axis=axis) for axis in flip_axes),
            T.RandScaleIntensityd(IMAGE, factors=intensity_scale, prob=intensity_scale_prob),
            T.RandShiftIntensityd(IMAGE, offsets=intensity_shift, prob=intensity_shift_prob),
        ]
    )


def augmentation_from_config(patch_size: Sequence[int], samples_per_volume: int, augment: Mapping[str, Any]) -> T.Compose:
    """:func:`augmentation` with the options of the ``data.augment`` config node."""
    return augmentation(patch_size, samples_per_volume, **dict(augment))
