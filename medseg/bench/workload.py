"""The work the benchmarks measure: run options, composed configs, batches, generated datasets and the
hand-written PyTorch training step that medseg's Lightning training is compared with."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor, nn

from medseg.config import compose
from medseg.precision import resolve_precision

# Generated datasets are cached here between runs (the generator reuses a folder made with the same
# parameters); never inside the repository.
DEFAULT_CACHE_DIR = Path(tempfile.gettempdir()) / "medseg-bench"
# Fraction of foreground voxels in the random training targets (a BraTS case has a few percent of tumour;
# the cost of the step does not depend on it).
TARGET_FOREGROUND = 0.15
# Lightning precision settings the reference step reproduces, and the autocast dtype each implies.
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"32-true": None, "32": None, "bf16-mixed": torch.bfloat16}

Tier = Literal["quick", "cpu", "gpu"]


@dataclass(frozen=True)
class BenchOptions:
    """How the suite runs (``python -m medseg.bench`` flags).

    Attributes:
        device: where models run.
        work_dir: this run's temporary files (logs, checkpoints, predictions); deleted afterwards.
        quick: tiny sizes and few repeats: checks that everything runs, the figures mean little.
        repeats: timed runs per contender; ``None``: each benchmark's default for the tier.
        cache_dir: generated datasets, kept between runs.
    """

    device: torch.device
    work_dir: Path
    quick: bool = False
    repeats: int | None = None
    cache_dir: Path = DEFAULT_CACHE_DIR

    @property
    def tier(self) -> Tier:
        """Which size settings apply: ``quick``, or full size on ``cpu`` or ``gpu``."""
        return "quick" if self.quick else ("gpu" if self.device.type == "cuda" else "cpu")

    def repeats_or(self, default: int) -> int:
        return self.repeats if self.repeats is not None else default


def compose_config(experiment: str, options: BenchOptions, overrides: Sequence[str] = (), data_root: Path | None = None) -> DictConfig:
    """The training config of ``+experiment=<experiment>`` as a user would compose it, plus ``overrides``.

    On CUDA the ``trainer=gpu`` group is selected (bf16 mixed precision), as a GPU user would.
    """
    root = data_root if data_root is not None else options.work_dir / "no-data"
    base = [f"+experiment={experiment}", f"paths.output_dir={options.work_dir / 'run'}", f"paths.cache_dir={options.work_dir / 'preprocessed'}", f"data.root={root}", "data.synthetic=null"]
    return compose("train", [*base, *(["trainer=gpu"] if options.device.type == "cuda" else []), *overrides])


def patch_override(patch: int) -> str:
    """The override selecting a cubic training patch (and so the sliding-window size) of ``patch`` voxels."""
    return f"data.patch_size=[{patch},{patch},{patch}]"


def random_batch(cfg: DictConfig, batch_size: int, patch: Sequence[int], device: torch.device, seed: int = 0) -> dict[str, Tensor]:
    """A training batch shaped as the config's data module delivers it.

    Returns:
        ``{"image": (B, C_in, H, W, D) float32, "label": (B, R, H, W, D) multi-hot float32}`` (sigmoid mode)
        or ``label`` ``(B, 1, H, W, D)`` class indices as float32 (softmax mode), on ``device``.
    """
    generator = torch.Generator().manual_seed(seed)
    size = (batch_size, *(int(p) for p in patch))
    image = torch.randn((size[0], int(cfg.data.in_channels), *size[1:]), generator=generator)  # (B, C_in, H, W, D)
    n_out = int(cfg.data.out_channels)
    if cfg.data.labels.mode == "sigmoid":
        label = (torch.rand((size[0], n_out, *size[1:]), generator=generator) < TARGET_FOREGROUND).float()  # (B, R, H, W, D)
    else:
        label = torch.randint(0, n_out, (size[0], 1, *size[1:]), generator=generator).float()  # (B, 1, H, W, D)
    return {"image": image.to(device), "label": label.to(device)}


def synthetic_dataset(options: BenchOptions, n_cases: int, shape: Sequence[int], spacing: Sequence[float], seed: int = 0) -> tuple[Path, float]:
    """A generated BraTS-layout dataset in the cache folder (made once, then reused).

    Returns:
        The dataset root and the seconds spent generating (about 0 when it was cached).
    """
    from medseg.data.synthetic import generate_dataset

    name = f"brats-{n_cases}x{'x'.join(map(str, shape))}-{'x'.join(f'{s:g}' for s in spacing)}mm-seed{seed}"
    root = options.cache_dir / name
    start = time.perf_counter()
    generate_dataset(root, n_cases, shape=tuple(shape), spacing=tuple(spacing), seed=seed)
    return root, time.perf_counter() - start


class ReferenceStep:
    """One step of a hand-written PyTorch training loop on a fixed batch.

    ``zero_grad -> forward and loss (under autocast for mixed precision) -> backward -> gradient clipping by
    norm -> optimizer step``: what the Lightning ``Trainer`` does with the same config, written out.

    Args:
        net: the network, mapping ``(B, C_in, H, W, D)`` to logits ``(B, C_out, H, W, D)``.
        loss: maps ``(logits, target)`` to a scalar.
        optimizer: over ``net``'s parameters.
        batch: ``{"image": (B, C_in, H, W, D), "label": target}`` on the network's device.
        precision: a Lightning precision setting: ``32-true`` or ``bf16-mixed``.
        gradient_clip_val: clip the gradients' global norm to this (``None`` or 0: no clipping).

    Raises:
        ValueError: a precision the reference does not reproduce.
    """

    def __init__(
        self,
        net: nn.Module,
        loss: nn.Module,
        optimizer: torch.optim.Optimizer,
        batch: dict[str, Tensor],
        precision: str = "32-true",
        gradient_clip_val: float | None = None,
    ) -> None:
        if str(precision) not in AUTOCAST_DTYPES:
            raise ValueError(f"expected trainer.precision in {sorted(AUTOCAST_DTYPES)}, got {precision!r}")
        self.net, self.loss, self.optimizer, self.batch = net, loss, optimizer, batch
        self.autocast_dtype = AUTOCAST_DTYPES[str(precision)]
        self.gradient_clip_val = gradient_clip_val or None
        self.device = batch["image"].device

    @classmethod
    def from_config(cls, cfg: DictConfig, net: nn.Module, batch: dict[str, Tensor]) -> ReferenceStep:
        """The config's loss, optimizer, precision and gradient clipping around ``net`` (on ``batch``'s device).

        Sets ``torch.backends.cudnn.benchmark`` to ``trainer.benchmark``, as the Lightning ``Trainer`` does.
        """
        torch.backends.cudnn.benchmark = bool(cfg.trainer.get("benchmark", False))
        net = net.to(batch["image"].device)
        loss = instantiate(cfg.loss).to(batch["image"].device)
        optimizer = instantiate(cfg.optimizer)(params=net.parameters())
        precision = resolve_precision(cfg.trainer.precision, "cuda" if batch["image"].device.type == "cuda" else "cpu")
        return cls(net, loss, optimizer, batch, precision, cfg.trainer.get("gradient_clip_val"))

    def __call__(self) -> Tensor:
        """One step; returns the loss, detached and left on the device (no synchronisation)."""
        image, target = self.batch["image"], self.batch["label"]  # (B, C_in, H, W, D), (B, R, H, W, D)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            loss = self.loss(self.net(image), target)
        loss.backward()
        if self.gradient_clip_val:
            nn.utils.clip_grad_norm_(self.net.parameters(), self.gradient_clip_val)
        self.optimizer.step()
        return loss.detach()
