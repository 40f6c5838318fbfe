"""Atomic file writers: every file the package writes goes to a temporary file in the target's folder, then
``os.replace`` puts it in place, so a reader (another process, a resumed job, a glob) sees the old file or the
whole new one, never half a file, and a writer killed halfway leaves the previous file intact.

:func:`atomic_path` is the one mechanism; the ``write_*_atomic`` functions are the formats the package writes.
Heavy libraries (NumPy, nibabel, torch) are imported inside the functions that need them, so that importing
this module costs nothing to the command-line tools that only write JSON or text.
"""

from __future__ import annotations

import csv
import io
import json
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import nibabel as nib
    import numpy as np
    from matplotlib.figure import Figure

# Extensions a writer may choose the file format from (kept at the end of the temporary name with keep_suffix).
_DOUBLE_SUFFIXES = (".nii.gz",)


@contextmanager
def atomic_path(path: str | os.PathLike, keep_suffix: bool = False, fsync: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed to ``path`` when the block ends without error.

    The parent folders are created. The temporary file is hidden (leading dot), unique to the process and the
    call (two writers never share one) and removed whatever happens; its name never ends with the target's
    name, so a glob such as ``*_t1.nii.gz`` or ``*.ckpt`` never matches a leftover of a killed process.

    Args:
        path: the file to write.
        keep_suffix: end the temporary name with ``path``'s extension (``.nii.gz``, ``.png``, ``.npz``), for
            writers that choose the format from it (nibabel, matplotlib) or append it (NumPy).
        fsync: flush the temporary file to disk before the rename (checkpoints, cache files: a crash of the
            machine then leaves the old or the new file, not an empty one).

    Yields:
        The temporary path (nothing exists there yet).

    Example::

        with atomic_path(out / "table.npz", keep_suffix=True) as tmp:
            np.savez(tmp, **arrays)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stem, ext = path.name, ""
    if keep_suffix:
        ext = next((s for s in _DOUBLE_SUFFIXES if stem.endswith(s)), path.suffix)
        stem = stem[: len(stem) - len(ext)]
    tmp = path.with_name(f".{stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{ext}")
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str, fsync: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | os.PathLike, payload: Any, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """Write ``payload`` as JSON (``json.dumps(payload, indent=indent, sort_keys=sort_keys)``) atomically."""
    return write_text_atomic(path, json.dumps(payload, indent=indent, sort_keys=sort_keys))


def write_csv_atomic(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Rows (dicts; columns in first-seen order, a missing key an empty cell) as CSV, written atomically."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return write_text_atomic(path, buffer.getvalue())


def write_nifti_atomic(array: np.ndarray, reference: nib.Nifti1Image, path: str | os.PathLike) -> Path:
    """Save ``array`` with the affine and header of ``reference`` atomically.

    Args:
        array: ``(X, Y, Z)`` or ``(X, Y, Z, C)`` whose first three axes are ``reference``'s voxel grid; its
            dtype becomes the file's.
        reference: the image whose affine, sform/qform codes and zooms the file keeps.
        path: ``.nii.gz`` (compressed) or ``.nii``.

    Raises:
        ValueError: the spatial shape differs from ``reference``'s.
    """
    import nibabel as nib

    if tuple(array.shape[:3]) != tuple(reference.shape[:3]):
        raise ValueError(f"expected an array of spatial shape {tuple(reference.shape[:3])} (the input's), got {tuple(array.shape)}")
    header = reference.header.copy()
    header.set_data_dtype(array.dtype)
    image = nib.Nifti1Image(array, reference.affine, header=header)  # sform/qform codes and zooms kept
    with atomic_path(path, keep_suffix=True) as tmp:
        nib.save(image, tmp)
    return Path(path)


def write_torch_atomic(obj: Any, path: str | os.PathLike, fsync: bool = True) -> Path:
    """``torch.save(obj)`` into ``path`` atomically (through an open file, flushed to disk unless ``fsync=False``)."""
    import torch

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as file:
            torch.save(obj, file)
            file.flush()
            if fsync:
                os.fsync(file.fileno())
    return Path(path)


def write_figure_atomic(fig: Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """``fig.savefig`` into ``path`` atomically (the format from ``path``'s extension); the figure stays open."""
    with atomic_path(path, keep_suffix=True) as tmp:
        fig.savefig(tmp, dpi=dpi)
    return Path(path)
