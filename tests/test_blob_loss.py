"""BlobLoss against a float64 reference written from the paper's definition (a loop over lesions)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from medseg.losses import BlobLoss, FocalDiceLoss
from medseg.losses.blob import lesion_components


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_blob_loss(logits, target, mode, lambda_global, lambda_blob, gamma, alpha, lambda_focal, lambda_dice, smooth):
    """Literal definition, float64: for every (item, region) and each of its lesions (scipy components), the
    binary focal (mean over background + that lesion) and soft Dice of that lesion alone; mean over the
    lesions of a pair, mean over pairs with lesions; plus the global focal + Dice (FocalDiceLoss in float64)."""
    x = logits.detach().double()
    if mode == "sigmoid":
        probs = torch.sigmoid(x)  # (B, C, ...)
        fg = target > 0.5
    else:
        probs = torch.softmax(x, 1)[:, 1:]
        classes = target[:, 0] if target.ndim == x.ndim else target
        fg = torch.stack([classes == c for c in range(1, x.shape[1])], 1)
    structure = np.ones((3,) * (x.ndim - 2))
    pair_means = []
    for b in range(x.shape[0]):
        for r in range(probs.shape[1]):
            components, n = ndimage.label(fg[b, r].numpy(), structure=structure)
            if n == 0:
                continue
            terms = []
            for k in range(1, n + 1):
                lesion = torch.from_numpy(components == k)
                keep = torch.from_numpy(components == 0) | lesion  # other lesions masked out
                p = probs[b, r][keep]
                t = lesion[keep].double()
                a_pos = 1.0 if alpha is None else alpha
                a_neg = 1.0 if alpha is None or mode == "softmax" else 1 - alpha
                focal = -(a_pos * t * (1 - p) ** gamma * torch.log(p) + a_neg * (1 - t) * p**gamma * torch.log(1 - p)).mean()
                dice = (2 * (p * t).sum() + smooth) / (p.sum() + t.sum() + smooth)
                terms.append(lambda_focal * focal + lambda_dice * (1 - dice))
            pair_means.append(torch.stack(terms).mean())
    blob = torch.stack(pair_means).mean() if pair_means else torch.zeros((), dtype=torch.float64)
    glob = FocalDiceLoss(mode, gamma=gamma, alpha=alpha, lambda_focal=lambda_focal, lambda_dice=lambda_dice, smooth=smooth)(x, target)
    return lambda_global * glob + lambda_blob * blob, blob


def lesion_target(shape, n_lesions, seed, big=False):
    """A binary mask with ``n_lesions`` random blobs (one of them large if ``big``)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, dtype=bool)
    for i in range(n_lesions):
        centre = rng.integers(0, shape)
        radius = 3 if big and i == 0 else rng.integers(0, 2)
        lo, hi = np.maximum(centre - radius, 0), np.minimum(centre + radius + 1, shape)
        mask[tuple(slice(a, z) for a, z in zip(lo, hi))] = True
    return mask


def sigmoid_case(seed=0, shape=(10, 10, 10)):
    g = torch.Generator().manual_seed(seed)
    target = torch.from_numpy(np.stack([np.stack([lesion_target(shape, 5, seed * 10 + b * 2 + c, big=c == 0) for c in range(2)]) for b in range(2)])).double()
    logits = torch.randn((2, 2, *shape), generator=g, dtype=torch.float64) * 2
    return logits, target


def softmax_case(seed=0, shape=(10, 10, 10)):
    g = torch.Generator().manual_seed(seed)
    classes = np.zeros((2, 1, *shape), dtype=np.int64)
    for b in range(2):
        classes[b, 0][lesion_target(shape, 6, seed + b, big=True)] = 1
        classes[b, 0][lesion_target(shape, 4, seed + b + 50)] = 2
    logits = torch.randn((2, 3, *shape), generator=g, dtype=torch.float64) * 2
    return logits, torch.from_numpy(classes)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("gamma,alpha", [(2.0, None), (0.0, None), (1.0, 0.25)])
