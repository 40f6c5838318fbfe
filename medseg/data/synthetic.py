"""Synthetic BraTS-like brain MRI: four contrasts, a glioma and small satellite lesions.

Each case is a skull-stripped head (zero outside the brain) with white matter, a folded cortical
ribbon of grey matter, CSF in sulci, the interhemispheric fissure and the ventricles, one main glioma
(necrotic core NCR=1, enhancing rim ET=4, oedema ED=2; BraTS 2018-2021 labels) and small enhancing
satellite lesions (3 to 8 by default; their number and size range are parameters), each its own
26-connected component. Images get tissue contrast as on real scans (T1: WM > GM > CSF; T2: CSF >
GM > WM; FLAIR: CSF suppressed, oedema bright; T1ce: T1 with a bright enhancing tumour), a smooth
multiplicative bias field, Rician noise and an arbitrary scanner scale.

Anatomy is defined in millimetres and shrinks uniformly when the field of view is too small for an
adult brain, so 240x240x155 @ 1 mm and 96x96x64 @ 2 mm show the same anatomy at different resolutions.

    python -m medseg.data.synthetic --out data/synthetic --cases 8 --shape 96 96 64 --spacing 2 2 2
    python -m medseg.data.synthetic --out data/many_small --cases 8 --satellites 15 25 --satellite-radius-mm 1 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from medseg.io import atomic_path, write_text_atomic

CONTRASTS = ("t1", "t1ce", "t2", "flair")
NCR, ED, ET = 1, 2, 4  # BraTS 2018-2021 label values
CSF, GM, WM = 1, 2, 3  # codes of SyntheticCase.tissue (0 = outside the brain)
MANIFEST_NAME = "synthetic.json"
SATELLITE_VOXELS = (3, 1000)  # each satellite component (ET + rim) has this many voxels, any shape

_VERSION = 1  # bump when the generated data change, so cached folders are not reused silently
_PARTIAL_NAME = "synthetic.partial.json"  # parameters of an unfinished run, to resume it
_MIN_SIZE = 32  # voxels per axis; below this the lesions no longer fit apart from each other
_MIN_BRAIN_SPAN = 8  # voxels the brain must span along each axis, for the same reason
_BRAIN_SEMI_AXES_MM = np.array([66.0, 84.0, 60.0])  # adult cerebrum half-widths along R, A, S
_BRAIN_JITTER, _BRAIN_DEFORM, _BRAIN_OFFSET_MM = 0.05, 0.07, 2.0
_EGG_MAX = np.array([1.09, 1.0, 1.0])  # largest widening of the frontal lobes along R-L
SATELLITES = (3, 8)  # default (min, max) number of satellite lesions per case
SATELLITE_RADIUS_MM = (1.0, 4.0)  # default (min, max) satellite ET semi-axis at full scale (see _add_satellites)
SATELLITE_CONTRAST = 1.0  # default fraction of a lesion's intensity difference from its tissue that satellites keep
CONFLUENT = (0, 0)  # default (min, max) number of large confluent lesions besides the glioma
CONFLUENT_RADIUS_MM = (6.0, 10.0)  # default (min, max) semi-axis of a confluent lesion's enhancing part, mm
# Satellite ET semi-axes are kept within these bounds in voxels: below _SAT_MIN_VOXELS a lesion is a single
# voxel or vanishes; above _SAT_MAX_VOXELS it outgrows SATELLITE_VOXELS; the largest semi-axis of a case is
# at least _SAT_SPAN_VOXELS so that each case spans small to larger lesions even on coarse grids.
_SAT_MIN_VOXELS, _SAT_SPAN_VOXELS, _SAT_MAX_VOXELS = 1.2, 2.5, 4.0

# Mean intensity of each class (background, CSF, GM, WM, NCR, ED, ET) before bias, noise and scale.
_MEANS = {
    "t1": [0.0, 0.30, 0.72, 1.00, 0.35, 0.62, 0.70],
    "t1ce": [0.0, 0.30, 0.75, 1.00, 0.30, 0.64, 1.90],
    "t2": [0.0, 1.60, 0.70, 0.45, 1.35, 1.15, 0.95],
    "flair": [0.0, 0.15, 0.78, 0.58, 0.80, 1.35, 1.05],
}
_TEXTURE = np.array([0.0, 0.03, 0.04, 0.03, 0.15, 0.10, 0.15], np.float32)  # relative heterogeneity
_CLASS_OF_LABEL = np.array([0, 4, 5, 0, 6], np.uint8)  # label value -> class index above
_BIAS, _NOISE = 0.15, 0.03  # log-amplitude of the bias field; noise sigma relative to tissue mean


@dataclass(frozen=True)
class SyntheticCase:
    """One generated case.

    Attributes:
        images: contrast name (``t1``, ``t1ce``, ``t2``, ``flair``) -> (X, Y, Z) float32, >= 0,
            exactly 0 outside the brain.
        label: (X, Y, Z) uint8 with values in {0, NCR=1, ED=2, ET=4}.
        affine: (4, 4) float64 voxel-to-world (RAS+, mm) matrix; the volume is centred on 0.
        tissue: (X, Y, Z) uint8 healthy anatomy under the lesions: 0 outside, CSF=1, GM=2, WM=3.
    """

    images: dict[str, np.ndarray]
    label: np.ndarray
    affine: np.ndarray
    tissue: np.ndarray


def generate_case(
    rng: np.random.Generator,
    shape: Sequence[int] = (240, 240, 155),
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    satellites: Sequence[int] = SATELLITES,
    satellite_radius_mm: Sequence[float] = SATELLITE_RADIUS_MM,
    satellite_contrast: float = SATELLITE_CONTRAST,
    confluent: Sequence[int] = CONFLUENT,
    confluent_radius_mm: Sequence[float] = CONFLUENT_RADIUS_MM,
) -> SyntheticCase:
    """Generate one synthetic multi-contrast case with a glioma and small satellite lesions.

    Args:
        rng: source of all randomness; the same generator state gives the same case.
        shape: (X, Y, Z) voxels, each >= 32; axes point to the right, anterior and superior.
        spacing: (SX, SY, SZ) voxel size in mm, each > 0.
        satellites: (min, max) number of satellite lesions, drawn uniformly per case (both included).
            When the brain is too crowded for all of them, at least ``min`` are placed.
        satellite_radius_mm: (min, max) semi-axis of a satellite's enhancing part in mm at full anatomical
            scale (the anatomy shrinks with a small field of view, and so do the lesions), drawn
            log-uniformly and stratified, so each case spans the range. In voxels, semi-axes are kept
            within [1.2, 4], the largest at least 2.5; a satellite may get a one-voxel oedema rim.
        satellite_contrast: in (0, 1]: the fraction of a lesion's mean intensity difference from the tissue
            it lies in that satellites keep in every contrast (1: as the glioma's ET/ED; 0.3: faint lesions,
            as small MS lesions are against white matter).
        confluent: (min, max) number of large confluent lesions (ET with an oedema rim, full contrast, not
            clipped to the satellite size range) drawn before the satellites, like the confluent
            periventricular lesions of an MS scan; 0 by default.
        confluent_radius_mm: (min, max) semi-axis of their enhancing part in mm at full scale.

    Returns:
        A SyntheticCase whose arrays all have shape (X, Y, Z).

    Raises:
        TypeError: if ``rng`` is not a ``numpy.random.Generator``.
        ValueError: if ``shape``, ``spacing``, ``satellites`` or ``satellite_radius_mm`` is invalid.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"expected rng to be a numpy.random.Generator, got {type(rng).__name__}")
    shape, spacing = _check_geometry(shape, spacing)
    satellites, satellite_radius_mm = _check_satellites(satellites, satellite_radius_mm)
    satellite_contrast, confluent, confluent_radius_mm = _check_lesion_options(satellite_contrast, confluent, confluent_radius_mm)
    sp = np.asarray(spacing)
    s = _anatomy_scale(shape, sp)
    semi = (_BRAIN_SEMI_AXES_MM * s * rng.uniform(1 - _BRAIN_JITTER, 1 + _BRAIN_JITTER, 3)).astype(np.float32)
    centre = rng.uniform(-_BRAIN_OFFSET_MM, _BRAIN_OFFSET_MM, 3) * s  # mm from the volume centre
    # all work happens in the box holding the brain (a third of a 240x240x155 volume); mm coordinates
    # inside it are measured from its own centre
    head, _ = _box(shape, sp, centre, semi * (1 + _BRAIN_DEFORM) * _EGG_MAX + 2 * sp)
    lo, box_shape = np.array([b.start for b in head]), tuple(b.stop - b.start for b in head)
    centre = centre - (lo + (np.array(box_shape) - np.array(shape)) / 2) * sp
    rho = _brain_radius(rng, box_shape, sp, s, semi, centre)  # (bx, by, bz), < 1 inside the brain
    tissue = _tissues(rng, rho, semi, centre, sp, s)  # (bx, by, bz) uint8
    label = np.zeros(box_shape, np.uint8)  # (bx, by, bz)
    _add_glioma(rng, label, tissue, rho, sp, s)
    if confluent[1] > 0:  # only then: the default draws exactly the random numbers it always drew
        _add_confluent(rng, label, tissue, rho, sp, s, confluent, confluent_radius_mm)
    satellite = np.zeros(box_shape, bool)  # (bx, by, bz): voxels of satellite lesions
    _add_satellites(rng, label, tissue, rho, sp, s, satellites, satellite_radius_mm, satellite)
    images = {name: _embed(img, head, shape) for name, img in _render(rng, tissue, label, sp, s, satellite, satellite_contrast).items()}
    label, tissue = _embed(label, head, shape), _embed(tissue, head, shape)  # (X, Y, Z)
    return SyntheticCase(images=images, label=label, affine=_affine(shape, sp), tissue=tissue)


