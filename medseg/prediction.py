"""Segment new scans with a trained checkpoint (the library behind ``python -m medseg.predict``).

The flow per case: load the channels -> the training preprocessing, rebuilt from the config saved in the
checkpoint (RAS orientation, optional resampling, foreground crop, normalisation) -> sliding-window
inference, optionally averaged over flips (test-time augmentation) -> probabilities mapped back to the
input's own voxel grid by inverting the preprocessing (MONAI records every spatial step on the image's
MetaTensor) -> threshold (sigmoid) or argmax (softmax) -> removal of small connected components ->
dataset labels (BraTS 0/1/2/4, MSD class values) -> ``<output>/<case>.nii.gz`` with the input's shape,
affine and header, written atomically. Over several cases the sliding window runs one case after another
while worker threads read the next cases and write the previous ones (``prefetch``, see
:func:`predict_cases`). ``predict(cfg)`` is the whole job; :mod:`medseg.predict` adds Hydra and readable errors. A case
that fails is reported and the others still run; ``<output>/predictions.json`` lists each case's output
file or error, in the input's order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from medseg import __version__
from medseg.build import build_model, preprocessing_from_config
from medseg.config import ConfigError, check_required
from medseg.data.labels import LabelSpec
from medseg.data.layouts import NIFTI_SUFFIXES, CaseRecord, DatasetError, find_input_cases, find_label_files, reference_label_folders
from medseg.data.layouts.base import strip_nifti_suffix
from medseg.data.transforms import IMAGE
from medseg.dicom.seg import SEG_TYPES, Algorithm, write_segmentation
from medseg.dicom.series import DicomSeriesError, dicom_cases, is_dicom_folder, stage_case
from medseg.ensemble import EnsembleModel, check_members, load_members, resolve_checkpoint, resolve_checkpoints  # noqa: F401 (resolve_checkpoint: public here too)
from medseg.evaluation import label_channels, spacing_mm
from medseg.io import write_csv_atomic, write_json_atomic, write_nifti_atomic, write_text_atomic
from medseg.lesion_table import COLUMNS as LESION_COLUMNS
from medseg.lesion_table import REFERENCE_COLUMNS as LESION_REFERENCE_COLUMNS
from medseg.lesion_table import SCORES as LESION_SCORES
from medseg.lesion_table import lesion_rows
from medseg.metrics.matching import MatchingRule
from medseg.module import SegmentationModule
from medseg.postprocess import CHECKPOINT_KEY, TUNED_ON, OperatingPoint, postprocess

log = logging.getLogger("medseg")
PRED = "pred"
SUMMARY_NAME = "predictions.json"
PROBABILITY_DIR = "probabilities"
LESION_DIR = "lesions"  # <output>/lesions/<case>.csv: one row per predicted lesion (lesion_table=true)
SEG_SUFFIX = ".seg.dcm"  # <output>/<case>.seg.dcm: the DICOM SEG of a case read from DICOM series
OUTPUT_FORMATS = ("nifti", "dicom_seg", "both")
BACKENDS = ("torch", "onnxruntime")
REQUIRED_HELP = {
    "ckpt_path": "ckpt_path is a training run folder (outputs/<task>/runs/<run>), a cross-validation folder (outputs/<task>/crossval/<run>: an ensemble of its folds), a checkpoint of medseg.train, or a list of these.",
    "input": "input is a case folder, a dataset folder (BraTS, MSD, nnU-Net, images/ + labels/), an images folder such as imagesTs/, dataset.json, a list of NIfTI files, or a folder of DICOM series.",
    "output": "output is the folder for the predicted label files.",
}


def load_model(ckpt_path: Any, inferer: dict[str, Any] | None = None, backend: str = "torch") -> tuple[SegmentationModule, DictConfig]:
    """The trained module and its training config, from checkpoints written by ``medseg.train``.

    Args:
        ckpt_path: a ``.ckpt`` file, a run folder, a cross-validation folder, or a list of these
            (:func:`medseg.ensemble.resolve_checkpoints`); several checkpoints give an
            :class:`medseg.ensemble.EnsembleModel` (the first one's config, operating point and flips).
        inferer: sliding-window options replacing the checkpoint's ``model.inferer`` values (``None``
            values are ignored).
        backend: ``"torch"``, or ``"onnxruntime"``: each member's network runs as ONNX (:func:`onnx_network_file`),
            the rest of the pipeline unchanged.

    Returns:
        The module (or ensemble) in eval mode on the CPU, and the resolved training config.

    Raises:
        ConfigError: a file is missing or unreadable, lacks the saved config, its weights do not fit it, or the
            members of an ensemble differ in preprocessing, labels or network.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"expected backend one of {list(BACKENDS)}, got {backend!r}")
    paths = resolve_checkpoints(ckpt_path)
    if backend != "onnxruntime" and any(p.suffix == ".onnx" for p in paths):
        raise ConfigError(f"ckpt_path names an ONNX network ({[str(p) for p in paths if p.suffix == '.onnx'][0]}): predict it with backend=onnxruntime")
    model, cfg, tuned_on = _load_one(paths[0], inferer)
    if len(paths) == 1:
        if tuned_on and tuned_on not in (paths[0].name, "crossval"):  # a fold alone applies its cross-validation's point
            log.warning("%s carries the operating point its run tuned on the probabilities of %s; with these weights its numbers may differ "
                        "(ckpt_path=<run folder> takes %s)", paths[0].name, tuned_on, tuned_on)
        if backend == "onnxruntime" and paths[0].suffix != ".onnx":  # an .onnx file's module runs it already
            from medseg.onnx_backend import use_onnxruntime

            use_onnxruntime(model, onnx_network_file(paths[0], model, cfg))
        return model, cfg
    others = [_load_one(p, inferer) for p in paths[1:]]
    check_members([cfg, *(o[1] for o in others)], paths)
    if backend == "onnxruntime":
        from medseg.onnx_backend import OnnxNetwork, use_onnxruntime

        members = [OnnxNetwork(onnx_network_file(p, m, c)) for p, (m, c, _) in zip(paths, [(model, cfg, None), *others])]
        use_onnxruntime(model, members[0].path)
        return EnsembleModel(model, members, paths).eval(), cfg
    del others
    return EnsembleModel(model, load_members(paths), paths).eval(), cfg


