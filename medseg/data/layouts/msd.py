"""The Medical Segmentation Decathlon layout: ``TaskXX_Name/dataset.json`` listing ``imagesTr/`` and ``labelsTr/`` files."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from medseg.data.layouts.base import CaseRecord, InputCases, Layout, LayoutProblem, image_folders, raise_for, register, strip_nifti_suffix

MSD_HELP = (
    "Medical Segmentation Decathlon tasks are published at http://medicaldecathlon.com; unpack a task and "
    "pass the folder holding dataset.json as data.root=/path/to/TaskXX_Name."
)


def dataset_json_path(root: str | Path) -> Path:
    """``root/dataset.json``, or ``root`` itself when it is the json file."""
    root = Path(root).expanduser()
    return root if root.suffix == ".json" else root / "dataset.json"


def read_dataset_json(root: str | Path) -> dict[str, Any] | None:
    """The parsed ``dataset.json`` of ``root``, or ``None`` when it is missing or not a JSON object."""
    try:
        meta = json.loads(dataset_json_path(root).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


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
    raise_for(problems, str(json_path if json_path.suffix == ".json" else json_path / "dataset.json"))
    return cases


def _assign_case_ids(cases: list[CaseRecord], base: Path) -> None:
    """Case ids from the first image's file name (``hippocampus_001``), or from its folder when file names
    repeat across cases (``patient07/flair.nii.gz``) and the folders tell more cases apart, unless the json
    gives an explicit ``case``."""
    first = [Path(c["image"][0]) for c in cases]
    stems = [strip_nifti_suffix(p.name) for p in first]
    if len(set(stems)) < len(stems):
        folders = [str(p.parent.relative_to(base)) if p.parent.is_relative_to(base) else p.parent.name for p in first]
        # A case listed twice repeats its file name, but is no reason to name every case by its folder.
        if len(set(folders)) > len(set(stems)):
            stems = folders
    for case, stem in zip(cases, stems):
        case["case"] = case["case"] or stem


def msd_section(path: Path, data_section: str) -> str:
    """``auto``: ``test`` when dataset.json lists test images, else ``training``."""
    if data_section != "auto":
        return data_section
    meta = read_dataset_json(path)
    if meta is None:
        return "test"  # read_msd_datalist reports the problem with its own message
    return "test" if meta.get("test") else "training"


@register
class MsdLayout(Layout):
    """``dataset.json`` with ``training`` (and ``test``) lists of paths relative to it."""

    name = "msd"
    help = MSD_HELP
    input_order = 40

    def scan(self, root: str | Path, modalities: Sequence[str] = (), require_label: bool = True) -> tuple[list[CaseRecord], list[LayoutProblem]]:
        return scan_msd_datalist(root, require_label=require_label)

    def find_cases(self, root: str | Path, modalities: Sequence[str] = (), require_label: bool = True) -> list[CaseRecord]:
        return read_msd_datalist(root, require_label=require_label)  # MSD lists its channels in dataset.json

    def input_cases(self, path: Path, modalities: Sequence[str], section: str) -> InputCases | None:
        if not (path.suffix == ".json" or (path / "dataset.json").is_file()):
            return None
        cases = read_msd_datalist(path, section=msd_section(path, section), require_label=False)
        return InputCases(cases, [path.parent if path.suffix == ".json" else path, *image_folders(cases)])

    def label_files(self, root: Path) -> dict[str, str] | None:
        if not (root.suffix == ".json" or (root / "dataset.json").is_file()):
            return None
        return {c["case"]: c["label"] for c in read_msd_datalist(root) if c["label"]}

    def reference_folders(self, root: Path) -> list[Path]:
        if not (root.suffix == ".json" or (root / "dataset.json").is_file()):
            return []
        base = root.parent if root.suffix == ".json" else root
        # The listed label files' folders, and labelsTr/labelsTs whatever the list says (a test list has no labels).
        return sorted({*super().reference_folders(root), *((base / f).resolve() for f in ("labelsTr", "labelsTs") if (base / f).is_dir())})

    def declared_modality(self, root: str | Path) -> str | None:
        modality = (read_dataset_json(root) or {}).get("modality") or {}
        return str(modality["0"]) if isinstance(modality, dict) and "0" in modality else None

    def channel_names(self, root: str | Path | None, modalities: Sequence[str], count: int) -> list[str]:
        modality = (read_dataset_json(root) or {}).get("modality") if root else None
        if isinstance(modality, dict) and len(modality) == count:
            return [str(modality.get(str(i), f"channel {i}")) for i in range(count)]
        return super().channel_names(root, modalities, count)