def write_case(case: SyntheticCase, out_dir: str | os.PathLike, case_id: str) -> Path:
    """Write a case in the BraTS 2021 layout ``out_dir/case_id/case_id_{t1,t1ce,t2,flair,seg}.nii.gz``.

    Every file is written under a temporary name in the same folder and then renamed, so a reader
    never sees a half-written file. Images are float32, the label uint8; zooms equal the spacing.

    Args:
        case: the case to write (arrays (X, Y, Z)).
        out_dir: dataset folder; created if missing.
        case_id: folder and file name prefix, e.g. ``SYN-0000``.

    Returns:
        The case folder ``out_dir/case_id``.

    Raises:
        ValueError: if ``case_id`` is not a plain name or the case's arrays disagree in shape.
    """
    if (
        not isinstance(case_id, str)
        or not case_id
        or case_id in (".", "..")
        or "/" in case_id
        or os.sep in case_id
    ):
        raise ValueError(f"expected case_id to be a non-empty file name, got {case_id!r}")
    if sorted(case.images) != sorted(CONTRASTS):
        raise ValueError(f"expected images {list(CONTRASTS)}, got {sorted(case.images)}")
    shapes = {name: img.shape for name, img in case.images.items()} | {"seg": case.label.shape}
    if len(set(shapes.values())) != 1 or case.label.ndim != 3:
        raise ValueError(f"expected images and label of one 3D shape, got {shapes}")
    folder = Path(out_dir) / case_id
    folder.mkdir(parents=True, exist_ok=True)
    zooms = np.sqrt((case.affine[:3, :3] ** 2).sum(axis=0))
    volumes = [(c, case.images[c], np.float32) for c in CONTRASTS] + [("seg", case.label, np.uint8)]
    for name, data, dtype in volumes:
        img = nib.Nifti1Image(np.asarray(data, dtype=dtype), case.affine)
        img.set_qform(case.affine, code=1)  # scanner-anatomical RAS+
        img.set_sform(case.affine, code=1)
        img.header.set_data_dtype(dtype)
        img.header.set_zooms(tuple(float(z) for z in zooms))
        img.header.set_xyzt_units("mm")
        # the temporary name keeps .nii.gz (nibabel picks gzip from it) but never matches a glob such as "*_t1.nii.gz"
        with atomic_path(folder / f"{case_id}_{name}.nii.gz", keep_suffix=True) as tmp:
            nib.save(img, tmp)
    return folder