def onnx_network_file(checkpoint: Path, model: SegmentationModule, cfg: DictConfig) -> Path:
    """The ONNX file of a checkpoint's network: the one a model zip ships (``include_onnx=true``), else exported once
    into the model cache (``$MEDSEG_CACHE/models/onnx/<checksum>.onnx``) and reused."""
    from medseg.model_package import installed_onnx, model_cache_dir, sha256_file
    from medseg.onnx_backend import export_network

    if checkpoint.suffix == ".onnx":  # an exported network itself
        return checkpoint
    shipped = installed_onnx(checkpoint)
    if shipped is not None:
        return shipped
    path = model_cache_dir() / "onnx" / f"{sha256_file(checkpoint)[:16]}.onnx"
    if not path.is_file():
        log.info("Exporting the network of %s to ONNX (once; cached as %s)", checkpoint, path)
        export_network(model.net, int(cfg.data.in_channels), path, list(model.inferer["roi_size"]))
    return path


def _load_one(path: Path, inferer: dict[str, Any] | None) -> tuple[SegmentationModule, DictConfig, str | None]:
    """One checkpoint's module (eval mode, CPU), its config, and the checkpoint its operating point was tuned on. An
    ``.onnx`` file of ``medseg.export format=onnx`` carries its config and point as metadata: its module runs the file."""
    if path.suffix == ".onnx":
        return _load_onnx(path, inferer)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors all mean "not a readable checkpoint"
        raise ConfigError(f"cannot read checkpoint {str(path)!r}: {type(err).__name__}: {_first_line(err)}") from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("medseg_config"), dict) or "state_dict" not in checkpoint:
        raise ConfigError(f"checkpoint {str(path)!r} has no saved training config ('medseg_config') and weights; expected a checkpoint written by medseg.train")
    cfg = OmegaConf.create(checkpoint["medseg_config"])
    overrides = {k: v for k, v in (inferer or {}).items() if v is not None}
    if overrides:
        cfg.model.inferer = OmegaConf.merge(cfg.model.inferer, overrides)
    model = build_model(cfg)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        raise ConfigError(f"checkpoint {str(path)!r}: the weights do not fit the network of its saved config: {_first_line(err)}") from err
    model.on_load_checkpoint(checkpoint)  # the tuned operating point, when the final evaluation stored one
    return model.eval(), cfg, (checkpoint.get(CHECKPOINT_KEY) or {}).get(TUNED_ON)


def _load_onnx(path: Path, inferer: dict[str, Any] | None) -> tuple[SegmentationModule, DictConfig, str | None]:
    """The module of an exported ONNX network: built from the config in its metadata, running the file (onnxruntime)."""
    from medseg.onnx_backend import OnnxNetwork, use_onnxruntime

    network = OnnxNetwork(path)
    if "medseg_config" not in network.metadata:
        raise ConfigError(f"{path}: an ONNX file without medseg's config in its metadata; expected one written by python -m medseg.export format=onnx")
    saved = {"medseg_config": json.loads(network.metadata["medseg_config"]), CHECKPOINT_KEY: json.loads(network.metadata.get(CHECKPOINT_KEY) or "null")}
    cfg = OmegaConf.create(saved["medseg_config"])
    overrides = {k: v for k, v in (inferer or {}).items() if v is not None}
    if overrides:
        cfg.model.inferer = OmegaConf.merge(cfg.model.inferer, overrides)
    model = build_model(cfg)
    model.on_load_checkpoint(saved)
    use_onnxruntime(model, path)
    return model.eval(), cfg, (saved[CHECKPOINT_KEY] or {}).get(TUNED_ON)


def check_output_folder(output: str | Path, input_folders: list[Path], enclosing_root: Path | None = None, reference_folders: Sequence[Path] = ()) -> Path:
    """The resolved output folder, refused when predictions could land among the input files or replace reference
    labels.

    Raises:
        ConfigError: ``output`` is an existing file, one of ``input_folders``, one of ``reference_folders`` (where a
            dataset keeps its reference labels: ``labelsTr/``, ``labels/``, ...) or inside ``enclosing_root`` (a
            BraTS root, where a later run would take it for an incomplete case folder).
    """
    out = Path(output).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output={str(out)!r} is a file; expected a folder for the predictions")
    if out in {p.resolve() for p in input_folders}:
        raise ConfigError(f"output={str(out)!r} is an input folder; choose another folder so that predictions never mix with (or replace) input files")
    if out in {p.resolve() for p in reference_folders}:
        raise ConfigError(f"output={str(out)!r} holds the dataset's reference labels; predictions named like them would replace them: choose another folder")
    if enclosing_root is not None and out.is_relative_to(enclosing_root.resolve()):
        raise ConfigError(f"output={str(out)!r} is inside the input root {str(enclosing_root)!r}, where it would look like a case folder; choose a folder outside it")
    return out


def infer_probabilities(model: SegmentationModule, image: Tensor, flip_axes: Sequence[int] = ()) -> Tensor:
    """Sliding-window probabilities of one preprocessed volume.

    Args:
        model: the trained module (its ``predict_probabilities`` and ``mode``).
        image: ``(C_in, H, W, D)`` float32, on the model's device.
        flip_axes: spatial axes (0, 1, 2) whose flips the probabilities are averaged over (test-time augmentation,
            2^len passes, each prediction flipped back first); ``()``: none.

    Returns:
        ``(C_out, H, W, D)`` float32: per-region sigmoid or per-class softmax probabilities.
    """
    with torch.inference_mode():
        return model.predict_probabilities(image[None], tuple(flip_axes))[0]


