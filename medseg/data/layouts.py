"""Dataset layouts: find the cases of a BraTS folder tree or a Medical Segmentation Decathlon dataset.

Each reader returns a list of *case records*, the dictionaries MONAI's dictionary transforms consume::

    {"case": "BraTS2021_00000", "image": [t1, t1ce, t2, flair], "label": seg}

``image`` is always a list of per-channel files (one entry per modality, in the configured order) and
``label`` is ``None`` for cases without a reference segmentation (test sets).

The ``find_*``/``read_*`` readers raise :class:`DatasetError` listing every problem at once; the ``scan_*``
functions under them return the cases together with the problems (:class:`LayoutProblem`), for the
dataset check (:mod:`medseg.data.check`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

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
DATA_HELP = {"brats": BRATS_HELP, "msd": MSD_HELP}  # per data.layout: where to get the data

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


class LayoutProblem(NamedTuple):
    """A problem found while listing a dataset's cases.

    Attributes:
        case: the case id, or ``None`` for a problem of the whole dataset (missing root, bad ``dataset.json``).
        path: the file or folder at fault (for ``dataset.json`` entries: the json file).
        message: what is wrong and, where useful, how to fix it.
    """

    case: str | None
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def _raise_for(problems: list[LayoutProblem], what: str) -> None:
    """Raise one :class:`DatasetError` listing every problem (one line each), if there are any."""
    if len(problems) == 1:
        raise DatasetError(str(problems[0]))
    if problems:
        raise DatasetError(f"{what} has {len(problems)} problems:\n  " + "\n  ".join(str(p) for p in problems))


def scan_brats_cases(
    root: str | Path,
    modalities: Sequence[str] = ("t1", "t1ce", "t2", "flair"),
    require_label: bool = True,
) -> tuple[list[CaseRecord], list[LayoutProblem]]:
    """Every case folder of a BraTS-layout root and every problem found listing them, without raising.

    Args:
        root: folder holding one sub-folder per case.
        modalities: modality names (2018-2021 naming) in channel order.
        require_label: a case without a ``_seg`` file is a problem (training data).

    Returns:
        Case records sorted by case id, incomplete ones included: a missing file is ``None`` in ``image``
        or ``label``. The problems: a missing root, no case folder, one per missing file.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        return [], [LayoutProblem(None, str(root), f"BraTS data root does not exist or is not a folder. {BRATS_HELP}")]
    cases: list[CaseRecord] = []
    problems: list[LayoutProblem] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        case = folder.name
        images = [brats_file(folder, case, m) for m in modalities]
        label = brats_file(folder, case, "seg")
        # Name a missing file in the naming the case's other files use.
        naming_2023 = any(f is not None and f.name.startswith(f"{case}-") for f in [*images, label])
        expected = {m: f"{case}-{BRATS_2023_NAMES.get(m, m)}.nii.gz" if naming_2023 else f"{case}_{m}.nii.gz" for m in [*modalities, "seg"]}
        for modality, found in zip(modalities, images):
            if found is None:
                problems.append(LayoutProblem(case, str(folder / expected[modality]), f"missing modality file {modality!r} (expected {expected[modality]})"))
        if label is None and require_label:
            problems.append(LayoutProblem(case, str(folder / expected["seg"]), f"missing label file (expected {expected['seg']})"))
        cases.append({"case": case, "image": [str(f) if f else None for f in images], "label": str(label) if label else None})
    if not cases:
        problems.append(LayoutProblem(None, str(root), f"BraTS data root holds no case folders (expected one sub-folder per case). {BRATS_HELP}"))
    return cases, problems


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
        DatasetError: ``root`` does not exist, holds no case folder, or cases lack modality or label
            files (every missing file is listed).
    """
    cases, problems = scan_brats_cases(root, modalities, require_label)
    _raise_for(problems, f"BraTS data root {str(Path(root).expanduser().resolve())!r}")
    return cases


def _resolve(base: Path, entry: str) -> Path:
    return (base / entry).resolve() if not Path(entry).is_absolute() else Path(entry)


def scan_msd_datalist(
    root: str | Path,
    section: Literal["training", "test"] = "training",
    require_label: bool = True,
) -> tuple[list[CaseRecord], list[LayoutProblem]]:
    """Every case listed in an MSD ``dataset.json`` and every problem found reading it, without raising.

    Args:
        root: the task folder holding ``dataset.json`` (or the json file itself).
        section: ``"training"`` (entries with ``image`` and ``label``) or ``"test"`` (images only).
        require_label: a training entry without a label is a problem.

    Returns:
        Case records in the json's order (entries without a usable ``image`` are left out); a file the
        json points to that does not exist is ``None`` in ``image`` or ``label``. The problems: a missing
        or malformed json, an empty section, malformed entries, missing files, duplicate case ids.
    """
    root = Path(root).expanduser()
    json_path = root if root.suffix == ".json" else root / "dataset.json"
    if not json_path.is_file():
        return [], [LayoutProblem(None, str(json_path), f"no dataset.json found in MSD data root {str(root)!r}. {MSD_HELP}")]
    try:
        meta = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return [], [LayoutProblem(None, str(json_path), f"malformed JSON ({err})")]
    entries = meta.get(section) if isinstance(meta, dict) else None
    if not isinstance(entries, list) or not entries:
        got = "an empty list" if isinstance(entries, list) else type(entries).__name__
        return [], [LayoutProblem(None, str(json_path), f"expected a non-empty list under {section!r}, got {got}")]
    base = json_path.parent
    cases: list[CaseRecord] = []
    entry_problems: list[list[str]] = []  # per case; the case ids are known only once all are listed
    problems: list[LayoutProblem] = []
    for i, entry in enumerate(entries):
        where = f"{section}[{i}]"
        if isinstance(entry, str):  # MSD test lists are plain paths
            entry = {"image": entry}
        image = entry.get("image") if isinstance(entry, dict) else None
        image_entries = image if isinstance(image, list) else [image]
        if not image_entries or not all(isinstance(e, str) and e for e in image_entries):
            problems.append(LayoutProblem(None, str(json_path), f"{where}: expected an 'image' path or list of paths, got {image!r}"))
            continue
        found: list[str] = []
        for e in image_entries:
            path = _resolve(base, e)
            if not path.is_file():
                found.append(f"{where}.image {e!r} points to missing file {str(path)!r}")
        label = entry.get("label")
        label_path = _resolve(base, label) if isinstance(label, str) and label else None
        if label is None and require_label and section == "training":
            found.append(f"{where} ({image_entries[0]}) has no 'label' entry")
        elif label is not None and label_path is None:
            found.append(f"{where}: expected a 'label' path, got {label!r}")
        elif label_path is not None and not label_path.is_file():
            found.append(f"{where}.label {label!r} points to missing file {str(label_path)!r}")
        case = entry.get("case")
        cases.append({"case": str(case) if case else None, "image": [str(_resolve(base, e)) for e in image_entries], "label": str(label_path) if label_path else None, "_entry": where})
        entry_problems.append(found)
    _assign_case_ids(cases, base)
    first_entry: dict[str, str] = {}
    for case, found in zip(cases, entry_problems):
        problems.extend(LayoutProblem(case["case"], str(json_path), message) for message in found)
        where = case.pop("_entry")
        if case["case"] in first_entry:
            problems.append(LayoutProblem(case["case"], str(json_path), f"duplicate case id {case['case']!r} ({first_entry[case['case']]} and {where})"))
        first_entry.setdefault(case["case"], where)
        case["image"] = [f if Path(f).is_file() else None for f in case["image"]]
        if case["label"] is not None and not Path(case["label"]).is_file():
            case["label"] = None
    return cases, problems


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
        DatasetError: missing or malformed json, an empty section, malformed entries, entries pointing to
            missing files or duplicate case ids (every problem is listed).
    """
    cases, problems = scan_msd_datalist(root, section, require_label)
    json_path = Path(root).expanduser()
    _raise_for(problems, str(json_path if json_path.suffix == ".json" else json_path / "dataset.json"))
    return cases