def test_sigmoid_matches_loop_reference(seed, gamma, alpha):
    logits, target = sigmoid_case(seed)
    loss = BlobLoss("sigmoid", lambda_global=2.0, lambda_blob=1.0, gamma=gamma, alpha=alpha)
    total, terms = loss.forward_with_terms(logits, target)
    ref_total, ref_blob = reference_blob_loss(logits, target, "sigmoid", 2.0, 1.0, gamma, alpha, 1.0, 1.0, 1e-5)
    torch.testing.assert_close(terms["blob"], ref_blob, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(total, ref_total, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("gamma", [2.0, 0.0])
def test_softmax_matches_loop_reference(seed, gamma):
    logits, target = softmax_case(seed)
    loss = BlobLoss("softmax", lambda_global=1.5, lambda_blob=0.5, gamma=gamma, lambda_focal=0.7, lambda_dice=1.3, smooth=1.0)
    total, terms = loss.forward_with_terms(logits, target)
    ref_total, ref_blob = reference_blob_loss(logits, target, "softmax", 1.5, 0.5, gamma, None, 0.7, 1.3, 1.0)
    torch.testing.assert_close(terms["blob"], ref_blob, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(total, ref_total, rtol=1e-10, atol=1e-12)
    # the one-hot form of the same target gives the same loss
    onehot = torch.nn.functional.one_hot(target[:, 0], 3).movedim(-1, 1).double()
    torch.testing.assert_close(loss(logits, onehot), total, rtol=1e-10, atol=1e-12)


def test_float32_close_to_float64():
    logits, target = sigmoid_case(3, shape=(16, 16, 16))
    loss = BlobLoss("sigmoid")
    torch.testing.assert_close(loss(logits.float(), target.float()).double(), loss(logits, target), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_gradcheck(mode):
    logits, target = sigmoid_case(4, shape=(6, 6, 6)) if mode == "sigmoid" else softmax_case(4, shape=(6, 6, 6))
    logits.requires_grad_()
    loss = BlobLoss(mode, gamma=2.0, alpha=0.3 if mode == "sigmoid" else None)
    assert torch.autograd.gradcheck(lambda x: loss(x, target), (logits,))


def test_no_lesion_is_the_global_term_and_has_gradient():
    logits = torch.randn(2, 1, 8, 8, 8, dtype=torch.float64, requires_grad=True)
    target = torch.zeros_like(logits)
    loss = BlobLoss("sigmoid", lambda_global=2.0, lambda_blob=1.0)
    total, terms = loss.forward_with_terms(logits, target)
    assert terms["blob"].item() == 0.0
    torch.testing.assert_close(total, 2.0 * FocalDiceLoss("sigmoid")(logits, target))
    total.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_one_lesion_touching_the_border():
    logits = torch.randn(1, 1, 8, 8, 8, dtype=torch.float64)
    target = torch.zeros_like(logits)
    target[0, 0, :3, :2, 5:] = 1  # a block on three faces of the patch
    loss = BlobLoss("sigmoid", lambda_global=0.0, lambda_blob=1.0)
    ref_total, ref_blob = reference_blob_loss(logits, target, "sigmoid", 0.0, 1.0, 2.0, None, 1.0, 1.0, 1e-5)
    torch.testing.assert_close(loss(logits, target), ref_blob)
    # one lesion and nothing else: the blob term is focal + Dice over the whole patch (no voxel masked out)
    torch.testing.assert_close(loss(logits, target), FocalDiceLoss("sigmoid")(logits, target), rtol=1e-10, atol=1e-12)


def test_every_lesion_weighs_the_same():
    """Missing a 1-voxel lesion costs as much blob Dice as missing a 125-voxel one (the point of the loss),
    while the global Dice barely notices the small one."""
    target = torch.zeros(1, 1, 20, 20, 20, dtype=torch.float64)
    target[0, 0, 2:7, 2:7, 2:7] = 1  # 125 voxels
    target[0, 0, 15, 15, 15] = 1  # 1 voxel
    good = torch.where(target > 0, 16.0, -16.0)
    miss_small = good.clone()
    miss_small[0, 0, 15, 15, 15] = -16.0
    miss_big = good.clone()
    miss_big[0, 0, 2:7, 2:7, 2:7] = -16.0
    blob = BlobLoss("sigmoid", lambda_focal=0.0).blob_term
    assert blob(miss_small, target).item() == pytest.approx(blob(miss_big, target).item(), rel=0.05)
    global_dice = FocalDiceLoss("sigmoid", lambda_focal=0.0)
    assert global_dice(miss_small, target) < 0.05 < global_dice(miss_big, target)


def test_components_are_per_item_and_channel_and_26_connected():
    target = torch.zeros(2, 2, 5, 5, 5, dtype=torch.bool)
    target[0, 0, 0, 0, 0] = target[0, 0, 1, 1, 1] = True  # corner-touching: one lesion under 26-connectivity
    target[1, 1, 4, 4, 4] = target[1, 1, 0, 0, 0] = True  # two lesions
    labels, owner = lesion_components(target, 26)
    assert owner.tolist() == [0, 3, 3]
    assert set(labels[0, 0].unique().tolist()) == {0, 1} and set(labels[1, 1].unique().tolist()) == {0, 2, 3}
    labels6, owner6 = lesion_components(target, 6)
    assert owner6.tolist() == [0, 0, 3, 3]


def test_bad_arguments():
    with pytest.raises(ValueError, match="connectivity"):
        BlobLoss("sigmoid", connectivity=8)
    with pytest.raises(ValueError, match="lambda_blob"):
        BlobLoss("sigmoid", lambda_blob=-1.0)
    with pytest.raises(ValueError, match="spatial"):
        BlobLoss("sigmoid")(torch.randn(4, 2), torch.zeros(4, 2))