def to_original_geometry(probs: Tensor | list[Tensor | None], data: dict[str, Any], transform: Compose) -> Tensor:
    """Probabilities on the preprocessed grid back on the input file's voxel grid.

    The preprocessing recorded its spatial steps (orientation, resampling, crop) on ``data["image"]``;
    their inverse is applied to ``probs`` with linear interpolation (exact when nothing was resampled), one channel
    at a time into one output volume, so that the way back holds one extra channel, not a second volume.

    Args:
        probs: ``(C_out, H, W, D)`` on the preprocessed image's grid; or a list of ``(H, W, D)`` channels, each set
            to ``None`` once inverted (so that one with its own memory is freed), ``None`` entries not inverted
            (left uninitialised in the result: the caller computes them).
        data: the preprocessed case, whose ``"image"`` MetaTensor carries ``applied_operations``.
        transform: the preprocessing that produced ``data``.

    Returns:
        ``(C_out, X, Y, Z)`` float32 in the voxel order of the input file.
    """
    channels = probs if isinstance(probs, list) else list(probs.unbind(0))
    out: Tensor | None = None
    for c, channel in enumerate(channels):
        if channel is None:
            continue
        channels[c] = None
        pred = MetaTensor(channel[None].cpu(), meta=deepcopy(data[IMAGE].meta))
        del channel
        inverted = Invertd(PRED, transform, orig_keys=IMAGE, nearest_interp=False)({IMAGE: data[IMAGE], PRED: pred})[PRED]
        del pred
        inverted = inverted.as_tensor() if isinstance(inverted, MetaTensor) else inverted
        if out is None:
            out = torch.empty((len(channels), *inverted.shape[1:]), dtype=torch.float32)
        out[c] = inverted[0]
        del inverted
    if out is None:
        raise ValueError(f"expected a channel to invert, got {len(channels)} channels, none given")
    return out


def segment(probs: Tensor, spec: LabelSpec, point: OperatingPoint | None = None, voxel_mm3: float = 1.0, connectivity: int = 26) -> np.ndarray:
    """Probabilities to dataset labels at an operating point (threshold, small components removed).

    Args:
        probs: ``(C_out, X, Y, Z)``: sigmoid probabilities per region, or softmax probabilities per class
            (background first).
        spec: the label convention of the checkpoint.
        point: per-region threshold and minimum component volume (:mod:`medseg.postprocess`, the same code
            as the final evaluation); ``None``: threshold 0.5, nothing removed.
        voxel_mm3: the volume of one voxel of ``probs``' grid.
        connectivity: of the components ``point.min_component_mm3`` filters (6, 18, 26): the model's
            (the config's ``connectivity``), as in the final evaluation.

    Returns:
        ``(X, Y, Z)`` integer labels in the dataset's convention (e.g. BraTS 0/1/2/4).
    """
    point = point or OperatingPoint.uniform(spec.names)
    masks = postprocess(probs, spec.mode, point, voxel_mm3, connectivity, spec.nesting)  # (R, X, Y, Z) bool, nested regions kept nested
    return labels_of(masks, spec)


def labels_of(masks: np.ndarray, spec: LabelSpec) -> np.ndarray:
    """Final masks ``(R, X, Y, Z)`` (bool) to ``(X, Y, Z)`` dataset labels in the label file's integer type."""
    labels = np.zeros(masks.shape[1:], dtype=_label_dtype(spec))  # (X, Y, Z), the file's type: no int64 volume
    foreground = masks.any(0)  # (X, Y, Z)
    if not foreground.any():
        return labels
    # Labels only within the foreground's bounding box: most of a scan is background. Per-axis projections
    # find the box without listing every foreground voxel.
    bounds = []
    for axis in range(3):
        hits = foreground.any(axis=tuple(a for a in range(3) if a != axis))  # (size along axis,) bool
        bounds.append(slice(int(hits.argmax()), len(hits) - int(hits[::-1].argmax())))
    box = tuple(bounds)
    crop = masks[(slice(None), *box)]  # (R, x, y, z)
    if spec.mode == "sigmoid":
        labels[box] = spec.to_labels(torch.from_numpy(crop))[0].numpy()
    else:
        index = np.zeros(crop.shape[1:], dtype=np.uint8 if crop.shape[0] < 256 else np.int16)  # classes are exclusive
        for c in range(crop.shape[0]):
            index[crop[c]] = c + 1
        labels[box] = np.asarray(spec.values, dtype=labels.dtype)[index]  # LabelSpec.to_labels, in the file's type
    return labels


@dataclass(frozen=True)
class PredictOptions:
    """How to predict (from ``conf/predict.yaml`` and the checkpoint's config); see :func:`predict_case`."""

    output: Path
    device: torch.device
    flip_axes: tuple[int, ...] = ()  # test-time flips: those the operating point was tuned with, unless told otherwise
    point: OperatingPoint | None = None  # per-region threshold and minimum component volume; None: 0.5, none removed
    connectivity: int = 26  # of the components the point's size filter removes: the model's
    save_probabilities: bool = False
    lesion_score: str | None = None  # "max" or "mean": write a per-lesion table with that component score; None: none
    reference_labels: dict[str, str] = field(default_factory=dict)  # case id -> reference label file: the tables say what each lesion matched
    matching: MatchingRule = field(default_factory=MatchingRule)  # the checkpoint's lesion matching rule (model.lesion_metrics)
    in_channels: int | None = None  # None skips the channel check
    inputs: frozenset[Path] = field(default_factory=frozenset)  # resolved input files, never written
    output_format: str = "nifti"  # "nifti", "dicom_seg" (DICOM input only) or "both"
    seg_type: str = "binary"  # of the DICOM SEG: "binary" (final masks) or "fractional" (probabilities)
    algorithm: Algorithm | None = None  # what the DICOM SEG names as its maker


def output_name(case: str) -> str:
    """The file name of a case's prediction: ``<case>.nii.gz``, folder separators replaced by ``_``."""
    return f"{case.replace('/', '_').replace(os.sep, '_')}.nii.gz"


@dataclass
class PreparedCase:
    """A case read and preprocessed for the sliding window (:func:`read_case`)."""

    record: CaseRecord
    target: Path  # <output>/<case>.nii.gz
    data: dict[str, Any]  # {"image": (C_in, H, W, D) MetaTensor whose applied_operations Invertd undoes}
    seconds: float  # spent on this case's own stages so far (not waiting in a queue)


