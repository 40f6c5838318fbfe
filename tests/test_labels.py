"""Label conventions: dataset labels to targets and back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medseg.data.labels import ConvertLabelsd, LabelSpec

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
