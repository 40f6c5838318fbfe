"""Label conventions: dataset labels to targets and back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medseg.data.labels import ConvertLabelsd, LabelSpec, region_sizes

from conftest import BRATS_LABELS


@pytest.fixture()
def brats() -> LabelSpec:
    return LabelSpec.from_config(BRATS_LABELS)


def test_brats_regions_hand_computed(brats):
    label = torch.tensor([0, 1, 2, 4]).view(1, 4, 1, 1)
    target = brats.to_target(label)[:, :, 0, 0]  # (R, 4)
    assert target.tolist() == [[0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]]  # WT, TC, ET per label 0,1,2,4


def test_brats_round_trip_on_random_labels(brats):
    label = torch.from_numpy(np.random.default_rng(0).choice([0, 1, 2, 4], size=(1, 9, 8, 7)))
    assert torch.equal(brats.to_labels(brats.to_target(label)), label)


def test_inconsistent_regions_get_the_nearest_label(brats):
    # ET without TC/WT -> 4 (enhancing), TC without WT -> 1, WT alone -> 2 (oedema), nothing -> 0
    pred = torch.tensor([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0]]).view(3, 4, 1, 1)
    assert brats.to_labels(pred).flatten().tolist() == [4, 1, 2, 0]


def test_softmax_values_map_to_consecutive_indices():
    spec = LabelSpec("softmax", ("ncr", "ed", "et"), (0, 1, 2, 4))
    label = torch.tensor([[0, 4, 2, 1]])
    assert spec.to_target(label).tolist() == [[0, 3, 2, 1]]
    assert torch.equal(spec.to_labels(spec.to_target(label)), label)
    assert spec.num_outputs == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "softmin", "names": ("a",), "values": (0, 1)}, "expected labels.mode"),
        ({"mode": "softmax", "names": ("a", "b"), "values": (0, 1)}, "one value per name"),
        ({"mode": "sigmoid", "names": ("wt",), "values": (0, 1), "regions": {}}, "missing"),
        ({"mode": "sigmoid", "names": ("wt",), "values": (0, 1), "regions": {"wt": (1, 3)}}, r"values \[3\]"),
        ({"mode": "softmax", "names": ("a",), "values": (1, 2)}, "background 0"),
    ],
)
def test_bad_label_specs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LabelSpec(**kwargs)


def test_unexpected_label_value_names_the_file(brats):
    label = MetaTensor(torch.tensor([[[[0.0, 3.0]]]]), meta={"filename_or_obj": "/data/case7_seg.nii.gz"})
    with pytest.raises(ValueError, match=r"case7_seg.nii.gz: unexpected label values \[3\]"):
        ConvertLabelsd("label", brats)({"label": label})
    with pytest.raises(ValueError, match=r"case7_seg.nii.gz: expected integer label values"):
        ConvertLabelsd("label", brats)({"label": MetaTensor(label.as_tensor() * 0 + 0.5, meta=label.meta)})


def test_conversion_keeps_geometry_metadata(brats):
    affine = torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0]))
    label = MetaTensor(torch.tensor([[[[0.0, 4.0]]]]), affine=affine)
    out = ConvertLabelsd("label", brats)({"label": label})["label"]
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, affine.double()) and out.shape == (3, 1, 1, 2)


# LabelSpec.to_channels: one boolean mask per region (sigmoid) or foreground class (softmax).
CHANNEL_SPECS = {
    "brats_sigmoid": LabelSpec.from_config(BRATS_LABELS),
    "brats_softmax": LabelSpec("softmax", ("ncr", "ed", "et"), (0, 1, 2, 4)),
    "two_classes": LabelSpec("softmax", ("anterior", "posterior"), (0, 1, 2)),
    "overlapping": LabelSpec("sigmoid", ("a", "ab", "c"), (0, 1, 2, 3), {"a": (1,), "ab": (1, 2), "c": (3,)}),
}


def reference_channels(spec: LabelSpec, label: np.ndarray) -> np.ndarray:
    """Voxel by voxel, from the spec's definition: in region ``name`` when the value is one of
    ``regions[name]`` (sigmoid), in class ``r`` when the value is ``values[r + 1]`` (softmax)."""
    members = [set(spec.regions[n]) for n in spec.names] if spec.mode == "sigmoid" else [{v} for v in spec.values[1:]]
    out = np.zeros((len(spec.names), *label.shape), dtype=bool)
    for index in np.ndindex(*label.shape):
        for r, values in enumerate(members):
            out[(r, *index)] = int(label[index]) in values
    return out


@pytest.mark.parametrize("name", list(CHANNEL_SPECS))
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int64, np.float32])
def test_to_channels_matches_a_voxelwise_reference_on_random_labels(name, dtype):
    spec = CHANNEL_SPECS[name]
    label = np.random.default_rng(len(name)).choice(spec.values, size=(7, 6, 5)).astype(dtype)  # (X, Y, Z)
    expected = reference_channels(spec, label)  # (R, X, Y, Z)
    from_numpy = spec.to_channels(label[None])
    from_torch = spec.to_channels(torch.from_numpy(label)[None])
    assert isinstance(from_numpy, np.ndarray) and from_numpy.dtype == bool and from_numpy.shape == (len(spec.names), 7, 6, 5)
    assert isinstance(from_torch, torch.Tensor) and from_torch.dtype == torch.bool
    np.testing.assert_array_equal(from_numpy, expected)
    np.testing.assert_array_equal(from_torch.numpy(), expected)
    # the masks the metrics used to derive from the training target
    target = spec.to_target(torch.from_numpy(label.astype(np.int64))[None])
    derived = target > 0.5 if spec.mode == "sigmoid" else torch.stack([target[0] == r + 1 for r in range(len(spec.names))])
    assert torch.equal(from_torch, derived)


def test_to_channels_hand_computed(brats):
    label = torch.tensor([0, 1, 2, 4]).view(1, 4, 1, 1)
    assert brats.to_channels(label)[:, :, 0, 0].tolist() == [[False, True, True, True], [False, True, False, True], [False, False, False, True]]
    assert brats.channel_values == ((1, 2, 4), (1, 4), (4,))
    assert CHANNEL_SPECS["brats_softmax"].channel_values == ((1,), (2,), (4,))
    assert region_sizes(brats, np.array([0, 1, 2, 4, 4]).reshape(5, 1, 1)) == {"wt": 4, "tc": 3, "et": 2}
    assert region_sizes(CHANNEL_SPECS["brats_softmax"], np.array([0, 1, 2, 4, 4]).reshape(5, 1, 1)) == {"ncr": 1, "ed": 1, "et": 2}