def generate_dataset(
    out_dir: str | os.PathLike,
    n_cases: int,
    shape: Sequence[int] = (240, 240, 155),
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    seed: int = 0,
    *,
    satellites: Sequence[int] = SATELLITES,
    satellite_radius_mm: Sequence[float] = SATELLITE_RADIUS_MM,
    satellite_contrast: float = SATELLITE_CONTRAST,
    confluent: Sequence[int] = CONFLUENT,
    confluent_radius_mm: Sequence[float] = CONFLUENT_RADIUS_MM,
    progress: bool = False,
) -> list[Path]:
    """Generate (or reuse) a dataset of cases ``SYN-0000``, ``SYN-0001``, ... in ``out_dir``.

    Case ``i`` comes from ``np.random.default_rng([seed, i])``, so it does not depend on
    ``n_cases``. The folder is a cache: the manifest ``synthetic.json`` (parameters and case ids) is
    written last; a later call with the same parameters only regenerates missing cases and otherwise
    touches nothing. A folder without a manifest is (re)generated, except that a run interrupted
    with the same parameters resumes, keeping its finished cases.

    Args:
        out_dir: dataset folder; created if missing.
        n_cases: number of cases, >= 1.
        shape: (X, Y, Z) voxels per case, each >= 32.
        spacing: (SX, SY, SZ) voxel size in mm, each > 0.
        seed: non-negative dataset seed.
        satellites, satellite_radius_mm, satellite_contrast, confluent, confluent_radius_mm: the lesions
            besides the glioma (see :func:`generate_case`).
        progress: show a tqdm progress bar over the cases being generated.

    Returns:
        The case folders, in case order.

    Raises:
        ValueError: on invalid arguments, or if ``out_dir`` holds a manifest with other parameters.
    """
    if not _is_int(n_cases) or n_cases < 1:
        raise ValueError(f"expected n_cases to be an integer >= 1, got {n_cases!r}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"expected seed to be an integer >= 0, got {seed!r}")
    shape, spacing = _check_geometry(shape, spacing)
    satellites, satellite_radius_mm = _check_satellites(satellites, satellite_radius_mm)
    satellite_contrast, confluent, confluent_radius_mm = _check_lesion_options(satellite_contrast, confluent, confluent_radius_mm)
    out = Path(out_dir)
    params = {
        "generator": "medseg.data.synthetic",  # not __name__: "__main__" from the CLI
        "version": _VERSION,
        "shape": list(shape),
        "spacing": list(spacing),
        "seed": int(seed),
        "n_cases": int(n_cases),
        "satellites": list(satellites),
        "satellite_radius_mm": list(satellite_radius_mm),
        "satellite_contrast": satellite_contrast,
        "confluent": list(confluent),
        "confluent_radius_mm": list(confluent_radius_mm),
    }
    ids = [f"SYN-{i:04d}" for i in range(n_cases)]
    manifest, partial = out / MANIFEST_NAME, out / _PARTIAL_NAME
    if manifest.exists():
        _check_same_params(_with_defaults(_read_json(manifest)), params, manifest)
        todo = [i for i in range(n_cases) if not _case_complete(out, ids[i])]
    else:
        resumable = partial.exists() and _with_defaults(_read_json(partial)) == params
        todo = [i for i in range(n_cases) if not (resumable and _case_complete(out, ids[i]))]
        out.mkdir(parents=True, exist_ok=True)
        _write_json(partial, params)
    for i in tqdm(todo, desc=f"synthetic cases -> {out}", unit="case", disable=not progress):
        case = generate_case(
            np.random.default_rng([int(seed), i]),
            shape,
            spacing,
            satellites=satellites,
            satellite_radius_mm=satellite_radius_mm,
            satellite_contrast=satellite_contrast,
            confluent=confluent,
            confluent_radius_mm=confluent_radius_mm,
        )
        write_case(case, out, ids[i])
    if not manifest.exists():
        _write_json(manifest, {**params, "case_ids": ids})
        partial.unlink(missing_ok=True)
    return [out / case_id for case_id in ids]


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; see ``python -m medseg.data.synthetic --help``."""
    parser = argparse.ArgumentParser(
        prog="python -m medseg.data.synthetic",
        description="Write a synthetic BraTS-2021-layout dataset (t1, t1ce, t2, flair, seg per case) "
        "with a glioma and small satellite lesions per case. Reuses a folder generated with "
        "the same parameters and refuses one generated with others.",
    )
    parser.add_argument("--out", type=Path, required=True, help="dataset folder (created if missing)")
    parser.add_argument("--cases", type=int, required=True, help="number of cases (>= 1)")
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=[240, 240, 155],
        metavar=("X", "Y", "Z"),
        help="voxels per axis, each >= 32 (default: 240 240 155)",
    )
    parser.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=[1.0, 1.0, 1.0],
        metavar=("SX", "SY", "SZ"),
        help="voxel size in mm (default: 1 1 1)",
    )
    parser.add_argument("--seed", type=int, default=0, help="dataset seed, >= 0 (default: 0)")
    satellite_options = [
        ("--satellites", int, SATELLITES, "number of satellite lesions per case, drawn in [MIN, MAX]"),
        ("--satellite-radius-mm", float, SATELLITE_RADIUS_MM, "semi-axis range of the satellites' enhancing "
         "part in mm at full scale, kept within 1.2-4 voxels"),
        ("--confluent", int, CONFLUENT, "number of large confluent lesions per case, drawn in [MIN, MAX]"),
        ("--confluent-radius-mm", float, CONFLUENT_RADIUS_MM, "semi-axis range of the confluent lesions' enhancing part in mm"),
    ]  # fmt: skip
    for flag, kind, default, text in satellite_options:
        parser.add_argument(
            flag, type=kind, nargs=2, default=list(default), metavar=("MIN", "MAX"), help=f"{text} (default: %(default)s)"
        )
    parser.add_argument("--satellite-contrast", type=float, default=SATELLITE_CONTRAST, help="fraction of the lesion-tissue intensity difference satellites keep, in (0, 1] (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        cases = generate_dataset(
            args.out,
            args.cases,
            args.shape,
            args.spacing,
            args.seed,
            satellites=args.satellites,
            satellite_radius_mm=args.satellite_radius_mm,
            satellite_contrast=args.satellite_contrast,
            confluent=args.confluent,
            confluent_radius_mm=args.confluent_radius_mm,
            progress=True,
        )
    except ValueError as err:
        parser.error(str(err))
    print(f"{len(cases)} synthetic cases in {args.out.resolve()} (manifest: {MANIFEST_NAME})")
    return 0


# ----------------------------------------------------------------------------- anatomy


def _anatomy_scale(shape: tuple[int, int, int], spacing: np.ndarray) -> float:
    """Uniform shrink factor (<= 1) that fits the brain, with 2 voxels margin, in the field of view."""
    half_fov = np.asarray(shape) * spacing / 2 - 2 * spacing  # mm
    half_brain = _BRAIN_SEMI_AXES_MM * (1 + _BRAIN_JITTER) * (1 + _BRAIN_DEFORM) * _EGG_MAX + _BRAIN_OFFSET_MM
    return float(min(1.0, (half_fov / half_brain).min()))


def _brain_radius(rng, shape, spacing, s, semi, centre) -> np.ndarray:
    """Normalised brain radius (X, Y, Z) float32, < 1 inside: a deformed egg-shaped ellipsoid."""
    x, y, z = _box(shape, spacing, centre, None)[1]  # (X,1,1), (1,Y,1), (1,1,Z)
    egg = 1 + float(_EGG_MAX[0] - 1) / (1 + _BRAIN_DEFORM) * y / semi[1]  # (1, Y, 1): wider frontal lobes
    rho = np.sqrt((x / (semi[0] * egg)) ** 2 + (y / semi[1]) ** 2 + (z / semi[2]) ** 2)  # (X, Y, Z)
    rho /= 1 + _BRAIN_DEFORM * np.tanh(_smooth_noise(rng, shape, 30 * s, spacing))
    return rho


def _tissues(rng, rho, semi, centre, spacing, s) -> np.ndarray:
    """(X, Y, Z) uint8 tissue map: WM core, cortical ribbon and sulci, fissure, thalami, ventricles."""
    shape = rho.shape
    brain = rho < 1
    depth = (1 - rho) * float(semi.mean())  # (X, Y, Z) approximate depth below the surface, mm
    fold = np.tanh(_smooth_noise(rng, shape, 20 * s, spacing))  # varies thickness and sulcal depth
    sulcus = np.abs(_smooth_noise(rng, shape, 10 * s, spacing))  # its zero sheets are sulcal fundi
    ribbon = np.maximum(3.0 * s * (1 + 0.3 * fold), float(spacing.min()))  # cortical thickness, mm
    sulcal_depth = 18.0 * s * (1 + 0.4 * fold)
    gm = (depth < ribbon) | ((sulcus < 0.6) & (depth < sulcal_depth + ribbon))
    csf = (sulcus < 0.15) & (depth < sulcal_depth)
    x, _, z = _box(shape, spacing, centre, None)[1]
    upper = (z > 0) & (rho > 0.35)  # interhemispheric fissure, lined with cortex
    half_width = max(1.0 * s, 0.5 * float(spacing[0]))
    csf |= (np.abs(x) < half_width) & upper
    gm |= (np.abs(x) < half_width + 3.0 * s) & upper
    tissue = np.where(brain, WM, 0).astype(np.uint8)
    tissue[gm & brain] = GM
    for side in (-1, 1):  # thalami
        sl, blob = _blob(
            rng,
            shape,
            spacing,
            centre + s * np.array([side * 9.0, -8, 0]),
            s * np.array([7.0, 11, 7]),
            amp=0.15,
        )
        tissue[sl][blob & (tissue[sl] == WM)] = GM
    tissue[csf & brain] = CSF
    size = rng.uniform(0.7, 1.4)  # ventricle size varies a lot between people
    minimum = 0.6 * spacing  # keep them visible at coarse spacing
    ventricles = [
        (np.array([side * 7.0, 3, 12]), np.array([4.0 * size, 22, 7 * size]), 0.6) for side in (-1, 1)
    ]
    ventricles.append((np.array([0.0, -2, -4]), np.array([1.5 * size, 10, 8]), 0.0))  # third ventricle
    for offset, half, bend in ventricles:
        sl, blob = _blob(rng, shape, spacing, centre + s * offset, np.maximum(s * half, minimum), 0.2, bend)
        tissue[sl][blob & (tissue[sl] > 0)] = CSF
    return tissue


# ----------------------------------------------------------------------------- lesions


def _add_glioma(rng, label, tissue, rho, spacing, s) -> None:
    """Draw the main tumour into ``label`` (X, Y, Z): NCR core, ET rim, ED around, one component."""
    centre = _pick(rng, (rho < 0.6) & (tissue >= GM), spacing)
    vox = float(spacing.min())
    r_core = max(rng.uniform(4, 10) * s, 1.5 * vox)  # mm; minima keep every class visible
    t_rim = max(rng.uniform(2, 4) * s, 1.0 * vox)
    t_oedema = max(rng.uniform(5, 15) * s, 1.5 * vox)
    reach = 1.3 * (r_core + t_rim) + 1.15 * 1.5 * t_oedema + vox
    sl, (x, y, z) = _box(label.shape, spacing, centre, np.full(3, reach))
    dist = np.sqrt(x**2 + y**2 + z**2)  # (bx, by, bz) mm from the centre
    core = r_core * (1 + 0.3 * np.tanh(_smooth_noise(rng, dist.shape, r_core, spacing)))
    rim = core + t_rim * (1 + 0.3 * np.tanh(_smooth_noise(rng, dist.shape, r_core, spacing)))
    spread = np.where(tissue[sl] == WM, 1.15, 0.8)  # oedema follows white matter
    noise = _smooth_noise(rng, dist.shape, 0.5 * (r_core + t_rim + t_oedema), spacing)
    oedema = rim + t_oedema * (1 + 0.5 * np.tanh(noise)) * spread
    sub = np.select([dist < core, dist < rim, dist < oedema], [NCR, ET, ED], 0).astype(np.uint8)
    sub[tissue[sl] == 0] = 0
    parts, n = ndimage.label(sub > 0, structure=np.ones((3, 3, 3)))
    if n > 1:  # clipping by the brain surface can cut off fragments; keep the tumour body
        sub[parts != 1 + int(np.argmax(np.bincount(parts.ravel())[1:]))] = 0
    label[sl] = sub


def _add_confluent(rng, label, tissue, rho, spacing, s, count, radius_mm) -> None:
    """Add ``count`` (min, max) large lesions (ET with an oedema rim, bent blobs) apart from all lesions."""
    free = (rho < 0.8) & (tissue >= GM) & (label == 0)
    for _ in range(int(rng.integers(count[0], count[1] + 1))):
        semi = np.maximum(rng.uniform(*radius_mm) * s * rng.uniform(0.7, 1.3, 3), 2 * spacing)  # (3,) mm
        _place_satellite(rng, label, tissue, free, semi, True, spacing, rim_probability=1.0)


def _add_satellites(rng, label, tissue, rho, spacing, s, count, radius_mm, satellite=None) -> None:
    """Add ``count`` (min, max) enhancing satellites (some with an oedema rim) to ``label``, apart from
    all lesions, with ET semi-axes in ``radius_mm`` (min, max) at full scale; their voxels are marked in
    ``satellite`` (bool, like ``label``) when given."""
    n_sat = int(rng.integers(count[0], count[1] + 1))
    # ET semi-axes in voxels, log-uniform and stratified so each case spans small to large: the
    # physical range is floored so lesions stay visible on coarse grids and capped so voxel counts
    # stay within SATELLITE_VOXELS on fine ones.
    lo = np.clip(radius_mm[0] * s / spacing, _SAT_MIN_VOXELS, _SAT_MAX_VOXELS)  # (3,) voxels; 1.2: face neighbours in
    hi = np.clip(radius_mm[1] * s / spacing, _SAT_SPAN_VOXELS, _SAT_MAX_VOXELS)
    quantiles = (np.arange(n_sat) + rng.uniform(size=n_sat)) / n_sat  # (n_sat,) small to large
    free = (rho < 0.85) & (tissue >= GM) & (label == 0)
    placed = 0
    for u in quantiles[::-1]:  # the large ones first, while there is room
        placed += _place_satellite(rng, label, tissue, free, lo * (hi / lo) ** u * spacing, u > 0.4, spacing, satellite)
    for _ in range(max(0, count[0] - placed)):  # crowded (tiny or very anisotropic volume): smallest ones
        placed += _place_satellite(rng, label, tissue, free, lo * spacing, False, spacing, satellite)
    if placed < count[0]:
        raise RuntimeError(
            f"expected room for >= {count[0]} satellite lesions, got {placed}; use a larger shape or fewer satellites"
        )


def _place_satellite(rng, label, tissue, free, semi_et, may_have_rim, spacing, satellite=None, rim_probability=0.6) -> bool:
    """Try to draw one satellite with ET semi-axes ``semi_et`` (3,) mm; False if no room was found."""
    rim = may_have_rim and rng.random() < rim_probability  # a one-voxel oedema rim on some of the larger ones
    semi_out = semi_et + (spacing if rim else 0.0)
    amp = 0.12
    for _ in range(100):
        sl, grids = _box(label.shape, spacing, _pick(rng, free, spacing), semi_out * (1 + amp) + spacing)
        q_et = np.sqrt(sum((g / a) ** 2 for g, a in zip(grids, semi_et, strict=True)))  # (bx, by, bz)
        q_out = np.sqrt(sum((g / a) ** 2 for g, a in zip(grids, semi_out, strict=True)))
        bound = 1 + amp * np.tanh(_smooth_noise(rng, q_et.shape, 2 * semi_et.max(), spacing))
        et, out = q_et < bound, q_out < bound  # out contains et
        near = ndimage.binary_dilation(out, structure=np.ones((3, 3, 3)))
        if (tissue[sl][out] == 0).any() or (label[sl][near] > 0).any():
            continue  # must lie inside the brain and not touch another lesion (26-connectivity)
        label[sl][out & ~et] = ED
        label[sl][et] = ET
        if satellite is not None:
            satellite[sl][out] = True
        return True
    return False


# ----------------------------------------------------------------------------- images


def _render(rng, tissue, label, spacing, s, satellite=None, satellite_contrast=1.0) -> dict[str, np.ndarray]:
    """Per-contrast images (X, Y, Z) float32: class means, texture, bias field, Rician noise, scale.
    Satellite voxels keep ``satellite_contrast`` of their class's mean difference from the tissue below."""
    brain = tissue > 0
    base = tissue[brain]  # (N,) tissue classes of the brain voxels
    lesion = label[brain]
    cls = np.where(lesion > 0, _CLASS_OF_LABEL[lesion], base)
    faint = satellite[brain] if satellite is not None and satellite_contrast < 1 else None  # (N,) bool
    texture = 1 + _TEXTURE[cls] * _smooth_noise(rng, tissue.shape, 4 * s, spacing)[brain]  # (N,)
    images = {}
    for contrast in CONTRASTS:
        means = np.asarray(_MEANS[contrast], np.float32)
        bias = np.exp(_BIAS * _smooth_noise(rng, tissue.shape, 80 * s, spacing)[brain])  # (N,)
        mean = means[cls]
        if faint is not None:
            mean = np.where(faint, means[base] + np.float32(satellite_contrast) * (means[cls] - means[base]), mean)
        signal = mean * texture * bias
        real, imag = rng.standard_normal((2, cls.size), dtype=np.float32) * (_NOISE * means[1:4].mean())
        volume = np.zeros(tissue.shape, np.float32)  # (X, Y, Z)
        volume[brain] = np.sqrt((signal + real) ** 2 + imag**2) * rng.uniform(200, 1500)
        images[contrast] = volume
    return images


# ----------------------------------------------------------------------------- helpers


def _smooth_noise(rng, shape, step_mm, spacing) -> np.ndarray:
    """Smooth Gaussian random field (X, Y, Z) float32 with unit variance and features of ~step_mm.

    A coarse lattice of white noise (one node per step, at least 1.5 voxels) is interpolated with
    cubic B-splines, one axis at a time as matrix products: no per-voxel Python work.
    """
    weights = [_bspline_weights(rng, n, max(step_mm / d, 1.5)) for n, d in zip(shape, spacing, strict=True)]
    coarse = rng.standard_normal([w.shape[1] for w in weights], dtype=np.float32)  # (a, b, c)
    field = np.tensordot(weights[0], coarse, axes=(1, 0))  # (X, b, c)
    field = np.tensordot(field, weights[1], axes=(1, 1))  # (X, c, Y)
    return np.tensordot(field, weights[2], axes=(1, 1))  # (X, Y, Z)


def _bspline_weights(rng, n: int, step: float) -> np.ndarray:
    """(n, n_coarse) cubic B-spline weights, rows normalised so the field keeps unit variance."""
    n_coarse = math.ceil((n - 1) / step) + 5
    t = np.arange(n) / step + 1.5 + rng.uniform()  # random phase of the lattice
    u = np.abs(t[:, None] - np.arange(n_coarse)[None, :])
    w = np.where(u < 1, 2 / 3 - u**2 + u**3 / 2, np.where(u < 2, (2 - np.minimum(u, 2)) ** 3 / 6, 0.0))
    return (w / np.sqrt((w**2).sum(axis=1, keepdims=True))).astype(np.float32)


def _box(shape, spacing, centre, reach):
    """Voxel box around ``centre`` +- ``reach`` mm (whole volume if None), clipped to the volume.

    Returns:
        The box's slices and three open grids (bx,1,1), (1,by,1), (1,1,bz) of mm from ``centre``.
    """
    n = np.asarray(shape)
    if reach is None:
        lo, hi = np.zeros(3, int), n
    else:
        mid = centre / spacing + (n - 1) / 2
        lo = np.clip(np.floor(mid - reach / spacing), 0, n).astype(int)
        hi = np.clip(np.ceil(mid + reach / spacing) + 1, 0, n).astype(int)
    grids = tuple(
        ((np.arange(lo[k], hi[k]) - (n[k] - 1) / 2) * spacing[k] - centre[k])
        .astype(np.float32)
        .reshape([-1 if j == k else 1 for j in range(3)])
        for k in range(3)
    )
    return tuple(slice(a, b) for a, b in zip(lo, hi, strict=True)), grids


def _blob(rng, shape, spacing, centre, semi, amp, bend=0.0):
    """Irregular ellipsoid, optionally bent along A-P: its box slices and (bx, by, bz) bool mask."""
    reach = semi * (1 + amp) + spacing
    reach[2] += abs(bend) * semi[2] * (1 + amp) ** 2
    sl, (x, y, z) = _box(shape, spacing, centre, reach)
    z = z - bend * semi[2] * (y / semi[1]) ** 2  # (1, by, bz): ends curve down like a C
    q = np.sqrt((x / semi[0]) ** 2 + (y / semi[1]) ** 2 + (z / semi[2]) ** 2)
    return sl, q < 1 + amp * np.tanh(_smooth_noise(rng, q.shape, 2 * semi.min(), spacing))


def _pick(rng, mask, spacing) -> np.ndarray:
    """A random voxel of ``mask`` (X, Y, Z), as (3,) mm from the volume centre."""
    candidates = np.flatnonzero(mask)
    if candidates.size == 0:
        raise RuntimeError("expected free brain voxels to place a lesion, got none; use a larger shape")
    index = np.unravel_index(candidates[rng.integers(candidates.size)], mask.shape)
    return (np.array(index) - (np.asarray(mask.shape) - 1) / 2) * spacing


def _embed(box: np.ndarray, where: tuple[slice, ...], shape: tuple[int, int, int]) -> np.ndarray:
    """Zero volume of ``shape`` (X, Y, Z) with ``box`` (bx, by, bz) placed at ``where``."""
    volume = np.zeros(shape, box.dtype)
    volume[where] = box
    return volume


def _affine(shape, spacing) -> np.ndarray:
    """(4, 4) RAS+ affine: diagonal spacing, origin chosen so the volume's centre is at 0 mm."""
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2 * np.asarray(spacing)
    return affine


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    values = tuple(shape) if isinstance(shape, (Sequence, np.ndarray)) else ()
    if len(values) != 3 or not all(_is_int(v) and v >= _MIN_SIZE for v in values):
        raise ValueError(f"expected shape to be 3 integers >= {_MIN_SIZE}, got {shape!r}")
    return tuple(int(v) for v in values)


def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(spacing) if isinstance(spacing, (Sequence, np.ndarray)) else ()
    ok = len(values) == 3 and all(
        isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        for v in values
    )
    if not ok:
        raise ValueError(f"expected spacing to be 3 finite numbers > 0 (mm), got {spacing!r}")
    return tuple(float(v) for v in values)


def _check_satellites(
    satellites: Sequence[int], radius_mm: Sequence[float]
) -> tuple[tuple[int, int], tuple[float, float]]:
    """Validated (satellites, satellite_radius_mm): integers 0 <= min <= max, and mm 0 < min <= max."""
    count = tuple(satellites) if isinstance(satellites, (Sequence, np.ndarray)) else ()
    if len(count) != 2 or not all(_is_int(v) and v >= 0 for v in count) or count[0] > count[1]:
        raise ValueError(f"expected satellites to be 2 integers 0 <= min <= max, got {satellites!r}")
    radius = tuple(radius_mm) if isinstance(radius_mm, (Sequence, np.ndarray)) else ()
    ok = len(radius) == 2 and all(
        isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        for v in radius
    )
    if not ok or radius[0] > radius[1]:
        raise ValueError(f"expected satellite_radius_mm to be 2 finite numbers 0 < min <= max (mm), got {radius_mm!r}")
    return (int(count[0]), int(count[1])), (float(radius[0]), float(radius[1]))


def _check_lesion_options(contrast: float, confluent: Sequence[int], radius_mm: Sequence[float]) -> tuple[float, tuple[int, int], tuple[float, float]]:
    """Validated (satellite_contrast, confluent, confluent_radius_mm)."""
    if isinstance(contrast, bool) or not isinstance(contrast, (int, float, np.number)) or not (0 < contrast <= 1):
        raise ValueError(f"expected satellite_contrast in (0, 1], got {contrast!r}")
    try:
        count, radius = _check_satellites(confluent, radius_mm)
    except ValueError as err:
        raise ValueError(str(err).replace("satellites", "confluent").replace("satellite_radius_mm", "confluent_radius_mm")) from None
    return float(contrast), count, radius


def _check_geometry(
    shape: Sequence[int], spacing: Sequence[float]
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Validated (shape, spacing); the brain, shrunk to fit the field of view, must span enough voxels."""
    shape, spacing = _check_shape(shape), _check_spacing(spacing)
    sp = np.asarray(spacing)
    span = 2 * _BRAIN_SEMI_AXES_MM * (1 - _BRAIN_JITTER) * _anatomy_scale(shape, sp) / sp  # (3,) voxels
    if span.min() < _MIN_BRAIN_SPAN:
        raise ValueError(
            f"expected shape and spacing where the brain spans >= {_MIN_BRAIN_SPAN} voxels per axis, got "
            f"{np.round(span).astype(int).tolist()} voxels for shape={shape}, spacing={spacing} (the brain "
            "shrinks to fit the smallest field-of-view axis; use more voxels or more isotropic spacing)"
        )
    return shape, spacing


def _case_complete(out: Path, case_id: str) -> bool:
    return all((out / case_id / f"{case_id}_{name}.nii.gz").is_file() for name in (*CONTRASTS, "seg"))


def _with_defaults(found: Any) -> Any:
    """Manifest parameters, with the satellite options that manifests written before they existed lacked."""
    if not isinstance(found, dict):
        return found
    defaults = {
        "satellites": list(SATELLITES), "satellite_radius_mm": list(SATELLITE_RADIUS_MM), "satellite_contrast": SATELLITE_CONTRAST,
        "confluent": list(CONFLUENT), "confluent_radius_mm": list(CONFLUENT_RADIUS_MM),
    }  # fmt: skip
    return {**defaults, **found}


def _check_same_params(found: Any, expected: dict, manifest: Path) -> None:
    keys = [k for k in expected if not isinstance(found, dict) or found.get(k) != expected[k]]
    if keys:
        want = ", ".join(f"{k}={expected[k]}" for k in keys)
        got = ", ".join(f"{k}={found.get(k) if isinstance(found, dict) else None}" for k in keys)
        raise ValueError(
            f"expected {manifest.parent} to hold a synthetic dataset with {want}, got {got} "
            f"(from {manifest}); use another output folder or delete this one"
        )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"expected a readable JSON manifest at {path}, got {err}") from err


def _write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
