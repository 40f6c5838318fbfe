"""Time the lesion-wise metrics on one BraTS-sized case (240x240x155, about 100 lesions) on one CPU core.

Goal (issue 4): ``lesion_metrics`` under 1 s per case. Run from the project root:

    python benchmarks/bench_lesion_metrics.py            # full case, 5 repeats
    python benchmarks/bench_lesion_metrics.py --quick    # small case, 1 repeat (a smoke run)
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from medseg.metrics.distance import hausdorff_distance_95
from medseg.metrics.lesion import lesion_metrics, lesion_table


def make_case(shape: tuple[int, int, int], n_lesions: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random ellipsoid lesions (radius 0.7-8 voxels, most small) and a prediction that finds ~75% of them."""
    rng = np.random.default_rng(seed)
    target, pred = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool)  # (D, H, W)

    def paint(vol: np.ndarray, centre: np.ndarray, radii: np.ndarray) -> None:
        lo = np.maximum(np.floor(centre - radii).astype(int), 0)
        hi = np.minimum(np.ceil(centre + radii).astype(int) + 1, shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        grid = np.ogrid[box]
        vol[box] |= sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1

    for _ in range(n_lesions):
        centre = rng.uniform(0, np.array(shape) - 1)
        radii = rng.lognormal(mean=0.6, sigma=0.6, size=3).clip(0.7, 8.0)
        paint(target, centre, radii)
        if rng.random() < 0.75:
            paint(pred, centre + rng.normal(0, 0.7, size=3), radii * rng.uniform(0.7, 1.3, size=3))
    for _ in range(n_lesions // 10):  # false positives
        paint(pred, rng.uniform(0, np.array(shape) - 1), rng.uniform(0.7, 3.0, size=3))
    return pred, target


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small 96x96x64 case with 20 lesions, 1 repeat")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shape, n_lesions, repeats = ((96, 96, 64), 20, 1) if args.quick else ((240, 240, 155), 100, args.repeats)

    pred, target = make_case(shape, n_lesions)
    lesion_metrics(pred, target)  # warm-up (imports, allocator)
    t_metrics, out = timed(lambda: lesion_metrics(pred, target), repeats)
    t_table, rows = timed(lambda: lesion_table(pred, target), repeats)
    t_hd95, hd95 = timed(lambda: hausdorff_distance_95(pred, target), repeats)

    print(f"case {shape}, {out['n_ref_lesions']} reference lesions, {out['n_pred_lesions']} predicted components")
    print(
        f"lesion_recall {out['lesion_recall']:.3f} (small {out['lesion_recall_small']:.3f}), "
        f"precision {out['lesion_precision']:.3f}, lesion_dice {out['lesion_dice']:.3f}, HD95 {hd95:.2f} mm"
    )
    print(f"median of {repeats} on 1 thread: lesion_metrics {t_metrics:.3f} s (goal < 1 s)")
    print(f"                            lesion_table {t_table:.3f} s ({len(rows)} rows)")
    print(f"                            hausdorff_distance_95 {t_hd95:.3f} s")


if __name__ == "__main__":
    main()
