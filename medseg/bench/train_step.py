"""Training step: medseg's ``SegmentationModule`` inside a Lightning ``Trainer`` against a hand-written
PyTorch loop with the same network, loss, optimizer, precision, gradient clipping and batch.

Both sides get the network of the composed config (``+experiment=brats``; the demo network in quick mode),
built once and copied, and the same batch already on the device, so that neither loads data. They take
turns step by step inside one ``fit``: a callback runs one reference step right after every Lightning step.

Lightning is timed two ways:

- iteration: from one ``on_train_batch_start`` to the next, less the reference step run in between. This is
  everything Lightning and the module do per step: forward, loss and its ``self.log`` calls, the module's
  non-finite loss and gradient checks, backward, clipping, optimizer step, the other callbacks, logger and
  progress-bar updates, fetching the next batch.
- step window: ``on_train_batch_start`` to ``on_train_batch_end`` only (the compute part of the above).

The reference is timed around one call of :class:`medseg.bench.workload.ReferenceStep`. Not included on
either side: data loading, validation, checkpoint writing at the end of the epoch, ``fit``'s setup. Run
first with logging, progress bar, checkpointing and model summary off (steady state, as a user would see
it between log lines), then with the config's callbacks and loggers on (checkpoints, rich progress bar,
learning-rate monitor, CSV and TensorBoard logs). The last step of each run measures peak memory and is
not timed.

A third run times a tiny step (demo network, 1x4x16^3), on which the fixed cost per step shows; it is
reported in ms per step (median over steps of the Lightning iteration less the reference step right after
it) and applies to any step size: ratio = 1 + fixed cost / step time.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import statistics
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig
from torch import Tensor

from medseg.bench.report import BenchResult, Contender, Figure, Goal
from medseg.bench.timing import PeakMemory, Timing, clock
from medseg.bench.workload import BenchOptions, ReferenceStep, compose_config, patch_override, random_batch
from medseg.build import build_model, build_trainer, instantiate_group

NAME = "train_step"
GOAL = Goal("<=", 1.05)  # issue 8: Lightning costs at most 5% over a hand-written loop


@dataclass(frozen=True)
class StepSettings:
    """Experiment whose network is trained, cubic patch size and patches per batch."""

    experiment: str
    patch: int
    batch_size: int


# brats-sized patches on a GPU (issue 8: 2x4x96^3); smaller on the CPU, where a 96^3 step of the BraTS
# network takes seconds.
SETTINGS = {"quick": StepSettings("demo", 32, 2), "cpu": StepSettings("brats", 64, 2), "gpu": StepSettings("brats", 96, 2)}
REPEATS = {"quick": 2, "cpu": 7, "gpu": 20}  # timed steps per side
# A step so small that Lightning's fixed cost per step (hooks, logging, checks) shows: the overhead in ms,
# to be set against any step time.
TINY = {tier: StepSettings("demo", 16, 1) for tier in ("quick", "cpu", "gpu")}
TINY_REPEATS = {"quick": 5, "cpu": 60, "gpu": 100}
# Untimed steps first: allocator growth, oneDNN primitive creation, cuDNN algorithm search (benchmark=true).
WARMUP = {"quick": 1, "cpu": 2, "gpu": 5}


class RepeatedBatch:
    """The same batch ``steps`` times: an in-memory stand-in for a DataLoader (no loading cost)."""

    def __init__(self, batch: dict[str, Tensor], steps: int) -> None:
        self.batch, self.steps = batch, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return itertools.repeat(self.batch, self.steps)


class AlternatingClock(Callback):
    """Times every Lightning step and, right after it, one call of ``reference`` (see the module doc).

    After ``fit``: ``iteration_s``, ``step_s`` and ``reference_s`` hold one time per step after the first
    ``warmup`` ones; on the last step (untimed) ``lightning_peak`` and ``reference_peak`` hold peak bytes.

    Args:
        reference: one step of the reference loop.
        device: where both train (CUDA is synchronised around every timed span).
        warmup: untimed steps first.
        steps: steps of the fit (warm-up, timed, one for memory).
    """

    def __init__(self, reference: Callable[[], object], device: torch.device, warmup: int, steps: int) -> None:
        self.reference, self.device, self.warmup, self.steps = reference, device, warmup, steps
        self.iteration_s: list[float] = []
        self.step_s: list[float] = []
        self.reference_s: list[float] = []
        self.lightning_peak: int | None = None
        self.reference_peak: int | None = None
        self._start = self._resume = 0.0
        self._step = 0.0
        self._memory: PeakMemory | None = None

    def _last(self, batch_idx: int) -> bool:
        return batch_idx == self.steps - 1

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        now = clock(self.device)
        if batch_idx > self.warmup:  # the previous step was timed: close its iteration
            self.iteration_s.append(self._step + now - self._resume)
        if self._last(batch_idx):
            self._memory = PeakMemory(self.device)
            self._memory.start()
        self._start = clock(self.device)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._step = clock(self.device) - self._start
        if self._memory is not None:
            self.lightning_peak = self._memory.stop()
            with PeakMemory(self.device) as peak:
                self.reference()
            self.reference_peak = peak.bytes
            self._memory = None
            return
        start = clock(self.device)
        self.reference()
        reference = clock(self.device) - start
        if batch_idx >= self.warmup:
            self.step_s.append(self._step)
            self.reference_s.append(reference)
        self._resume = clock(self.device)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's start-up messages and its advice for real runs (workers, logging interval) off."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"lightning\.")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def trainer_kwargs(options: BenchOptions, steps: int) -> dict[str, Any]:
    """Trainer arguments replacing the config's for a fit of ``steps`` steps on ``options.device``."""
    device = options.device
    return {
        "accelerator": "gpu" if device.type == "cuda" else "cpu",
        "devices": [device.index or 0] if device.type == "cuda" else 1,
        "max_epochs": 1,
        "max_steps": steps,
        "num_sanity_val_steps": 0,
        "default_root_dir": str(options.work_dir / "lightning"),
    }


