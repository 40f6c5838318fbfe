"""Dataset check: every problem of a dataset on disk, one line each, before any training starts.

    python -m medseg.data.check +experiment=brats data.root=/path/to/BraTS2021_Training_Data

The cases are listed as training lists them (:mod:`medseg.data.layouts`) and every file is read once.
Errors: missing modality or label files, unreadable or truncated NIfTI, NaN or Inf voxels, an all-zero
image, image and label (or two modalities) with different shapes or affines, label values outside
``data.labels.values`` or non-integer labels, a wrong number of image channels, duplicate case ids, an
empty dataset, a malformed ``dataset.json`` or one pointing to missing files. Warning: a label with
background only where the dataset expects foreground in every case.

What is learnt about each file is cached by (path, size, modification time) in ``data.check.cache_dir``,
so the check that runs before every training reads only new or changed files and otherwise costs one
``stat`` per file. Nothing is written into the dataset.

A folder of DICOM series (``data.root=<folder>``, e.g. scans to predict) is checked as ``medseg.predict`` reads it
(:func:`check_dicom_folder`): one error per series that cannot be read as a volume, naming it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import sys
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import hydra
import nibabel as nib
import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from medseg.config import ConfigError, check_required, register_resolvers, run_without_run_folder
from medseg.data.labels import LabelSpec, label_values_problem
from medseg.data.layouts import DATA_HELP, CaseRecord, DatasetError, scan_cases
from medseg.dicom.series import is_dicom_folder
from medseg.io import write_json_atomic

log = logging.getLogger("medseg")
Severity = Literal["error", "warning"]

CHECK_MODULE = "medseg.data.check"
OPTION_KEYS = ("enabled", "affine_tolerance", "expect_foreground", "num_workers", "cache_dir")
CACHE_VERSION = 1  # bump when VolumeFacts changes, so that older cache files are ignored
MAX_LISTED = 20  # problems quoted in the error that stops training; the check command lists them all
# A label volume has a handful of values; a float image passed as a label has millions, and a few of
# them name the problem as well as all would.
_MAX_VALUES = 64
_BINCOUNT_LIMIT = 1 << 16  # integer labels in [0, limit) are counted (fast) rather than sorted


@dataclass(frozen=True)
class Problem:
    """One finding of the check.

    Attributes:
        severity: ``"error"`` (training would fail or learn from broken data) or ``"warning"``.
        case: the case id, or ``None`` for the dataset as a whole.
        path: the file or folder at fault (``dataset.json`` for problems of its entries).
        message: what is wrong.
    """

    severity: Severity
    case: str | None
    path: str
    message: str

    def format(self) -> str:
        """One line: ``ERROR    BraTS_003  /data/BraTS_003/BraTS_003_seg.nii.gz: unexpected label values [3]; ...``."""
        return f"{self.severity.upper():<7}  {self.case or '-'}  {self.path}: {self.message}"


@dataclass
class DataCheckReport:
    """All problems of one dataset, in case order (problems of the whole dataset first)."""

    layout: str
    root: str
    cases: int = 0
    files: int = 0
    files_read: int = 0  # read this time; the others came from the cache
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def format(self) -> str:
        """One line per problem."""
        return "\n".join(p.format() for p in self.problems)

    def summary(self) -> str:
        return (
            f"{self.cases} case(s), {self.files} file(s) ({self.files_read} read, {self.files - self.files_read} "
            f"unchanged since the last check): {len(self.errors)} error(s), {len(self.warnings)} warning(s)"
        )


@dataclass(frozen=True)
class VolumeFacts:
    """What the check needs to know about one NIfTI file; cached, so independent of the check's options.

    Attributes:
        error: why the file could not be read (``None`` when it could).
        shape: the array shape, e.g. ``(X, Y, Z)`` or ``(X, Y, Z, C)``.
        affine: the 4x4 voxel-to-world matrix (mm).
        nan, inf: voxel counts.
        all_zero: every voxel is 0.
        values: labels only: the distinct finite values in increasing order (at most ``_MAX_VALUES``).
    """

    error: str | None = None
    shape: tuple[int, ...] = ()
    affine: tuple[tuple[float, ...], ...] = ()
    nan: int = 0
    inf: int = 0
    all_zero: bool = False
    values: tuple[float, ...] | None = None

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> VolumeFacts:
        values = d.get("values")
        return cls(
            error=d.get("error"),
            shape=tuple(int(s) for s in d.get("shape", ())),
            affine=tuple(tuple(float(v) for v in row) for row in d.get("affine", ())),
            nan=int(d.get("nan", 0)),
            inf=int(d.get("inf", 0)),
            all_zero=bool(d.get("all_zero", False)),
            values=None if values is None else tuple(float(v) for v in values),
        )


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _distinct_values(data: np.ndarray) -> tuple[float, ...]:
    """Distinct finite values of ``data``, increasing, at most ``_MAX_VALUES``."""
    finite = data[np.isfinite(data)] if data.dtype.kind in "fc" else data.ravel()
    if finite.size == 0:
        return ()
    small = finite.min() >= 0 and finite.max() < _BINCOUNT_LIMIT
    if small and (finite.dtype.kind in "iub" or np.array_equal(finite, np.rint(finite))):
        distinct = np.flatnonzero(np.bincount(finite.astype(np.int64).ravel()))
    else:
        distinct = np.unique(finite)
    return tuple(float(v) for v in distinct[:_MAX_VALUES])


def read_volume(path: str, with_values: bool = False) -> VolumeFacts:
    """Read a whole NIfTI file (a truncated gzip stream fails only when the data are read) and describe it.

    Args:
        path: the ``.nii`` or ``.nii.gz`` file.
        with_values: also collect the distinct values (for label files).
    """
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)  # (4, 4)
    except Exception as err:  # any failure to read is a finding, not a crash
        return VolumeFacts(error=_one_line(err))
    nan = inf = 0
    if data.dtype.kind in "fc" and not np.isfinite(data).all():
        nan, inf = int(np.isnan(data).sum()), int(np.isinf(data).sum())
    return VolumeFacts(
        shape=tuple(int(s) for s in data.shape),
        affine=tuple(tuple(float(v) for v in row) for row in affine),
        nan=nan,
        inf=inf,
        all_zero=not np.any(data),
        values=_distinct_values(data) if with_values else None,
    )


class FactsCache:
    """Per-file :class:`VolumeFacts` in one JSON file per dataset root, valid while size and mtime are unchanged.

    Args:
        cache_dir: folder of the cache files; ``None`` disables caching.
        root: the dataset root (names the cache file).
    """

    def __init__(self, cache_dir: str | Path | None, root: str | Path) -> None:
        self.path: Path | None = None
        self._old: dict[str, Any] = {}
        self._new: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.reads = 0
        if cache_dir is None:
            return
        root = Path(root).expanduser().resolve()
        digest = hashlib.sha1(str(root).encode()).hexdigest()[:12]
        self.path = Path(cache_dir).expanduser() / f"{root.name or 'root'}-{digest}.json"
        try:
            saved = json.loads(self.path.read_text())
            if saved.get("version") == CACHE_VERSION:
                self._old = saved["files"]
        except (OSError, ValueError, KeyError, AttributeError):  # absent or damaged: start afresh
            self._old = {}

    def facts(self, path: str, with_values: bool = False) -> VolumeFacts:
        """The facts of ``path``: from the cache when the file is unchanged, else read (and remembered)."""
        path = str(Path(path).absolute())
        try:
            stat = os.stat(path)
        except OSError as err:
            return VolumeFacts(error=_one_line(err))
        entry = self._old.get(path)
        if (
            isinstance(entry, dict)
            and isinstance(entry.get("facts"), dict)
            and (entry.get("size"), entry.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns)
            and (entry["facts"].get("values") is not None or not with_values)  # a label needs its values
        ):
            facts = VolumeFacts.from_json(entry["facts"])
        else:
            facts = read_volume(path, with_values)
            with self._lock:
                self.reads += 1
        with self._lock:
            self._new[path] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "facts": asdict(facts)}
        return facts

    def save(self, complete: bool = True) -> None:
        """Write what is known, if anything changed.

        Args:
            complete: every file of the dataset was looked at: entries of other files (deleted, renamed)
                are dropped. An interrupted check keeps them.
        """
        files = self._new if complete else {**self._old, **self._new}
        if self.path is None or (self.reads == 0 and files.keys() == self._old.keys()):
            return
        try:
            # Written beside and renamed, so a concurrent check never reads half a file.
            write_json_atomic(self.path, {"version": CACHE_VERSION, "files": files}, indent=None)
        except OSError as err:  # a read-only cache folder makes later checks slower, not wrong
            log.warning("Data check: could not write the cache %s (%s); set data.check.cache_dir to a writable folder", self.path, err)


def _spatial(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(shape[:3])


def _affine_gap(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def _check_case(
    case: CaseRecord,
    cache: FactsCache,
    labels: LabelSpec,
    in_channels: int | None,
    affine_tolerance: float,
    expect_foreground: bool,
) -> tuple[list[Problem], int]:
    """The problems of one case's files, and how many files were looked at."""
    name = case["case"]
    problems: list[Problem] = []

    def error(path: str, message: str) -> None:
        problems.append(Problem("error", name, path, message))

    images = [p for p in case["image"] if p is not None]
    label = case.get("label")
    facts = {p: cache.facts(p) for p in images}
    if label is not None:
        facts[label] = cache.facts(label, with_values=True)
    for path, f in facts.items():
        if f.error:
            error(path, f"unreadable NIfTI file ({f.error})")
            continue
        if len(f.shape) < 3:
            error(path, f"expected a 3D volume (X, Y, Z) or a 4D one (X, Y, Z, C), got shape {f.shape}")
        if f.nan or f.inf:
            error(path, f"expected finite voxel values, got {f.nan} NaN and {f.inf} Inf voxel(s)")
        if not np.isfinite(np.asarray(f.affine)).all():
            error(path, "the affine (voxel-to-world matrix) holds NaN or Inf: a broken header")
    readable = [p for p in images if not facts[p].error and len(facts[p].shape) >= 3]

    for path in readable:
        if facts[path].all_zero:
            error(path, "all-zero image (every voxel is 0)")
    if in_channels is not None and len(readable) == len(case["image"]):
        channels = sum(int(np.prod(facts[p].shape[3:], dtype=np.int64)) for p in readable)
        if channels != in_channels:
            shapes = ", ".join(str(facts[p].shape) for p in readable)
            error(readable[0], f"expected {in_channels} image channel(s) (data.in_channels), got {channels} in {len(readable)} file(s) of shape {shapes}")
    if readable:
        ref = readable[0]
        ref_name, ref_shape, ref_affine = Path(ref).name, _spatial(facts[ref].shape), facts[ref].affine
        others = [(p, "image") for p in readable[1:]]
        if label is not None and not facts[label].error and len(facts[label].shape) >= 3:
            others.append((label, "label"))
        for path, kind in others:
            shape = _spatial(facts[path].shape)
            if shape != ref_shape:
                error(path, f"{kind} shape {shape} differs from the image shape {ref_shape} of {ref_name}")
            gap = _affine_gap(facts[path].affine, ref_affine)
            if gap > affine_tolerance:
                error(path, f"{kind} affine differs from that of {ref_name} by up to {gap:.4g} (more than data.check.affine_tolerance={affine_tolerance:g})")

    if label is not None and not facts[label].error:
        f = facts[label]
        if any(s != 1 for s in f.shape[3:]):
            error(label, f"expected a 3D label volume (X, Y, Z), got shape {f.shape}")
        problem = label_values_problem(f.values or (), labels)
        if problem:
            error(label, problem)
        elif expect_foreground and not any(f.values or ()):
            problems.append(Problem("warning", name, label, "empty label (background only) where the dataset expects foreground in every case (data.check.expect_foreground)"))
    return problems, len(facts)


