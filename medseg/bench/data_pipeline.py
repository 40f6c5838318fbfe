"""Data pipeline: patches per second the training DataLoader delivers against patches per second the
training step consumes.

The loader is the real one: :class:`medseg.data.datamodule.SegmentationDataModule` built from the composed
config over generated NIfTI cases in the BraTS layout (``medseg.data.synthetic``), with the configured
preprocessing cache, augmentation, batch size, patches per volume and worker count. Each batch is handed
over as Lightning would (MONAI metadata dropped, tensors moved to the device).

- loader: patches per second over whole epochs after the first (workers already running, cache built);
  the first epoch is reported apart, with the time to build the cache (reading and preprocessing every
  training case) counted in.
- training step: the hand-written step of :mod:`medseg.bench.workload` (the config's network, loss,
  optimizer) on one real batch from the loader, resident on the device; patches per step / median time.
- fed by the loader: the same step on every batch the loader delivers, over whole epochs: what training
  gets when both run together. On a CPU the loader's workers and the step share the same cores.

The loader is not timed step by step against the model (its workers run ahead on their own); the "fed by
the loader" figure is the one where both run at once.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from hydra.utils import instantiate
from torch import Tensor

from medseg.bench.report import BenchResult, Contender, Figure, Goal
from medseg.bench.timing import clock, time_alternating
from medseg.bench.workload import BenchOptions, ReferenceStep, compose_config, patch_override, synthetic_dataset
from medseg.build import build_model
from medseg.data.datamodule import SegmentationDataModule

NAME = "data"
GOAL = Goal(">=", 1.0)  # issue 8: the loader never starves the model


@dataclass(frozen=True)
class DataSettings:
    """Experiment (data, network), generated cases (count, shape, spacing in mm), cubic patch, and the
    fewest batches timed after the first epoch (whole epochs are timed)."""

    experiment: str
    cases: int
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    patch: int
    min_batches: int


# Full size: BraTS-sized cases (240x240x155 at 1 mm) and the training-step benchmark's patch size.
SETTINGS = {
    "quick": DataSettings("demo", 4, (64, 64, 48), (3.0, 3.0, 3.0), 32, 4),
    "cpu": DataSettings("brats", 8, (240, 240, 155), (1.0, 1.0, 1.0), 64, 6),
    "gpu": DataSettings("brats", 8, (240, 240, 155), (1.0, 1.0, 1.0), 96, 24),
}
REPEATS = {"quick": 2, "cpu": 3, "gpu": 10}  # timed steps of the model on a resident batch
WARMUP = {"quick": 1, "cpu": 1, "gpu": 3}


@dataclass(frozen=True)
class Epochs:
    """Batches, patches and seconds of one or more timed epochs."""

    batches: int
    patches: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.patches / self.seconds


def to_device(batch: dict[str, Any], datamodule: SegmentationDataModule, device: torch.device) -> dict[str, Any]:
    """A loader batch as the training step receives it: plain tensors (``on_before_batch_transfer``) on ``device``."""
    batch = datamodule.on_before_batch_transfer(batch, 0)
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def time_epochs(loader: Iterable[dict[str, Any]], datamodule: SegmentationDataModule, device: torch.device, min_batches: int, on_batch: Callable[[dict[str, Any]], object] | None = None) -> Epochs:
    """Iterate whole epochs until at least ``min_batches`` batches came, calling ``on_batch`` on each."""
    batches = patches = 0
    start = clock(device)
    while batches < max(min_batches, 1):
        for batch in loader:
            batch = to_device(batch, datamodule, device)
            if on_batch is not None:
                on_batch(batch)
            batches += 1
            patches += int(batch["image"].shape[0])
    return Epochs(batches, patches, clock(device) - start)


def run(options: BenchOptions) -> BenchResult:
    """Loader rate, model rate, and the rate of training fed by the loader."""
    s = SETTINGS[options.tier]
    warmup, repeats = WARMUP[options.tier], options.repeats_or(REPEATS[options.tier])
    root, generate_s = synthetic_dataset(options, s.cases, s.shape, s.spacing)
    cfg = compose_config(s.experiment, options, [patch_override(s.patch)], data_root=root)
    datamodule: SegmentationDataModule = instantiate(cfg.data)
    datamodule.setup("fit")

    start = time.perf_counter()
    datamodule.train_dataset()  # builds the preprocessing cache (cold: the run's own cache folder)
    cache_s = time.perf_counter() - start
    loader = datamodule.train_dataloader()
    first = time_epochs(loader, datamodule, options.device, 1)  # one epoch, workers starting
    steady = time_epochs(loader, datamodule, options.device, s.min_batches)

    batch = to_device(next(iter(loader)), datamodule, options.device)
    torch.manual_seed(0)
    step = ReferenceStep.from_config(cfg, build_model(cfg).net, batch)
    timing = time_alternating({"step": step}, options.device, repeats, warmup)["step"]
    patches_per_step = int(batch["image"].shape[0])
    model_rate = patches_per_step / timing.median_s

    def train_on(b: dict[str, Any]) -> None:
        step.batch = b
        step()

    fed = time_epochs(loader, datamodule, options.device, s.min_batches, on_batch=train_on)
    del loader  # shuts the persistent workers down
    gc.collect()

    workers = int(cfg.data.num_workers)
    model = Contender("training step, resident batch", model_rate, "patches/s")  # step times in details
    loader_note = f"first epoch {first.rate:.3g} patches/s including {cache_s:.1f} s to cache {len(datamodule.train_cases)} cases"
    first_rate = first.patches / (first.seconds + cache_s)
    figures = [
        Figure.compare(NAME, f"loader vs training step, {workers} worker(s), patch {s.patch}^3", Contender(f"DataLoader after the first epoch ({steady.batches} batches)", steady.rate, "patches/s"), model, GOAL, loader_note),
        Figure.compare(NAME, "first epoch (cache build, workers starting) vs training step", Contender("DataLoader, first epoch + cache build", first_rate, "patches/s"), model, None, "once per run"),
        Figure.compare(NAME, "training fed by the loader vs on a resident batch", Contender(f"step on each loader batch ({fed.batches} batches)", fed.rate, "patches/s"), model, None, "both at once" + ("; workers and step share the CPU cores" if options.device.type == "cpu" else "")),
    ]
    return BenchResult(
        figures,
        settings={**asdict(s), "num_workers": workers, "batch_size": int(cfg.data.batch_size), "samples_per_volume": int(cfg.data.samples_per_volume), "cache": str(cfg.data.cache), "train_cases": len(datamodule.train_cases), "warmup": warmup, "repeats": repeats},
        details={"generate_s": generate_s, "cache_s": cache_s, "first_epoch": asdict(first), "steady": asdict(steady), "fed": asdict(fed), "step_s": list(timing.times_s), "patches_per_step": patches_per_step},
    )
