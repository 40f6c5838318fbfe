"""Checkpoint files that survive a killed job: written atomically, never with non-finite weights, loaded safely."""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

from medseg.io import write_torch_atomic

log = logging.getLogger("medseg")


class NonFiniteWeightsError(RuntimeError):
    """A checkpoint was about to be saved with NaN or infinite weights."""


def non_finite_tensors(state_dict: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of ``state_dict`` holding a NaN or an infinity."""
    return [name for name, value in state_dict.items() if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all())]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` that writes a temporary file beside the target and renames it into place.

    A job killed while saving (SIGKILL, a node failure, the end of a SLURM time limit) leaves the previous
    checkpoint intact instead of a truncated one that ``ckpt_path=last`` would then fail to load. A model whose
    weights have become non-finite is never saved (:class:`NonFiniteWeightsError`). Loading tries
    ``torch.load(weights_only=True)`` first and falls back to full unpickling, with a warning, only for
    checkpoints that hold other objects.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None) -> None:
        bad = non_finite_tensors(checkpoint.get("state_dict", {}))
        if bad:
            raise NonFiniteWeightsError(f"not saving {path}: non-finite weights in {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
        if not _is_local_file_protocol(path):  # remote storage (s3:// ...): Lightning's own writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"expected storage_options=None for a local checkpoint, got {storage_options!r}")
        write_torch_atomic(checkpoint, path, fsync=True)  # flushed to disk, then renamed over the old file

    def load_checkpoint(self, path: str | os.PathLike, map_location: Callable | Any = lambda storage, loc: storage, weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is not None:
            return super().load_checkpoint(path, map_location, weights_only)
        try:
            return super().load_checkpoint(path, map_location, weights_only=True)
        except pickle.UnpicklingError as err:  # older checkpoints may pickle arbitrary objects (hparams classes)
            log.warning("%s holds more than tensors and plain containers (%s); loading it fully: only do this for files you trust.", path, str(err).splitlines()[0])
            return super().load_checkpoint(path, map_location, weights_only=False)


def update_checkpoint(path: str | os.PathLike, key: str, value: Any) -> None:
    """Set ``checkpoint[key] = value`` in a saved checkpoint file, atomically (the weights are unchanged)."""
    io = AtomicCheckpointIO()
    checkpoint = io.load_checkpoint(path, map_location="cpu")
    checkpoint[key] = value
    io.save_checkpoint(checkpoint, path)
