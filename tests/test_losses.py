"""Focal, Dice and focal + Dice losses against a float64 formula, torch, MONAI and known answers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.losses import DiceFocalLoss as MonaiDiceFocalLoss
from monai.losses import DiceLoss as MonaiDiceLoss
from monai.losses import FocalLoss as MonaiFocalLoss

from medseg.losses import DiceCELoss, DiceLoss, FocalDiceLoss, FocalLoss, _stats

SHAPES = [(2, 3, 5, 6, 7), (3, 4, 9, 10), (6, 3)]  # 3D, 2D and (N, C) logits
GAMMAS = [0.0, 0.5, 1.5, 2.0, 5.0]
ALPHAS = [None, 0.25, "per-class"]
# MONAI computes its focal term in float32 (with cancellation, up to ~1e-6 absolute per element) and its
# squared Dice through norms: agreement to ~1e-6 only.
MONAI_TOL = {"rtol": 2e-6, "atol": 1e-6}


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny tensors: one thread. (After an explicit torch.set_num_threads(2), as in conftest, every exp/pow
    of a small tensor waits ~8 ms for the thread pool on a loaded 2-core machine, which makes gradcheck
    take minutes.) The previous setting is restored for the tests that follow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------
# independent float64 references, written from the formulas (naive but exact for moderate logits)


def make_batch(shape, mode, seed=0, dtype=torch.float64, scale=3.0):
    """Logits and target: multi-hot for sigmoid, class indices (B, 1, *spatial) for softmax."""
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(shape, generator=g)).to(dtype)
    if mode == "sigmoid":
        target = (torch.rand(shape, generator=g) < 0.3).to(dtype)
    else:
        target = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]), generator=g).to(dtype)
    return logits, target


def one_hot(index, channels):
    """(B, 1, *spatial) class indices to a float64 one-hot (B, C, *spatial)."""
    return F.one_hot(index.long().squeeze(1), channels).movedim(-1, 1).double()


def alpha_value(alpha, channels):
    return [0.1 + 0.8 * c / max(channels - 1, 1) for c in range(channels)] if alpha == "per-class" else alpha


def reference_focal(logits, target, mode, gamma, alpha, reduction="mean", include_background=True):
    x = logits.double()
    channels = x.shape[1]
    shape = [1, channels] + [1] * (x.ndim - 2)
    if mode == "sigmoid":
        t = target.double()
        p = 1 / (1 + torch.exp(-x))
        if alpha is None:
            a_pos, a_neg = 1.0, 1.0
        else:
            a = torch.tensor(alpha, dtype=torch.float64)
            a = a.view(shape) if a.ndim else a
            a_pos, a_neg = a, 1 - a
        loss = -t * a_pos * (1 - p) ** gamma * torch.log(p) - (1 - t) * a_neg * p**gamma * torch.log(1 - p)
        loss = loss if include_background else loss[:, 1:]
    else:
        t = target.double() if target.shape == x.shape else one_hot(target, channels)
        p = torch.exp(x) / torch.exp(x).sum(1, keepdim=True)
        if alpha is None:
            w = torch.ones(channels, dtype=torch.float64)
        elif isinstance(alpha, float):
            w = torch.tensor([1 - alpha] + [alpha] * (channels - 1), dtype=torch.float64)
        else:
            w = torch.tensor(alpha, dtype=torch.float64)
        if not include_background:
            w[0] = 0
        loss = (w.view(shape) * t * (1 - p) ** gamma * -torch.log(p)).sum(1)
    return {"mean": loss.mean(), "sum": loss.sum(), "none": loss}[reduction]


def reference_dice(logits, target, mode, include_background, smooth=1e-5, batch_dice=False, squared=False):
    x = logits.double()
    if mode == "sigmoid":
        p, t = torch.sigmoid(x), target.double()
    else:
        p = torch.softmax(x, 1)
        t = target.double() if target.shape == x.shape else one_hot(target, x.shape[1])
    if not include_background:
        p, t = p[:, 1:], t[:, 1:]
    axes = [0, *range(2, x.ndim)] if batch_dice else list(range(2, x.ndim))
    inter = (p * t).sum(axes)
    denominator = ((p * p).sum(axes) + (t * t).sum(axes)) if squared else (p.sum(axes) + t.sum(axes))
    return 1 - ((2 * inter + smooth) / (denominator + smooth)).mean()


# ----------------------------------------------------------------------------------------------------
# focal loss


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("alpha", ALPHAS, ids=str)
def test_focal_matches_float64_reference(mode, shape, gamma, alpha):
    logits, target = make_batch(shape, mode, seed=int(10 * gamma) + len(shape))
    alpha = alpha_value(alpha, shape[1])
    for reduction in ("mean", "sum", "none"):
        got = FocalLoss(gamma=gamma, alpha=alpha, mode=mode, reduction=reduction)(logits, target)
        expected = reference_focal(logits, target, mode, gamma, alpha, reduction)
        if reduction == "none" and mode == "softmax":
            expected = expected.reshape(got.shape)  # (B, *spatial)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_focal_float32_matches_float64_reference(mode, gamma):
    logits, target = make_batch((2, 3, 8, 9, 10), mode, seed=4)
    got = FocalLoss(gamma=gamma, alpha=0.25, mode=mode)(logits.float(), target.float())
    assert got.dtype == torch.float32
    expected = reference_focal(logits.float(), target, mode, gamma, 0.25)
    assert got.item() == pytest.approx(expected.item(), rel=2e-6)


def test_focal_worked_example():
    logits = torch.tensor([[0.8], [-1.5], [0.1]])
    target = torch.tensor([[1.0], [0.0], [1.0]])
    mean = FocalLoss(gamma=1.5, alpha=0.25, mode="sigmoid")(logits, target)
    total = FocalLoss(gamma=1.5, alpha=0.25, mode="sigmoid", reduction="sum")(logits, target)
    assert mean.item() == pytest.approx(0.026843, abs=5e-7)
    assert total.item() == pytest.approx(0.080528, abs=5e-7)


# float32: torch's own BCE cancels digits for confident negatives ((1 - t) x + max(-x, 0) + ...), an
# absolute error up to ~1e-6 (checked below against float64: ours does not), hence the atol.
@pytest.mark.parametrize("dtype, rtol, atol", [(torch.float64, 1e-7, 0.0), (torch.float32, 1e-6, 2e-6)])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_focal_gamma0_is_bce_with_logits(shape, dtype, rtol, atol):
    logits, target = make_batch(shape, "sigmoid", seed=1, dtype=dtype)
    for reduction in ("mean", "sum", "none"):
        got = FocalLoss(gamma=0.0, mode="sigmoid", reduction=reduction)(logits, target)
        expected = F.binary_cross_entropy_with_logits(logits, target, reduction=reduction)
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
    exact = F.binary_cross_entropy_with_logits(logits.double(), target.double(), reduction="none")
    got = FocalLoss(gamma=0.0, mode="sigmoid", reduction="none")(logits, target)
    torch.testing.assert_close(got.double(), exact, rtol=1e-6 if dtype == torch.float32 else 1e-10, atol=0)


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-7), (torch.float32, 2e-6)])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_focal_gamma0_is_cross_entropy(shape, dtype, rtol):
    logits, target = make_batch(shape, "softmax", seed=2, dtype=dtype)
    index = target.long().squeeze(1)  # (B, *spatial)
    for reduction in ("mean", "sum", "none"):
        expected = F.cross_entropy(logits, index, reduction=reduction)
        for form in (target, index, one_hot(target, shape[1]).to(dtype)):  # (B,1,...) float, (B,...) long, one-hot
            got = FocalLoss(gamma=0.0, mode="softmax", reduction=reduction)(logits, form)
            torch.testing.assert_close(got, expected, rtol=rtol, atol=1e-7 if dtype == torch.float32 else 0)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0])
@pytest.mark.parametrize("alpha", [None, 0.25])
def test_focal_sigmoid_matches_monai(gamma, alpha):
    logits, target = make_batch((2, 3, 6, 7, 8), "sigmoid", seed=5)
    for reduction in ("mean", "none"):  # MONAI's "sum" averages the spatial axes first
        got = FocalLoss(gamma=gamma, alpha=alpha, mode="sigmoid", reduction=reduction)(logits, target)
        expected = MonaiFocalLoss(gamma=gamma, alpha=alpha, reduction=reduction)(logits, target)
        torch.testing.assert_close(got, expected.double(), **MONAI_TOL)


@pytest.mark.parametrize("gamma", [0.0, 2.0])
@pytest.mark.parametrize("alpha", [None, 0.25, [0.2, 0.3, 0.5, 0.7]])
def test_focal_softmax_matches_monai(gamma, alpha):
    # MONAI's per-voxel softmax focal is split over channels (summing them gives ours) and its "mean"
    # divides by B * C * N instead of B * N.
    logits, target = make_batch((2, 4, 6, 7, 8), "softmax", seed=6)
    monai = MonaiFocalLoss(gamma=gamma, alpha=alpha, use_softmax=True, to_onehot_y=True, reduction="none")(logits, target)
    got = FocalLoss(gamma=gamma, alpha=alpha, mode="softmax", reduction="none")(logits, target)
    torch.testing.assert_close(got, monai.sum(1).double(), **MONAI_TOL)
    mean = FocalLoss(gamma=gamma, alpha=alpha, mode="softmax")(logits, target)
    torch.testing.assert_close(mean, 4 * monai.mean().double(), **MONAI_TOL)


def test_focal_alpha_conventions():
    logits, target = make_batch((2, 3, 5, 5, 5), "sigmoid", seed=7)
    # sigmoid: a number is the same number for every channel (positives alpha, negatives 1 - alpha)
    one = FocalLoss(alpha=0.3)(logits, target)
    torch.testing.assert_close(one, FocalLoss(alpha=[0.3, 0.3, 0.3])(logits, target))
    # softmax: a number weighs background 1 - alpha and every class alpha
    logits, index = make_batch((2, 3, 5, 5, 5), "softmax", seed=7)
    one = FocalLoss(alpha=0.3, mode="softmax")(logits, index)
    torch.testing.assert_close(one, FocalLoss(alpha=[0.7, 0.3, 0.3], mode="softmax")(logits, index))


def test_focal_include_background():
    logits, target = make_batch((2, 3, 5, 5, 5), "sigmoid", seed=8)
    dropped = FocalLoss(include_background=False, alpha=[0.9, 0.2, 0.4])(logits, target)
    torch.testing.assert_close(dropped, FocalLoss(alpha=[0.2, 0.4])(logits[:, 1:], target[:, 1:]))
    assert FocalLoss(include_background=False, reduction="none")(logits, target).shape == (2, 2, 5, 5, 5)
    # softmax: class-0 voxels contribute 0, the mean still divides by every voxel
    logits, index = make_batch((2, 3, 5, 5, 5), "softmax", seed=8)
    dropped = FocalLoss(mode="softmax", include_background=False)(logits, index)
    torch.testing.assert_close(dropped, FocalLoss(mode="softmax", alpha=[0.0, 1.0, 1.0])(logits, index))
    torch.testing.assert_close(dropped, reference_focal(logits, index, "softmax", 2.0, None, include_background=False))


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_focal_none_output_agrees_with_reductions(mode):
    logits, target = make_batch((2, 3, 4, 5, 6), mode, seed=9)
    none = FocalLoss(mode=mode, alpha=0.4, reduction="none")(logits, target)
    assert none.shape == ((2, 3, 4, 5, 6) if mode == "sigmoid" else (2, 4, 5, 6))
    torch.testing.assert_close(none.mean(), FocalLoss(mode=mode, alpha=0.4)(logits, target))
    torch.testing.assert_close(none.sum(), FocalLoss(mode=mode, alpha=0.4, reduction="sum")(logits, target))


def test_focal_soft_sigmoid_target_mixes_the_two_terms():
    logits, _ = make_batch((2, 2, 4, 4, 4), "sigmoid", seed=10)
    soft = torch.rand(logits.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    loss = FocalLoss(gamma=1.5, alpha=0.25, reduction="none")
    mixed = soft * loss(logits, torch.ones_like(soft)) + (1 - soft) * loss(logits, torch.zeros_like(soft))
    torch.testing.assert_close(loss(logits, soft), mixed)
    torch.testing.assert_close(FocalLoss(gamma=1.5, alpha=0.25)(logits, soft), mixed.mean())


# ----------------------------------------------------------------------------------------------------
# Dice loss


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("shape", SHAPES[:2], ids=str)
@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("squared", [False, True])
def test_dice_matches_float64_reference(mode, shape, batch_dice, squared):
    logits, target = make_batch(shape, mode, seed=11)
    for include_background in (None, True, False):
        effective = (mode == "sigmoid") if include_background is None else include_background
        got = DiceLoss(mode, include_background=include_background, batch_dice=batch_dice, squared=squared)(logits, target)
        expected = reference_dice(logits, target, mode, effective, batch_dice=batch_dice, squared=squared)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-12)


def test_dice_softmax_excludes_background_by_default():
    assert DiceLoss("softmax").include_background is False
    assert DiceLoss("sigmoid").include_background is True


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("squared", [False, True])
def test_dice_matches_monai(batch, squared):
    logits, target = make_batch((2, 3, 6, 7, 8), "sigmoid", seed=12)
    got = DiceLoss("sigmoid", batch_dice=batch, squared=squared)(logits, target)
    expected = MonaiDiceLoss(sigmoid=True, batch=batch, squared_pred=squared)(logits, target)
    torch.testing.assert_close(got, expected, **MONAI_TOL)
    logits, index = make_batch((2, 4, 6, 7, 8), "softmax", seed=12)
    got = DiceLoss("softmax", batch_dice=batch, squared=squared)(logits, index)
    expected = MonaiDiceLoss(softmax=True, to_onehot_y=True, include_background=False, batch=batch, squared_pred=squared)(logits, index)
    torch.testing.assert_close(got, expected, **MONAI_TOL)


def test_dice_empty_mask_convention():
    empty = torch.zeros(1, 1, 4, 4, 4)
    absent = torch.full((1, 1, 4, 4, 4), -100.0)  # predicts nothing
    present = torch.full((1, 1, 4, 4, 4), 100.0)  # predicts everything
    # empty target, empty prediction: Dice = s / (0 + s) = 1, loss 0
    assert DiceLoss("sigmoid")(absent, empty).item() == pytest.approx(0.0, abs=1e-6)
    # empty target, full prediction: Dice = s / (64 + s), loss ~ 1
    assert DiceLoss("sigmoid")(present, empty).item() == pytest.approx(1 - 1e-5 / (64 + 1e-5), abs=1e-7)
    # smooth = 0: empty/empty scores 0 (clamped denominator, no NaN), loss 1
    assert DiceLoss("sigmoid", smooth=0.0)(absent, empty).item() == 1.0
    # full target, full prediction: loss ~ 0
    assert DiceLoss("sigmoid")(present, torch.ones_like(empty)).item() == pytest.approx(0.0, abs=1e-7)


# ----------------------------------------------------------------------------------------------------
# focal + Dice, Dice + CE


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("include_background", [None, True, False])
def test_focal_dice_is_the_weighted_sum_of_its_parts(mode, include_background):
    logits, target = make_batch((2, 3, 6, 5, 4), mode, seed=13)
    loss = FocalDiceLoss(mode, gamma=1.5, alpha=0.3, lambda_focal=0.7, lambda_dice=1.9, include_background=include_background)
    total, terms = loss.forward_with_terms(logits, target)
    assert set(terms) == {"focal", "dice"}
    torch.testing.assert_close(total, 0.7 * terms["focal"] + 1.9 * terms["dice"])
    torch.testing.assert_close(loss(logits, target), total)
    focal_bg = True if include_background is None else include_background
    expected_focal = FocalLoss(gamma=1.5, alpha=0.3, mode=mode, include_background=focal_bg)(logits, target)
    expected_dice = DiceLoss(mode, include_background=include_background)(logits, target)
    torch.testing.assert_close(terms["focal"], expected_focal, rtol=1e-12, atol=0)
    torch.testing.assert_close(terms["dice"], expected_dice, rtol=1e-12, atol=0)


@pytest.mark.parametrize("gamma", [0.0, 2.0])
@pytest.mark.parametrize("alpha", [None, 0.25])
def test_focal_dice_matches_monai_dice_focal_in_sigmoid_mode(gamma, alpha):
    logits, target = make_batch((2, 3, 6, 7, 8), "sigmoid", seed=14)
    got = FocalDiceLoss("sigmoid", gamma=gamma, alpha=alpha, lambda_focal=0.6, lambda_dice=1.3)(logits, target)
    expected = MonaiDiceFocalLoss(sigmoid=True, gamma=gamma, alpha=alpha, lambda_focal=0.6, lambda_dice=1.3)(logits, target)
    torch.testing.assert_close(got, expected.double(), **MONAI_TOL)


def test_focal_dice_softmax_focal_term_is_softmax_focal():
    # MONAI issue #8242: DiceFocalLoss(softmax=True) keeps a sigmoid focal term; ours follows the mode.
    logits, index = make_batch((2, 4, 5, 5, 5), "softmax", seed=15)
    _, terms = FocalDiceLoss("softmax").forward_with_terms(logits, index)
    torch.testing.assert_close(terms["focal"], reference_focal(logits, index, "softmax", 2.0, None))
    sigmoid_focal = MonaiFocalLoss(gamma=2.0, to_onehot_y=True)(logits, index)
    assert abs(terms["focal"].item() - sigmoid_focal.item()) > 0.01


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_dice_ce_parts(mode):
    logits, target = make_batch((2, 3, 6, 5, 4), mode, seed=16)
    total, terms = DiceCELoss(mode, lambda_ce=0.4, lambda_dice=1.1).forward_with_terms(logits, target)
    assert set(terms) == {"ce", "dice"}
    torch.testing.assert_close(total, 0.4 * terms["ce"] + 1.1 * terms["dice"])
    if mode == "sigmoid":
        expected_ce = F.binary_cross_entropy_with_logits(logits, target)
    else:
        expected_ce = F.cross_entropy(logits, target.long().squeeze(1))
    torch.testing.assert_close(terms["ce"], expected_ce, rtol=1e-12, atol=0)
    torch.testing.assert_close(terms["dice"], DiceLoss(mode)(logits, target), rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------------------------------
# targets, gradients, stability


def test_softmax_target_forms_agree():
    logits, index = make_batch((2, 4, 5, 6, 7), "softmax", seed=17)
    loss = FocalDiceLoss("softmax", alpha=[0.1, 0.3, 0.3, 0.3])
    expected = loss(logits, index)
    for form in (index.long(), index.squeeze(1), one_hot(index, 4), MetaTensor(index), index.to(torch.uint8)):
        torch.testing.assert_close(loss(logits, form), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(loss(MetaTensor(logits), MetaTensor(index)), expected, rtol=1e-12, atol=0)


def test_sigmoid_target_dtypes_agree():
    logits, target = make_batch((2, 3, 5, 6, 7), "sigmoid", seed=18)
    loss = FocalDiceLoss("sigmoid")
    expected = loss(logits, target)
    for form in (target.bool(), target.to(torch.uint8), target.float(), MetaTensor(target)):
        torch.testing.assert_close(loss(logits, form), expected, rtol=1e-12, atol=0)


def _gradcheck_cases():
    g = torch.Generator().manual_seed(19)
    multi_hot = (torch.rand(2, 3, 3, 4, 5, generator=g) < 0.4).double()
    soft = torch.rand(2, 3, 3, 4, 5, generator=g).double()
    index = torch.randint(0, 3, (2, 1, 3, 4, 5), generator=g).double()
    return [
        ("focal-sigmoid-g0.5", FocalLoss(gamma=0.5, alpha=0.25), multi_hot),
        ("focal-sigmoid-soft", FocalLoss(gamma=2.0, alpha=[0.2, 0.5, 0.8]), soft),
        ("focal-sigmoid-none", FocalLoss(gamma=1.5, reduction="none", include_background=False), multi_hot),
        ("focal-softmax-g0.5", FocalLoss(gamma=0.5, alpha=[0.2, 0.5, 0.8], mode="softmax"), index),
        ("focal-softmax-onehot", FocalLoss(gamma=2.0, mode="softmax", reduction="sum"), one_hot(index, 3)),
        ("focal-softmax-none", FocalLoss(gamma=2.0, alpha=0.3, mode="softmax", reduction="none"), index),
        ("dice-sigmoid-squared", DiceLoss("sigmoid", squared=True), soft),
        ("dice-softmax-batch", DiceLoss("softmax", batch_dice=True), index),
        ("dice-softmax-onehot", DiceLoss("softmax", squared=True), one_hot(index, 3)),
        ("focal-dice-sigmoid", FocalDiceLoss("sigmoid", gamma=1.5, alpha=0.25), multi_hot),
        ("focal-dice-softmax", FocalDiceLoss("softmax", gamma=2.0, squared=True), index),
        ("dice-ce-softmax", DiceCELoss("softmax"), index),
    ]


@pytest.mark.parametrize("name, loss, target", _gradcheck_cases(), ids=[c[0] for c in _gradcheck_cases()])
def test_gradcheck_float64(name, loss, target):
    logits = torch.randn(target.shape[0], 3, *target.shape[2:], dtype=torch.float64, generator=torch.Generator().manual_seed(20))
    logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: loss(x, target), (logits,))


def test_fused_kernel_gradients_with_small_chunks(monkeypatch):
    # several chunks per volume: the chunked forward and backward must match the one-chunk result
    logits, index = make_batch((2, 4, 6, 7, 8), "softmax", seed=21)
    logits.requires_grad_()
    loss = FocalDiceLoss("softmax", gamma=2.0)
    value = loss(logits, index)
    (grad,) = torch.autograd.grad(value, logits)
    monkeypatch.setitem(_stats._CHUNK_ELEMENTS, "cpu", 64)
    chunked = loss(logits, index)
    (chunked_grad,) = torch.autograd.grad(chunked, logits)
    torch.testing.assert_close(chunked, value, rtol=1e-12, atol=0)
    torch.testing.assert_close(chunked_grad, grad, rtol=1e-12, atol=1e-15)


def _all_losses(mode):
    from medseg.losses import BalancedCELoss, CrossEntropyLoss, TopKCELoss

    losses = [FocalLoss(gamma=g, alpha=0.25, mode=mode, reduction=r) for g in (0.0, 0.5, 2.0) for r in ("mean", "none")]
    return losses + [DiceLoss(mode), FocalDiceLoss(mode), DiceCELoss(mode), CrossEntropyLoss(mode), BalancedCELoss(mode), TopKCELoss(mode)]


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("target_kind", ["background", "foreground", "random"])
def test_large_logits_and_extreme_targets_are_finite(mode, target_kind):
    g = torch.Generator().manual_seed(22)
    logits = 100 * torch.sign(torch.randn(2, 3, 4, 4, 4, generator=g))  # saturated, both signs
    if mode == "sigmoid":
        target = {"background": torch.zeros_like(logits), "foreground": torch.ones_like(logits)}.get(target_kind, (logits > 0).float())
    else:
        target = {"background": torch.zeros(2, 1, 4, 4, 4), "foreground": torch.full((2, 1, 4, 4, 4), 2.0)}.get(
            target_kind, torch.randint(0, 3, (2, 1, 4, 4, 4), generator=g).float()
        )
    for loss in _all_losses(mode):
        x = logits.clone().requires_grad_()
        value = loss(x, target)
        value.sum().backward()
        assert torch.isfinite(value).all(), loss
        assert torch.isfinite(x.grad).all(), loss


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_bf16_autocast_computes_in_float32(mode):
    logits, target = make_batch((2, 3, 4, 5, 6), mode, seed=23, dtype=torch.float32)
    for loss in _all_losses(mode):
        reference = loss(logits, target)
        x = logits.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = loss(x, target)
        assert value.dtype == torch.float32, loss
        torch.testing.assert_close(value, reference, rtol=1e-6, atol=1e-7)
        value.sum().backward()
        assert torch.isfinite(x.grad).all(), loss
        # bf16 logits (a bf16 network output): computed in float32, gradient in bf16
        xb = logits.bfloat16().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = loss(xb, target)
        assert value.dtype == torch.float32, loss
        value.sum().backward()
        assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad).all(), loss


# ----------------------------------------------------------------------------------------------------
# argument checks


@pytest.mark.parametrize(
    "build, fragment",
    [
        (lambda: FocalLoss(gamma=-1.0), "expected gamma"),
        (lambda: FocalLoss(alpha=1.5), "expected alpha"),
        (lambda: FocalLoss(alpha=[0.2, -0.1]), "expected alpha"),
        (lambda: FocalLoss(alpha="high"), "expected alpha"),
        (lambda: FocalLoss(mode="relu"), "expected mode"),
        (lambda: FocalLoss(reduction="avg"), "expected reduction"),
        (lambda: DiceLoss("softmax", smooth=-1.0), "expected smooth"),
        (lambda: DiceLoss("softmax", include_background="yes"), "expected include_background"),
        (lambda: FocalDiceLoss("sigmoid", lambda_dice=-0.5), "expected lambda_dice"),
        (lambda: FocalDiceLoss("sigmoid", gamma=float("nan")), "expected gamma"),
    ],
)
def test_bad_arguments_raise(build, fragment):
    with pytest.raises(ValueError, match=fragment) as error:
        build()
    assert "got" in str(error.value)


@pytest.mark.parametrize(
    "mode, loss, logits_shape, target, fragment",
    [
        ("sigmoid", FocalLoss(alpha=[0.2, 0.3]), (2, 3, 4, 4), torch.zeros(2, 3, 4, 4), "one value per output channel \\(3\\), got 2"),
        ("sigmoid", FocalLoss(), (2, 3, 4, 4), torch.zeros(2, 1, 4, 4), "expected a target of shape"),
        ("sigmoid", FocalLoss(), (2, 3, 4, 4), torch.full((2, 3, 4, 4), 2.0), "expected target values in \\[0, 1\\]"),
        ("sigmoid", DiceLoss("sigmoid"), (2, 3, 4, 4), torch.full((2, 3, 4, 4), float("nan")), "expected target values"),
        ("softmax", FocalLoss(mode="softmax"), (2, 3, 4, 4), torch.full((2, 1, 4, 4), 3.0), "for 3 output channels in \\[0, 2\\]"),
        ("softmax", FocalLoss(mode="softmax"), (2, 3, 4, 4), torch.full((2, 1, 4, 4), -1), "expected class indices"),
        ("softmax", DiceLoss("softmax"), (2, 3, 4, 4), torch.full((2, 1, 4, 4), 0.5), "expected integer-valued class indices"),
        ("softmax", FocalDiceLoss("softmax"), (2, 3, 4, 4), torch.zeros(2, 2, 4, 4), "expected a target of shape"),
        ("softmax", FocalDiceLoss("softmax"), (2, 3, 4, 4), torch.zeros(2, 1, 4, 5), "expected a target of shape"),
        ("softmax", FocalLoss(mode="softmax"), (2, 1, 4, 4), torch.zeros(2, 1, 4, 4), "expected at least 2 output channels"),
        ("sigmoid", FocalLoss(include_background=False), (2, 1, 4, 4), torch.zeros(2, 1, 4, 4), "expected at least 2 channels"),
        ("sigmoid", FocalLoss(), (4,), torch.zeros(4), "expected logits of shape"),
    ],
)
def test_bad_inputs_raise(mode, loss, logits_shape, target, fragment):
    with pytest.raises(ValueError, match=fragment) as error:
        loss(torch.zeros(logits_shape), target)
    assert "got" in str(error.value)


def test_integer_logits_and_non_tensors_are_rejected():
    with pytest.raises(ValueError, match="expected floating-point logits, got dtype torch.int64"):
        FocalLoss()(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3))
    with pytest.raises(TypeError, match="expected Tensor logits and target, got Tensor and list"):
        FocalLoss()(torch.zeros(2, 3), [[0, 1, 0]])
