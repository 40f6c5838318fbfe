"""Lesion metrics: seconds per BraTS-sized case (240x240x155, about 100 lesions) on one CPU thread.

Goal (issue 4): :func:`medseg.metrics.lesion.lesion_metrics` under 1 s per case. There is no library
reference to compare with, so the figure is the time against that budget (A / B = time / 1 s);
``lesion_table`` and ``hausdorff_distance_95`` on the same case are timed alongside (they alternate) as
context.

Alone: ``python benchmarks/bench_lesion_metrics.py [--quick] [--repeats N]``; in the suite:
``python -m medseg.bench --only lesion``.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from medseg.bench.report import BenchResult, Contender, Figure, Goal
from medseg.bench.timing import time_alternating, torch_threads
from medseg.bench.workload import BenchOptions
from medseg.metrics.distance import hausdorff_distance_95
from medseg.metrics.lesion import lesion_metrics, lesion_table

NAME = "lesion"
BUDGET_S = 1.0  # issue 4: lesion_metrics under 1 s per case on one core
THREADS = 1  # issue 4 measures on one core
FULL_CASE = ((240, 240, 155), 100)  # shape, lesions
QUICK_CASE = ((96, 96, 64), 20)
REPEATS = {"quick": 1, "cpu": 5, "gpu": 5}


def make_case(shape: tuple[int, int, int], n_lesions: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random ellipsoid lesions (radius 0.7-8 voxels, most small) and a prediction that finds ~75% of them.

    Returns:
        Boolean prediction and reference, each ``(D, H, W)``.
    """
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


def measure(shape: tuple[int, int, int], n_lesions: int, repeats: int) -> dict:
    """Median and minimum seconds of the three functions on one case (one thread), and their outputs."""
    pred, target = make_case(shape, n_lesions)
    cpu = torch.device("cpu")
    with torch_threads(THREADS):
        out = lesion_metrics(pred, target)  # warm-up (imports, allocator), and the values for the record
        functions = {
            "lesion_metrics": lambda: lesion_metrics(pred, target),
            "lesion_table": lambda: lesion_table(pred, target),
            "hausdorff_distance_95": lambda: hausdorff_distance_95(pred, target),
        }
        times = time_alternating(functions, cpu, repeats, warmup=0)
    return {
        "shape": list(shape),
        "n_ref_lesions": int(out["n_ref_lesions"]),
        "n_pred_lesions": int(out["n_pred_lesions"]),
        **{key: float(out[key]) for key in ("lesion_recall", "lesion_recall_small", "lesion_precision", "lesion_dice")},
        "times": times,
        "table_rows": len(lesion_table(pred, target)),
        "hd95_mm": float(hausdorff_distance_95(pred, target)),
    }


def run(options: BenchOptions) -> BenchResult:
    """``lesion_metrics`` per case against the 1 s budget, on one CPU thread whatever the device."""
    shape, n_lesions = QUICK_CASE if options.quick else FULL_CASE
    repeats = options.repeats_or(REPEATS[options.tier])
    m = measure(shape, n_lesions, repeats)
    times = m.pop("times")
    metrics = Contender.from_timing("lesion_metrics", times["lesion_metrics"])
    note = f"lesion_table {times['lesion_table'].median_s:.2f} s, HD95 {times['hausdorff_distance_95'].median_s:.2f} s; {m['n_ref_lesions']} lesions; 1 thread"
    figure = Figure.compare(NAME, f"per case {'x'.join(map(str, shape))}", metrics, Contender("budget (issue 4)", BUDGET_S, "s"), Goal("<=", 1.0), note)
    details = {**m, "times_s": {name: list(t.times_s) for name, t in times.items()}}
    return BenchResult([figure], settings={"shape": list(shape), "n_lesions": n_lesions, "repeats": repeats, "threads": THREADS}, details=details)


def main(argv: list[str] | None = None) -> None:
    """The lesion benchmark alone, printed as lines."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"small {QUICK_CASE[0]} case with {QUICK_CASE[1]} lesions, 1 repeat")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (median reported; default 5, quick 1)")
    args = parser.parse_args(argv)
    shape, n_lesions = QUICK_CASE if args.quick else FULL_CASE
    repeats = args.repeats if args.repeats is not None else REPEATS["quick" if args.quick else "cpu"]
    m = measure(shape, n_lesions, repeats)
    t = {name: timing.median_s for name, timing in m["times"].items()}
    print(f"case {tuple(shape)}, {m['n_ref_lesions']} reference lesions, {m['n_pred_lesions']} predicted components")
    print(
        f"lesion_recall {m['lesion_recall']:.3f} (small {m['lesion_recall_small']:.3f}), "
        f"precision {m['lesion_precision']:.3f}, lesion_dice {m['lesion_dice']:.3f}, HD95 {m['hd95_mm']:.2f} mm"
    )
    print(f"median of {repeats} on {THREADS} thread: lesion_metrics {t['lesion_metrics']:.3f} s (goal < {BUDGET_S:g} s)")
    print(f"                            lesion_table {t['lesion_table']:.3f} s ({m['table_rows']} rows)")
    print(f"                            hausdorff_distance_95 {t['hausdorff_distance_95']:.3f} s")