def check_dataset(
    layout: str,
    root: str | Path,
    labels: LabelSpec | Mapping[str, Any],
    modalities: Sequence[str] = ("t1", "t1ce", "t2", "flair"),
    in_channels: int | None = None,
    *,
    affine_tolerance: float = 1e-3,
    expect_foreground: bool = True,
    num_workers: int = 4,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> DataCheckReport:
    """Check a labelled dataset and report every problem found (nothing is raised for problems of the data).

    Args:
        layout: a registered layout name (:mod:`medseg.data.layouts`: ``brats``, ``msd``, ``nnunet``, ``folder``).
        root: the dataset folder (MSD: the folder holding ``dataset.json``, or the file).
        labels: the label convention, or the ``data.labels`` config node.
        modalities: BraTS modality names in channel order (MSD lists its files in ``dataset.json``).
        in_channels: image channels every case must have (files, or the last axis of one 4D file);
            ``None`` skips this check.
        affine_tolerance: largest allowed absolute difference between the 4x4 affines (mm) of a case's files.
        expect_foreground: a label with background only is a warning (lesions expected in every case).
        num_workers: threads reading files (decompression releases the GIL); at least 1 is used.
        cache_dir: folder of the per-file cache; ``None`` reads every file every time.
        progress: show a progress bar (stderr).

    Returns:
        The report; ``report.errors`` is empty when the dataset can be trained on.

    Raises:
        ValueError: an unknown ``layout`` or an invalid ``labels`` node (configuration, not data).
    """
    spec = labels if isinstance(labels, LabelSpec) else LabelSpec.from_config(labels)
    cases, layout_problems = scan_cases(layout, root, tuple(modalities))
    report = DataCheckReport(layout=layout, root=str(root), cases=len(cases))
    problems = [Problem("error", p.case, p.path, p.message) for p in layout_problems]
    cache = FactsCache(cache_dir, root)
    check_one = partial(_check_case, cache=cache, labels=spec, in_channels=in_channels, affine_tolerance=affine_tolerance, expect_foreground=expect_foreground)
    pool = ThreadPoolExecutor(max(1, int(num_workers)), thread_name_prefix="data-check")
    results: list[tuple[list[Problem], int]] = []
    try:
        results = list(tqdm(pool.map(check_one, cases), total=len(cases), desc="Checking cases", unit="case", disable=not progress or not cases))
    finally:  # on Ctrl-C: drop the cases not started, keep what was learnt
        pool.shutdown(wait=True, cancel_futures=True)
        cache.save(complete=len(results) == len(cases))
    for case_problems, n_files in results:
        problems.extend(case_problems)
        report.files += n_files
    report.files_read = cache.reads
    order: dict[str, int] = {}
    for i, c in enumerate(cases):
        order.setdefault(c["case"], i)
    report.problems = sorted(problems, key=lambda p: -1 if p.case is None else order.get(p.case, len(order)))  # stable
    return report


def check_options(options: Mapping[str, Any] | None) -> tuple[bool, dict[str, Any]]:
    """Split the ``data.check`` node into ``enabled`` and the keyword arguments of :func:`check_dataset`.

    Raises:
        ConfigError: an unknown key.
    """
    kwargs = dict(options or {})
    unknown = sorted(set(kwargs) - set(OPTION_KEYS))
    if unknown:
        raise ConfigError(f"expected data.check keys among {list(OPTION_KEYS)}, got unknown {unknown}")
    return bool(kwargs.pop("enabled", True)), kwargs


def check_command(root: str | Path) -> str:
    """The command that checks this run's dataset: the run's experiment and data overrides under Hydra."""
    from hydra.core.hydra_config import HydraConfig

    args = ["+experiment=EXPERIMENT", f"data.root={root}"]
    if HydraConfig.initialized():
        kept = ("experiment", "data", "paths")
        args = [o for o in HydraConfig.get().overrides.task if o.lstrip("+~").split("=", 1)[0].split(".", 1)[0].split("/", 1)[0] in kept]
    return " ".join(["python", "-m", CHECK_MODULE, *(shlex.quote(a) for a in args)])


def check_before_training(
    layout: str,
    root: str | Path,
    labels: LabelSpec | Mapping[str, Any],
    modalities: Sequence[str],
    in_channels: int | None,
    options: Mapping[str, Any] | None,
) -> DataCheckReport | None:
    """The dataset check, cached, as the gate before training: warnings are logged, errors stop the run.

    Args:
        layout, root, labels, modalities, in_channels: as for :func:`check_dataset` (the ``data`` config).
        options: the ``data.check`` node (``enabled``, ``affine_tolerance``, ``expect_foreground``,
            ``num_workers``, ``cache_dir``); ``None`` or ``enabled: false`` skips the check.

    Returns:
        The report, or ``None`` when the check is disabled.

    Raises:
        DatasetError: the dataset has errors; the message quotes the first ``MAX_LISTED`` and ends with
            the command that lists them all.
    """
    enabled, kwargs = check_options(options)
    if options is None or not enabled:
        return None
    report = check_dataset(layout, root, labels, modalities, in_channels, progress=True, **kwargs)
    errors = report.errors
    if errors:
        lines = [p.format() for p in errors[:MAX_LISTED]]
        if len(errors) > MAX_LISTED:
            lines.append(f"... and {len(errors) - MAX_LISTED} more")
        raise DatasetError(
            f"the dataset at {root} has {len(errors)} error(s) in {report.cases} case(s); training will not start:\n"
            + "\n".join(lines)
            + f"\nFix them (or set data.check.enabled=false) and list every problem with: {check_command(root)}"
        )
    warnings = report.warnings
    for problem in warnings[:MAX_LISTED]:
        log.warning("%s", problem.format())
    if len(warnings) > MAX_LISTED:
        log.warning("... and %d more warning(s): %s", len(warnings) - MAX_LISTED, check_command(root))
    log.info("Data check: %s", report.summary())
    return report


def check_from_config(cfg: DictConfig, progress: bool = True) -> DataCheckReport:
    """Check the dataset of a composed training config (``cfg.data``), whatever ``data.check.enabled`` says.

    Raises:
        ConfigError: ``data.root`` (or another required value) is unset, or ``data.check`` has unknown keys.
        DatasetError: a synthetic dataset (``data.synthetic``) that no training run has generated yet.
    """
    check_required(cfg, {"data.root": DATA_HELP.get(cfg.data.get("layout"), "")})
    data = cfg.data
    if is_dicom_folder(Path(str(data.root)).expanduser()):
        return check_dicom_folder(Path(str(data.root)).expanduser())
    if data.get("synthetic") and not Path(data.root).expanduser().exists():
        raise DatasetError(f"{data.root} does not exist yet: data.synthetic is set, so the first training run with this config generates it")
    _, kwargs = check_options(data.get("check"))
    return check_dataset(data.layout, data.root, data.labels, list(data.modalities), data.get("in_channels"), progress=progress, **kwargs)


def check_dicom_folder(root: str | Path) -> DataCheckReport:
    """The problems of a folder of DICOM series, as :func:`medseg.dicom.series.series_problems` finds them before
    ``medseg.predict`` reads it: an error per series that cannot be read as a volume (missing or unevenly spaced
    slices, mixed orientations, a compressed syntax without decoder, ...), a warning per non-image object skipped.
    ``cases`` counts the image series, ``files`` the DICOM files; each problem's case is its SeriesInstanceUID.

    Raises:
        DatasetError: no DICOM file under ``root``.
    """
    from medseg.dicom.series import DicomSeriesError, find_series, not_an_image_reason, series_problems

    try:
        found = find_series(root)
    except DicomSeriesError as err:
        raise DatasetError(str(err)) from err
    except ImportError as err:  # the dicom extra is not installed
        raise ConfigError(str(err)) from err
    report = DataCheckReport(layout="dicom", root=str(root), cases=sum(s.image for s in found), files=sum(len(s.files) for s in found))
    report.files_read = report.files
    for series in found:
        if not series.image:
            report.problems.append(Problem("warning", series.uid, series.folder, not_an_image_reason(series)))
            continue
        report.problems.extend(Problem("error", series.uid, series.folder, message) for message in series_problems(series))
    log.info("Data check: %s", report.summary())
    return report


@hydra.main(version_base="1.3", config_path="../../conf", config_name="train")
def _main(cfg: DictConfig) -> None:
    try:
        report = check_from_config(cfg)
    except (DatasetError, ConfigError, ValueError) as err:  # configuration mistakes: one readable line
        log.error("%s", err)
        sys.exit(1)
    if report.problems:
        print(report.format())
    print(f"{report.root}: {report.summary()}")
    sys.exit(1 if report.errors else 0)


def main() -> None:
    """``python -m medseg.data.check +experiment=... data.root=...``: exit status 1 when the dataset has errors."""
    run_without_run_folder(_main)


register_resolvers()

if __name__ == "__main__":
    main()
