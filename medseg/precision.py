"""The precision a run trains in: ``trainer.precision: auto`` resolved for the device it runs on.

``auto`` is bf16 mixed precision on a GPU that computes bf16 natively (Ampere or newer), float16 mixed precision
(with a gradient scaler) on older GPUs, and float32 on a CPU, so that CPU results never depend on the CPU model.
Lightning itself has no ``auto``: the value is resolved before the ``Trainer`` is built and recorded, resolved, in
the run's ``config.yaml`` and checkpoints. The planner (``plan.precision=auto``) also reads the CPU: a preset planned
for a bf16 CPU trains in bf16 there.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, open_dict

AUTO = "auto"
CUDA_ACCELERATORS = ("gpu", "cuda")


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX). The one place medseg reads the CPU model, so that
    tests can fix it (no test outcome may depend on the machine)."""
    return bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())


def cuda_precision() -> str:
    """Mixed precision for this process's GPU: bf16 where it is native (not emulated), else float16."""
    return "bf16-mixed" if torch.cuda.is_bf16_supported(including_emulation=False) else "16-mixed"


def uses_cuda(accelerator: Any) -> bool:
    """Whether a Trainer with ``accelerator`` runs on CUDA here (``auto``: when a GPU is visible)."""
    name = str(accelerator).lower()
    return name in CUDA_ACCELERATORS or (name == AUTO and torch.cuda.is_available())


def resolve_precision(precision: Any, accelerator: Any = AUTO) -> str:
    """``precision`` itself, or for ``auto`` the precision of the device ``accelerator`` selects here."""
    if str(precision) != AUTO:
        return str(precision)
    return cuda_precision() if uses_cuda(accelerator) else "32-true"


def resolve_trainer_precision(cfg: DictConfig) -> str:
    """Replace ``cfg.trainer.precision: auto`` by its value on this machine (in place); returns the precision."""
    value = resolve_precision(cfg.trainer.get("precision", "32-true"), cfg.trainer.get("accelerator", AUTO))
    with open_dict(cfg):
        cfg.trainer.precision = value
    return value
