"""A dataset's fingerprint: the figures of every training case that planning is derived from.

Per case (in RAS voxel order, the toolkit's ``(H, W, D)``): the shape and spacing, per image channel the
intensity statistics of the foreground (label > 0: mean, std, percentiles 0.5 / 99.5) and of the non-zero
region, the voxel fraction of each class or region, and per region the connected components (26-connected)
with their volumes in mm^3. Over the dataset: the intensity statistics of the foreground voxels of all cases
pooled (from a fixed-size random sample per case, as nnU-Net does), which the CT normalisation uses.

:func:`dataset_fingerprint` reads the cases in worker processes with a progress bar and reuses the records of
an earlier fingerprint whose source files (path, size, modification time) are unchanged, so that re-planning
a dataset after adding cases reads only the new ones.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import cc3d
import nibabel as nib
import numpy as np
from tqdm import tqdm

from medseg.data.cache import source_identity
from medseg.data.labels import LabelSpec
from medseg.io import atomic_path, write_json_atomic
from medseg.data.layouts import CaseRecord, DatasetError

log = logging.getLogger("medseg")
FINGERPRINT_VERSION = 1
PERCENTILES = (0.5, 99.5)


def intensity_stats(voxels: np.ndarray) -> dict[str, float]:
    """Mean, std and the :data:`PERCENTILES` of ``voxels`` (any shape), in float64; ``None`` (JSON null) each
    for no voxels."""
    voxels = np.asarray(voxels, dtype=np.float64).ravel()
    if voxels.size == 0:
        return {"mean": None, "std": None, "p0.5": None, "p99.5": None}
    low, high = np.percentile(voxels, PERCENTILES)
    return {"mean": float(voxels.mean()), "std": float(voxels.std()), "p0.5": float(low), "p99.5": float(high)}


def _load_ras(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The array of a NIfTI file reoriented to RAS and its spacing in that order (mm)."""
    try:
        image = nib.as_closest_canonical(nib.load(str(path)))
        data = np.asanyarray(image.dataobj)
    except Exception as error:  # nibabel raises several types for damaged files
        raise DatasetError(f"{path}: cannot be read as NIfTI ({error})") from error
    return data, np.asarray(image.header.get_zooms()[:3], dtype=np.float64)


def case_fingerprint(record: CaseRecord, spec: LabelSpec, samples_per_case: int = 10000, connectivity: int = 26) -> tuple[dict[str, Any], np.ndarray]:
    """The fingerprint record of one case and its foreground intensity sample ``(C, n)`` float32.

    Raises:
        DatasetError: naming the file, when a file is unreadable, holds NaN voxels, or shapes differ.
    """
    case = str(record["case"])
    label_path = record["label"]
    label, spacing = _load_ras(label_path)
    label = np.rint(np.asarray(label)).astype(np.int64)
    if label.ndim != 3:
        raise DatasetError(f"{label_path}: expected a 3D label volume, got shape {label.shape}")
    channels = []
    for path in record["image"]:
        data, _ = _load_ras(path)
        data = np.asarray(data, dtype=np.float32)
        data = data[..., None] if data.ndim == 3 else data.reshape(*data.shape[:3], -1)
        if data.shape[:3] != label.shape:
            raise DatasetError(f"{path}: image shape {data.shape[:3]} differs from the label's {label.shape} ({label_path})")
        if not np.isfinite(data).all():
            raise DatasetError(f"{path}: holds NaN or infinite voxels")
        channels.extend(np.moveaxis(data, -1, 0))
    foreground = label > 0
    rng = np.random.default_rng(zlib.crc32(case.encode()))  # the same sample at every planning
    where = np.flatnonzero(foreground)
    chosen = rng.choice(where, size=min(samples_per_case, where.size), replace=False) if where.size else where
    voxel_mm3 = float(np.prod(spacing))
    regions = {}
    for name, mask in zip(spec.names, spec.to_channels(label[None])):  # (X, Y, Z) bool each
        components = cc3d.connected_components(mask.astype(np.uint8), connectivity=connectivity)
        counts = np.bincount(components.ravel())[1:] if mask.any() else np.zeros(0, dtype=np.int64)
        regions[name] = {"fraction": float(mask.mean()), "components_mm3": sorted((float(c) * voxel_mm3 for c in counts), reverse=True)}
    row = {
        "case": case,
        "source": source_identity(record),
        "shape": [int(s) for s in label.shape],
        "spacing": [float(s) for s in spacing],
        "foreground_fraction": float(foreground.mean()),
        "intensity": [
            {"foreground": intensity_stats(channel[foreground]), "nonzero": intensity_stats(channel[channel != 0])}
            for channel in channels
        ],
        "regions": regions,
    }
    sample = np.stack([channel.ravel()[chosen] for channel in channels]).astype(np.float32)
    return row, sample


def _fingerprint_one(arguments: tuple[CaseRecord, LabelSpec, int]) -> tuple[dict[str, Any], np.ndarray]:
    return case_fingerprint(*arguments)