def read_case(record: CaseRecord, transform: Compose, options: PredictOptions) -> PreparedCase:
    """Read and preprocess one case, and check it before the network spends time on it.

    Args:
        record: ``{"case", "image": [files]}``.
        transform: the checkpoint's preprocessing (:func:`medseg.data.transforms.preprocessing`).

    Raises:
        ValueError: its output file would be one of the input files, or it has not the checkpoint's number
            of channels. Reader errors pass through (MONAI wraps them in a ``RuntimeError``).
    """
    start = time.perf_counter()
    target = options.output / output_name(str(record["case"]))
    if target.resolve() in options.inputs:
        raise ValueError(f"output file {target} is an input file; choose another output folder")
    if record.get("dicom"):  # DICOM series: checked and read, written as NIfTI for the preprocessing
        stage_case(record)
    data = transform({IMAGE: list(record["image"])})
    image = data[IMAGE]  # (C_in, H, W, D) MetaTensor on the preprocessed grid
    if options.in_channels is not None and image.shape[0] != options.in_channels:
        raise ValueError(f"expected {options.in_channels} image channels (the checkpoint's data.in_channels), got {image.shape[0]} from {record['image']}")
    return PreparedCase(record, target, data, time.perf_counter() - start)


def infer_case(case: PreparedCase, model: SegmentationModule, options: PredictOptions) -> Tensor:
    """Sliding-window probabilities of a prepared case; adds the time to ``case.seconds``.

    Returns:
        ``(C_out, H, W, D)`` float32 on the CPU (the copy waits for the device, so that the device memory is
        free for the next case and the time is the inference's).
    """
    start = time.perf_counter()
    image = case.data[IMAGE].as_tensor().to(options.device)  # (C_in, H, W, D)
    probs = infer_probabilities(model, image, options.flip_axes).cpu()
    del image
    # The way back to the input grid needs the recorded operations and metadata, not the voxels: let them go.
    recorded = case.data[IMAGE]
    case.data[IMAGE] = MetaTensor(torch.empty(0), meta=recorded.meta, applied_operations=recorded.applied_operations)
    case.seconds += time.perf_counter() - start
    return probs


def input_geometry_probabilities(case: PreparedCase, probs: Tensor | list[Tensor], transform: Compose, spec: LabelSpec) -> Tensor:
    """A case's probabilities on the preprocessed grid mapped back onto its input file's voxel grid.

    Args:
        probs: ``(C_out, H, W, D)`` from :func:`infer_case`; or that tensor in a one-item list, which is emptied, so
            that (nothing else holding it) its memory goes as soon as the channels the way back needs are copied out.
        transform: the preprocessing that produced ``case.data``.

    Returns:
        ``(C_out, X, Y, Z)`` float32 (softmax: voxels outside the inverted crop are background).
    """
    if isinstance(probs, list):
        probs = probs.pop()
    if spec.mode == "sigmoid":
        return to_original_geometry(probs, case.data, transform)  # (C_out, X, Y, Z)
    # Softmax: the background is what the classes leave (the inverse crop pads them with 0: background there), so
    # only the classes go back, each in its own memory, freed once inverted; the preprocessed volume goes now.
    channels: list[Tensor | None] = [None, *(probs[c].clone() for c in range(1, probs.shape[0]))]
    del probs
    out = to_original_geometry(channels, case.data, transform)
    torch.sum(out[1:], dim=0, out=out[0])
    out[0].neg_().add_(1.0).clamp_(0.0, 1.0)
    return out


def write_labels(case: PreparedCase, probs: Tensor, spec: LabelSpec, options: PredictOptions) -> dict[str, Any]:
    """Probabilities on a case's input grid -> labels at ``options.point`` -> ``<output>/<case>.nii.gz`` (and the
    probabilities if asked), with the first input image's affine and header.

    Args:
        probs: ``(C_out, X, Y, Z)`` from :func:`input_geometry_probabilities`.

    Returns:
        ``{"case", "prediction": path, "shape", "seconds"}`` (and ``"probabilities"``); ``seconds`` sums
        the case's own stages.
    """
    start = time.perf_counter()
    reference = nib.load(case.record["image"][0])
    point = options.point or OperatingPoint.uniform(spec.names)
    masks = postprocess(probs, spec.mode, point, float(np.prod(spacing_mm(reference))), options.connectivity, spec.nesting)  # (R, X, Y, Z)
    labels = labels_of(masks, spec)  # (X, Y, Z), what segment() gives
    result: dict[str, Any] = {"case": case.record["case"], "shape": list(labels.shape)}
    if options.output_format != "dicom_seg":
        write_nifti_atomic(labels, reference, case.target)
        result["prediction"] = str(case.target)  # label files only: what medseg.evaluate and the notebook read
    if options.output_format != "nifti":
        seg_path = options.output / f"{strip_nifti_suffix(case.target.name)}{SEG_SUFFIX}"
        values = masks if options.seg_type == "binary" else probs[len(probs) - len(spec.names):].numpy()  # (R, X, Y, Z): the classes' (softmax) or regions'
        write_segmentation(seg_path, values, reference, case.record["dicom"][0], spec.names, options.algorithm, options.seg_type)
        result["dicom_seg"] = str(seg_path)
    if options.lesion_score is not None:
        table = options.output / LESION_DIR / f"{strip_nifti_suffix(case.target.name)}.csv"
        label_file = options.reference_labels.get(str(case.record["case"]))
        truth = reference_masks(label_file, spec, masks.shape) if label_file else None
        rows = lesion_rows(masks, probs, spec.names, spec.mode, reference.affine, options.connectivity, options.lesion_score, truth, options.matching)
        if rows:
            write_csv_atomic(rows, table)
        else:  # no lesion predicted: the header alone
            write_text_atomic(table, ",".join(LESION_COLUMNS + (LESION_REFERENCE_COLUMNS if truth is not None else ())) + "\n")
        result["lesions"], result["lesion_table"] = len(rows), str(table)
    del masks
    if options.save_probabilities:
        prob_path = options.output / PROBABILITY_DIR / case.target.name
        prob_path.parent.mkdir(exist_ok=True)
        write_nifti_atomic(np.ascontiguousarray(probs.permute(1, 2, 3, 0).numpy(), dtype=np.float32), reference, prob_path)
        result["probabilities"] = str(prob_path)
    result["seconds"] = round(case.seconds + time.perf_counter() - start, 2)
    remove_staged(case.record)  # written: the NIfTI copies of its series are no longer needed
    return result


