"""Argument checks and the canonical ``(B, C, N)`` layout shared by every loss of this package.

Every loss takes logits ``(B, C, *spatial)`` (or ``(N, C)``, read as ``N`` items of one voxel each) and a
target in one of these forms:

- ``mode="sigmoid"``: a multi-label target of the logits' shape with values in ``[0, 1]``: ``C``
  independent (possibly overlapping) regions, no background channel (e.g. BraTS WT/TC/ET).
- ``mode="softmax"``: class indices ``(B, 1, *spatial)`` or ``(B, *spatial)`` in ``[0, C - 1]`` with
  0 = background (an integer tensor, or a float one holding whole numbers, as MONAI pipelines produce),
  or a one-hot (or soft, rows summing to 1) target of the logits' shape.

:func:`prepare` checks the pair and flattens the spatial axes, so the arithmetic elsewhere sees one layout.
The checks read the target once (its minimum and maximum), which also guards the gathers that follow
against out-of-range indices (on CUDA those would be a device-side assert instead of a ValueError).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Mode = Literal["sigmoid", "softmax"]
MODES = ("sigmoid", "softmax")
REDUCTIONS = ("mean", "sum", "none")


def check_mode(mode: str) -> Mode:
    """Return ``mode`` if it is ``"sigmoid"`` or ``"softmax"``, else raise ValueError."""
    if mode not in MODES:
        raise ValueError(f"expected mode 'sigmoid' or 'softmax', got {mode!r}")
    return mode  # type: ignore[return-value]


def check_reduction(reduction: str) -> str:
    """Return ``reduction`` if it is ``"mean"``, ``"sum"`` or ``"none"``, else raise ValueError."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"expected reduction 'mean', 'sum' or 'none', got {reduction!r}")
    return reduction


def check_nonnegative(name: str, value: float) -> float:
    """Return ``float(value)`` if it is a finite number >= 0, else raise ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"expected {name} to be a finite number >= 0, got {value!r}")
    return float(value)


def check_optional_bool(name: str, value: bool | None) -> bool | None:
    """Return ``value`` if it is True, False or None, else raise ValueError naming ``name``."""
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"expected {name} to be true, false or null, got {value!r}")
    return value


def parse_alpha(alpha: float | Sequence[float] | None) -> Tensor | None:
    """The focal ``alpha`` as a tensor: 0-d for one value, 1-d for one value per channel, or None.

    Raises:
        ValueError: if a value lies outside ``[0, 1]`` or ``alpha`` is neither a number nor a sequence.
    """
    if alpha is None:
        return None
    if isinstance(alpha, Tensor):
        values = alpha.detach().to("cpu", torch.float64)
    elif isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        values = torch.tensor(float(alpha), dtype=torch.float64)
    elif isinstance(alpha, Sequence) and not isinstance(alpha, str) and len(alpha) > 0:
        if not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in alpha):
            raise ValueError(f"expected alpha to be a number in [0, 1] or a list of them, got {alpha!r}")
        values = torch.tensor([float(a) for a in alpha], dtype=torch.float64)
    else:
        raise ValueError(f"expected alpha to be a number in [0, 1] or a list of them, got {alpha!r}")
    if values.ndim > 1 or not bool(((values >= 0) & (values <= 1)).all()):
        raise ValueError(f"expected alpha in [0, 1] (a number or one value per channel), got {alpha!r}")
    return values


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (gradcheck, references); everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def autocast_disabled(device: torch.device) -> contextlib.AbstractContextManager:
    """A context in which autocast is off for ``device``, so bf16/fp16 autocast cannot reach the loss."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):  # a device type without autocast support
        return contextlib.nullcontext()


@dataclass(frozen=True)
class Batch:
    """Logits and target in the canonical layout.

    Attributes:
        logits: ``(B, C, N)``, the caller's dtype (converted chunk by chunk where it is used).
        target: sigmoid: ``(B, C, N)``; softmax: ``(B, 1, N)`` int64 class indices when ``indices``,
            else a dense ``(B, C, N)`` one-hot or probability target. Any dtype (bool, uint8, float...).
        indices: whether ``target`` holds class indices.
        spatial: the spatial shape of the input (``()`` for ``(N, C)`` logits), to shape per-voxel outputs.
    """

    logits: Tensor
    target: Tensor
    indices: bool
    spatial: tuple[int, ...]


