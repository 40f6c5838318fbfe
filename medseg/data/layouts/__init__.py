"""Dataset layouts: find the cases of a dataset on disk, one module per layout.

Each reader returns a list of *case records*, the dictionaries MONAI's dictionary transforms consume::

    {"case": "BraTS2021_00000", "image": [t1, t1ce, t2, flair], "label": seg}

``image`` is always a list of per-channel files (one entry per modality, in the configured order) and
``label`` is ``None`` for cases without a reference segmentation (test sets).

Layouts (``data.layout``): ``brats`` (:mod:`.brats`), ``msd`` (:mod:`.msd`), ``nnunet`` (:mod:`.nnunet`) and
``folder`` (:mod:`.folder`). A new layout is one module here that subclasses :class:`Layout` and decorates it
with :func:`register` (every module of this package is imported), plus ``conf/data/<name>.yaml``.

The ``find_*``/``read_*`` readers raise :class:`DatasetError` listing every problem at once; the ``scan_*``
functions under them return the cases together with the problems (:class:`LayoutProblem`), for the
dataset check (:mod:`medseg.data.check`).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medseg.config import ConfigError
from medseg.data.layouts.base import (
    LAYOUTS,
    NIFTI_SUFFIXES,
    CaseRecord,
    DatasetError,
    InputCases,
    Layout,
    LayoutProblem,
    get_layout,
    image_folders,
    nifti_files,
    register,
    strip_nifti_suffix,
)

for _module in pkgutil.iter_modules(__path__):  # every layout module registers itself
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

from medseg.data.layouts.brats import BRATS_2023_NAMES, brats_case_id, brats_file, find_brats_cases, scan_brats_cases  # noqa: E402
from medseg.data.layouts.msd import read_msd_datalist, scan_msd_datalist  # noqa: E402

SURE_INPUT_ORDER = 50
DATA_HELP = {name: layout.help for name, layout in LAYOUTS.items()}  # per data.layout: where to get the data

__all__ = [
    "reference_label_folders",
    "BRATS_2023_NAMES", "DATA_HELP", "LAYOUTS", "NIFTI_SUFFIXES", "CaseRecord", "DatasetError", "InputCases", "Layout", "LayoutProblem",
    "brats_file", "find_brats_cases", "find_cases", "find_input_cases", "find_label_files", "get_layout", "layout_metadata",
    "read_msd_datalist", "register", "scan_brats_cases", "scan_cases", "scan_msd_datalist",
]


def find_cases(layout: str, root: str | Path, modalities: Sequence[str] = (), require_label: bool = True) -> list[CaseRecord]:
    """The training cases of ``root`` in the layout named ``layout`` (raises :class:`DatasetError` listing every problem)."""
    return get_layout(layout).find_cases(root, tuple(modalities), require_label)


def scan_cases(layout: str, root: str | Path, modalities: Sequence[str] = ()) -> tuple[list[CaseRecord], list[LayoutProblem]]:
    """The training cases of ``root`` and every problem found listing them, without raising."""
    return get_layout(layout).scan(root, tuple(modalities))


def layout_metadata(layout: str, root: str | Path, key: str) -> Any:
    """One config value the dataset states itself, by dotted key (``${medseg.layout_meta:${data.layout},${data.root},labels.mode}``)."""
    value: Any = get_layout(layout).metadata(root)
    for part in key.split("."):  # labels.mode
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"data.layout={layout} reads no {key!r} from the dataset")
        value = value[part]
    return value


def find_input_cases(source: Any, modalities: Sequence[str], data_section: str = "auto", layout: str | None = None) -> InputCases:
    """The cases named by a prediction's ``input``, and the folders they live in.

    Args:
        source: one NIfTI file, a list of NIfTI files forming one case's channels, or a folder or ``dataset.json``
            of any layout (a whole dataset, an images folder such as nnU-Net's ``imagesTs/``, a BraTS case folder).
        modalities: the checkpoint's ``data.modalities`` (channel files of the BraTS and folder layouts).
        data_section: for whole datasets: ``"test"``, ``"training"`` or ``"auto"`` (test cases if there are any).
        layout: the checkpoint's ``data.layout``: tried after the layouts that recognise their inputs for sure
            (``input_order`` below ``SURE_INPUT_ORDER``: a ``dataset.json``), before the others.

    Returns:
        Case records (``{"case", "image": [files], "label": None}``); the input folders: the folder named by
        ``source`` and every folder holding an image file; a dataset root the output must stay outside of.

    Raises:
        DatasetError: missing paths, incomplete cases, a malformed dataset.json.
        ConfigError: ``data_section`` is not one of the three values.
    """
    if data_section not in ("auto", "test", "training"):
        raise ConfigError(f"expected data_section 'auto', 'test' or 'training', got {data_section!r}")
    if not isinstance(source, (str, Path)) and isinstance(source, Sequence):
        files = [Path(str(f)).expanduser().resolve() for f in source]
        if not files:
            raise DatasetError("input is an empty list; expected one NIfTI file per channel of a case")
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DatasetError(f"input file(s) not found: {missing}")
        stem = strip_nifti_suffix(files[0].name)
        cases = [{"case": brats_case_id(stem, modalities) or stem, "image": [str(f) for f in files], "label": None}]
        return InputCases(cases, image_folders(cases))
    path = Path(str(source)).expanduser().resolve()
    if path.is_file() and path.name.endswith(NIFTI_SUFFIXES):
        return find_input_cases([path], modalities, data_section)
    if not path.exists():
        raise DatasetError(f"input {str(path)!r} does not exist; expected a case folder, a dataset folder of any layout ({', '.join(sorted(LAYOUTS))}) or dataset.json, or NIfTI files")
    # Layouts that recognise their data for sure (a dataset.json) first, then the checkpoint's, then the catch-alls.
    ordered = sorted(LAYOUTS.values(), key=lambda item: (0 if item.input_order < SURE_INPUT_ORDER else 1 if item.name == layout else 2, item.input_order))
    for candidate in ordered:
        found = candidate.input_cases(path, tuple(modalities), data_section)
        if found is not None:
            return found
    raise DatasetError(f"input {str(path)!r} is not a case folder or dataset of any layout ({', '.join(sorted(LAYOUTS))}), nor a NIfTI file")


def reference_label_folders(*paths: str | Path | None) -> list[Path]:
    """Every folder holding reference labels of the datasets at or around ``paths``: for each path (a dataset root,
    its ``dataset.json``, or a folder inside a dataset such as ``imagesTr/``), the label folders every layout
    recognises there and in the folder above (MSD and nnU-Net ``labelsTr``/``labelsTs``, a folder dataset's
    ``labels/``, BraTS case folders). Prediction never writes into one of them."""
    found: set[Path] = set()
    for path in paths:
        if path is None or not str(path):
            continue
        path = Path(path).expanduser().resolve()
        for root in dict.fromkeys([path, path.parent]):
            if root.exists():
                for layout in LAYOUTS.values():
                    found.update(layout.reference_folders(root))
    return sorted(found)


def find_label_files(root: str | Path) -> dict[str, str]:
    """Reference label files by case id, for evaluation.

    ``root`` may be a dataset of any layout (an MSD or nnU-Net task: its training labels; a BraTS tree:
    ``CASE/CASE_seg``; a folder dataset: ``labels/``) or a flat folder of ``<case>.nii.gz`` label files.

    Raises:
        DatasetError: ``root`` is missing or holds no label file.
    """
    root = Path(root).expanduser().resolve()
    if not root.exists():
        raise DatasetError(f"reference folder {str(root)!r} does not exist or is not a folder")
    for layout in sorted(LAYOUTS.values(), key=lambda item: item.input_order):
        labels = layout.label_files(root)
        if labels:
            return labels
    labels = {strip_nifti_suffix(p.name): str(p) for p in nifti_files(root)} if root.is_dir() else {}
    if not labels:
        raise DatasetError(f"reference folder {str(root)!r} holds no label files (<case>.nii.gz, a dataset.json, CASE/CASE_seg.nii.gz or labels/)")
    return labels