def remove_staged(record: CaseRecord) -> None:
    """Remove the NIfTI copies a DICOM case's series were staged as (:func:`medseg.dicom.series.stage_case`), if any."""
    if record.get("dicom"):
        for staged in record["image"]:
            Path(staged).unlink(missing_ok=True)


def reference_masks(label_file: str, spec: LabelSpec, shape: Sequence[int]) -> np.ndarray:
    """A case's reference label file as boolean ``(R, X, Y, Z)`` masks in the model's label convention.

    Raises:
        ValueError: naming the file, when its values or its grid do not fit the prediction's (``shape``).
    """
    masks = label_channels(nib.load(label_file), spec, label_file).numpy()
    if tuple(masks.shape) != tuple(shape):
        raise ValueError(f"reference {label_file}: a {list(masks.shape[1:])} grid, the prediction's is {list(shape[1:])}")
    return masks


def write_case(case: PreparedCase, probs: Tensor | list[Tensor], transform: Compose, spec: LabelSpec, options: PredictOptions) -> dict[str, Any]:
    """:func:`input_geometry_probabilities` then :func:`write_labels`: a case's label file from its probabilities on
    the preprocessed grid ``(C_out, H, W, D)`` (or that tensor in a one-item list, emptied: see there)."""
    start = time.perf_counter()
    probs = input_geometry_probabilities(case, probs, transform, spec)
    case.seconds += time.perf_counter() - start
    return write_labels(case, probs, spec, options)


def predict_case(record: CaseRecord, model: SegmentationModule, transform: Compose, spec: LabelSpec, options: PredictOptions) -> dict[str, Any]:
    """Segment one case and write ``<output>/<case>.nii.gz`` (and its probabilities if asked):
    :func:`read_case`, :func:`infer_case` and :func:`write_case` in a row.

    Args:
        record: ``{"case", "image": [files]}``.
        model: the trained module, on ``options.device``.
        transform: the checkpoint's preprocessing (:func:`medseg.data.transforms.preprocessing`).
        spec: the checkpoint's label convention.

    Returns:
        ``{"case", "prediction": path, "shape", "seconds"}`` (and ``"probabilities"``).
    """
    case = read_case(record, transform, options)
    return write_case(case, infer_case(case, model, options), transform, spec, options)


class _InlineExecutor(Executor):
    """Runs each submitted call at once in the calling thread (``prefetch=0``: one stage after another)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as err:  # kept for the caller, as a worker thread's future would keep it
            future.set_exception(err)
        return future


def predict_cases(
    cases: Sequence[CaseRecord],
    model: SegmentationModule,
    transform: Compose,
    spec: LabelSpec,
    options: PredictOptions,
    prefetch: int = 1,
    finish: Callable[[PreparedCase, Tensor], dict[str, Any]] | None = None,
) -> Iterator[dict[str, Any]]:
    """Predict ``cases`` with the sliding window in this thread and reading and writing overlapped with it.

    While case ``i`` is inferred, cases ``i+1 .. i+prefetch`` are read and preprocessed (:func:`read_case`)
    and the cases before ``i`` are written (:func:`write_case`) by ``prefetch`` worker threads on each side;
    at most ``prefetch`` cases wait on each side, so memory does not grow with the number of cases.

    Args:
        cases: ``{"case", "image": [files]}`` records.
        prefetch: cases read ahead of (and written behind) the one inferred, >= 0; 0 runs every stage in this
            thread, one case after another.
        finish: what the writer does with a case and its probabilities on the input grid ``(C_out, X, Y, Z)``
            (:func:`input_geometry_probabilities`); ``None``: :func:`write_labels` (the final evaluation keeps the
            probabilities instead, to tune the operating point before writing labels).

    Yields:
        One result per case, in the order of ``cases``: :func:`predict_case`'s, or ``{"case", "error",
        "image"}`` for a case that failed (logged; the others still run).
    """
    # Threads rather than processes: the heavy parts of reading (zlib inflating in nibabel, the NumPy and
    # torch array work of MONAI's transforms) and of writing (Invertd's torch ops, NumPy, zlib deflating)
    # release the GIL, so threads overlap the sliding window as processes would. They also share the
    # preprocessed MetaTensor, applied_operations included, as it is: no pickling of whole volumes, no
    # worker start-up, no fork after CUDA or OpenMP started, and a case's exception keeps the chain its
    # error message is taken from. Each case is read and inverted by its own copy of the transforms (the
    # inverse must be the instance that was applied): shared MONAI transform instances once raced under
    # threads (a cached 4-channel image came out with 1 channel).
    reader, writer = (ThreadPoolExecutor(prefetch, thread_name_prefix=f"medseg-{role}") if prefetch else _InlineExecutor() for role in ("read", "write"))
    transforms: dict[int, Compose] = {}  # case index -> its transforms, while it is in flight

    def read(index: int) -> PreparedCase:
        transforms[index] = deepcopy(transform) if prefetch else transform
        return read_case(cases[index], transforms[index], options)

    def write(index: int, case: PreparedCase, held: list[Tensor]) -> dict[str, Any]:
        # The probabilities come in a list emptied here, so that nothing else (a frame, the future's arguments) keeps
        # the preprocessed grid's volume alive once the input grid's exists.
        if finish is None:
            return write_case(case, held, transforms.pop(index), spec, options)
        return finish(case, input_geometry_probabilities(case, held, transforms.pop(index), spec))

    reads: deque[tuple[CaseRecord, Future]] = deque()  # read ahead, oldest first
    writes: deque[tuple[CaseRecord, Future]] = deque()  # inferred (or failed), oldest first

    def read_ahead(index: int) -> None:
        if index < len(cases):
            reads.append((cases[index], reader.submit(read, index)))

    try:
        for index in range(prefetch):
            read_ahead(index)
        for index in range(len(cases)):
            read_ahead(index + prefetch)
            record, pending = reads.popleft()
            try:
                case = pending.result()
                held = [infer_case(case, model, options)]  # (C_out, H, W, D)
            except Exception as err:  # reported in the input's order, after the cases before it
                transforms.pop(index, None)
                failed: Future = Future()
                failed.set_exception(err)
                writes.append((record, failed))
            else:
                writes.append((record, writer.submit(write, index, case, held)))
                del held
            while len(writes) > prefetch:
                yield _outcome(*writes.popleft())
        while writes:
            yield _outcome(*writes.popleft())
    finally:  # also when the caller stops early: no worker is left running
        reader.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True, cancel_futures=True)


def _outcome(record: CaseRecord, stage: Future) -> dict[str, Any]:
    """The result of a case's last stage, or its error entry (logged) when one of its stages failed."""
    try:
        return stage.result()
    except Exception as err:  # one unreadable case must not stop the others; it is reported instead
        message = _root_cause(err)
        remove_staged(record)  # if it got as far as staging them
        unreadable = None if record.get("dicom") else _unreadable_file(record["image"])
        message = f"{unreadable}: {message}" if unreadable else message
        log.error("case %s failed: %s", record["case"], message)
        return {"case": record["case"], "error": message, "image": list(record["image"])}


