"""Dataset layouts: find the cases of a BraTS folder tree or a Medical Segmentation Decathlon dataset.

Each reader returns a list of *case records*, the dictionaries MONAI's dictionary transforms consume::

    {"case": "BraTS2021_00000", "image": [t1, t1ce, t2, flair], "label": seg}

``image`` is always a list of per-channel files (one entry per modality, in the configured order) and
``label`` is ``None`` for cases without a reference segmentation (test sets).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

NIFTI_SUFFIXES = (".nii.gz", ".nii")

# Modality names of the BraTS 2018-2021 releases and their BraTS 2023 equivalents, in channel order.
BRATS_2023_NAMES = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "seg": "seg"}

BRATS_HELP = (
    "BraTS data is distributed by the challenge organisers (https://www.synapse.org/brats, registration "
    "required); unpack it and pass the folder holding one sub-folder per case as data.root=/path/to/cases."
)
MSD_HELP = (
    "Medical Segmentation Decathlon tasks are published at http://medicaldecathlon.com; unpack a task and "
    "pass the folder holding dataset.json as data.root=/path/to/TaskXX_Name."
)

CaseRecord = dict[str, Any]


class DatasetError(ValueError):
    """A dataset on disk is missing, empty or malformed; the message names the path and the fix."""


def _find_nifti(folder: Path, stem: str) -> Path | None:
    for suffix in NIFTI_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def brats_file(folder: Path, case: str, modality: str) -> Path | None:
    """The file of one modality of a case, in 2018-2021 (``CASE_t1``) or 2023 (``CASE-t1n``) naming."""
    found = _find_nifti(folder, f"{case}_{modality}")
    if found is None and modality in BRATS_2023_NAMES:
        found = _find_nifti(folder, f"{case}-{BRATS_2023_NAMES[modality]}")
    return found


def find_brats_cases(
    root: str | Path,
    modalities: tuple[str, ...] | list[str] = ("t1", "t1ce", "t2", "flair"),
    require_label: bool = True,
) -> list[CaseRecord]:
    """Cases of a BraTS-layout folder: one sub-folder per case holding ``CASE_<modality>.nii.gz`` files.

    Both the 2018-2021 naming (``_t1``, ``_t1ce``, ``_t2``, ``_flair``, ``_seg``) and the 2023 naming
    (``-t1n``, ``-t1c``, ``-t2w``, ``-t2f``, ``-seg``) are accepted; channels come in the order of
    ``modalities`` whatever the naming.

    Args:
        root: folder holding one sub-folder per case.
        modalities: modality names (2018-2021 naming) in channel order.
        require_label: raise if a case has no ``_seg`` file (training); when False such cases get
            ``label=None`` (inference on test sets).

    Returns:
        Case records sorted by case id.

    Raises:
        DatasetError: ``root`` does not exist, holds no case folder, or a case lacks a modality or label.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(f"BraTS data root {str(root)!r} does not exist or is not a folder. {BRATS_HELP}")
    cases: list[CaseRecord] = []
    problems: list[str] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        case = folder.name
        images = [brats_file(folder, case, m) for m in modalities]
        label = brats_file(folder, case, "seg")
        missing = [m for m, f in zip(modalities, images) if f is None]
        if missing:
            problems.append(f"{folder}: missing modality file(s) {missing} (expected {case}_<modality>.nii.gz)")
            continue
        if label is None and require_label:
            problems.append(f"{folder}: missing label file {case}_seg.nii.gz")
            continue
        cases.append({"case": case, "image": [str(f) for f in images], "label": str(label) if label else None})
    if problems:
        raise DatasetError(f"BraTS data root {str(root)!r} has {len(problems)} incomplete case(s):\n  " + "\n  ".join(problems))
    if not cases:
        raise DatasetError(f"BraTS data root {str(root)!r} holds no case folders. {BRATS_HELP}")
    return cases


def _resolve(base: Path, entry: str, json_path: Path, what: str) -> str:
    path = (base / entry).resolve() if not Path(entry).is_absolute() else Path(entry)
    if not path.is_file():
        raise DatasetError(f"{json_path}: {what} {entry!r} points to missing file {str(path)!r}")
    return str(path)


