"""What every dataset layout implements, the case records they return, and the registry of layouts.

A *layout* knows how one on-disk convention names its files: it lists the training cases of a root, the cases
of a folder to predict, the reference label files for evaluation, and what ``dataset.json`` (where there is one)
says about channels and labels. Each lives in its own module of this package and registers itself with
:func:`register`; the rest of medseg asks :func:`get_layout` by the ``data.layout`` name and never branches on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

NIFTI_SUFFIXES = (".nii.gz", ".nii")

CaseRecord = dict[str, Any]  # {"case": id, "image": [one file per channel], "label": file or None}


class DatasetError(ValueError):
    """A dataset on disk is missing, empty or malformed; the message names the path and the fix."""


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


class InputCases(NamedTuple):
    """The cases a prediction ``input`` names, the folders the output must differ from, and a dataset root the
    output must stay outside of (a BraTS root: a folder inside it would look like a case folder to later runs)."""

    cases: list[CaseRecord]
    folders: list[Path]
    enclosing_root: Path | None = None


def raise_for(problems: list[LayoutProblem], what: str) -> None:
    """Raise one :class:`DatasetError` listing every problem (one line each), if there are any."""
    if len(problems) == 1:
        raise DatasetError(str(problems[0]))
    if problems:
        raise DatasetError(f"{what} has {len(problems)} problems:\n  " + "\n  ".join(str(p) for p in problems))


def find_nifti(folder: Path, stem: str) -> Path | None:
    """``folder/stem.nii.gz`` or ``folder/stem.nii``, whichever exists."""
    for suffix in NIFTI_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def strip_nifti_suffix(name: str) -> str:
    for suffix in NIFTI_SUFFIXES:
        name = name.removesuffix(suffix)
    return name


def nifti_files(folder: Path) -> list[Path]:
    """The NIfTI files of a folder (not hidden ones), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(NIFTI_SUFFIXES) and not p.name.startswith("."))


def image_folders(cases: list[CaseRecord]) -> list[Path]:
    """Every folder holding an image file of ``cases``."""
    return sorted({Path(f).resolve().parent for c in cases for f in c["image"] if f})


class Layout:
    """One dataset layout. Subclasses set ``name`` and ``help`` and implement :meth:`scan`; the other methods
    have defaults that suit a layout without them.

    Attributes:
        name: the ``data.layout`` value (and the ``conf/data/<name>.yaml`` group option).
        help: where to get such data and what to pass as ``data.root`` (shown when the root is missing).
        modalities_name_files: ``data.modalities`` chooses which files are read (so it is part of the cache key).
        input_order: layouts that recognise their inputs surely (a ``dataset.json``) go before catch-alls.
    """

    name: ClassVar[str]
    help: ClassVar[str]
    modalities_name_files: ClassVar[bool] = False
    input_order: ClassVar[int] = 50  # when a prediction input is matched against the layouts: lower first; below 50: sure

    def scan(self, root: str | Path, modalities: Sequence[str] = (), require_label: bool = True) -> tuple[list[CaseRecord], list[LayoutProblem]]:
        """Every training case of ``root`` and every problem found listing them, without raising.

        Returns:
            Case records (a missing file is ``None`` in ``image`` or ``label``) and the problems.
        """
        raise NotImplementedError

    def find_cases(self, root: str | Path, modalities: Sequence[str] = (), require_label: bool = True) -> list[CaseRecord]:
        """The training cases of ``root``.

        Raises:
            DatasetError: listing every problem :meth:`scan` found.
        """
        cases, problems = self.scan(root, modalities, require_label)
        raise_for(problems, f"{self.name} data root {str(Path(root).expanduser())!r}")
        return cases

    def input_cases(self, path: Path, modalities: Sequence[str], section: str) -> InputCases | None:
        """The cases to predict when ``path`` (a resolved folder or json) is this layout's, else ``None``.

        Args:
            section: ``"auto"``, ``"test"`` or ``"training"``: which cases of a whole dataset to predict.
        """
        return None

    def label_files(self, root: Path) -> dict[str, str] | None:
        """Reference label files by case id when ``root`` is this layout's, else ``None`` (evaluation)."""
        return None

    def reference_folders(self, root: Path) -> list[Path]:
        """The folders holding ``root``'s reference labels when ``root`` is this layout's, else ``[]``: prediction
        refuses to write into them. By default, the folders of :meth:`label_files`."""
        try:
            labels = self.label_files(root)
        except (DatasetError, OSError, ValueError):  # a malformed dataset: nothing to say about its labels here
            return []
        return sorted({Path(f).resolve().parent for f in (labels or {}).values()})

    def channel_names(self, root: str | Path | None, modalities: Sequence[str], count: int) -> list[str]:
        """Display names of a case's ``count`` channels."""
        names = [str(m) for m in modalities]
        return names if len(names) == count else [f"channel {i}" for i in range(count)]

    def declared_modality(self, root: str | Path) -> str | None:
        """Channel 0's modality as the dataset states it (``dataset.json``), if it does."""
        return None

    def metadata(self, root: str | Path) -> dict[str, Any]:
        """Config values the dataset itself states (``${medseg.layout_meta:layout,root,key}``)."""
        raise DatasetError(f"data.layout={self.name} reads no settings from the dataset; set them in conf/data/{self.name}.yaml or on the command line")


LAYOUTS: dict[str, Layout] = {}


def register(layout: type[Layout]) -> type[Layout]:
    """Class decorator: make a layout available as ``data.layout=<its name>``."""
    LAYOUTS[layout.name] = layout()
    return layout


def get_layout(name: str) -> Layout:
    """The layout registered as ``name``.

    Raises:
        ValueError: no such layout (the message lists the known ones).
    """
    if name not in LAYOUTS:
        raise ValueError(f"expected data.layout to be one of {sorted(LAYOUTS)}, got {name!r}")
    return LAYOUTS[name]