def _plain(tensor: Tensor) -> Tensor:
    # MONAI MetaTensor (a Tensor subclass) routes every op through __torch_function__: slow, and its
    # metadata means nothing to a loss. as_subclass keeps the autograd graph.
    return tensor.as_subclass(Tensor) if type(tensor) is not Tensor else tensor


def _check_range(target: Tensor, low: float, high: float, what: str) -> None:
    if target.numel() == 0 or target.dtype == torch.bool:
        return
    lo, hi = torch.aminmax(target)  # one pass over the target
    lo, hi = lo.item(), hi.item()
    if not (lo >= low and hi <= high):  # written so that NaN fails too
        raise ValueError(f"expected {what} in [{low:g}, {high:g}], got values in [{lo:g}, {hi:g}]")


def _class_indices(target: Tensor, num_classes: int) -> Tensor:
    """Integer class indices ``(B, 1, N)`` int64 from an integer or integer-valued float tensor."""
    if target.is_complex():
        raise ValueError(f"expected real class indices in softmax mode, got dtype {target.dtype}")
    indices = target.long()
    if target.is_floating_point() and not torch.equal(indices.to(target.dtype), target):
        bad = target[indices.to(target.dtype) != target].flatten()[0].item()
        raise ValueError(f"expected integer-valued class indices in softmax mode, got a value of {bad!r}")
    _check_range(indices, 0, num_classes - 1, f"class indices for {num_classes} output channels")
    return indices.reshape(target.shape[0], 1, -1)


def prepare(logits: Tensor, target: Tensor, mode: Mode) -> Batch:
    """Check a (logits, target) pair and bring it to the ``(B, C, N)`` layout.

    Args:
        logits: ``(B, C, *spatial)`` or ``(N, C)``, floating point (MONAI MetaTensor accepted).
        target: see the module docstring for the forms each mode accepts.
        mode: ``"sigmoid"`` or ``"softmax"``.

    Returns:
        The :class:`Batch`; views of the inputs where no conversion is needed.

    Raises:
        TypeError: if ``logits`` or ``target`` is not a Tensor.
        ValueError: on a shape mismatch, non-floating logits, a softmax output with one channel, or
            target values outside their range (``[0, 1]``, or ``[0, C - 1]`` for class indices).
    """
    if not isinstance(logits, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"expected Tensor logits and target, got {type(logits).__name__} and {type(target).__name__}")
    logits, target = _plain(logits), _plain(target)
    if logits.ndim < 2:
        raise ValueError(f"expected logits of shape (B, C, *spatial) or (N, C), got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"expected floating-point logits, got dtype {logits.dtype}")
    if target.device != logits.device:
        raise ValueError(f"expected the target on the logits' device {logits.device}, got {target.device}")
    batch, channels, spatial = logits.shape[0], logits.shape[1], tuple(logits.shape[2:])
    if mode == "softmax" and channels < 2:
        raise ValueError(f"expected at least 2 output channels in softmax mode (background + classes), got {channels}")
    flat = logits.reshape(batch, channels, -1)  # (B, C, N)

    if target.shape == logits.shape:
        what = "target values" if mode == "sigmoid" else "one-hot target values"
        _check_range(target, 0.0, 1.0, what)
        return Batch(flat, target.reshape(batch, channels, -1), indices=False, spatial=spatial)
    if mode == "softmax" and tuple(target.shape) in ((batch, 1, *spatial), (batch, *spatial)):
        return Batch(flat, _class_indices(target, channels), indices=True, spatial=spatial)
    if mode == "sigmoid":
        expected = f"{tuple(logits.shape)} (multi-label, the logits' shape) in sigmoid mode"
    else:
        expected = f"{(batch, 1, *spatial)} or {(batch, *spatial)} (class indices) or {tuple(logits.shape)} (one-hot) in softmax mode"
    raise ValueError(f"expected a target of shape {expected}, got {tuple(target.shape)}")