def read_msd_datalist(
    root: str | Path,
    section: Literal["training", "test"] = "training",
    require_label: bool = True,
) -> list[CaseRecord]:
    """Cases of a Medical Segmentation Decathlon dataset described by ``root/dataset.json``.

    Paths in the json are relative to the folder holding it. An ``image`` entry may be one file (its
    channels are then split by the loader if the file is 4D) or a list of per-modality files.

    Args:
        root: the task folder holding ``dataset.json`` (or the json file itself).
        section: ``"training"`` (entries with ``image`` and ``label``) or ``"test"`` (images only).
        require_label: raise if a training entry has no label.

    Returns:
        Case records in the json's order; the case id is the image file name without extension.

    Raises:
        DatasetError: missing or malformed json, an empty section, or entries pointing to missing files.
    """
    root = Path(root).expanduser()
    json_path = root if root.suffix == ".json" else root / "dataset.json"
    if not json_path.is_file():
        raise DatasetError(f"MSD data root {str(root)!r}: no dataset.json found at {str(json_path)!r}. {MSD_HELP}")
    try:
        meta = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{json_path}: malformed JSON ({err})") from err
    entries = meta.get(section) if isinstance(meta, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DatasetError(f"{json_path}: expected a non-empty list under {section!r}, got {type(entries).__name__}")
    base = json_path.parent
    cases: list[CaseRecord] = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):  # MSD test lists are plain paths
            entry = {"image": entry}
        if not isinstance(entry, dict) or "image" not in entry:
            raise DatasetError(f"{json_path}: {section}[{i}] has no 'image' entry")
        image_entries = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
        images = [_resolve(base, e, json_path, f"{section}[{i}].image") for e in image_entries]
        label = entry.get("label")
        if label is None and require_label and section == "training":
            raise DatasetError(f"{json_path}: {section}[{i}] ({image_entries[0]}) has no 'label' entry")
        label_path = _resolve(base, label, json_path, f"{section}[{i}].label") if label else None
        cases.append({"case": entry.get("case"), "image": images, "label": label_path})
    _assign_case_ids(cases, base)
    ids = [c["case"] for c in cases]
    duplicates = sorted({c for c in ids if ids.count(c) > 1})
    if duplicates:
        raise DatasetError(f"{json_path}: duplicate case ids {duplicates[:5]}")
    return cases


def _strip_nifti_suffix(name: str) -> str:
    for suffix in NIFTI_SUFFIXES:
        name = name.removesuffix(suffix)
    return name


def _assign_case_ids(cases: list[CaseRecord], base: Path) -> None:
    """Case ids from the first image's file name (``hippocampus_001``), or from its folder when file names
    repeat across cases (``patient07/flair.nii.gz``), unless the json gives an explicit ``case``."""
    first = [Path(c["image"][0]) for c in cases]
    stems = [_strip_nifti_suffix(p.name) for p in first]
    if len(set(stems)) < len(stems):
        stems = [str(p.parent.relative_to(base)) if p.parent.is_relative_to(base) else p.parent.name for p in first]
    for case, stem in zip(cases, stems):
        case["case"] = case["case"] or stem


def find_cases(layout: Literal["brats", "msd"], root: str | Path, **kwargs: Any) -> list[CaseRecord]:
    """Dispatch to :func:`find_brats_cases` or :func:`read_msd_datalist` by layout name."""
    if layout == "brats":
        return find_brats_cases(root, **kwargs)
    if layout == "msd":
        kwargs.pop("modalities", None)  # MSD lists its channels in dataset.json
        return read_msd_datalist(root, **kwargs)
    raise ValueError(f"expected data.layout to be 'brats' or 'msd', got {layout!r}")


def find_label_files(root: str | Path) -> dict[str, str]:
    """Reference label files by case id, for evaluation.

    ``root`` may be an MSD task (``dataset.json``: its training labels), a BraTS-layout tree (``CASE/CASE_seg``)
    or a flat folder of ``<case>.nii.gz`` label files.

    Raises:
        DatasetError: ``root`` is missing or holds no label file.
    """
    root = Path(root).expanduser().resolve()
    if root.suffix == ".json" or (root / "dataset.json").is_file():
        return {c["case"]: c["label"] for c in read_msd_datalist(root) if c["label"]}
    if not root.is_dir():
        raise DatasetError(f"reference folder {str(root)!r} does not exist or is not a folder")
    labels = {}
    for path in sorted(root.iterdir()):
        if path.is_dir() and (seg := brats_file(path, path.name, "seg")) is not None:
            labels[path.name] = str(seg)
        elif path.is_file() and path.name.endswith(NIFTI_SUFFIXES) and not path.name.startswith("."):
            labels[_strip_nifti_suffix(path.name)] = str(path)
    if not labels:
        raise DatasetError(f"reference folder {str(root)!r} holds no label files (<case>.nii.gz, CASE/CASE_seg.nii.gz or dataset.json)")
    return labels
