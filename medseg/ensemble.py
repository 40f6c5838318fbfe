"""Which checkpoints a prediction uses, and several of them as one predictor (the folds of a cross-validation).

``ckpt_path`` may name a checkpoint file, a training run folder (its evaluated checkpoint), a cross-validation folder
(every fold's checkpoint, ``crossval.json``), a model zip of ``medseg.export`` or a list of any of these (:func:`resolve_checkpoints`). Several
checkpoints predict as an :class:`EnsembleModel`: the mean of their probabilities, as ``nnUNetv2_predict`` averages
its folds, computed as a running sum with one network in memory whose weights are swapped member by member (each
member's weights are memory-mapped from its file, read as they are copied in).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor

from medseg.build import preprocessing_options_from_config
from medseg.config import ConfigError

CROSSVAL_RECORD = "crossval.json"


def resolve_checkpoint(ckpt_path: str | Path) -> Path:
    """The checkpoint file ``ckpt_path`` names: a ``.ckpt`` file, or a training run folder, whose evaluated checkpoint
    (``operating_point.json`` records it) or else ``checkpoints/last.ckpt`` is taken.

    Raises:
        ConfigError: no such file, or a folder without a checkpoint.
    """
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        record = path / "operating_point.json"
        if record.is_file():
            name = Path(str(json.loads(record.read_text()).get("checkpoint") or "")).name
            if name and (path / "checkpoints" / name).is_file():
                return path / "checkpoints" / name
        if (path / "checkpoints" / "last.ckpt").is_file():
            return path / "checkpoints" / "last.ckpt"
        raise ConfigError(f"ckpt_path={str(path)!r} is a folder without checkpoints/last.ckpt; pass a training run folder, a cross-validation folder or a .ckpt file")
    if not path.is_file():
        raise ConfigError(f"checkpoint not found: ckpt_path={str(path)!r}; pass a training run folder (outputs/<task>/runs/<run>), a cross-validation folder or a .ckpt file")
    return path


def resolve_checkpoints(ckpt_path: Any) -> list[Path]:
    """Every checkpoint ``ckpt_path`` names (see the module docstring), in order.

    Raises:
        ConfigError: a path names no checkpoint, a cross-validation's fold checkpoint is gone, or the list is empty.
    """
    if isinstance(ckpt_path, (list, tuple, ListConfig)):
        paths = [p for item in ckpt_path for p in resolve_checkpoints(item)]
        if not paths:
            raise ConfigError("ckpt_path is an empty list; expected checkpoint files or run folders")
        return paths
    folder = Path(str(ckpt_path)).expanduser()
    if folder.suffix == ".zip" and folder.is_file():  # a model zip of medseg.export: its checkpoints, unpacked once
        from medseg.model_package import installed_checkpoints

        return installed_checkpoints(folder)
    record = folder / CROSSVAL_RECORD
    if folder.is_dir() and record.is_file():
        checkpoints = [Path(p) for p in json.loads(record.read_text())["checkpoints"]]
        # Relative to the folder (it travels); a moved folder keeps its fold_<k>/checkpoints/<name> layout.
        checkpoints = [folder / p if not p.is_absolute() else p if p.is_file() else folder / p.parent.parent.name / "checkpoints" / p.name for p in checkpoints]
        gone = [str(p) for p in checkpoints if not p.is_file()]
        if gone:
            raise ConfigError(f"{record} lists fold checkpoints that are gone: {gone}")
        return checkpoints
    return [resolve_checkpoint(folder)]


def check_members(configs: Sequence[DictConfig], paths: Sequence[Path]) -> None:
    """Refuse members whose preprocessing, labels or network differ (their probabilities could not be averaged).

    Raises:
        ConfigError: naming the first checkpoint that differs from the first one.
    """

    def key(cfg: DictConfig) -> Any:
        plain = OmegaConf.to_container(cfg, resolve=True)
        return (preprocessing_options_from_config(plain["data"]), plain["data"]["labels"], plain["data"].get("in_channels"), plain["model"]["net"])

    first = key(configs[0])
    for cfg, path in zip(configs[1:], paths[1:]):
        if key(cfg) != first:
            raise ConfigError(f"checkpoint {path} differs from {paths[0]} in preprocessing, labels or network: an ensemble averages members of one setup")


class EnsembleModel:
    """Several checkpoints of one setup predicting as one: probabilities averaged over the members.

    Args:
        model: the module of the first member (its network runs every member's weights in turn).
        members: each member's ``state_dict`` (memory-mapped: see :func:`load_members`), or each member's network
            (``medseg.onnx_backend.OnnxNetwork``), put in the module's place of its network in turn.
        paths: the members' files, for records.

    Everything but :meth:`predict_probabilities` (operating point, label spec, inferer, ...) is the first member's.
    """

    def __init__(self, model: Any, members: Sequence[dict[str, Tensor]], paths: Sequence[Path]) -> None:
        self.model, self.members, self.paths = model, list(members), [str(p) for p in paths]

    def predict_probabilities(self, image: Tensor, flip_axes: Sequence[int] = ()) -> Tensor:
        """The mean of the members' probabilities ``(B, C_out, H, W, D)`` of volumes ``(B, C_in, H, W, D)`` (each with
        the flips of ``flip_axes`` averaged), as a running sum: one probability sum and one member's in memory."""
        total = None
        for member in self.members:
            if isinstance(member, torch.nn.Module):  # a network of its own (onnxruntime: the weights live in its file)
                self.model.net = member
            else:
                self.model.load_state_dict(member)
            probs = self.model.predict_probabilities(image, flip_axes)
            total = probs if total is None else total.add_(probs.to(total.device))  # a member stitched elsewhere joins
            del probs
        return total.div_(len(self.members)) if len(self.members) > 1 else total

    def to(self, device: torch.device | str) -> EnsembleModel:
        self.model.to(device)
        return self

    def eval(self) -> EnsembleModel:
        self.model.eval()
        return self

    def __getattr__(self, name: str) -> Any:  # everything else is the first member's (called only for missing names)
        return getattr(self.__dict__["model"], name)


def load_members(paths: Sequence[Path]) -> list[dict[str, Tensor]]:
    """Each checkpoint's weights, memory-mapped (not read into memory until copied into the network)."""
    return [torch.load(path, map_location="cpu", weights_only=True, mmap=True)["state_dict"] for path in paths]