def predict(cfg: DictConfig) -> list[dict[str, Any]]:
    """Predict every case of ``cfg.input`` into ``cfg.output`` and write ``predictions.json``.

    Args:
        cfg: the ``conf/predict.yaml`` config (``ckpt_path``, ``input``, ``output``, ``tta``, ...).

    Returns:
        One entry per case: ``{"case", "prediction", "shape", "seconds"}`` (plus ``"probabilities"``), or
        ``{"case", "error"}`` for a case that failed.

    Raises:
        ConfigError, DatasetError: unusable keys, checkpoint or input (before any case is predicted).
    """
    check_required(cfg, REQUIRED_HELP)
    if cfg.get("min_component_mm3") is not None and not cfg.min_component_mm3 >= 0:
        raise ConfigError(f"expected min_component_mm3 >= 0 (or null: the checkpoint's tuned value), got {cfg.min_component_mm3}")
    if cfg.get("min_component_score") is not None and not 0 <= cfg.min_component_score <= 1:
        raise ConfigError(f"expected min_component_score in [0, 1] (or null: the checkpoint's tuned value), got {cfg.min_component_score}")
    if cfg.get("threshold") is not None and not 0 < cfg.threshold < 1:
        raise ConfigError(f"expected threshold in (0, 1) (or null: the checkpoint's tuned value), got {cfg.threshold}")
    if not isinstance(cfg.prefetch, int) or isinstance(cfg.prefetch, bool) or cfg.prefetch < 0:
        raise ConfigError(f"expected prefetch to be a whole number >= 0 (cases read ahead; 0: one case after another), got {cfg.prefetch!r}")
    output_format, seg_type = str(cfg.get("output_format") or "nifti"), str(cfg.get("dicom_seg_type") or "binary")
    if output_format not in OUTPUT_FORMATS or seg_type not in SEG_TYPES:
        raise ConfigError(f"expected output_format one of {list(OUTPUT_FORMATS)} and dicom_seg_type one of {list(SEG_TYPES)}, got {output_format!r} and {seg_type!r}")
    if output_format != "nifti" and not (isinstance(cfg.input, str) and is_dicom_folder(Path(cfg.input).expanduser())):
        raise ConfigError(f"output_format={output_format} writes DICOM SEG objects referencing the input's DICOM series; input {cfg.input} is not a folder of DICOM series (use output_format=nifti)")
    device = _device(str(cfg.device))
    inferer = OmegaConf.to_container(cfg.inferer, resolve=True) if cfg.get("inferer") else None
    backend = str(cfg.get("backend") or "torch")
    try:
        model, train_cfg = load_model(cfg.ckpt_path, inferer, backend)
    except ImportError as err:  # backend=onnxruntime without the onnx extra
        raise ConfigError(str(err)) from err
    model.to(device)
    data_cfg = train_cfg.data
    source = OmegaConf.to_container(cfg.input) if isinstance(cfg.input, ListConfig) else cfg.input
    staging = tempfile.TemporaryDirectory(prefix="medseg-dicom-")  # DICOM cases' channels as NIfTI, while predicted
    with staging:
        cases, input_folders, enclosing_root, skipped = input_cases(cfg, source, data_cfg, staging.name)
        return _predict_cases(cfg, model, train_cfg, device, source, cases, input_folders, enclosing_root, skipped, output_format, seg_type)


def input_cases(cfg: DictConfig, source: Any, data_cfg: DictConfig, staging: str) -> tuple[list[CaseRecord], list[Path], Path | None, list[dict[str, str]]]:
    """The cases of ``cfg.input``: a folder of DICOM series (:func:`medseg.dicom.series.dicom_cases`, their channels
    written into ``staging`` as they are read) or any input :func:`medseg.data.layouts.find_input_cases` reads; the
    input folders, a root the output must stay out of, and the DICOM objects skipped (not images).

    Raises:
        DatasetError: no case, or a DICOM folder without image series; ConfigError: a DICOM channel mapping that does
            not fit the model.
    """
    modalities = list(data_cfg.get("modalities") or ())
    if isinstance(source, str) and is_dicom_folder(Path(source).expanduser()):
        folder = Path(source).expanduser().resolve()
        channels = OmegaConf.to_container(cfg.dicom_channels, resolve=True) if cfg.get("dicom_channels") else None
        try:
            cases, skipped = dicom_cases(folder, staging, data_cfg.get("in_channels"), modalities, channels)
        except DicomSeriesError as err:
            raise DatasetError(str(err)) from err
        except (ValueError, ImportError) as err:  # a channel mapping that does not fit; the dicom extra missing
            raise ConfigError(str(err)) from err
        for item in skipped:
            log.warning("%s", item["reason"])
        return cases, [folder], folder, skipped
    cases, input_folders, enclosing_root = find_input_cases(source, modalities, str(cfg.data_section), data_cfg.get("layout"))
    return cases, input_folders, enclosing_root, []


