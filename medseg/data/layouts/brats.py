"""The BraTS layout: one folder per case holding ``CASE_<modality>.nii.gz`` files (2018-2021 or 2023 naming)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from medseg.data.layouts.base import CaseRecord, InputCases, Layout, LayoutProblem, find_nifti, image_folders, raise_for, register

# Modality names of the BraTS 2018-2021 releases and their BraTS 2023 equivalents, in channel order.
BRATS_2023_NAMES = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "seg": "seg"}
DEFAULT_MODALITIES = ("t1", "t1ce", "t2", "flair")

BRATS_HELP = (
    "BraTS data is distributed by the challenge organisers (https://www.synapse.org/brats, registration "
    "required); unpack it and pass the folder holding one sub-folder per case as data.root=/path/to/cases."
)


def brats_file(folder: Path, case: str, modality: str) -> Path | None:
    """The file of one modality of a case, in 2018-2021 (``CASE_t1``) or 2023 (``CASE-t1n``) naming."""
    found = find_nifti(folder, f"{case}_{modality}")
    if found is None and modality in BRATS_2023_NAMES:
        found = find_nifti(folder, f"{case}-{BRATS_2023_NAMES[modality]}")
    return found


def scan_brats_cases(root: str | Path, modalities: Sequence[str] = DEFAULT_MODALITIES, require_label: bool = True) -> tuple[list[CaseRecord], list[LayoutProblem]]:
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


def find_brats_cases(root: str | Path, modalities: Sequence[str] = DEFAULT_MODALITIES, require_label: bool = True) -> list[CaseRecord]:
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
    raise_for(problems, f"BraTS data root {str(Path(root).expanduser().resolve())!r}")
    return cases


def brats_case_id(file_name: str, modalities: Sequence[str]) -> str | None:
    """``BraTS_001_t1`` -> ``BraTS_001`` (a known modality suffix in either naming dropped), else ``None``."""
    for modality in modalities:
        for tail in (f"_{modality}", f"-{BRATS_2023_NAMES.get(modality, modality)}"):
            if file_name.endswith(tail) and len(file_name) > len(tail):
                return file_name.removesuffix(tail)
    return None


@register
class BratsLayout(Layout):
    """``root/CASE/CASE_{t1,t1ce,t2,flair,seg}.nii.gz``; ``data.modalities`` names the channels' files."""

    name = "brats"
    help = BRATS_HELP
    modalities_name_files = True
    input_order = 90  # any folder could be a BraTS root: the last resort

    def scan(self, root: str | Path, modalities: Sequence[str] = DEFAULT_MODALITIES, require_label: bool = True) -> tuple[list[CaseRecord], list[LayoutProblem]]:
        return scan_brats_cases(root, modalities or DEFAULT_MODALITIES, require_label)

    def find_cases(self, root: str | Path, modalities: Sequence[str] = DEFAULT_MODALITIES, require_label: bool = True) -> list[CaseRecord]:
        return find_brats_cases(root, modalities or DEFAULT_MODALITIES, require_label)

    def input_cases(self, path: Path, modalities: Sequence[str], section: str) -> InputCases | None:
        if not path.is_dir():
            return None
        modalities = modalities or DEFAULT_MODALITIES
        images = [brats_file(path, path.name, m) for m in modalities]
        if all(images):  # one case folder
            return InputCases([{"case": path.name, "image": [str(f) for f in images], "label": None}], [path])
        cases = find_brats_cases(path, modalities, require_label=False)
        return InputCases(cases, [path, *image_folders(cases)], enclosing_root=path)

    def label_files(self, root: Path) -> dict[str, str] | None:
        labels = {p.name: str(seg) for p in sorted(root.iterdir()) if p.is_dir() and (seg := brats_file(p, p.name, "seg")) is not None}
        return labels or None
