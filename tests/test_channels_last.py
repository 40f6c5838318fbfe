"""model.channels_last: the same logits and gradients as the default memory order, weights stored NDHWC."""

from __future__ import annotations

import copy
import functools

import torch
from monai.networks.nets import DynUNet

from medseg.losses import FocalDiceLoss
from medseg.module import SegmentationModule

LABELS = {"mode": "softmax", "names": ["a", "b"], "values": [0, 1, 2]}


def module(net, channels_last):
    return SegmentationModule(
        net=net, loss=FocalDiceLoss("softmax"), optimizer=functools.partial(torch.optim.SGD, lr=0.1), labels=LABELS,
        inferer={"roi_size": [16, 16, 16], "sw_batch_size": 2, "overlap": 0.5, "mode": "gaussian"}, channels_last=channels_last,
    )


def test_channels_last_matches_default_memory_order_in_forward_backward_and_sliding_window():
    torch.manual_seed(0)
    net = DynUNet(3, 2, 3, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2], filters=[4, 8, 16], norm_name="INSTANCE", res_block=True)
    default, fast = module(copy.deepcopy(net), False), module(copy.deepcopy(net), True)
    conv = next(w for w in fast.net.parameters() if w.dim() == 5)
    assert conv.is_contiguous(memory_format=torch.channels_last_3d) and not conv.is_contiguous()
    assert_same_results(default, fast)


def assert_same_results(a: SegmentationModule, b: SegmentationModule) -> None:
    """Two modules of the same weights (2 channels in, softmax over 3 classes) give the same logits and gradients
    of a training batch and the same sliding-window logits of a volume, within float tolerance."""
    image = torch.randn(2, 2, 16, 16, 16, dtype=torch.float64).float()
    target = torch.randint(0, 3, (2, 1, 16, 16, 16))
    outputs = []
    for m in (a, b):
        logits = m(image)
        m.loss(logits, target).backward()
        outputs.append((logits.detach(), [p.grad.clone() for p in m.net.parameters()]))
    torch.testing.assert_close(outputs[0][0], outputs[1][0], rtol=1e-4, atol=1e-5)
    for g0, g1 in zip(outputs[0][1], outputs[1][1]):
        torch.testing.assert_close(g0, g1, rtol=1e-3, atol=1e-5)
    volume = torch.randn(1, 2, 24, 20, 28)
    with torch.no_grad():
        torch.testing.assert_close(a.predict_volume(volume), b.predict_volume(volume), rtol=1e-4, atol=1e-5)


def test_test_time_flips_average_the_flipped_back_probabilities_and_only_in_test_passes():
    from itertools import combinations

    import pytest

    torch.manual_seed(1)
    net = DynUNet(3, 1, 3, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2], filters=[4, 8, 16], norm_name="INSTANCE").eval()
    m = module(net, False)
    m.tta_flip_axes = (0, 2)
    volume = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        plain = m.predict_volume(volume).double()
        expected = torch.zeros_like(plain)
        for k in range(3):
            for axes in combinations((2, 4), k):
                flipped = m.predict_volume(volume.flip(axes)).double() if axes else m.predict_volume(volume).double()
                expected += torch.softmax(flipped.flip(axes) if axes else flipped, dim=1) / 4
        averaged = torch.softmax(m.predict_volume(volume, m.tta_flip_axes).double(), dim=1)
    torch.testing.assert_close(averaged, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(torch.softmax(plain, dim=1), expected, atol=1e-3)  # the flips changed something
    with pytest.raises(ValueError, match="flip axes"):
        m.predict_volume(volume, (0, 3))
