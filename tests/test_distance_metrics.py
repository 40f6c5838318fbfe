"""HD95 in millimetres: known answers, empty conventions and a float64 brute-force reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.distance import cdist

from medseg.metrics.distance import hausdorff_distance_95


def _surface_points(mask: np.ndarray, spacing) -> np.ndarray:
    """Mask voxels with a 6-neighbour outside the mask or the volume, as mm coordinates, float64."""
    interior = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1), border_value=0)
    return np.argwhere(mask & ~interior).astype(np.float64) * np.asarray(spacing, dtype=np.float64)


def _brute_force_hd95(pred: np.ndarray, target: np.ndarray, spacing) -> float:
    """All-pairs surface distances (scipy cdist), 95th percentile with linear interpolation, symmetric max."""
    distances = cdist(_surface_points(pred, spacing), _surface_points(target, spacing))  # (N_pred, N_target)
    return max(np.percentile(distances.min(axis=1), 95), np.percentile(distances.min(axis=0), 95))


def _random_mask(rng: np.random.Generator, shape) -> np.ndarray:
    mask = ndimage.binary_opening(rng.random(shape) < 0.45, iterations=1)
    mask |= rng.random(shape) < 0.01  # isolated voxels: surfaces of one voxel
    return mask


def test_identical_masks_have_zero_distance():
    mask = np.zeros((10, 10, 10), dtype=bool)
    mask[2:7, 3:8, 1:6] = True
    assert hausdorff_distance_95(mask, mask, (0.7, 1.3, 2.0)) == 0.0


@pytest.mark.parametrize(
    ("spacing", "expected"), [((1.0, 1.0, 1.0), 3.0), ((2.0, 1.0, 1.0), 6.0), ((0.5, 3.0, 1.0), 1.5)]
)
def test_single_voxels_use_the_spacing(spacing, expected):
    pred, target = np.zeros((8, 8, 8), dtype=bool), np.zeros((8, 8, 8), dtype=bool)
    pred[1, 4, 4], target[4, 4, 4] = True, True  # 3 voxels apart along axis 0
    assert hausdorff_distance_95(pred, target, spacing) == pytest.approx(expected)


def test_shifted_slab_known_answer():
    # two full slabs of one voxel thickness, 4 voxels apart along axis 2 at 2.5 mm: every surface voxel is 10 mm away
    pred, target = np.zeros((6, 7, 12), dtype=bool), np.zeros((6, 7, 12), dtype=bool)
    pred[:, :, 2], target[:, :, 6] = True, True
    assert hausdorff_distance_95(pred, target, (1.0, 1.0, 2.5)) == pytest.approx(10.0)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.6, 1.1, 3.0)])
def test_random_masks_match_brute_force(seed, spacing):
    rng = np.random.default_rng(seed)
    shape = (14, 12, 10)
    pred, target = _random_mask(rng, shape), _random_mask(rng, shape)
    expected = _brute_force_hd95(pred, target, spacing)
    assert expected > 0
    assert hausdorff_distance_95(pred, target, spacing) == pytest.approx(expected, rel=1e-5)


def test_distance_is_symmetric_and_accepts_tensors():
    rng = np.random.default_rng(42)
    pred, target = _random_mask(rng, (12, 12, 12)), _random_mask(rng, (12, 12, 12))
    spacing = (1.0, 2.0, 0.5)
    value = hausdorff_distance_95(pred, target, spacing)
    assert hausdorff_distance_95(target, pred, spacing) == value
    as_tensors = (torch.from_numpy(pred).float(), torch.from_numpy(target), torch.tensor(spacing))
    assert hausdorff_distance_95(*as_tensors) == value


def test_empty_masks_follow_the_explicit_conventions():
    empty = np.zeros((240, 240, 155), dtype=bool)
    lesion = empty.copy()
    lesion[100:105, 100:105, 70:75] = True
    assert hausdorff_distance_95(empty, empty) == 0.0
    assert math.isnan(hausdorff_distance_95(empty, empty, both_empty=float("nan")))
    diagonal = math.sqrt(240**2 + 240**2 + 155**2)  # 373.13 mm, about the 374 of BraTS 2023
    assert hausdorff_distance_95(empty, lesion) == pytest.approx(diagonal)
    assert hausdorff_distance_95(lesion, empty) == pytest.approx(diagonal)
    assert hausdorff_distance_95(lesion, empty, spacing=(2.0, 2.0, 2.0)) == pytest.approx(2 * diagonal)
    assert hausdorff_distance_95(lesion, empty, one_empty=374.0) == 374.0
    assert math.isinf(hausdorff_distance_95(empty, lesion, one_empty=float("inf")))


@pytest.mark.parametrize(
    ("pred", "target", "spacing", "match"),
    [
        (np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), (1.0, 1.0, 1.0), "same shape"),
        (np.full((4, 4, 4), 0.3), np.zeros((4, 4, 4)), (1.0, 1.0, 1.0), "binary"),
        (np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1.0, -1.0, 1.0), "spacing"),
    ],
)
def test_invalid_inputs_raise(pred, target, spacing, match):
    with pytest.raises(ValueError, match=match):
        hausdorff_distance_95(pred, target, spacing)
