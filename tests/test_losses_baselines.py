"""Cross-entropy baselines (plain, balanced, top-k) and the deep-supervision wrapper, with known answers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medseg.losses import BalancedCELoss, CrossEntropyLoss, DeepSupervisionLoss, DiceLoss, FocalDiceLoss, TopKCELoss


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny tensors: one thread (see tests/test_losses.py); the previous setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_batch(shape, mode, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(shape, generator=g, dtype=torch.float64)
    if mode == "sigmoid":
        return logits, (torch.rand(shape, generator=g) < 0.2).double()
    return logits, torch.randint(0, shape[1], (shape[0], 1, *shape[2:]), generator=g).double()


# ----------------------------------------------------------------------------------------------------
# cross-entropy


def test_cross_entropy_is_torch():
    logits, target = make_batch((2, 3, 4, 5, 6), "sigmoid", seed=1)
    torch.testing.assert_close(CrossEntropyLoss("sigmoid")(logits, target), F.binary_cross_entropy_with_logits(logits, target))
    weighted = CrossEntropyLoss("sigmoid", weight=[1.0, 2.0, 0.5])(logits, target)
    w = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64).view(1, 3, 1, 1, 1)
    torch.testing.assert_close(weighted, F.binary_cross_entropy_with_logits(logits, target, weight=w))
    logits, index = make_batch((2, 3, 4, 5, 6), "softmax", seed=1)
    y = index.long().squeeze(1)
    torch.testing.assert_close(CrossEntropyLoss("softmax")(logits, index), F.cross_entropy(logits, y))
    weight = torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(
        CrossEntropyLoss("softmax", weight=[0.2, 1.0, 3.0])(logits, index), F.cross_entropy(logits, y, weight=weight)
    )


def test_cross_entropy_rejects_bad_weights():
    with pytest.raises(ValueError, match="expected weight to be a list of non-negative numbers, one per channel, got"):
        CrossEntropyLoss("softmax", weight=[1.0, -1.0])
    with pytest.raises(ValueError, match="expected weight with one value per output channel \\(3\\), got 2 values"):
        CrossEntropyLoss("softmax", weight=[1.0, 2.0])(*make_batch((2, 3, 4, 4), "softmax"))


def test_balanced_ce_softmax_known_answer():
    # 1 item, 3 classes, 4 voxels: classes 0, 0, 0, 2 (class 1 absent). Balanced CE = mean over the
    # present classes (0 and 2) of their mean -log p over their own voxels.
    logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0], [-1.0, 0.0, 1.0, 3.0]]], dtype=torch.float64)  # (1, 3, 4)
    index = torch.tensor([[[0, 0, 0, 2]]])  # (1, 1, 4)
    logp = torch.log_softmax(logits, 1)[0]  # (3, 4)
    class0 = -(logp[0, 0] + logp[0, 1] + logp[0, 2]) / 3
    class2 = -logp[2, 3]
    torch.testing.assert_close(BalancedCELoss("softmax")(logits, index), (class0 + class2) / 2)


def test_balanced_ce_sigmoid_known_answer():
    # per channel: mean of (mean BCE over positives, mean BCE over negatives); a channel without
    # positives counts its negatives alone.
    logits = torch.tensor([[[1.0, -2.0, 0.5], [0.3, -0.7, 2.0]]], dtype=torch.float64)  # (1, 2, 3)
    target = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]], dtype=torch.float64)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")[0]  # (2, 3)
    channel0 = (bce[0, 0] + (bce[0, 1] + bce[0, 2]) / 2) / 2
    channel1 = bce[1].mean()
    torch.testing.assert_close(BalancedCELoss("sigmoid")(logits, target), (channel0 + channel1) / 2)


def test_balanced_ce_ignores_class_frequency():
    # duplicating the background voxels changes plain CE but not balanced CE
    logits, index = make_batch((1, 3, 20), "softmax", seed=2)
    background = index[..., :] == 0
    extra_logits = logits[..., background[0, 0]].repeat(1, 1, 5)
    extra_index = torch.zeros(1, 1, extra_logits.shape[-1], dtype=torch.float64)
    more_logits, more_index = torch.cat([logits, extra_logits], -1), torch.cat([index, extra_index], -1)
    loss = BalancedCELoss("softmax")
    torch.testing.assert_close(loss(more_logits, more_index), loss(logits, index))


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_topk_ce(mode):
    logits, target = make_batch((2, 3, 5, 6, 7), mode, seed=3)
    if mode == "sigmoid":
        ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten()
    else:
        ce = F.cross_entropy(logits, target.long().squeeze(1), reduction="none").flatten()
    torch.testing.assert_close(TopKCELoss(mode, k=100)(logits, target), ce.mean())
    kept = math.ceil(0.1 * ce.numel())
    torch.testing.assert_close(TopKCELoss(mode)(logits, target), ce.sort(descending=True).values[:kept].mean())


@pytest.mark.parametrize("k", [0, -5, 101, "ten"])
def test_topk_rejects_bad_k(k):
    with pytest.raises(ValueError, match="expected k, the percentage of elements kept, in \\(0, 100\\], got"):
        TopKCELoss("softmax", k=k)


# ----------------------------------------------------------------------------------------------------
# deep supervision


def test_deep_supervision_stacked_dynunet_output():
    logits, target = make_batch((2, 3, 3, 4, 5, 6), "sigmoid", seed=4)  # (B, S, C, D, H, W)
    target = target[:, 0]  # (B, C, D, H, W)
    inner = FocalDiceLoss("sigmoid", lambda_focal=0.5)
    loss = DeepSupervisionLoss(inner)
    weights = [4 / 7, 2 / 7, 1 / 7]  # 1, 1/2, 1/4 normalised
    expected = sum(w * inner(logits[:, i], target) for i, w in enumerate(weights))
    torch.testing.assert_close(loss(logits, target), expected)
    total, parts = loss.forward_with_terms(logits, target)
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(total, 0.5 * parts["focal"] + parts["dice"])
    expected_dice = sum(w * DiceLoss("sigmoid")(logits[:, i], target) for i, w in enumerate(weights))
    torch.testing.assert_close(parts["dice"], expected_dice)


def test_deep_supervision_list_downsamples_the_target():
    g = torch.Generator().manual_seed(5)
    index = torch.randint(0, 3, (2, 8, 8, 8), generator=g)  # (B, D, H, W) class indices, no channel axis
    outputs = [torch.randn(2, 3, s, s, s, generator=g, dtype=torch.float64) for s in (8, 4, 2)]
    inner = FocalDiceLoss("softmax")
    total, parts = DeepSupervisionLoss(inner).forward_with_terms(outputs, index)
    expected, weights = 0.0, [4 / 7, 2 / 7, 1 / 7]
    for w, out in zip(weights, outputs, strict=True):
        small = F.interpolate(index[:, None].float(), size=out.shape[2:], mode="nearest").long()  # (B, 1, s, s, s)
        expected = expected + w * inner(out, small)
    torch.testing.assert_close(total, expected)
    assert set(parts) == {"focal", "dice"}
    torch.testing.assert_close(total, parts["focal"] + parts["dice"])


def test_deep_supervision_plain_logits_and_gradients():
    logits, target = make_batch((2, 3, 4, 5, 6), "softmax", seed=6)
    inner = FocalDiceLoss("softmax")
    loss = DeepSupervisionLoss(inner)
    torch.testing.assert_close(loss(logits, target), inner(logits, target))  # eval mode: one output
    weighted = DeepSupervisionLoss(inner, weights=[1.0, 0.5, 0.25])
    torch.testing.assert_close(weighted(logits, target), inner(logits, target))
    total, parts = weighted.forward_with_terms(logits, target)
    torch.testing.assert_close(total, inner(logits, target))
    assert set(parts) == {"focal", "dice"}
    stacked = torch.randn(2, 3, 3, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    loss(stacked, target).backward()
    assert torch.isfinite(stacked.grad).all() and (stacked.grad[:, 2] != 0).any()


def test_deep_supervision_custom_weights_and_plain_inner_loss():
    logits, target = make_batch((2, 2, 3, 4, 5, 6), "sigmoid", seed=7)
    target = target[:, 0]
    inner = DiceLoss("sigmoid")
    total, parts = DeepSupervisionLoss(inner, weights=[1.0, 0.0]).forward_with_terms(logits, target)
    torch.testing.assert_close(total, inner(logits[:, 0], target))
    assert parts == {}


def test_deep_supervision_bad_arguments():
    with pytest.raises(ValueError, match="expected each deep supervision weight to be a finite number >= 0, got -1"):
        DeepSupervisionLoss(DiceLoss("sigmoid"), weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="expected 2 deep supervision outputs \\(one per weight\\), got 3"):
        DeepSupervisionLoss(DiceLoss("sigmoid"), weights=[1.0, 0.5])(torch.zeros(1, 3, 2, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4))
    with pytest.raises(ValueError, match="expected logits \\(B, C, \\*spatial\\) or stacked"):
        DeepSupervisionLoss(DiceLoss("sigmoid"))(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="expected at least one network output, got an empty sequence"):
        DeepSupervisionLoss(DiceLoss("sigmoid"))([], torch.zeros(1, 2, 4, 4, 4))
    with pytest.raises(ValueError, match="expected spatial_dims to be a positive integer, got 0"):
        DeepSupervisionLoss(DiceLoss("sigmoid"), spatial_dims=0)
