"""The nnU-Net v2 raw dataset layout, read with its own ``dataset.json``.

::

    DatasetXXX_Name/
        dataset.json          {"channel_names": {"0": "T2", "1": "ADC"}, "labels": {"background": 0, "PZ": 1, "TZ": 2},
                               "numTraining": 32, "file_ending": ".nii.gz"}
        imagesTr/CASE_0000.nii.gz, CASE_0001.nii.gz, ...   one file per channel, numbered as channel_names
        labelsTr/CASE.nii.gz
        imagesTs/CASE_0000.nii.gz, ...                    (optional) cases to predict

Classes (integer labels, a softmax output) or regions (list-valued labels such as BraTS's
``"whole tumor": [1, 2, 3]``, one sigmoid output each, with ``regions_class_order``) come from ``labels``;
channels and their count from ``channel_names``; nothing needs to be set on the command line. Label names
become metric names with every run of non-word characters replaced by ``_`` (``whole tumor`` -> ``whole_tumor``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from medseg.data.layouts.base import (
    CaseRecord,
    DatasetError,
    InputCases,
    Layout,
    LayoutProblem,
    image_folders,
    nifti_files,
    raise_for,
    register,
)

NNUNET_HELP = (
    "An nnU-Net v2 raw dataset is a folder DatasetXXX_Name holding dataset.json, imagesTr/ (CASE_0000.nii.gz per "
    "channel) and labelsTr/ (CASE.nii.gz); pass it as data.root=/path/to/DatasetXXX_Name."
)
CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _json_path(root: Path) -> Path:
    return root if root.suffix == ".json" else root / "dataset.json"


def is_nnunet_dataset(root: Path) -> bool:
    """``root`` (or the json itself) has an nnU-Net v2 ``dataset.json`` (``channel_names`` and ``labels``)."""
    try:
        meta = json.loads(_json_path(root).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "channel_names" in meta and "labels" in meta


def metric_name(label: str) -> str:
    """A label name of ``dataset.json`` as a metric name: ``whole tumor`` -> ``whole_tumor``."""
    return re.sub(r"\W+", "_", str(label)).strip("_") or "label"


def labels_config(labels: Mapping[str, Any], regions_class_order: Sequence[int] | None = None, where: str = "dataset.json") -> dict[str, Any]:
    """The ``data.labels`` node (:class:`medseg.data.labels.LabelSpec`) of nnU-Net's ``labels`` entry.

    Args:
        labels: ``{"background": 0, "name": value or [values], ...}`` as in ``dataset.json``.
        regions_class_order: the label value written for each region, in order (region-based datasets).

    Returns:
        ``{"mode", "names", "values", "regions"}``: softmax classes when every value is one integer, sigmoid
        regions when any is a list (or ``regions_class_order`` is given).

    Raises:
        DatasetError: naming ``where``: no background 0, an ``ignore`` label, non-integer values, classes that are
            not 0..K, duplicate names after :func:`metric_name`, a ``regions_class_order`` of the wrong length.
    """
    if not isinstance(labels, Mapping) or not labels:
        raise DatasetError(f"{where}: expected 'labels' to be an object such as {{\"background\": 0, \"tumour\": 1}}, got {labels!r}")
    if labels.get("background") != 0:
        raise DatasetError(f"{where}: expected labels.background = 0 (nnU-Net's convention), got {labels.get('background')!r}")
    if "ignore" in labels:
        raise DatasetError(f"{where}: the 'ignore' label (nnU-Net's sparse annotations) is not supported; remove it or map those voxels to background")
    members: dict[str, tuple[int, ...]] = {}
    for name, value in labels.items():
        if name == "background":
            continue
        entries = value if isinstance(value, list) else [value]
        if not entries or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in entries):
            raise DatasetError(f"{where}: labels.{name} must be a positive integer or a list of them, got {value!r}")
        members[name] = tuple(entries)
    names = [metric_name(n) for n in members]
    if len(set(names)) < len(names):
        raise DatasetError(f"{where}: label names {list(members)} repeat once spaces and punctuation become '_' ({names})")
    region_based = regions_class_order is not None or any(isinstance(v, list) for v in labels.values())
    if region_based:
        if regions_class_order is not None and len(regions_class_order) != len(members):
            raise DatasetError(f"{where}: regions_class_order lists {len(regions_class_order)} values for {len(members)} regions")
        values = sorted({0, *(v for m in members.values() for v in m), *(regions_class_order or ())})
        return {"mode": "sigmoid", "names": names, "values": values, "regions": {n: list(m) for n, m in zip(names, members.values())}}
    order = sorted(zip((m[0] for m in members.values()), names))
    if [v for v, _ in order] != list(range(1, len(order) + 1)):
        raise DatasetError(f"{where}: expected class labels 0..{len(order)} (consecutive, as nnU-Net requires), got {[0, *(v for v, _ in order)]}")
    return {"mode": "softmax", "names": [n for _, n in order], "values": [0, *(v for v, _ in order)], "regions": None}


@lru_cache(maxsize=32)
def _read_meta(json_path: str, mtime: float) -> dict[str, Any]:
    """Parse and check a dataset.json once per version of the file."""
    path = Path(json_path)
    try:
        meta = json.loads(path.read_text())
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: malformed JSON ({err})") from err
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: malformed JSON ({err})") from err
    if not isinstance(meta, dict):
        raise DatasetError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    channels = meta.get("channel_names")
    if not isinstance(channels, dict) or not channels or set(map(str, channels)) != {str(i) for i in range(len(channels))}:
        raise DatasetError(f"{path}: expected 'channel_names' numbered from 0, such as {{\"0\": \"T2\", \"1\": \"ADC\"}}, got {channels!r}")
    ending = meta.get("file_ending", ".nii.gz")
    if ending not in (".nii.gz", ".nii"):
        raise DatasetError(f"{path}: file_ending {ending!r}: medseg reads NIfTI (.nii.gz, .nii); convert the images first")
    labels = labels_config(meta.get("labels"), meta.get("regions_class_order"), str(path))
    return {"channels": [str(channels[str(i)]) for i in range(len(channels))], "ending": ending, "labels": labels, "num_training": meta.get("numTraining"), "dataset": meta.get("dataset")}


def read_nnunet_json(root: str | Path) -> dict[str, Any]:
    """The checked contents of an nnU-Net ``dataset.json``: ``channels`` (names in order), ``ending``,
    ``labels`` (a ``data.labels`` node), ``num_training`` and the optional explicit ``dataset`` file list.

    Raises:
        DatasetError: the json is missing or malformed (naming the file and the entry at fault).
    """
    path = _json_path(Path(root).expanduser().resolve())
    if not path.is_file():
        raise DatasetError(f"no dataset.json found in nnU-Net data root {str(path.parent)!r}. {NNUNET_HELP}")
    return _read_meta(str(path), path.stat().st_mtime)


def channel_cases(folder: Path, ending: str, num_channels: int | None, require_all: bool = True) -> tuple[dict[str, list[Path | None]], list[LayoutProblem]]:
    """The cases of an images folder (``CASE_0000.nii.gz`` ...), each a list of channel files in channel order.

    Args:
        num_channels: channels per case (``dataset.json``); ``None``: as many as the case with most has.

    Returns:
        ``{case: [file or None per channel]}`` sorted by case id, and the problems: a file not named
        ``CASE_XXXX<ending>``, a channel beyond ``num_channels``, a missing channel file (named exactly).
    """
    problems: list[LayoutProblem] = []
    found: dict[str, dict[int, Path]] = {}
    for path in nifti_files(folder):
        stem = path.name.removesuffix(ending) if path.name.endswith(ending) else None
        match = CHANNEL_FILE.match(stem) if stem else None
        if match is None:
            problems.append(LayoutProblem(None, str(path), f"unexpected file name in {folder.name}/ (expected CASE_XXXX{ending}, one file per channel)"))
            continue
        found.setdefault(match["case"], {})[int(match["channel"])] = path
    count = num_channels if num_channels is not None else max((max(c) + 1 for c in found.values()), default=0)
    cases: dict[str, list[Path | None]] = {}
    for case in sorted(found):
        files = found[case]
        for extra in sorted(c for c in files if c >= count):
            problems.append(LayoutProblem(case, str(files[extra]), f"channel {extra:04d} is not one of dataset.json's channel_names (0000-{count - 1:04d})"))
        cases[case] = [files.get(i) for i in range(count)]
        if require_all:
            for i in range(count):
                if i not in files:
                    problems.append(LayoutProblem(case, str(folder / f"{case}_{i:04d}{ending}"), f"missing channel file {i:04d} (expected {case}_{i:04d}{ending})"))
    return cases, problems


def scan_nnunet_dataset(root: str | Path, require_label: bool = True) -> tuple[list[CaseRecord], list[LayoutProblem]]:
    """Every training case of an nnU-Net v2 dataset and every problem found listing them, without raising.

    Returns:
        Case records sorted by case id (a missing file is ``None``) and the problems: a missing root or
        ``imagesTr/``, a malformed ``dataset.json``, misnamed files, missing channel or label files, labels
        without images, a ``numTraining`` that does not match.
    """
    root = Path(root).expanduser().resolve()
    if root.suffix == ".json":
        root = root.parent
    if not root.is_dir():
        return [], [LayoutProblem(None, str(root), f"nnU-Net data root does not exist or is not a folder. {NNUNET_HELP}")]
    try:
        meta = read_nnunet_json(root)
    except DatasetError as err:
        return [], [LayoutProblem(None, str(_json_path(root)), str(err).removeprefix(f"{_json_path(root)}: "))]
    if isinstance(meta["dataset"], dict):  # nnU-Net v2's explicit file lists
        return _listed_cases(root, meta, require_label)
    images_dir, labels_dir, ending = root / "imagesTr", root / "labelsTr", meta["ending"]
    if not images_dir.is_dir():
        return [], [LayoutProblem(None, str(images_dir), f"missing imagesTr/ folder. {NNUNET_HELP}")]
    by_case, problems = channel_cases(images_dir, ending, len(meta["channels"]))
    cases = []
    for case, files in by_case.items():
        label = labels_dir / f"{case}{ending}"
        if not label.is_file():
            if require_label:
                problems.append(LayoutProblem(case, str(label), f"missing label file (expected labelsTr/{case}{ending})"))
            label = None
        cases.append({"case": case, "image": [str(f) if f else None for f in files], "label": str(label) if label else None})
    if labels_dir.is_dir():
        for path in nifti_files(labels_dir):
            case = path.name.removesuffix(ending)
            if case not in by_case:
                problems.append(LayoutProblem(case, str(path), f"label file without images (expected imagesTr/{case}_0000{ending})"))
    if not cases:
        problems.append(LayoutProblem(None, str(images_dir), f"imagesTr/ holds no CASE_XXXX{ending} files. {NNUNET_HELP}"))
    elif isinstance(meta["num_training"], int) and meta["num_training"] != len(cases):
        problems.append(LayoutProblem(None, str(_json_path(root)), f"numTraining is {meta['num_training']} but imagesTr/ holds {len(cases)} cases"))
    return cases, problems


def _listed_cases(root: Path, meta: dict[str, Any], require_label: bool) -> tuple[list[CaseRecord], list[LayoutProblem]]:
    """Cases of a ``dataset.json`` whose ``dataset`` entry lists ``{case: {"images": [...], "label": ...}}``."""
    cases, problems, json_path = [], [], str(_json_path(root))
    for case, entry in sorted(meta["dataset"].items()):
        images = entry.get("images") if isinstance(entry, dict) else None
        if not isinstance(images, list) or len(images) != len(meta["channels"]):
            problems.append(LayoutProblem(case, json_path, f"dataset.{case}.images: expected {len(meta['channels'])} files (one per channel), got {images!r}"))
            continue
        paths = [(root / f).resolve() for f in images]
        for channel, path in enumerate(paths):
            if not path.is_file():
                problems.append(LayoutProblem(case, str(path), f"missing channel file {channel:04d} listed in dataset.json"))
        label = (root / entry["label"]).resolve() if entry.get("label") else None
        if (label is None or not label.is_file()) and require_label:
            problems.append(LayoutProblem(case, str(label or json_path), "missing label file listed in dataset.json"))
        cases.append({"case": case, "image": [str(p) if p.is_file() else None for p in paths], "label": str(label) if label and label.is_file() else None})
    return cases, problems


@register
class NnunetLayout(Layout):
    """nnU-Net v2 raw data: ``dataset.json`` (channels, labels, regions), ``imagesTr/CASE_XXXX``, ``labelsTr/CASE``."""

    name = "nnunet"
    help = NNUNET_HELP
    input_order = 10

    def scan(self, root: str | Path, modalities: Sequence[str] = (), require_label: bool = True) -> tuple[list[CaseRecord], list[LayoutProblem]]:
        return scan_nnunet_dataset(root, require_label)

    def input_cases(self, path: Path, modalities: Sequence[str], section: str) -> InputCases | None:
        if path.is_dir() and is_nnunet_dataset(path):
            folders = {"test": ["imagesTs"], "training": ["imagesTr"], "auto": ["imagesTs", "imagesTr"]}[section]
            chosen = next((path / f for f in folders if (path / f).is_dir() and nifti_files(path / f)), None)
            if chosen is None:
                raise DatasetError(f"nnU-Net dataset {str(path)!r} has no {' or '.join(f + '/' for f in folders)} images to predict")
            meta = read_nnunet_json(path)
            return self._folder_cases(chosen, meta["ending"], len(meta["channels"]), extra=[path])
        files = nifti_files(path) if path.is_dir() else []
        stems = [f.name.removesuffix(".gz").removesuffix(".nii") for f in files]
        if files and all(CHANNEL_FILE.match(s) for s in stems):  # a folder of CASE_XXXX files, such as imagesTs/
            ending = ".nii.gz" if files[0].name.endswith(".nii.gz") else ".nii"
            return self._folder_cases(path, ending, len(modalities) or None)
        return None

    @staticmethod
    def _folder_cases(folder: Path, ending: str, num_channels: int | None, extra: Sequence[Path] = ()) -> InputCases:
        by_case, problems = channel_cases(folder, ending, num_channels)
        raise_for(problems, f"nnU-Net images folder {str(folder)!r}")
        cases = [{"case": case, "image": [str(f) for f in files], "label": None} for case, files in by_case.items()]
        return InputCases(cases, [*extra, folder, *image_folders(cases)])

    def label_files(self, root: Path) -> dict[str, str] | None:
        if not (root.is_dir() and is_nnunet_dataset(root)):
            return None
        return {c["case"]: c["label"] for c in self.find_cases(root, require_label=False) if c["label"]}

    def reference_folders(self, root: Path) -> list[Path]:
        if not (root.is_dir() and is_nnunet_dataset(root)):
            return []
        return sorted({*super().reference_folders(root), *(root / f for f in ("labelsTr", "labelsTs") if (root / f).is_dir())})

    def declared_modality(self, root: str | Path) -> str | None:
        return read_nnunet_json(root)["channels"][0]

    def metadata(self, root: str | Path) -> dict[str, Any]:
        meta = read_nnunet_json(root)
        ct = meta["channels"][0].strip().lower() == "ct"  # nnU-Net picks CT normalisation by this name too
        return {"modalities": meta["channels"], "in_channels": len(meta["channels"]), "labels": meta["labels"], "intensity": "ct" if ct else "mri"}


def export_nnunet(
    cases: Sequence[CaseRecord],
    out: str | Path,
    channel_names: Sequence[str],
    labels: Mapping[str, int | list[int]],
    label_map: Mapping[int, int] | None = None,
    regions_class_order: Sequence[int] | None = None,
    section: str = "imagesTr",
    link: bool = True,
) -> Path:
    """Write cases read by any layout as an nnU-Net v2 raw dataset (``out/dataset.json``, ``imagesTr/``, ``labelsTr/``).

    Args:
        cases: case records (:func:`medseg.data.layouts.find_cases`); an image may be one file per channel or one
            4D file holding every channel (split here).
        out: the ``DatasetXXX_Name`` folder (created; existing files of the same names are replaced).
        channel_names: one name per channel, in order (``dataset.json``'s ``channel_names``).
        labels: nnU-Net's ``labels`` entry, e.g. ``{"background": 0, "whole tumor": [1, 2, 3], ...}``.
        label_map: dataset value -> nnU-Net value, when the conventions differ (BraTS: ``{1: 2, 2: 1, 4: 3}``).
        regions_class_order: region-based datasets: the value written for each region, in order.
        section: ``imagesTr`` (cases with labels) or ``imagesTs`` (images only).
        link: symbolic links to single-channel files that need no change, instead of copies.

    Returns:
        ``out``.
    """
    import nibabel as nib
    import numpy as np

    from medseg.io import write_json_atomic, write_nifti_atomic

    out = Path(out)
    images_dir, labels_dir = out / section, out / "labelsTr"
    images_dir.mkdir(parents=True, exist_ok=True)
    for case in cases:
        name = str(case["case"]).replace("/", "_")
        files = list(case["image"])
        if len(files) == 1 and len(channel_names) > 1:  # one 4D file: split its channels
            volume = nib.load(files[0])
            data = np.asarray(volume.dataobj)
            for channel in range(len(channel_names)):
                write_nifti_atomic(np.ascontiguousarray(data[..., channel]), volume, images_dir / f"{name}_{channel:04d}.nii.gz")
        else:
            for channel, source in enumerate(files):
                _place(Path(source), images_dir / f"{name}_{channel:04d}.nii.gz", link)
        if section == "imagesTr" and case.get("label"):
            labels_dir.mkdir(exist_ok=True)
            if label_map:
                volume = nib.load(case["label"])
                data = np.asarray(volume.dataobj)
                remapped = data.copy()
                for source_value, value in label_map.items():
                    remapped[data == source_value] = value
                write_nifti_atomic(remapped, volume, labels_dir / f"{name}.nii.gz")
            else:
                _place(Path(case["label"]), labels_dir / f"{name}.nii.gz", link)
    meta: dict[str, Any] = {"channel_names": {str(i): str(n) for i, n in enumerate(channel_names)}, "labels": dict(labels),
                            "numTraining": len(cases) if section == "imagesTr" else 0, "file_ending": ".nii.gz"}
    if regions_class_order is not None:
        meta["regions_class_order"] = list(regions_class_order)
    json_path = out / "dataset.json"
    if section == "imagesTs" and json_path.is_file():
        return out  # test images added to an exported dataset keep its dataset.json
    write_json_atomic(json_path, meta)
    return out


def _place(source: Path, target: Path, link: bool) -> None:
    """``target`` as a link to (or copy of) ``source``; a gzip-compressed NIfTI keeps its compression."""
    import shutil

    from medseg.io import atomic_path

    if source.name.endswith(".nii.gz") and link:
        target.unlink(missing_ok=True)
        target.symlink_to(source.resolve())
        return
    with atomic_path(target, keep_suffix=True) as tmp:
        if source.name.endswith(".nii.gz"):
            shutil.copyfile(source, tmp)
        else:  # .nii: compress, as file_ending says .nii.gz
            import nibabel as nib

            nib.save(nib.load(source), tmp)