def compare(cfg: DictConfig, batch: dict[str, Tensor], options: BenchOptions, warmup: int, repeats: int, with_defaults: bool) -> AlternatingClock:
    """One fit in which Lightning and the reference loop alternate; returns the clock with the times.

    Args:
        with_defaults: the config's callbacks and loggers on; else logging, progress bar, checkpointing
            and model summary off.
    """
    torch.manual_seed(0)
    module = build_model(cfg)
    reference = ReferenceStep.from_config(cfg, copy.deepcopy(module.net), batch)  # same initial weights
    steps = warmup + repeats + 1
    timer = AlternatingClock(reference, options.device, warmup, steps)
    if with_defaults:
        extra = {"callbacks": [timer, *instantiate_group(cfg.get("callbacks"))], "logger": instantiate_group(cfg.get("logger"))}
    else:
        extra = {"callbacks": [timer], "logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}
    with quiet_lightning():
        trainer: L.Trainer = build_trainer(cfg, **trainer_kwargs(options, steps), **extra)
        trainer.fit(module, train_dataloaders=RepeatedBatch(batch, steps))
    if len(timer.iteration_s) != repeats:
        raise RuntimeError(f"expected {repeats} timed Lightning steps, got {len(timer.iteration_s)} (did the fit stop early?)")
    return timer


def paired_overhead_s(timer: AlternatingClock) -> float:
    """Median over steps of (Lightning iteration - the reference step right after it): seconds per step."""
    return statistics.median(a - b for a, b in zip(timer.iteration_s, timer.reference_s))


def run(options: BenchOptions) -> BenchResult:
    """Lightning against the hand-written loop: the configured step without and with the config's callbacks
    and loggers, and a tiny step on which Lightning's fixed cost per step shows."""
    tier = options.tier
    settings, tiny = SETTINGS[tier], TINY[tier]
    warmup, repeats = WARMUP[tier], options.repeats_or(REPEATS[tier])
    figures, details = [], {}
    for what, s, reps in (("step", settings, repeats), ("tiny", tiny, options.repeats_or(TINY_REPEATS[tier]))):
        cfg = compose_config(s.experiment, options, [patch_override(s.patch)])
        batch = random_batch(cfg, s.batch_size, (s.patch,) * 3, options.device)
        shape = f"{s.batch_size}x{cfg.data.in_channels}x{s.patch}^3, {s.experiment} network"
        for with_defaults in (False, True) if what == "step" else (False,):
            timer = compare(cfg, batch, options, warmup, reps, with_defaults)
            extra = paired_overhead_s(timer)
            lightning = Contender.from_timing("Trainer + SegmentationModule", Timing(tuple(timer.iteration_s)), timer.lightning_peak)
            plain = Contender.from_timing("hand-written PyTorch loop", Timing(tuple(timer.reference_s)), timer.reference_peak)
            cost = f"Lightning adds {extra * 1e3:.1f} ms per step (paired median)"
            if what == "tiny":
                figures.append(Figure.compare(NAME, f"fixed cost per step: tiny step, {shape}", lightning, plain, None, f"{cost}; diagnostic: the cost does not grow with the step"))
            elif with_defaults:
                figures.append(Figure.compare(NAME, f"iteration with the config's callbacks and loggers, {shape}", lightning, plain, GOAL, f"{cost}; rich progress bar, checkpoint callbacks, LR monitor, CSV + TensorBoard loggers"))
            else:
                window = Contender.from_timing("on_train_batch_start..end", Timing(tuple(timer.step_s)), timer.lightning_peak)
                figures.append(Figure.compare(NAME, f"iteration, logging/progress/checkpoints off, {shape}", lightning, plain, GOAL, f"{cost}; whole loop iteration less the interleaved reference step"))
                figures.append(Figure.compare(NAME, f"step window only, {shape}", window, plain, None, "forward, loss + self.log, non-finite check, backward, clipping, optimizer step; diagnostic"))
            key = "tiny" if what == "tiny" else ("defaults_on" if with_defaults else "steady")
            details[key] = {"iteration_s": timer.iteration_s, "step_window_s": timer.step_s, "reference_s": timer.reference_s, "paired_overhead_s": extra}
    return BenchResult(
        figures,
        settings={"step": asdict(settings), "tiny": asdict(tiny), "warmup": warmup, "repeats": repeats, "precision": str(cfg.trainer.precision), "gradient_clip_val": cfg.trainer.get("gradient_clip_val")},
        details=details,
    )