def _predict_cases(cfg: DictConfig, model: Any, train_cfg: DictConfig, device: torch.device, source: Any, cases: list[CaseRecord], input_folders: list[Path],
                   enclosing_root: Path | None, skipped: list[dict[str, str]], output_format: str, seg_type: str) -> list[dict[str, Any]]:
    """:func:`predict` once the model and the cases are known: the output folder, options, the cases, the record."""
    data_cfg = train_cfg.data
    # Reference labels near the input and of the training dataset are never overwritten (an MSD task's labelsTr/).
    sources = source if isinstance(source, list) else [source]
    references = reference_label_folders(*(Path(str(s)).expanduser().parent if str(s).endswith(NIFTI_SUFFIXES) else s for s in sources), data_cfg.get("root"), cfg.get("reference"))
    reference_labels = find_label_files(cfg.reference) if cfg.get("reference") else {}
    if reference_labels:
        references += sorted({Path(f).resolve().parent for f in reference_labels.values()})  # never written into
        unmatched = [str(c["case"]) for c in cases if str(c["case"]) not in reference_labels]
        if unmatched:
            log.warning("No reference label under %s for %d case(s) (%s): their lesion tables list the predicted lesions only", cfg.reference, len(unmatched), ", ".join(unmatched[:5]))
    output = check_output_folder(cfg.output, input_folders, enclosing_root, references)
    names = [output_name(str(c["case"])) for c in cases]
    if len(set(names)) < len(names):
        raise DatasetError(f"input {cfg.input}: several cases would be written to {sorted({n for n in names if names.count(n) > 1})[:5]}")

    spec = LabelSpec.from_config(data_cfg.labels)
    transform = preprocessing_from_config(data_cfg, with_label=False)
    # The checkpoint's operating point (tuned after training, or its model.threshold), unless overridden here.
    point = model.postprocessing.with_overrides(cfg.get("threshold"), cfg.get("min_component_mm3"), cfg.get("min_component_score"))
    options = PredictOptions(
        output=output,
        device=device,
        flip_axes=prediction_flips(cfg.get("tta"), model, train_cfg),
        point=point,
        connectivity=model.connectivity,
        save_probabilities=bool(cfg.save_probabilities),
        lesion_score=lesion_score(cfg, point),
        reference_labels=reference_labels,
        matching=MatchingRule.from_options(OmegaConf.to_container(train_cfg.model.lesion_metrics, resolve=True) if train_cfg.model.get("lesion_metrics") else None),
        in_channels=data_cfg.get("in_channels"),
        inputs=frozenset(Path(f).resolve() for c in cases for f in (c["image"] if not c.get("dicom") else [f for s in c["dicom"] for f in s.files])),
        output_format=output_format,
        seg_type=seg_type,
        algorithm=model_algorithm(cfg.ckpt_path) if output_format != "nifti" else None,
    )
    checkpoints = [str(p.resolve()) for p in resolve_checkpoints(cfg.ckpt_path)]
    made_by = {
        "checkpoint": checkpoints if isinstance(model, EnsembleModel) else checkpoints[0],
        "options": {"tta_flip_axes": list(options.flip_axes), "operating_point": point.to_dict(), "save_probabilities": options.save_probabilities, "lesion_score": options.lesion_score,
                    **({"reference": str(Path(str(cfg.reference)).expanduser().resolve())} if reference_labels else {}),
                    **({"output_format": output_format, "dicom_seg_type": seg_type} if output_format != "nifti" else {}),
                    **({"backend": str(cfg.backend)} if cfg.get("backend", "torch") != "torch" else {}),
                    "inferer": {k: v for k, v in dict(model.inferer).items() if k not in ("device", "sw_device")}},
    }  # fmt: skip
    inputs = {str(c["case"]): [str(f) for f in c.get("source") or c["image"]] for c in cases}  # DICOM: dicom:<SeriesInstanceUID> (<n> files) per channel
    finished = resume_or_refuse(output, made_by, inputs, bool(cfg.get("overwrite", False)), options.save_probabilities)
    summary = {**made_by, "input": OmegaConf.to_container(cfg.input) if isinstance(cfg.input, ListConfig) else str(cfg.input), "device": str(device), "complete": False, "failed": 0,
               **({"skipped": skipped} if skipped else {}), "cases": []}  # fmt: skip
    todo = [c for c in cases if str(c["case"]) not in finished]
    output.mkdir(parents=True, exist_ok=True)
    if finished:
        log.info("%d of %d case(s) already predicted into %s by the same checkpoint and options: kept (overwrite=true predicts them again)", len(cases) - len(todo), len(cases), output)
    log.info("Predicting %d case(s) with %s on %s into %s", len(todo), cfg.ckpt_path, device, output)
    results: dict[str, dict[str, Any]] = {str(c["case"]): finished[str(c["case"])] for c in cases if str(c["case"]) in finished}

    def record(complete: bool) -> None:  # after every case: a killed run says what it finished
        entries = [results[str(c["case"])] for c in cases if str(c["case"]) in results]
        write_json_atomic(output / SUMMARY_NAME, {**summary, "complete": complete, "failed": sum("error" in r for r in entries), "cases": entries})

    with logging_redirect_tqdm(loggers=[log]):
        pipeline = predict_cases(todo, model, transform, spec, options, cfg.prefetch)
        progress = tqdm(pipeline, total=len(todo), desc="predict", unit="case", dynamic_ncols=True)
        try:
            for result in progress:
                results[str(result["case"])] = {**result, "image": inputs[str(result["case"])]}
                record(complete=False)
                progress.set_postfix(failed=sum("error" in r for r in results.values()))
        finally:  # its worker threads stopped now, before the DICOM staging folder goes
            pipeline.close()
    record(complete=True)
    ordered = [results[str(c["case"])] for c in cases]
    failed = sum("error" in r for r in ordered)
    log.info("%d of %d case(s) predicted into %s (%s)", len(ordered) - failed, len(ordered), output, SUMMARY_NAME)
    return ordered


