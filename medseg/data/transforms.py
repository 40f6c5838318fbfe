"""MONAI transform pipelines: a deterministic, cacheable preprocessing part and a random training part.

Preprocessing (cached on disk by :mod:`medseg.data.cache`): load NIfTI -> channel first -> RAS orientation
-> optional resampling to a target spacing -> crop to the non-zero foreground (skull-stripped MRI) ->
intensity normalisation (per-channel z-score over non-zero voxels for MRI; Hounsfield window for CT)
-> label check and conversion (:class:`medseg.data.labels.ConvertLabelsd`).

Training cuts foreground-biased random patches (:mod:`medseg.data.sampling`, so that small lesions are
seen often enough) and applies random flips and intensity augmentation to each.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from monai import transforms as T

from medseg.data.labels import ConvertLabelsd, LabelSpec
from medseg.data.sampling import PatchSampler

IMAGE, LABEL = "image", "label"
# Axis labels of NIfTI world space (RAS+), given explicitly so that orientation never depends on metadata.
NIFTI_AXIS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
# Hounsfield window of intensity="ct" when none is given (abdominal soft tissue); conf/data sets data.ct_window.
DEFAULT_CT_WINDOW = (-175.0, 250.0)


def check_intensity(intensity: str, ct_window: Sequence[float], ct_zscore: Sequence[float] | None = None) -> None:
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
    if ct_zscore is not None and (len(ct_zscore) != 2 or not all(math.isfinite(float(v)) for v in ct_zscore) or not float(ct_zscore[1]) > 0):
        raise ValueError(f"expected data.ct_zscore = [mean, std] in Hounsfield units with std > 0, or null, got {list(ct_zscore)}")



def load_nifti(keys: Sequence[str]) -> T.LoadImaged:
    """``LoadImaged`` with nibabel. MONAI's ``LoadImage`` also instantiates every other reader it knows, and with pydicom
    installed (the ``dicom`` extra) its nvImageCodec DICOM reader warns on every construction that no GPU decoder
    exists; medseg never reads DICOM through MONAI (see :mod:`medseg.dicom`), so that warning is silenced here."""
    nvimgcodec = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    level = nvimgcodec.level
    nvimgcodec.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
            return T.LoadImaged(list(keys), reader="NibabelReader", image_only=True, ensure_channel_first=True)
    finally:
        nvimgcodec.setLevel(level)

def preprocessing(
    labels: LabelSpec,
    with_label: bool = True,
    spacing: Sequence[float] | None = None,
    intensity: Literal["mri", "ct", "none"] = "mri",
    ct_window: Sequence[float] = DEFAULT_CT_WINDOW,
    crop_foreground: bool = True,
    ct_zscore: Sequence[float] | None = None,
) -> T.Compose:
    """The deterministic part of the pipeline, applied to case records from :mod:`medseg.data.layouts`.

    Args:
        labels: the dataset's label convention.
        with_label: load and convert ``label`` (False for inference on images alone).
        spacing: target voxel spacing in mm, ``None`` keeps the native spacing.
        intensity: ``"mri"`` z-scores each channel over its non-zero voxels; ``"ct"`` clips Hounsfield
            units to ``ct_window`` and scales them to [0, 1]; ``"none"`` leaves intensities alone.
        ct_window: (low, high) Hounsfield window for ``intensity="ct"``.
        ct_zscore: ``(mean, std)`` in HU: after clipping to ``ct_window``, z-score with these (nnU-Net's CT
            scheme, with the dataset's foreground statistics) instead of scaling the window to [0, 1].
        crop_foreground: crop to the bounding box of non-zero image voxels (background of skull-stripped
            MRI), which saves memory and time without losing any label voxel of the brain.

    Returns:
        A transform mapping ``{"image": [files], "label": file}`` to ``image`` ``(C, H, W, D)`` float32 and
        ``label`` ``(R, H, W, D)`` multi-hot (sigmoid) or ``(1, H, W, D)`` class indices (softmax).
    """
    check_intensity(intensity, ct_window, ct_zscore)
    keys = [IMAGE, LABEL] if with_label else [IMAGE]
    steps: list[Any] = [
        load_nifti(keys),
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
        if ct_zscore is None:
            steps.append(T.ScaleIntensityRanged(IMAGE, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True))
        else:
            mean, std = ct_zscore
            steps.append(T.ScaleIntensityRanged(IMAGE, a_min=low, a_max=high, b_min=(low - mean) / std, b_max=(high - mean) / std, clip=True))
    if with_label:
        steps.append(ConvertLabelsd(LABEL, labels))
    return T.Compose(steps)


def preprocessing_options(
    spacing: Sequence[float] | None = None,
    intensity: Literal["mri", "ct", "none"] = "mri",
    ct_window: Sequence[float] = DEFAULT_CT_WINDOW,
    crop_foreground: bool = True,
    ct_zscore: Sequence[float] | None = None,
) -> dict[str, Any]:
    """The keyword arguments of :func:`preprocessing` (``labels`` and ``with_label`` aside) as plain values:
    lists of floats, a bool. They are hashed into the preprocessing cache's key (:mod:`medseg.data.cache`), so
    equal options give equal dicts; ``ct_zscore`` is left out when ``None``, so that caches made before it
    existed keep their key. Nothing is validated here (:func:`check_intensity` does it)."""
    options: dict[str, Any] = dict(
        spacing=[float(v) for v in spacing] if spacing is not None else None,
        intensity=intensity,
        ct_window=[float(v) for v in ct_window],
        crop_foreground=bool(crop_foreground),
    )
    if ct_zscore is not None:
        options["ct_zscore"] = [float(v) for v in ct_zscore]
    return options


def augmentation(
    flip_prob: float = 0.5,
    flip_axes: Sequence[int] = (0, 1, 2),
    intensity_scale_prob: float = 0.3,
    intensity_shift_prob: float = 0.3,
    intensity_scale: float = 0.1,
    intensity_shift: float = 0.1,
    rotate_prob: float = 0.0,
    rotate_degrees: float = 30.0,
    rotate_axes: Sequence[int] = (0, 1, 2),
    zoom_prob: float = 0.0,
    zoom_range: Sequence[float] = (0.7, 1.4),
    gamma_prob: float = 0.0,
    gamma_range: Sequence[float] = (0.7, 1.5),
    noise_prob: float = 0.0,
    noise_std: float = 0.1,
    blur_prob: float = 0.0,
    blur_sigma: Sequence[float] = (0.5, 1.0),
) -> T.Compose:
    """The random transforms of each training patch (cut by :class:`medseg.data.sampling.PatchSampler`).

    Args:
        flip_prob: probability of a flip along each axis.
        flip_axes: the axes (0, 1, 2 = L-R, P-A, I-S after RAS orientation) that may be flipped; leave out an
            axis along which classes differ by position (hippocampus anterior/posterior: only ``(0,)``).
        intensity_scale_prob, intensity_scale: probability and range of a random intensity scaling.
        intensity_shift_prob, intensity_shift: probability and range of a random intensity offset.
        rotate_prob, rotate_degrees: probability of a rotation about the patch centre, by up to this many
            degrees about each axis (nnU-Net: 0.2, 30).
        rotate_axes: the axes rotated about: all three, or only the slice axis of thick-slice data (in-plane
            rotations, as nnU-Net does for anisotropic spacing).
        zoom_prob, zoom_range: probability of a scaling by a factor drawn from this range (nnU-Net: 0.2,
            0.7-1.4); rotation and scaling are one resampling (image linear, label nearest).
        gamma_prob, gamma_range: probability and range of a gamma on the intensities rescaled to [0, 1]
            (nnU-Net: 0.3, 0.7-1.5).
        noise_prob, noise_std: probability and standard deviation of additive Gaussian noise (nnU-Net: 0.1).
        blur_prob, blur_sigma: probability and sigma range (voxels) of a Gaussian blur (nnU-Net: 0.2, 0.5-1).
    """
    if not set(flip_axes) <= {0, 1, 2}:
        raise ValueError(f"expected data.augment.flip_axes among 0, 1, 2, got {list(flip_axes)}")
    for name, value in (("rotate_prob", rotate_prob), ("zoom_prob", zoom_prob), ("gamma_prob", gamma_prob), ("noise_prob", noise_prob), ("blur_prob", blur_prob)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"expected data.augment.{name} in [0, 1], got {value}")
    keys = [IMAGE, LABEL]
    steps: list[Any] = []
    if rotate_prob or zoom_prob:
        # One RandAffined whose probability covers either; rotation and zoom then apply together, as in nnU-Net.
        if not set(rotate_axes) <= {0, 1, 2}:
            raise ValueError(f"expected data.augment.rotate_axes among 0, 1, 2, got {list(rotate_axes)}")
        radians = math.radians(rotate_degrees) if rotate_prob else 0.0
        rotate = tuple(radians if a in rotate_axes else 0.0 for a in range(3)) if radians else None
        zoom = (float(zoom_range[0]) - 1.0, float(zoom_range[1]) - 1.0) if zoom_prob else None
        steps.append(T.RandAffined(keys, prob=max(rotate_prob, zoom_prob), rotate_range=rotate, scale_range=(zoom,) * 3 if zoom else None,
                                   mode=("bilinear", "nearest"), padding_mode="zeros"))
    steps += [T.RandFlipd(keys, prob=flip_prob, spatial_axis=axis) for axis in flip_axes]
    if noise_prob:
        steps.append(T.RandGaussianNoised(IMAGE, prob=noise_prob, std=noise_std))
    if blur_prob:
        steps.append(T.RandGaussianSmoothd(IMAGE, sigma_x=tuple(blur_sigma), sigma_y=tuple(blur_sigma), sigma_z=tuple(blur_sigma), prob=blur_prob))
    steps += [
        T.RandScaleIntensityd(IMAGE, factors=intensity_scale, prob=intensity_scale_prob),
        T.RandShiftIntensityd(IMAGE, offsets=intensity_shift, prob=intensity_shift_prob),
    ]
    if gamma_prob:
        steps.append(T.RandAdjustContrastd(IMAGE, prob=gamma_prob, gamma=tuple(gamma_range), retain_stats=True))
    return T.Compose(steps)


def patches_from_config(patch_size: Sequence[int], labels: LabelSpec, augment: Mapping[str, Any]) -> tuple[PatchSampler, T.Compose]:
    """The patch sampler and the per-patch augmentation of the ``data.augment`` config node
    (``foreground_fraction``, ``sampling``, ``lesion_fraction`` and ``lesion_weighting`` are the sampler's,
    the other keys :func:`augmentation`'s)."""
    options = dict(augment)
    sampling = {key: options.pop(key) for key in ("foreground_fraction", "sampling", "lesion_fraction", "lesion_weighting") if key in options}
    sampler = PatchSampler(patch_size, labels.names, **sampling)
    return sampler, augmentation(**options)