def _strip_nifti_suffix(name: str) -> str:
    for suffix in NIFTI_SUFFIXES:
        name = name.removesuffix(suffix)
    return name


def _assign_case_ids(cases: list[CaseRecord], base: Path) -> None:
    """Case ids from the first image's file name (``hippocampus_001``), or from its folder when file names
    repeat across cases (``patient07/flair.nii.gz``) and the folders tell more cases apart, unless the json
    gives an explicit ``case``."""
    first = [Path(c["image"][0]) for c in cases]
    stems = [_strip_nifti_suffix(p.name) for p in first]
    if len(set(stems)) < len(stems):
        folders = [str(p.parent.relative_to(base)) if p.parent.is_relative_to(base) else p.parent.name for p in first]
        # A case listed twice repeats its file name, but is no reason to name every case by its folder.
        if len(set(folders)) > len(set(stems)):
            stems = folders
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


def scan_cases(layout: Literal["brats", "msd"], root: str | Path, modalities: Sequence[str] = ("t1", "t1ce", "t2", "flair")) -> tuple[list[CaseRecord], list[LayoutProblem]]:
    """Dispatch to :func:`scan_brats_cases` or :func:`scan_msd_datalist` (training section) by layout name."""
    if layout == "brats":
        return scan_brats_cases(root, modalities)
    if layout == "msd":
        return scan_msd_datalist(root)
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