def model_algorithm(ckpt_path: Any) -> Algorithm:
    """The model as a DICOM SEG names its maker: the name of what ``ckpt_path`` names (a model zip's name, ``<task>_<run>``
    of a run or cross-validation folder, a checkpoint file's name), medseg's version, and the SHA-256 of the model file
    (the zip, the checkpoint or ``.onnx`` file; for several checkpoints, of their SHA-256s in order)."""
    from medseg.model_package import MANIFEST, default_name, sha256_file, source_folder

    paths = resolve_checkpoints(ckpt_path)
    first = str(ckpt_path[0] if isinstance(ckpt_path, (list, ListConfig)) else ckpt_path)
    manifest = paths[0].parent.parent / MANIFEST  # a model zip's, unpacked
    if first.endswith(".zip") and manifest.is_file():
        name, files = json.loads(manifest.read_text())["name"], [Path(first).expanduser()]
    else:
        name, files = default_name(source_folder(first, paths), paths), paths
    # The file a user can check (sha256sum): the zip, the checkpoint or .onnx file; several: the digest of their digests.
    digests = [sha256_file(f) for f in files]
    checksum = digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()
    return Algorithm(name=name or "medseg model", version=__version__, checksum=f"sha256:{checksum}")


def lesion_score(cfg: DictConfig, point: OperatingPoint) -> str | None:
    """The component score of the per-lesion tables (``lesion_table``, or a ``reference`` to match them with;
    ``lesion_score``, unset: the operating point's), ``None`` without tables."""
    if not cfg.get("lesion_table", False) and not cfg.get("reference"):
        return None
    score = str(cfg.get("lesion_score") or point.component_score)
    if score not in LESION_SCORES:
        raise ConfigError(f"expected lesion_score one of {list(LESION_SCORES)}, got {score!r}")
    return score


def resume_or_refuse(output: Path, made_by: dict[str, Any], inputs: dict[str, list[str]], overwrite: bool, save_probabilities: bool) -> dict[str, dict[str, Any]]:
    """What an output folder already holds, before a prediction run writes into it.

    Returns the entries of cases already predicted there by the same checkpoint(s) and options (``made_by``) from the
    same image files (``inputs``: case id -> its files), whose files are all present: the run keeps them. With ``overwrite``: nothing kept, and the files an earlier record
    lists are removed first (no stale predictions of another checkpoint are left beside the new ones).

    Raises:
        ConfigError: without ``overwrite``, the folder holds predictions of other checkpoints or options, or label
            files no ``predictions.json`` accounts for.
    """
    record_path = output / SUMMARY_NAME
    if not output.is_dir():
        return {}
    if not record_path.is_file():
        unknown = sorted(p.name for p in output.iterdir() if p.is_file() and p.name.endswith((*NIFTI_SUFFIXES, SEG_SUFFIX)) and not p.name.startswith("."))
        if unknown and not overwrite:
            raise ConfigError(f"output {output} already holds {len(unknown)} label or SEG file(s) ({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}) and no {SUMMARY_NAME} saying what made them: choose another output folder, or overwrite=true to replace those of the same names")
        return {}
    try:
        earlier = json.loads(record_path.read_text())
        entries = list(earlier["cases"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{record_path}: unreadable ({type(err).__name__}: {err}); remove it or pass overwrite=true") from err
    same = all(earlier.get(key) == made_by[key] for key in made_by)
    if overwrite or not same:
        if not overwrite:
            raise ConfigError(f"output {output} holds predictions of {earlier.get('checkpoint')} with other options than this run's ({made_by['checkpoint']}; {SUMMARY_NAME} records them): choose another output folder, or overwrite=true to replace them")
        for entry in entries:  # the earlier run's files in this folder go, so that none is left beside the new ones
            for key, folder in (("prediction", output), ("dicom_seg", output), ("probabilities", output / PROBABILITY_DIR), ("lesion_table", output / LESION_DIR)):
                if entry.get(key):
                    (folder / Path(entry[key]).name).unlink(missing_ok=True)
        record_path.unlink()
        return {}
    done = {}
    for entry in entries:  # kept: cases predicted from the same image files, whose files are all there
        outputs = [entry[key] for key in ("prediction", "dicom_seg") if entry.get(key)]  # NIfTI labels, DICOM SEG or both
        files = [*outputs, *([entry.get("probabilities")] if save_probabilities else [])]
        if "error" not in entry and outputs and all(f and Path(f).is_file() for f in files) and entry.get("image") == inputs.get(str(entry["case"])):
            done[str(entry["case"])] = entry
    return done


def prediction_flips(tta: bool | None, model: SegmentationModule, train_cfg: DictConfig) -> tuple[int, ...]:
    """The flip axes prediction averages over (``tta``: ``predict.yaml``).

    ``None``: those the checkpoint's operating point was tuned with (recorded with the point; else the training
    config's ``model.tta_flip_axes``), so that predictions are what the reported numbers measured. ``True``: those,
    or the training augmentation's ``data.augment.flip_axes`` when they are none. ``False``: no flips.
    """
    if tta is False:
        return ()
    tuned = model.postprocessing.tta_flip_axes
    flips = tuple(tuned) if tuned is not None else tuple(int(a) for a in train_cfg.model.get("tta_flip_axes") or ())
    if tta is True and not flips:
        flips = tuple(int(a) for a in train_cfg.data.get("augment", {}).get("flip_axes", (0, 1, 2)))
    return flips


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise ConfigError(f"expected device 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is available; use device=cpu or device=auto")
    return torch.device(name)


def _label_dtype(spec: LabelSpec) -> type:
    low, high = min(spec.values), max(spec.values)
    for dtype in (np.uint8, np.int16, np.int32):
        if np.iinfo(dtype).min <= low and high <= np.iinfo(dtype).max:
            return dtype
    return np.int64


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _unreadable_file(files: list[str]) -> str | None:
    """The first of ``files`` whose voxels cannot be read (to name it in a case's error), or None."""
    for f in files:
        try:
            np.asarray(nib.load(f).dataobj)
        except Exception:  # any failure to read is what we are looking for
            return str(f)
    return None


def _root_cause(err: BaseException) -> str:
    """The innermost exception of a chain (MONAI wraps reader errors in RuntimeErrors), on one line."""
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {_first_line(err)}"
