"""The operating-point sweep under each lesion matching rule: seconds per MS-sized case on one CPU thread.

Workload: one 182x218x182 case (the shared MS scans' MNI grid; quick: 64x64x48) with 40 reference lesions of 1 to
~500 voxels, and sigmoid probabilities that find most of them, with smooth noise that floods the volume at low
thresholds (many components: the costly part of the grid). The grid is the ``ms_lesions`` preset's: 9 thresholds x
6 minimum sizes. :func:`medseg.metrics.operating_point.sweep_case` labels the prediction once per threshold and
builds the overlap table once; each size then re-runs the rule on the kept components. Figures: ``one_to_one`` and
``msseg`` against ``overlap`` (the any-overlap rule, whose per-size work is a lookup), goal <= 1.5: a one-to-one
assignment per grid point must not make the final evaluation slow; and ``msseg`` with the preset's 7 minimum
component scores against ``msseg`` without (each component scored once per threshold, the rule re-run per score),
goal <= 3: a detection-aware grid must stay a small part of a fold's out-of-fold prediction.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from medseg.bench.lesion import make_case
from medseg.bench.report import BenchResult, Contender, Figure, Goal
from medseg.bench.timing import time_alternating, torch_threads
from medseg.bench.workload import BenchOptions
from medseg.metrics.matching import MatchingRule
from medseg.metrics.operating_point import FIELDS, sweep_case

NAME = "sweep"
SHAPES = {"quick": (64, 64, 48), "cpu": (182, 218, 182), "gpu": (182, 218, 182)}
N_LESIONS = 40
THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
SIZES_MM3 = (0.0, 3.0, 5.0, 10.0, 20.0, 50.0)  # conf/experiment/ms_lesions.yaml
REPEATS = {"quick": 1, "cpu": 3, "gpu": 3}
RULES = {"overlap": {"matching": "overlap"}, "one_to_one": {"matching": "one_to_one"}, "msseg": {"matching": "msseg"}}
GOAL = Goal("<=", 1.5)
MIN_SCORES = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
SCORE_GOAL = Goal("<=", 3.0)


def make_probabilities(shape: tuple[int, int, int], seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Probabilities ``(1, *shape)`` and the boolean reference ``(1, *shape)`` of one case."""
    pred, target = make_case(shape, N_LESIONS, seed)
    rng = np.random.default_rng(seed + 1)
    noise = ndimage.gaussian_filter(rng.random(shape, dtype=np.float32), 2.0)
    noise = (noise - noise.min()) / (np.ptp(noise) + 1e-9)  # smooth, in [0, 1]: many blobs above 0.5
    found = ndimage.gaussian_filter(pred.astype(np.float32), 0.7)
    probs = np.clip(0.45 * noise + 0.9 * found, 0.0, 1.0)[None]  # lesions above 0.5, the noise above 0.1-0.4
    return torch.from_numpy(probs), target[None]


def run(options: BenchOptions) -> BenchResult:
    """The sweep of one case under the three rules, alternating, on one thread."""
    shape = SHAPES[options.tier]
    repeats = options.repeats_or(REPEATS[options.tier])
    probs, target = make_probabilities(shape)
    rules = {name: MatchingRule.from_options(o) for name, o in RULES.items()}
    with torch_threads(1):
        counts = {name: sweep_case(probs, target, "sigmoid", (1.0, 1.0, 1.0), THRESHOLDS, SIZES_MM3, 26, (10.0, 50.0, 500.0), 1.0, rule) for name, rule in rules.items()}
        calls = {name: (lambda rule=rule: sweep_case(probs, target, "sigmoid", (1.0, 1.0, 1.0), THRESHOLDS, SIZES_MM3, 26, (10.0, 50.0, 500.0), 1.0, rule)) for name, rule in rules.items()}
        calls["msseg_scores"] = lambda: sweep_case(probs, target, "sigmoid", (1.0, 1.0, 1.0), THRESHOLDS, SIZES_MM3, 26, (10.0, 50.0, 500.0), 1.0, rules["msseg"], MIN_SCORES)
        times = time_alternating(calls, torch.device("cpu"), repeats, warmup=0)
    n_pred = counts["overlap"][0, :, 0, 0, FIELDS.index("n_pred_lesions")]
    note = f"{len(THRESHOLDS)}x{len(SIZES_MM3)} grid; {int(n_pred.max())} predicted components at threshold {THRESHOLDS[int(n_pred.argmax())]}; 1 thread"
    base = Contender.from_timing("overlap (any-overlap rule)", times["overlap"])
    figures = [Figure.compare(NAME, f"sweep per case {'x'.join(map(str, shape))}, {name} vs overlap", Contender.from_timing(name, times[name]), base, GOAL, note) for name in ("one_to_one", "msseg")]
    figures.append(Figure.compare(NAME, f"sweep per case {'x'.join(map(str, shape))}, msseg with {len(MIN_SCORES)} component scores vs without",
                                  Contender.from_timing("msseg, component scores", times["msseg_scores"]), Contender.from_timing("msseg", times["msseg"]), SCORE_GOAL,
                                  f"{len(THRESHOLDS)}x{len(SIZES_MM3)}x{len(MIN_SCORES)} grid; 1 thread"))
    details = {"predicted_components_per_threshold": n_pred.astype(int).tolist(), "times_s": {n: list(t.times_s) for n, t in times.items()}}
    return BenchResult(figures, settings={"shape": list(shape), "lesions": N_LESIONS, "thresholds": list(THRESHOLDS), "min_component_mm3": list(SIZES_MM3), "min_component_score": list(MIN_SCORES), "repeats": repeats}, details=details)
