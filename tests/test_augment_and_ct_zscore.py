"""data.ct_zscore against a float64 formula; the nnU-Net augmentation options (data.augment.*) do what they say."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.data.labels import LabelSpec
from medseg.data.transforms import augmentation, preprocessing

SPEC = LabelSpec(mode="softmax", names=("a",), values=(0, 1))


def test_ct_zscore_clips_to_the_window_then_standardises(tmp_path):
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1200, 1500, size=(12, 10, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(hu, np.eye(4)), tmp_path / "ct.nii.gz")
    low, high, mean, std = -150.0, 300.0, 80.0, 55.0
    out = preprocessing(SPEC, with_label=False, intensity="ct", ct_window=(low, high), ct_zscore=(mean, std), crop_foreground=False)({"image": [str(tmp_path / "ct.nii.gz")]})["image"]
    expected = (np.clip(hu.astype(np.float64), low, high) - mean) / std
    np.testing.assert_allclose(out.as_tensor().numpy()[0], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="ct_zscore"):
        preprocessing(SPEC, intensity="ct", ct_zscore=(0.0, 0.0))


def item(image):
    return {"image": image.clone(), "label": (image > 0.5).float()}


def test_rotation_about_the_slice_axis_only_keeps_every_slice_its_own():
    # A volume constant in-plane per slice: rotating in-plane moves nothing between slices.
    image = torch.arange(8, dtype=torch.float32).repeat(1, 16, 16, 1) / 8  # (1, 16, 16, 8), slice k = k / 8
    aug = augmentation(flip_prob=0.0, intensity_scale_prob=0.0, intensity_shift_prob=0.0, rotate_prob=1.0, rotate_degrees=40.0, rotate_axes=(2,))
    aug.set_random_state(3)
    out = aug(item(image))
    centre = out["image"][0, 6:10, 6:10]  # the corners of a rotated slice are padding
    torch.testing.assert_close(centre, image[0, 6:10, 6:10])
    # Rotating about every axis mixes the slices.
    aug = augmentation(flip_prob=0.0, intensity_scale_prob=0.0, intensity_shift_prob=0.0, rotate_prob=1.0, rotate_degrees=40.0)
    aug.set_random_state(3)
    assert not torch.allclose(aug(item(image))["image"][0, 6:10, 6:10], image[0, 6:10, 6:10], atol=1e-2)


def test_spatial_and_intensity_augmentation_change_the_image_and_keep_labels_valid():
    torch.manual_seed(0)
    image = torch.rand(1, 20, 24, 16)
    aug = augmentation(flip_axes=(0,), rotate_prob=1.0, zoom_prob=1.0, gamma_prob=1.0, noise_prob=1.0, blur_prob=1.0)
    aug.set_random_state(1)
    out = aug(item(image))
    assert out["image"].shape == image.shape and out["label"].shape == image.shape
    assert not torch.allclose(out["image"], image, atol=1e-3)
    assert set(torch.unique(out["label"]).tolist()) <= {0.0, 1.0}  # nearest-neighbour labels: no blends
    off = augmentation(flip_prob=0.0, intensity_scale_prob=0.0, intensity_shift_prob=0.0)  # every new option off by default
    torch.testing.assert_close(off(item(image))["image"], image)
    with pytest.raises(ValueError, match="gamma_prob"):
        augmentation(gamma_prob=1.5)
