"""Connected-component Dice + CE: against a float64 reference written from the definition (a brute-force Voronoi
partition by distance to every component voxel), gradcheck, and the edge cases."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import ndimage

from medseg.losses import ConnectedComponentDiceCELoss, DiceCELoss
from medseg.losses.connected_components import influence_regions

STRUCTURES = {6: ndimage.generate_binary_structure(3, 1), 18: ndimage.generate_binary_structure(3, 2), 26: ndimage.generate_binary_structure(3, 3)}


def random_target(rng, shape, lesions):
    target = np.zeros(shape, dtype=bool)
    for _ in range(lesions):
        centre = [rng.integers(0, s) for s in shape]
        half = [rng.integers(0, 2) for _ in shape]
        target[tuple(slice(max(0, c - h), c + h + 1) for c, h in zip(centre, half))] = True
    return target


def brute_force_distances(mask: np.ndarray, connectivity: int) -> np.ndarray:
    """(K, N): the distance of every voxel to the nearest voxel of each component (scipy's labelling)."""
    components, n = ndimage.label(mask, STRUCTURES[connectivity])
    grid = np.stack(np.meshgrid(*(np.arange(s) for s in mask.shape), indexing="ij"), -1).reshape(-1, 3).astype(np.float64)
    return np.stack([np.sqrt(((grid[:, None] - np.argwhere(components == k)[None]) ** 2).sum(-1)).min(1) for k in range(1, n + 1)])


def reference_cc_term(p: np.ndarray, t: np.ndarray, cells: np.ndarray, smooth: float) -> float:
    """Mean over components of (1 - Dice) + mean BCE in each cell, float64, from the definition."""
    terms = []
    for k in np.unique(cells[cells > 0]):
        inside = cells == k
        pk, tk = p[inside], t[inside]
        dice = 1 - (2 * (pk * tk).sum() + smooth) / (pk.sum() + tk.sum() + smooth)
        ce = -(tk * np.log(pk) + (1 - tk) * np.log(1 - pk)).mean()
        terms.append(dice + ce)
    return float(np.mean(terms))


@pytest.mark.parametrize("mode, connectivity", [("sigmoid", 26), ("sigmoid", 6), ("softmax", 26)])
def test_component_term_equals_the_definition_on_random_scenes(mode, connectivity):
    rng = np.random.default_rng(0 if mode == "sigmoid" else 1)
    shape, batch, channels = (9, 8, 7), 2, 2
    for _ in range(3):
        logits = torch.from_numpy(rng.normal(0, 2, (batch, channels + (mode == "softmax"), *shape)))
        if mode == "sigmoid":
            target = torch.from_numpy(np.stack([np.stack([random_target(rng, shape, rng.integers(0, 5)) for _ in range(channels)]) for _ in range(batch)]))
            probs, fg = torch.sigmoid(logits).numpy(), target.numpy()
            loss_target = target.double()
        else:
            classes = np.zeros((batch, *shape), dtype=np.int64)
            for b, c in itertools.product(range(batch), range(1, channels + 1)):
                classes[b][random_target(rng, shape, rng.integers(0, 5))] = c
            probs = torch.softmax(logits, 1).numpy()[:, 1:]
            fg = np.stack([classes == c for c in range(1, channels + 1)], 1)
            loss_target = torch.from_numpy(classes)[:, None]
        loss = ConnectedComponentDiceCELoss(mode, connectivity=connectivity)
        cells, _ = influence_regions(torch.from_numpy(fg), connectivity)
        cells = cells.numpy().reshape(fg.shape)
        for b, r in itertools.product(range(batch), range(channels)):
            if not fg[b, r].any():
                assert (cells[b, r] == 0).all()
                continue
            # a Voronoi partition: every voxel lies in the cell of a component nearest to it (ties either way)
            distances = brute_force_distances(fg[b, r], connectivity)  # (K_br, N)
            local = cells[b, r].reshape(-1) - cells[b, r].min()
            assert np.allclose(distances[local, np.arange(local.size)], distances.min(0))
        expected = reference_cc_term(probs, fg.astype(np.float64), cells, loss.base.smooth) if cells.any() else 0.0
        got = loss.component_term(logits, loss_target)
        assert got.dtype == torch.float64 and float(got) == pytest.approx(expected, rel=1e-9, abs=1e-12)
        total, terms = loss.forward_with_terms(logits, loss_target)
        base = DiceCELoss(mode)(logits, loss_target)
        assert float(total) == pytest.approx(float(base) + expected, rel=1e-9)


def test_gradients_match_finite_differences():
    rng = np.random.default_rng(3)
    target = torch.from_numpy(np.stack([random_target(rng, (6, 5, 4), 3)])[None]).double()
    logits = torch.from_numpy(rng.normal(0, 1, (1, 1, 6, 5, 4))).requires_grad_()
    loss = ConnectedComponentDiceCELoss("sigmoid", lambda_global=0.5, lambda_cc=2.0)
    assert target.sum() > 0
    assert torch.autograd.gradcheck(lambda x: loss(x, target), (logits,))


def test_without_a_lesion_only_the_global_term_remains_with_a_graph():
    logits = torch.randn(2, 1, 8, 8, 8, requires_grad=True)
    target = torch.zeros(2, 1, 8, 8, 8)
    loss = ConnectedComponentDiceCELoss("sigmoid", lambda_global=1.5)
    total, terms = loss.forward_with_terms(logits, target)
    assert float(terms["cc"].detach()) == 0.0
    torch.testing.assert_close(total, 1.5 * DiceCELoss("sigmoid")(logits, target))
    total.backward()
    assert torch.isfinite(logits.grad).all()


def test_one_lesion_owns_the_whole_volume_so_its_term_is_the_global_dice_plus_ce():
    logits = torch.randn(1, 1, 10, 9, 8, dtype=torch.float64)
    target = torch.zeros(1, 1, 10, 9, 8, dtype=torch.float64)
    target[0, 0, 0:3, 0:2, 5:8] = 1  # one lesion, at a corner of the volume
    loss = ConnectedComponentDiceCELoss("sigmoid")
    _, terms = loss.forward_with_terms(logits, target)
    assert float(terms["cc"]) == pytest.approx(float(terms["dice"] + terms["ce"]), rel=1e-12)


def test_a_missed_small_lesion_costs_as_much_as_a_missed_large_one():
    # Dice part only (lambda_ce=0): the component term is the mean over lesions of their Dice losses, so missing the
    # 8-voxel lesion costs what missing the 1,152-voxel one does, where the global Dice hardly notices the small one.
    target = torch.zeros(1, 1, 24, 24, 12)
    target[0, 0, 2:14, 2:14, 2:10] = 1  # 1,152 voxels
    target[0, 0, 20:22, 20:22, 5:7] = 1  # 8 voxels
    small_missed = torch.where(target > 0, 14.0, -14.0)
    small_missed[0, 0, 20:22, 20:22, 5:7] = -14.0
    large_missed = torch.where(target > 0, 14.0, -14.0)
    large_missed[0, 0, 2:14, 2:14, 2:10] = -14.0
    loss = ConnectedComponentDiceCELoss("sigmoid", lambda_ce=0.0)
    assert float(loss.component_term(small_missed, target)) == pytest.approx(float(loss.component_term(large_missed, target)), abs=0.01)
    assert float(loss.component_term(small_missed, target)) == pytest.approx(0.5, abs=0.01)  # one of two lesions lost
    global_dice = DiceCELoss("sigmoid", lambda_ce=0.0)
    assert float(global_dice(small_missed, target)) < 0.01 < 0.5 < float(global_dice(large_missed, target))


def test_the_loss_is_selected_by_config(tmp_path):
    from hydra.utils import instantiate

    from medseg.config import compose

    cfg = compose("train", ["+experiment=ms_lesions", "loss=cc_dice_ce", f"paths.output_dir={tmp_path}", "data.root=unused"])
    loss = instantiate(cfg.loss)
    assert isinstance(loss, ConnectedComponentDiceCELoss) and loss.connectivity == 6 and loss.mode == "sigmoid"
