"""The plain folder layout: ``images/`` and ``labels/`` matched by case name.

::

    root/images/CASE.nii.gz                      one channel (data.modalities: [])
    root/images/CASE_t1.nii.gz, CASE_flair.nii.gz  several channels by suffix (data.modalities: [t1, flair])
    root/labels/CASE.nii.gz

The label convention is not stored with the data: set ``data.labels`` (default: one foreground class).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from medseg.data.layouts.base import CaseRecord, InputCases, Layout, LayoutProblem, find_nifti, image_folders, nifti_files, raise_for, register, strip_nifti_suffix

FOLDER_HELP = (
    "A folder dataset holds images/ (CASE.nii.gz, or CASE_<modality>.nii.gz per channel with data.modalities=[...]) "
    "and labels/ (CASE.nii.gz); pass the folder holding both as data.root=/path/to/dataset."
)


def image_cases(folder: Path, modalities: Sequence[str], require_all: bool = True) -> tuple[dict[str, list[Path | None]], list[LayoutProblem]]:
    """The cases of an images folder, each a list of channel files in the order of ``modalities``.

    Returns:
        ``{case: [file or None per channel]}`` sorted by case id and the problems: a file that carries none of
        the ``_<modality>`` suffixes (when there are modalities), a missing channel file (named exactly).
    """
    problems: list[LayoutProblem] = []
    if not modalities:
        return {strip_nifti_suffix(p.name): [p] for p in nifti_files(folder)}, problems
    found: dict[str, dict[str, Path]] = {}
    for path in nifti_files(folder):
        stem = strip_nifti_suffix(path.name)
        # The longest matching suffix, so that t1ce is not taken for t1 + "ce".
        modality = max((m for m in modalities if stem.endswith(f"_{m}") and len(stem) > len(m) + 1), key=len, default=None)
        if modality is None:
            problems.append(LayoutProblem(None, str(path), f"unexpected file name in {folder.name}/ (expected CASE_<modality>.nii.gz with a modality of {list(modalities)})"))
            continue
        found.setdefault(stem.removesuffix(f"_{modality}"), {})[modality] = path
    cases = {}
    for case in sorted(found):
        cases[case] = [found[case].get(m) for m in modalities]
        if require_all:
            for modality in modalities:
                if modality not in found[case]:
                    problems.append(LayoutProblem(case, str(folder / f"{case}_{modality}.nii.gz"), f"missing modality file {modality!r} (expected {case}_{modality}.nii.gz)"))
    return cases, problems


def scan_folder_dataset(root: str | Path, modalities: Sequence[str] = (), require_label: bool = True) -> tuple[list[CaseRecord], list[LayoutProblem]]:
    """Every case of ``root/images`` with its ``root/labels`` file, and every problem found, without raising."""
    root = Path(root).expanduser().resolve()
    images_dir, labels_dir = root / "images", root / "labels"
    if not images_dir.is_dir():
        where = "data root does not exist or is not a folder" if not root.is_dir() else "missing images/ folder"
        return [], [LayoutProblem(None, str(root if not root.is_dir() else images_dir), f"{where}. {FOLDER_HELP}")]
    by_case, problems = image_cases(images_dir, modalities)
    cases = []
    for case, files in by_case.items():
        label = find_nifti(labels_dir, case) if labels_dir.is_dir() else None
        if label is None and require_label:
            problems.append(LayoutProblem(case, str(labels_dir / f"{case}.nii.gz"), f"missing label file (expected labels/{case}.nii.gz)"))
        cases.append({"case": case, "image": [str(f) if f else None for f in files], "label": str(label) if label else None})
    if labels_dir.is_dir():
        for path in nifti_files(labels_dir):
            if strip_nifti_suffix(path.name) not in by_case:
                problems.append(LayoutProblem(strip_nifti_suffix(path.name), str(path), "label file without an image in images/"))
    if not cases:
        problems.append(LayoutProblem(None, str(images_dir), f"images/ holds no NIfTI files. {FOLDER_HELP}"))
    return cases, problems


@register
class FolderLayout(Layout):
    """``root/images/CASE[_<modality>].nii.gz`` and ``root/labels/CASE.nii.gz``."""

    name = "folder"
    help = FOLDER_HELP
    modalities_name_files = True
    input_order = 60

    def scan(self, root: str | Path, modalities: Sequence[str] = (), require_label: bool = True) -> tuple[list[CaseRecord], list[LayoutProblem]]:
        return scan_folder_dataset(root, modalities, require_label)

    def input_cases(self, path: Path, modalities: Sequence[str], section: str) -> InputCases | None:
        folder = path / "images" if (path / "images").is_dir() else path
        if not folder.is_dir() or not nifti_files(folder):
            return None
        by_case, problems = image_cases(folder, modalities)
        if problems and folder == path:
            return None  # a folder of other files: not this layout's
        raise_for(problems, f"images folder {str(folder)!r}")
        cases = [{"case": case, "image": [str(f) for f in files], "label": None} for case, files in by_case.items()]
        return InputCases(cases, [path, folder, *image_folders(cases)])

    def reference_folders(self, root: Path) -> list[Path]:
        return [(root / "labels").resolve()] if (root / "images").is_dir() and (root / "labels").is_dir() else []

    def label_files(self, root: Path) -> dict[str, str] | None:
        if not (root / "images").is_dir() or not (root / "labels").is_dir():
            return None
        return {strip_nifti_suffix(p.name): str(p) for p in nifti_files(root / "labels")} or None
