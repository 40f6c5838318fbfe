"""Per-lesion losses: forward + backward time and peak memory of ``BlobLoss`` and ``ConnectedComponentDiceCELoss``
against ``FocalDiceLoss`` as the number of reference lesions in the patch batch grows (10, 100, 1000).

Workload: sigmoid logits ``(2, 1, 96, 96, 96)`` (quick: ``(2, 1, 32, 32, 32)``) and a target of that many
cube lesions of 1 to 27 voxels spread over the batch (on a grid, so that they never touch: exactly that many
components). ``BlobLoss`` runs with its defaults (global focal + Dice, per-lesion focal + Dice); the
``FocalDiceLoss`` of the same settings is the global term alone (fused, :mod:`medseg.losses._stats`). Figures:
blob / global at each lesion count (what the per-lesion term adds), and blob at 1000 lesions / blob at 10
(goal <= 1.5: per-component sums make the cost independent of the count, where a loop over lesions, as the
paper's reference code, costs one pass over the patch per lesion). The connected
components of the target (cc3d, on the CPU) are inside the timed step, as in training; so are the CC loss's
Voronoi cells (a Euclidean distance transform per item and channel). The same figures for the CC loss.
"""

from __future__ import annotations

import numpy as np
import torch

from medseg.bench.report import BenchResult, Contender, Figure, Goal
from medseg.bench.timing import peak_memory, time_alternating
from medseg.bench.workload import BenchOptions

NAME = "blob"
SIZES = {"quick": (32, 32, 32), "cpu": (96, 96, 96), "gpu": (128, 128, 128)}
LESION_COUNTS = (10, 100, 1000)
REPEATS = {"quick": 2, "cpu": 5, "gpu": 20}
# The cost must not grow with the number of lesions: blob loss at 1000 lesions vs at 10.
GROWTH_GOAL = Goal("<=", 1.5)


def lesion_batch(n_lesions: int, size: tuple[int, int, int], device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits ``(2, 1, *size)`` and a binary target ``(2, 1, *size)`` with ``n_lesions`` separate cubes.

    Raises:
        ValueError: if the grid of 4-voxel cells cannot hold ``n_lesions`` lesions.
    """
    rng = np.random.default_rng(seed)
    cells = [(b, i, j, k) for b in range(2) for i in range(0, size[0] - 3, 4) for j in range(0, size[1] - 3, 4) for k in range(0, size[2] - 3, 4)]
    if n_lesions > len(cells):
        raise ValueError(f"expected at most {len(cells)} lesions in a batch of 2 x {size}, got {n_lesions}")
    target = np.zeros((2, 1, *size), dtype=np.float32)
    for index in rng.choice(len(cells), size=n_lesions, replace=False):
        b, i, j, k = cells[index]
        side = int(rng.integers(1, 4))  # 1 to 27 voxels
        target[b, 0, i : i + side, j : j + side, k : k + side] = 1.0
    logits = torch.from_numpy(rng.standard_normal((2, 1, *size), dtype=np.float32))
    return logits.to(device).requires_grad_(), torch.from_numpy(target).to(device)


def _step(loss: torch.nn.Module, logits: torch.Tensor, target: torch.Tensor) -> None:
    loss(logits, target).backward()
    logits.grad = None


def run(options: BenchOptions) -> BenchResult:
    """Blob vs global-only loss at each lesion count."""
    from medseg.losses import BlobLoss, ConnectedComponentDiceCELoss, FocalDiceLoss

    size = SIZES[options.tier]
    repeats = options.repeats_or(REPEATS[options.tier])
    losses = {"blob": BlobLoss("sigmoid"), "global": FocalDiceLoss("sigmoid"), "cc": ConnectedComponentDiceCELoss("sigmoid")}
    figures, details, blob_times, cc_times = [], [], {}, {}
    for count in LESION_COUNTS:
        logits, target = lesion_batch(count, size, options.device)
        steps = {name: (lambda loss=loss: _step(loss, logits, target)) for name, loss in losses.items()}
        times = time_alternating(steps, options.device, repeats)
        peaks = {name: peak_memory(fn, options.device) for name, fn in steps.items()}
        contenders = {
            name: Contender.from_timing(label, times[name], peaks[name])
            for name, label in (("blob", "BlobLoss (global + per lesion)"), ("global", "FocalDiceLoss (global term)"), ("cc", "ConnectedComponentDiceCELoss (global + per lesion cell)"))
        }
        figures.append(Figure.compare(NAME, f"forward + backward, {count} lesions in 2x1x{'x'.join(map(str, size))}", contenders["blob"], contenders["global"], None, "components (cc3d) inside the step"))
        figures.append(Figure.compare(NAME, f"CC Dice + CE, {count} lesions in 2x1x{'x'.join(map(str, size))}", contenders["cc"], contenders["global"], None, "components and their Voronoi cells (cc3d + a distance transform) inside the step"))
        blob_times[count] = Contender.from_timing(f"BlobLoss, {count} lesions", times["blob"], peaks["blob"])
        cc_times[count] = Contender.from_timing(f"ConnectedComponentDiceCELoss, {count} lesions", times["cc"], peaks["cc"])
        details.append({"lesions": count, **{f"{n}_time_median_s": times[n].median_s for n in losses}, **{f"{n}_peak_bytes": peaks[n] for n in losses}})
    many, few = LESION_COUNTS[-1], LESION_COUNTS[0]
    figures.append(Figure.compare(NAME, f"BlobLoss cost growth, {many} vs {few} lesions", blob_times[many], blob_times[few], GROWTH_GOAL, "per-component sums: one pass whatever the count"))
    figures.append(Figure.compare(NAME, f"CC Dice + CE cost growth, {many} vs {few} lesions", cc_times[many], cc_times[few], GROWTH_GOAL, "per-cell sums: one pass whatever the count"))
    return BenchResult(figures, settings={"size": list(size), "repeats": repeats, "lesion_counts": list(LESION_COUNTS)}, details={"cases": details})
