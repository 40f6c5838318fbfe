"""The preprocessing cache on disk: every case preprocessed once, stored so that a patch is read alone.

One folder per dataset and set of preprocessing options, ``<cache_dir>/<dataset>-<hash>``, where the hash
covers everything that changes the stored arrays (layout, root, modalities, labels, spacing, intensity
options, crop, sampling index options, MONAI version, format version): changing an option starts another
folder, and the old one stays valid for the runs that use it. Inside, one entry per case:

    <case>/image.npy    (C, H, W, D) float32, uncompressed, read with ``mmap_mode="r"``
    <case>/label.npy    (R, H, W, D) uint8 multi-hot (sigmoid) or (1, H, W, D) class indices (softmax)
    <case>/index.npz    the sampling index (:func:`medseg.data.sampling.build_sampling_index`)
    <case>/meta.json    the source files' identity (path, size, mtime), shapes, byte sizes, spacing, affine

An entry is valid when its ``meta.json`` names the case's current source files (path, size, mtime) and
every array file has the recorded size and ``.npy`` header. Entries are written into a temporary folder
and renamed into place, so a killed build leaves no entry that reads as valid; a damaged entry (truncated
or replaced file) is found by the size and header check and rebuilt with a warning. Builds hold an
exclusive file lock on ``<folder>/.lock``: of several processes (DDP ranks, nodes sharing the file system,
two runs) one builds, the others wait and then find the entries valid. Cases are preprocessed in
``workers`` spawned processes, each with its own transforms (nothing shared between them).

Why ``.npy`` and not a compressed chunked store (blosc2, as nnU-Net uses): measured on a preprocessed
BraTS-size image (``python -m medseg.bench --only cache``), blosc2 with zstd takes 2.4x less disk but
reads random 128^3 patches 2.6x slower; disk is the cheaper resource on a GPU node, and the patch rate
is what the GPUs wait for (README, "Performance").
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import socket
import time
import uuid
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import monai
import numpy as np
from tqdm import tqdm

from medseg.data.labels import LabelSpec
from medseg.data.layouts import CaseRecord, DatasetError, get_layout
from medseg.data.sampling import IndexOptions, build_sampling_index
from medseg.data.transforms import IMAGE, LABEL, preprocessing
from medseg.folderlock import folder_lock, owner_is_gone, server_now
from medseg.io import atomic_path

log = logging.getLogger("medseg")
FORMAT_VERSION = 1
IMAGE_FILE, LABEL_FILE, INDEX_FILE, META_FILE = "image.npy", "label.npy", "index.npz", "meta.json"
ARRAY_FILES = (IMAGE_FILE, LABEL_FILE)
LOCK_FILE, OPTIONS_FILE = ".lock", "options.json"
_LEFTOVER_PREFIXES = (".tmp-", ".trash-")
# A temporary folder of another host (or of an unknown owner) untouched this long is a killed build's leftover.
LEFTOVER_MAX_AGE_S = 3600.0
_HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


@dataclass
class PreprocessedCase:
    """One preprocessed case: arrays (in memory or memory-mapped), sampling index and geometry.

    Attributes:
        image: ``(C, H, W, D)`` float32.
        label: ``(R, H, W, D)`` multi-hot or ``(1, H, W, D)`` class indices, uint8.
        index: the sampling index (:mod:`medseg.data.sampling`).
        spacing: voxel size in mm after preprocessing ``(3,)``.
        affine: ``(4, 4)`` voxel-to-world matrix after preprocessing.
    """

    case: str
    image: np.ndarray
    label: np.ndarray
    index: dict[str, np.ndarray]
    spacing: tuple[float, float, float]
    affine: np.ndarray


@dataclass
class CasePreprocessor:
    """The deterministic preprocessing of labelled cases, picklable for worker processes.

    Each process builds its own MONAI transforms on first use (they are not pickled), so that no transform
    state is shared between processes or threads.

    Args:
        labels: the label convention.
        options: keyword arguments of :func:`medseg.data.transforms.preprocessing` (spacing, intensity, ...).
        index: what the sampling index keeps.
    """

    labels: LabelSpec
    options: dict[str, Any]
    index: IndexOptions = IndexOptions()
    _transform: Any = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_transform": None}

    def __call__(self, record: CaseRecord) -> PreprocessedCase:
        if self._transform is None:
            self._transform = preprocessing(self.labels, with_label=True, **self.options)
        data = self._transform({IMAGE: list(record[IMAGE]), LABEL: record[LABEL], "case": record["case"]})
        image, label = data[IMAGE], data[LABEL]
        affine = np.asarray(image.affine, dtype=np.float64)
        target = label.as_tensor().numpy()
        if target.size and target.max() > np.iinfo(np.uint8).max:
            raise DatasetError(f"case {record['case']}: {target.max():.0f} classes do not fit the cache's uint8 labels")
        return PreprocessedCase(
            case=str(record["case"]),
            image=np.ascontiguousarray(image.as_tensor().numpy(), dtype=np.float32),
            label=np.ascontiguousarray(target, dtype=np.uint8),
            index=build_sampling_index(target, self.labels.mode, self.labels.names, self.index, seed=zlib.crc32(str(record["case"]).encode())),
            spacing=tuple(float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(0))),
            affine=affine,
        )

    def key(self) -> dict[str, Any]:
        """What the stored arrays depend on (hashed into the cache folder's name)."""
        return {"labels": asdict(self.labels), "preprocessing": {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in self.options.items()}, "sampling": asdict(self.index)}


@dataclass
class BuildSummary:
    """What :meth:`CaseCache.ensure` did: entries built (new or changed sources), rebuilt (damaged),
    reused, the seconds it took and the cache's size on disk in bytes."""

    built: int = 0
    rebuilt: int = 0
    reused: int = 0
    seconds: float = 0.0
    size_bytes: int = 0  # the cache folder's size after a build (0 when nothing was built)

    def format(self) -> str:
        size = f"{self.size_bytes / 2**30:.2f} GiB" if self.size_bytes >= 2**30 else f"{self.size_bytes / 2**20:.1f} MiB"
        on_disk = f"; {size} on disk" if self.size_bytes else ""  # measured only after a build
        return f"{self.built} built, {self.rebuilt} rebuilt (damaged), {self.reused} reused in {self.seconds:.1f} s{on_disk}"


def file_identity(path: str | Path) -> list[Any]:
    """``[resolved path, size in bytes, modification time in ns]``: a file changed when this changes."""
    resolved = Path(path).expanduser().resolve()
    stat = resolved.stat()
    return [str(resolved), stat.st_size, stat.st_mtime_ns]


def source_identity(record: CaseRecord) -> list[list[Any]]:
    """The identity of a case's image files and label file, in order."""
    return [file_identity(f) for f in [*record[IMAGE], record[LABEL]]]


def entry_name(case: str) -> str:
    """A file-system-safe folder name for a case id (ids with other characters get a short hash)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", case)
    return safe if safe == case and not case.startswith(".") else f"{safe.lstrip('.')}-{hashlib.sha1(case.encode()).hexdigest()[:8]}"


class CaseCache:
    """The disk cache of one dataset under one set of preprocessing options (see the module docstring).

    Args:
        folder: the cache folder (``<cache_dir>/<dataset>-<hash>``, see :meth:`for_dataset`).
        key: the options the folder's hash stands for (written to ``options.json``), if known.
    """

    def __init__(self, folder: str | Path, key: Mapping[str, Any] | None = None) -> None:
        self.folder = Path(folder).expanduser()
        self.key = dict(key) if key is not None else None

    @classmethod
    def for_dataset(cls, cache_dir: str | Path, layout: str, root: str | Path, modalities: Sequence[str], preprocessor: CasePreprocessor) -> CaseCache:
        """The cache folder of a dataset: ``<cache_dir>/<root folder name>-<12 hex digits of the options' hash>``."""
        root = Path(root).expanduser().resolve()
        key = {"format": FORMAT_VERSION, "monai": monai.__version__, "layout": layout, "root": str(root), "modalities": list(modalities) if get_layout(layout).modalities_name_files else None, **preprocessor.key()}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        return cls(Path(cache_dir).expanduser() / f"{root.name or 'root'}-{digest}", key)

    def entry(self, case: str) -> Path:
        return self.folder / entry_name(case)

    # ----------------------------------------------------------------------------------------------- validity
    def problem(self, record: CaseRecord) -> str | None:
        """Why the entry of ``record`` cannot be used (``"missing"``, ``"source changed"``, or what is damaged),
        or ``None`` when it is valid. Reads only ``meta.json`` and the ``.npy`` headers."""
        entry = self.entry(str(record["case"]))
        try:
            meta = json.loads((entry / META_FILE).read_text())
        except FileNotFoundError:
            return "damaged: meta.json is missing" if entry.exists() else "missing"
        except (OSError, ValueError) as err:
            return f"damaged: meta.json is unreadable ({err})"
        if meta.get("format") != FORMAT_VERSION or meta.get("case") != record["case"]:
            return "damaged: meta.json is of another case or format"
        try:
            if meta.get("source") != source_identity(record):
                return "source changed"
        except OSError as err:
            return f"source unreadable ({err})"
        try:
            files = {name: (int(f["bytes"]), tuple(f.get("shape", ())), f.get("dtype")) for name, f in meta["files"].items()}
        except (KeyError, TypeError, ValueError, AttributeError):
            return "damaged: meta.json lacks the file records"
        if set(files) != {*ARRAY_FILES, INDEX_FILE}:
            return f"damaged: meta.json records {sorted(files)}"
        for name, (size, shape, dtype) in files.items():
            path = entry / name
            if not path.is_file():
                return f"damaged: {name} is missing"
            if path.stat().st_size != size:
                return f"damaged: {name} has {path.stat().st_size} bytes, expected {size}"
            if name.endswith(".npy") and _npy_header(path) != (shape, dtype):
                return f"damaged: {name} holds {_npy_header(path)}, expected {(shape, dtype)}"
        return None

    def stale(self, records: Sequence[CaseRecord]) -> list[tuple[CaseRecord, str]]:
        """The records whose entries must be (re)built, with the reason."""
        return [(r, why) for r in records if (why := self.problem(r)) is not None]

    # ------------------------------------------------------------------------------------------------- build
    def ensure(self, records: Sequence[CaseRecord], preprocessor: CasePreprocessor, workers: int = 0, progress: bool = True) -> BuildSummary:
        """Build every missing, changed or damaged entry of ``records``; reuse the others.

        Args:
            workers: 0 preprocesses in this process; ``n`` in ``n`` spawned worker processes.

        Raises:
            DatasetError: a case failed to preprocess (the message names the case and the cause).
        """
        start = time.perf_counter()
        summary = BuildSummary()
        if not self.stale(records):
            summary.reused = len(records)
        else:
            if multiprocessing.parent_process() is not None and multiprocessing.current_process().name.startswith("SpawnProcess"):
                # A script without an ``if __name__ == "__main__":`` guard re-runs itself in each spawned
                # worker, which would then wait forever on the lock its parent holds.
                raise RuntimeError(f"the preprocessing cache {self.folder} was asked to build from inside a spawned process; build it in the main process first (python -m medseg.data.preprocess), and guard a script's entry point with if __name__ == '__main__':")
            self.folder.mkdir(parents=True, exist_ok=True)
            with self._lock():
                self._remove_leftovers()
                todo = self.stale(records)  # again: another process may have built them while we waited
                for record, why in todo:
                    if why.startswith("damaged"):
                        log.warning("Cache entry %s is %s; rebuilding it", self.entry(str(record["case"])), why)
                summary.rebuilt = sum(why.startswith("damaged") for _, why in todo)
                summary.built = len(todo) - summary.rebuilt
                summary.reused = len(records) - len(todo)
                if todo:
                    self._write_options()
                    self._build([r for r, _ in todo], preprocessor, workers, progress)
        summary.seconds = time.perf_counter() - start
        if summary.built or summary.rebuilt:  # reported then only: no walk over a large cache at every start
            summary.size_bytes = self.size_bytes()
        return summary

    def _build(self, records: list[CaseRecord], preprocessor: CasePreprocessor, workers: int, progress: bool) -> None:
        bar = tqdm(total=len(records), desc=f"preprocess -> {self.folder.name}", unit="case", dynamic_ncols=True, disable=not progress)
        try:
            if workers <= 0:
                for record in records:
                    _build_entry(self, preprocessor, record)
                    bar.update()
                return
            # Spawned, not forked: a fork would copy this process's threads' state (OpenMP, torch) mid-flight.
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(min(workers, len(records)), mp_context=context, initializer=_init_worker, initargs=(self.folder, preprocessor)) as pool:
                futures = {pool.submit(_build_in_worker, record): record for record in records}
                try:
                    for future in as_completed(futures):
                        future.result()
                        bar.update()
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
        finally:
            bar.close()

    def write_entry(self, case: PreprocessedCase, source: list[list[Any]]) -> None:
        """Write one entry atomically: into a temporary folder, then renamed into place."""
        final = self.entry(case.case)
        tmp = self.folder / _leftover_name(".tmp-", final.name)
        tmp.mkdir(parents=True)
        try:
            arrays = {IMAGE_FILE: case.image, LABEL_FILE: case.label}
            for name, array in arrays.items():
                _write_synced(tmp / name, lambda f, a=array: np.save(f, a, allow_pickle=False))
            _write_synced(tmp / INDEX_FILE, lambda f: np.savez(f, **case.index))
            files = {name: {"bytes": (tmp / name).stat().st_size, "shape": list(a.shape), "dtype": a.dtype.str} for name, a in arrays.items()}
            files[INDEX_FILE] = {"bytes": (tmp / INDEX_FILE).stat().st_size}
            meta = {"format": FORMAT_VERSION, "case": case.case, "source": source, "files": files, "spacing": list(case.spacing), "affine": case.affine.tolist()}
            _write_synced(tmp / META_FILE, lambda f: f.write(json.dumps(meta, indent=1).encode()))
            trash = None
            if final.exists():  # a damaged or outdated entry: move it aside, then swap in the new one
                trash = self.folder / _leftover_name(".trash-", final.name)
                try:
                    os.rename(final, trash)
                except FileNotFoundError:  # another builder (node-local locks) moved it first
                    trash = None
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another builder placed the same entry meanwhile: keep theirs
            _fsync_dir(self.folder)
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    # ------------------------------------------------------------------------------------------------- read
    def load(self, case: str, mmap: bool = True) -> PreprocessedCase:
        """The cached arrays of ``case``: memory-mapped (``mmap=True``; reading a patch reads only its bytes)
        or read into memory.

        Raises:
            DatasetError: the entry is missing or damaged (naming it and the command that rebuilds it).
        """
        entry = self.entry(case)
        try:
            meta = json.loads((entry / META_FILE).read_text())
            image = np.load(entry / IMAGE_FILE, mmap_mode="r" if mmap else None, allow_pickle=False)
            label = np.load(entry / LABEL_FILE, mmap_mode="r" if mmap else None, allow_pickle=False)
            with np.load(entry / INDEX_FILE, allow_pickle=False) as stored:
                index = {k: stored[k] for k in stored.files}
        except (OSError, ValueError, KeyError) as err:
            raise DatasetError(f"cache entry {entry} is missing or damaged ({err}); rebuild it with python -m medseg.data.preprocess (same options)") from err
        return PreprocessedCase(case, image, label, index, tuple(meta["spacing"]), np.asarray(meta["affine"]))

    def size_bytes(self) -> int:
        """Bytes of every file in the cache folder."""
        if not self.folder.is_dir():
            return 0
        return sum(f.stat().st_size for f in self.folder.rglob("*") if f.is_file())

    # ------------------------------------------------------------------------------------------------- internals
    def _lock(self) -> AbstractContextManager[None]:
        """An exclusive lock on the cache folder, held while building (:func:`medseg.folderlock.folder_lock`: flock,
        or a lock file on file systems without it)."""
        return folder_lock(self.folder, LOCK_FILE, what="building the cache")

    def _remove_leftovers(self) -> None:
        """Temporary folders of builds that were killed: those of a process of this host that has ended, and any
        untouched for :data:`LEFTOVER_MAX_AGE_S` (another node's build may be running: node-local locks)."""
        now = server_now(self.folder)
        for path in self.folder.iterdir():
            if not path.name.startswith(_LEFTOVER_PREFIXES):
                continue
            try:
                modified = max([path.stat().st_mtime, *(f.stat().st_mtime for f in path.iterdir())])
            except OSError:
                continue  # renamed or removed meanwhile
            if owner_is_gone(_leftover_owner(path.name), modified, now, LEFTOVER_MAX_AGE_S):
                shutil.rmtree(path, ignore_errors=True)

    def _write_options(self) -> None:
        """``options.json``: the options the folder's hash stands for, for people looking at the folder."""
        path = self.folder / OPTIONS_FILE
        if self.key is not None and not path.exists():
            _write_synced(path, lambda f: f.write(json.dumps(self.key, indent=2, sort_keys=True).encode()), atomic=True)


def _npy_header(path: Path) -> tuple[tuple[int, ...], str] | None:
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
        return tuple(shape), dtype.str
    except (OSError, ValueError):
        return None


def _write_synced(path: Path, write: Any, atomic: bool = False) -> None:
    """Write a file and flush it to disk; ``atomic``: through a temporary file and a rename."""
    with atomic_path(path) if atomic else nullcontext(path) as target:
        with open(target, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _build_entry(cache: CaseCache, preprocessor: CasePreprocessor, record: CaseRecord) -> None:
    """Preprocess one case and write its entry; failures name the case."""
    try:
        source = source_identity(record)  # before reading: a file changed meanwhile makes the entry stale
        cache.write_entry(preprocessor(record), source)
    except DatasetError:
        raise
    except Exception as err:
        raise DatasetError(f"case {record['case']}: preprocessing for the cache failed: {err}") from err


_WORKER: dict[str, Any] = {}


def _init_worker(folder: Path, preprocessor: CasePreprocessor) -> None:
    import torch

    torch.set_num_threads(1)  # one core per worker process: the processes are the parallelism
    _WORKER.update(cache=CaseCache(folder), preprocessor=preprocessor)


def _build_in_worker(record: CaseRecord) -> None:
    _build_entry(_WORKER["cache"], _WORKER["preprocessor"], record)


def _leftover_name(prefix: str, entry: str) -> str:
    """``<prefix><entry>-<host tag>-<pid>-<random>``: a temporary folder that says whose it is."""
    return f"{prefix}{entry}-{_HOST_TAG}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _leftover_owner(name: str) -> dict[str, Any] | None:
    """The owner (host, pid) a temporary folder's name records, ``None`` for names of older versions."""
    parts = name.rsplit("-", 3)
    if len(parts) != 4 or not parts[2].isdigit():
        return None
    host = socket.gethostname() if parts[1] == _HOST_TAG else f"other host {parts[1]}"
    return {"host": host, "pid": int(parts[2]), "started": None}