def dataset_fingerprint(
    records: Sequence[CaseRecord],
    spec: LabelSpec,
    previous: Mapping[str, Any] | None = None,
    previous_samples: Mapping[str, np.ndarray] | None = None,
    workers: int = 0,
    samples_per_case: int = 10000,
    progress: bool = True,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The fingerprint of ``records`` and the per-case foreground samples, reusing ``previous`` records (and
    their samples) whose source files are unchanged.

    Returns:
        ``({"version", "cases": [...], "dataset": {...}}, {case: (C, n) float32 sample})``.
    """
    if not records:
        raise DatasetError("no training cases to fingerprint: check data.root and data.layout")
    known = {row["case"]: row for row in (previous or {}).get("cases", [])} if (previous or {}).get("version") == FINGERPRINT_VERSION else {}
    samples = dict(previous_samples or {})
    rows: dict[str, dict[str, Any]] = {}
    todo = []
    for record in records:
        old = known.get(str(record["case"]))
        if old is not None and old["source"] == source_identity(record) and str(record["case"]) in samples:
            rows[old["case"]] = old
        else:
            todo.append(record)
    if todo:
        jobs = [(record, spec, samples_per_case) for record in todo]
        bar = tqdm(total=len(jobs), desc="Fingerprint", unit="case", disable=not progress)
        if workers > 0:
            with ProcessPoolExecutor(workers) as pool:
                results = pool.map(_fingerprint_one, jobs)
                for row, sample in results:
                    rows[row["case"]], samples[row["case"]] = row, sample
                    bar.update()
        else:
            for job in jobs:
                row, sample = _fingerprint_one(job)
                rows[row["case"]], samples[row["case"]] = row, sample
                bar.update()
        bar.close()
    log.info("Fingerprint: %d case(s) read, %d reused", len(todo), len(records) - len(todo))
    ordered = [rows[str(r["case"])] for r in records]
    samples = {row["case"]: samples[row["case"]] for row in ordered}
    return {"version": FINGERPRINT_VERSION, "cases": ordered, "dataset": summarise(ordered, samples, spec)}, samples


def summarise(rows: Sequence[Mapping[str, Any]], samples: Mapping[str, np.ndarray], spec: LabelSpec) -> dict[str, Any]:
    """Dataset-level figures: median shape and spacing, pooled foreground intensities per channel, region
    fractions and component counts and sizes."""
    shapes = np.array([r["shape"] for r in rows], dtype=np.float64)
    spacings = np.array([r["spacing"] for r in rows], dtype=np.float64)
    channels = {len(r["intensity"]) for r in rows}
    if len(channels) != 1:
        raise DatasetError(f"cases have different numbers of image channels: {sorted(channels)}")
    pooled = np.concatenate([samples[r["case"]] for r in rows], axis=1)  # (C, N)
    regions = {}
    for name in spec.names:
        sizes = np.array([s for r in rows for s in r["regions"][name]["components_mm3"]], dtype=np.float64)
        counts = np.array([len(r["regions"][name]["components_mm3"]) for r in rows], dtype=np.float64)
        regions[name] = {
            "fraction_mean": float(np.mean([r["regions"][name]["fraction"] for r in rows])),
            "components_per_case_median": float(np.median(counts)),
            "components_total": int(sizes.size),
            "component_mm3_percentiles": {str(q): float(np.percentile(sizes, q)) for q in (10, 25, 50, 75, 90)} if sizes.size else {},
        }
    return {
        "num_cases": len(rows),
        "channels": channels.pop(),
        "median_shape": np.median(shapes, axis=0).tolist(),
        "median_spacing": np.median(spacings, axis=0).tolist(),
        "foreground_intensity": [intensity_stats(channel) for channel in pooled],
        "regions": regions,
    }


def write_fingerprint(path: str | Path, fingerprint: Mapping[str, Any], samples: Mapping[str, np.ndarray]) -> None:
    """``fingerprint.json`` and, beside it, ``fingerprint_samples.npz`` (the per-case foreground samples that
    let a later plan reuse the records), both written atomically."""
    path = Path(path)
    with atomic_path(path.with_name(path.stem + "_samples.npz"), keep_suffix=True) as partial:  # ends .npz: NumPy adds none
        np.savez_compressed(partial, **samples)
    write_json_atomic(path, fingerprint)


def read_fingerprint(path: str | Path) -> tuple[dict[str, Any] | None, dict[str, np.ndarray]]:
    """An earlier :func:`write_fingerprint`'s records and samples, or ``(None, {})`` when there are none."""
    path = Path(path)
    samples_path = path.with_name(path.stem + "_samples.npz")
    if not path.is_file() or not samples_path.is_file():
        return None, {}
    try:
        with np.load(samples_path) as stored:
            return json.loads(path.read_text()), {k: stored[k] for k in stored.files}
    except (OSError, ValueError) as error:
        log.warning("Ignoring the earlier fingerprint %s (%s): reading every case again", path, error)
        return None, {}
