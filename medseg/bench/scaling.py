"""Scaling with work: training-step time and peak memory against patch size, inference time against
volume size, and the exponent ``k`` of a least-squares fit ``cost ~ voxels^k`` (k = 1: cost grows as the
voxels do).

- training: the hand-written step of :mod:`medseg.bench.workload` (the config's network, loss, optimizer;
  Lightning adds a constant per step, see ``train_step``) on cubic patches, batch of 2; the sizes take
  turns step by step. Peak memory: tensor memory of one step (see :mod:`medseg.bench.timing`).
- inference: :func:`medseg.prediction.infer_probabilities` (sliding window, the config's window settings) on
  random volumes of growing size; the sizes take turns.

Each size is reported against the smallest one (A / B: how much more it costs), with the voxel ratio in
the note. On a CPU the BraTS network is also run on patches smaller than 64^3, and inference uses the demo
network, as in the inference benchmark.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from medseg.bench.report import BenchResult, Contender, Figure
from medseg.bench.timing import peak_memory, time_alternating
from medseg.bench.workload import BenchOptions, ReferenceStep, compose_config, patch_override, random_batch
from medseg.build import build_model
from medseg.prediction import infer_probabilities

NAME = "scaling"


@dataclass(frozen=True)
class ScalingSettings:
    """Training: experiment, cubic patch sizes, batch size. Inference: experiment, cubic window, volumes."""

    train_experiment: str
    patches: tuple[int, ...]
    batch_size: int
    infer_experiment: str
    window: int
    volumes: tuple[tuple[int, int, int], ...]


# Issue 8 asks for 64^3, 96^3 and 128^3; the CPU run adds 32^3 and 48^3 (a 128^3 step of the BraTS network
# takes about half a minute on two cores).
SETTINGS = {
    "quick": ScalingSettings("demo", (16, 24, 32), 2, "demo", 32, ((32, 32, 32), (48, 48, 48), (64, 64, 64))),
    "cpu": ScalingSettings("brats", (32, 48, 64, 96, 128), 2, "demo", 64, ((96, 96, 64), (160, 160, 104), (240, 240, 155))),
    "gpu": ScalingSettings("brats", (64, 96, 128), 2, "brats", 128, ((128, 128, 128), (192, 192, 128), (240, 240, 155))),
}
REPEATS = {"quick": 2, "cpu": 2, "gpu": 10}
WARMUP = {"quick": 1, "cpu": 1, "gpu": 3}


def fit_exponent(voxels: Sequence[float], costs: Sequence[float]) -> float:
    """Least-squares slope of ``log(cost)`` against ``log(voxels)``: ``k`` in ``cost ~ voxels^k``.

    Raises:
        ValueError: fewer than two distinct sizes, or a cost that is not positive.
    """
    if len(set(voxels)) < 2 or len(voxels) != len(costs):
        raise ValueError(f"expected at least two distinct sizes with one cost each, got {list(voxels)} and {list(costs)}")
    if min(costs) <= 0:
        raise ValueError(f"expected positive costs, got {list(costs)}")
    slope, _ = np.polyfit(np.log(np.asarray(voxels, float)), np.log(np.asarray(costs, float)), 1)
    return float(slope)


def _label(shape: Sequence[int]) -> str:
    return f"{shape[0]}^3" if len(set(shape)) == 1 else "x".join(map(str, shape))


def window_count(shape: Sequence[int], roi_size: Sequence[int], overlap: float) -> int:
    """Windows MONAI's ``sliding_window_inference`` evaluates on a volume of ``shape`` (its scan rule: a step of
    ``roi * (1 - overlap)`` voxels per axis, the last window flush with the border)."""
    count = 1
    for size, roi in zip(shape, roi_size):
        step = max(int(roi * (1 - overlap)), 1)
        count *= 1 if size <= roi else math.ceil((size - roi) / step) + 1
    return count


def _growth_figures(what: str, shapes: Sequence[tuple[int, ...]], contenders: Sequence[Contender], windows: Sequence[int] | None = None) -> list[Figure]:
    """Each size against the smallest, then the fitted exponents of time (and of memory when measured)."""
    voxels = [math.prod(s) for s in shapes]
    notes = [f"voxels x{n / voxels[0]:.1f}" + (f", windows x{w / windows[0]:.1f}" if windows else "") for n, w in zip(voxels, windows or voxels)]
    figures = [
        Figure.compare(NAME, f"{what} {_label(shape)} vs {_label(shapes[0])}", c, contenders[0], None, note)
        for shape, c, note in zip(shapes[1:], contenders[1:], notes[1:])
    ]
    sizes = ", ".join(_label(s) for s in shapes)
    figures.append(Figure(NAME, f"{what} time ~ voxels^k ({sizes})", fit_exponent(voxels, [c.value for c in contenders]), kind="exponent", note="least squares on log-log"))
    peaks = [c.peak_bytes for c in contenders]
    if all(p is not None and p > 0 for p in peaks):
        figures.append(Figure(NAME, f"{what} peak memory ~ voxels^k", fit_exponent(voxels, peaks), kind="exponent", note="tensor memory of one step"))
    return figures


def run(options: BenchOptions) -> BenchResult:
    """Training-step time and memory per patch size; inference time per volume size; growth exponents."""
    s = SETTINGS[options.tier]
    warmup, repeats, device = WARMUP[options.tier], options.repeats_or(REPEATS[options.tier]), options.device

    train_cfg = compose_config(s.train_experiment, options)
    torch.manual_seed(0)
    batches = {p: random_batch(train_cfg, s.batch_size, (p,) * 3, device) for p in s.patches}
    step = ReferenceStep.from_config(train_cfg, build_model(train_cfg).net, batches[s.patches[0]])  # one network and optimizer

    def step_at(patch: int) -> Callable[[], object]:
        def run_step() -> object:
            step.batch = batches[patch]
            return step()

        return run_step

    train_times = time_alternating({str(p): step_at(p) for p in s.patches}, device, repeats, warmup)
    train = [Contender.from_timing(f"step {_label((p,) * 3)}", train_times[str(p)], peak_memory(step_at(p), device)) for p in s.patches]

    infer_cfg = compose_config(s.infer_experiment, options, [patch_override(s.window)])
    torch.manual_seed(0)
    model = build_model(infer_cfg).eval().to(device)
    generator = torch.Generator().manual_seed(0)
    volumes = {shape: torch.randn((int(infer_cfg.data.in_channels), *shape), generator=generator).to(device) for shape in s.volumes}  # (C_in, H, W, D) each
    infer_times = time_alternating({str(shape): (lambda v=v: infer_probabilities(model, v)) for shape, v in volumes.items()}, device, repeats, warmup)
    infer = [Contender.from_timing(f"inference {_label(shape)}", infer_times[str(shape)]) for shape in s.volumes]
    windows = [window_count(shape, model.inferer["roi_size"], model.inferer["overlap"]) for shape in s.volumes]

    figures = [
        *_growth_figures(f"train step ({s.train_experiment} network, batch {s.batch_size})", [(p,) * 3 for p in s.patches], train),
        *_growth_figures(f"inference ({s.infer_experiment} network, window {s.window}^3)", list(s.volumes), infer, windows),
        Figure(NAME, f"inference time ~ windows^k ({', '.join(map(str, windows))} windows)", fit_exponent(windows, [c.value for c in infer]), kind="exponent", note="sliding-window inference costs per window; the window count grows faster than the voxels on small volumes"),
    ]
    return BenchResult(
        figures,
        settings={**asdict(s), "inferer": dict(model.inferer), "warmup": warmup, "repeats": repeats},
        details={
            "train": {str(p): {"times_s": list(c.samples), "peak_bytes": c.peak_bytes} for p, c in zip(s.patches, train)},
            "inference": {"x".join(map(str, v)): {"times_s": list(c.samples), "windows": n} for v, c, n in zip(s.volumes, infer, windows)},
        },
    )
