"""DICOM series as prediction input: find them in a folder, check them, read them into volumes.

A folder (searched recursively) may hold any number of series, each file one instance; a series is the files that
share a SeriesInstanceUID, whatever the folder structure or the file names. An image series becomes a volume
``(slice, row, column)`` in patient (LPS) space through highdicom (:func:`read_series`): slices sorted by their
ImagePositionPatient along the slice normal (never by file name or InstanceNumber), the modality transform applied
(CT RescaleSlope / RescaleIntercept: stored values to Hounsfield units). :func:`to_nifti` gives it as the NIfTI
image the rest of medseg reads: axes (column, row, slice), like ``dcm2niix``, RAS affine.

Before any pixel is read, :func:`series_problems` checks the headers, so a broken series is refused with a message
that names it (``series <SeriesInstanceUID> ('<SeriesDescription>', <n> files in <folder>): ...``): a missing slice
(a gap a whole number of spacings wide), unevenly spaced slices, several slices at one position, mixed orientations
or pixel grids, a single slice, a compressed transfer syntax no installed decoder reads. Objects without pixels
(structured reports, key object selections, presentation states) and segmentations are not image series: they are
listed as skipped, never read as images; so are localizers (ImageType LOCALIZER: scout views). An enhanced
(multi-frame) object is one series of one file, read through highdicom's frame geometry.

Cases: a single-channel model predicts every image series as its own case; a model of several channels needs a
mapping of its channels (``data.modalities``) to series (:func:`dicom_cases`): each channel a pattern matched
(case-insensitively, ``fnmatch``) against the SeriesDescription, or a SeriesInstanceUID; the series of one study
(StudyInstanceUID) that match form one case. The first channel's series is the case's grid (and the one its SEG
references): the others, when acquired on other grids in the same frame of reference (a sagittal 3D T1 beside an
axial FLAIR), are resampled onto it (trilinear, in patient coordinates).
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import re
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.dicom import require_dicom

if TYPE_CHECKING:
    import highdicom
    import nibabel as nib

log = logging.getLogger("medseg")

SEGMENTATION_CLASSES = {"1.2.840.10008.5.1.4.1.1.66.4": "Segmentation", "1.2.840.10008.5.1.4.1.1.481.3": "RT Structure Set"}
GEOMETRY_TOLERANCE_MM = 0.01  # positions and spacings agreeing within this are equal (DICOM stores decimal strings)
SPACING_TOLERANCE = 0.01  # relative: slice spacings may differ by 1% (rounded positions); more is uneven spacing
# The header elements the scan reads (the pixel data is read only when the case is predicted).
_HEADER_TAGS = (
    "SOPClassUID", "SeriesInstanceUID", "StudyInstanceUID", "PatientID", "StudyDate", "Modality", "SeriesNumber",
    "SeriesDescription", "Rows", "Columns", "PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient",
    "NumberOfFrames", "InstanceNumber", "ImageType", "FrameOfReferenceUID", "SOPInstanceUID",
)  # fmt: skip


class DicomSeriesError(ValueError):
    """A DICOM series that cannot be read as a volume; the message names the series and the problem."""


@dataclass(frozen=True)
class DicomSeries:
    """One series found in a folder (header facts only; :func:`read_series` reads the pixels).

    Attributes:
        uid: SeriesInstanceUID.
        files: its instances' files, sorted by name (the slice order comes from their positions, not from this).
        sop_class: SOPClassUID of its instances (of the first when they differ: then a problem).
        image: whether its instances carry a pixel grid in patient space (an image series) and are not localizers.
        localizer: ImageType says LOCALIZER (scout views: planning images, never a volume to segment).
    """

    uid: str
    files: tuple[str, ...]
    sop_class: str
    modality: str
    description: str
    series_number: int | None
    patient_id: str
    study_uid: str
    study_date: str
    image: bool
    localizer: bool = False
    frame_of_reference: str = ""

    @property
    def folder(self) -> str:
        """The folder holding its files (their common folder)."""
        return os.path.commonpath([str(Path(f).parent) for f in self.files])

    def describe(self) -> str:
        """``series <uid> ('<description>', <n> file(s) in <folder>)``: how messages name it."""
        return f"series {self.uid} ({self.description!r}, {self.modality or 'no modality'}, {len(self.files)} file(s) in {self.folder})"


def is_dicom_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder whose files include DICOM files and no NIfTI files (a folder of scans to read as
    DICOM rather than as a NIfTI dataset)."""
    folder = Path(path)
    if not folder.is_dir():
        return False
    found = False
    for file in _files(folder):
        if file.name.endswith((".nii", ".nii.gz")):
            return False
        found = found or _looks_like_dicom(file)
    return found  # every file looked at: a NIfTI file anywhere makes it a NIfTI dataset


def find_series(folder: str | os.PathLike) -> list[DicomSeries]:
    """Every series of the DICOM files under ``folder`` (recursively; hidden files and ``DICOMDIR`` ignored), ordered
    by patient, study, series number and UID.

    Raises:
        DicomSeriesError: no DICOM file under ``folder``.
    """
    require_dicom()
    import pydicom

    by_series: dict[str, list[tuple[str, Any]]] = defaultdict(list)
    for file in _files(Path(folder)):
        if not _looks_like_dicom(file):
            continue
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=list(_HEADER_TAGS))
        except Exception as err:  # not DICOM after all, or truncated: named, not fatal for the others
            log.warning("%s: not a readable DICOM file (%s: %s); ignored", file, type(err).__name__, _first_line(err))
            continue
        uid = str(ds.get("SeriesInstanceUID", "")) or f"(no SeriesInstanceUID: {file})"
        by_series[uid].append((str(file), ds))
    duplicates = 0
    for uid, members in by_series.items():  # copies of one instance (a CD export's duplicates): the first file kept
        members.sort(key=lambda m: m[0])
        kept: dict[str, tuple[str, Any]] = {}
        for member in members:
            kept.setdefault(str(member[1].get("SOPInstanceUID", "")) or member[0], member)
        duplicates += len(members) - len(kept)
        by_series[uid] = list(kept.values())
    if duplicates:
        log.warning("%s: %d file(s) repeat an instance (same SOPInstanceUID) of another file; each instance read once", folder, duplicates)
    if not by_series:
        raise DicomSeriesError(f"{folder}: no DICOM file found (looked for files with the DICM preamble or a .dcm suffix)")
    found = []
    for uid, members in by_series.items():
        first = members[0][1]
        sop_class = str(first.get("SOPClassUID", ""))
        # An image series when any instance is an image: a stray non-image instance then fails the case by name
        # (series_problems) instead of hiding the series among the skipped objects.
        image = sop_class not in SEGMENTATION_CLASSES and any(_is_image(ds) for _, ds in members)
        localizer = image and all(_is_localizer(ds) for _, ds in members)
        number = first.get("SeriesNumber")
        found.append(DicomSeries(
            uid=uid, files=tuple(f for f, _ in members), sop_class=sop_class, modality=str(first.get("Modality", "")),
            description=str(first.get("SeriesDescription", "")), series_number=int(number) if number not in (None, "") else None,
            patient_id=str(first.get("PatientID", "")), study_uid=str(first.get("StudyInstanceUID", "")), study_date=str(first.get("StudyDate", "")),
            image=image and not localizer, localizer=localizer, frame_of_reference=str(first.get("FrameOfReferenceUID", "")),
        ))  # fmt: skip
    return sorted(found, key=lambda s: (s.patient_id, s.study_uid, s.series_number if s.series_number is not None else -1, s.uid))


def not_an_image_reason(series: DicomSeries) -> str:
    """Why ``series`` is skipped rather than read: what kind of object it is."""
    import pydicom.uid

    if series.localizer:
        return f"{series.describe()}: a localizer (ImageType LOCALIZER: scout views), not a volume to segment: skipped"
    kind = SEGMENTATION_CLASSES.get(series.sop_class) or pydicom.uid.UID(series.sop_class).name if series.sop_class else "object without SOPClassUID"
    return f"{series.describe()}: a {kind} object ({series.modality or 'no modality'}), not an image series: skipped"


def series_problems(series: DicomSeries, datasets: Sequence[Any] | None = None) -> list[str]:
    """What makes ``series`` unreadable as a 3D volume, from its headers (no pixel data read); ``[]`` when readable.

    Args:
        series: an image series of :func:`find_series`.
        datasets: its instances' headers (read from ``series.files`` when ``None``).

    Returns:
        One message per problem, each naming the series; headers too broken to check (an unreadable file, a
        malformed value) are a problem too, never an exception that would stop the other series.
    """
    require_dicom()
    import pydicom

    try:
        if datasets is None:
            datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in series.files]
        return _header_problems(series.describe(), datasets)
    except Exception as err:  # a malformed header value: this series' problem, not the run's
        return [f"{series.describe()}: headers that cannot be checked ({type(err).__name__}: {_first_line(err)})"]


def _header_problems(name: str, datasets: Sequence[Any]) -> list[str]:
    """:func:`series_problems` of the headers ``datasets`` of the series called ``name``."""
    import pydicom
    from pydicom.pixels import get_decoder

    problems = []
    syntaxes = {str(ds.file_meta.TransferSyntaxUID) for ds in datasets if "TransferSyntaxUID" in getattr(ds, "file_meta", {})}
    for syntax in sorted(syntaxes):
        uid = pydicom.uid.UID(syntax)
        if uid.is_compressed:
            try:
                decoder = get_decoder(uid)
                available, missing = decoder.is_available, "; ".join(decoder.missing_dependencies)
            except NotImplementedError:
                available, missing = False, "no pydicom decoder exists for it"
            if not available:
                problems.append(f"{name}: pixel data compressed as {uid.name} ({uid}), which no installed decoder reads ({missing}); install one of those (the dicom extra's python-gdcm reads JPEG Lossless, JPEG-LS, JPEG 2000 and RLE), or export the series uncompressed")
    samples = {int(ds.get("SamplesPerPixel", 1) or 1) for ds in datasets}
    if samples != {1}:
        problems.append(f"{name}: colour pixels ({max(samples)} samples per pixel: a screen capture or a rendering?); a scan volume has one")
    if len({str(ds.SOPClassUID) for ds in datasets if "SOPClassUID" in ds}) > 1:
        problems.append(f"{name}: its instances are of {len({str(ds.SOPClassUID) for ds in datasets})} different SOP classes")
    not_images = sum(not _is_image(ds) for ds in datasets)
    if not_images:
        return [*problems, f"{name}: {not_images} of its {len(datasets)} instances carry no image geometry (ImagePositionPatient, ImageOrientationPatient): not one volume"]
    frames = [int(ds.get("NumberOfFrames", 1) or 1) for ds in datasets]
    if len(datasets) == 1 and frames[0] > 1:
        return problems  # one multi-frame instance: its frames' geometry is checked by highdicom when read
    if max(frames) > 1:
        return [*problems, f"{name}: {sum(f > 1 for f in frames)} multi-frame instances in one series (echoes, time points or diffusion directions?); a volume is one multi-frame instance or single-frame slices"]
    if len(datasets) < 2:
        return [*problems, f"{name}: a single slice; a 3D volume needs at least 2"]
    grids = {(int(ds.Rows), int(ds.Columns), *np.round(np.asarray(ds.get("PixelSpacing", [0, 0]), dtype=float), 4)) for ds in datasets}
    if len(grids) > 1:
        problems.append(f"{name}: slices of {len(grids)} different pixel grids (rows, columns, pixel spacing): {sorted(grids)[:3]}")
    orientations = np.asarray([ds.ImageOrientationPatient for ds in datasets], dtype=float)  # (N, 6)
    if np.abs(orientations - orientations[0]).max() > 1e-3:
        distinct = len({tuple(np.round(o, 3)) for o in orientations})
        return [*problems, f"{name}: mixed orientations ({distinct} different ImageOrientationPatient: e.g. a localizer or several stacks in one series); a volume needs one"]
    normal = np.cross(orientations[0, :3], orientations[0, 3:])  # (3,) slice direction
    positions = np.sort(np.asarray([ds.ImagePositionPatient for ds in datasets], dtype=float) @ normal)  # (N,) mm along the normal
    steps = np.diff(positions)  # (N - 1,)
    repeated = int((steps < GEOMETRY_TOLERANCE_MM).sum())
    if repeated:
        return [*problems, f"{name}: {len(positions) - repeated} positions for {len(positions)} slices (several acquisitions, echoes or time points in one series?); a volume needs one slice per position"]
    spacing = float(np.median(steps))
    if steps.max() - steps.min() > max(GEOMETRY_TOLERANCE_MM, SPACING_TOLERANCE * spacing):
        gaps = [i for i, step in enumerate(steps) if step > spacing * (1 + SPACING_TOLERANCE)]
        whole = [i for i in gaps if abs(steps[i] / spacing - round(steps[i] / spacing)) < SPACING_TOLERANCE and round(steps[i] / spacing) >= 2]
        if whole and len(whole) == len(gaps) and steps.min() > spacing * (1 - SPACING_TOLERANCE):
            missing = sum(round(steps[i] / spacing) - 1 for i in whole)
            where = ", ".join(f"between {positions[i]:.2f} and {positions[i + 1]:.2f} mm" for i in whole[:3])
            problems.append(f"{name}: {missing} slice(s) missing ({where} along the slice normal, where the others are {spacing:.3g} mm apart); the series is incomplete")
        else:
            problems.append(f"{name}: unevenly spaced slices (steps from {steps.min():.3g} to {steps.max():.3g} mm along the slice normal); a volume needs one slice spacing")
    return problems


def read_series(series: DicomSeries) -> highdicom.Volume:
    """The pixel volume of an image series: ``(slice, row, column)`` float32 after the modality transform (CT: Hounsfield
    units), with its affine in patient (LPS) space.

    Raises:
        DicomSeriesError: naming the series, for any problem of :func:`series_problems` or a failure to read it.
    """
    require_dicom()
    import highdicom as hd
    import pydicom

    if not series.image:
        raise DicomSeriesError(not_an_image_reason(series))
    try:
        datasets = [pydicom.dcmread(f) for f in series.files]
    except Exception as err:
        raise DicomSeriesError(f"{series.describe()}: unreadable file ({type(err).__name__}: {err})") from err
    problems = series_problems(series, datasets)
    if problems:
        raise DicomSeriesError("; ".join(problems))
    try:
        if len(datasets) == 1:  # one multi-frame instance (enhanced CT/MR)
            volume = hd.Image.from_dataset(datasets[0]).get_volume(dtype=np.float32, apply_real_world_transform=False, apply_voi_transform=False)
        else:
            # The modality transform (RescaleSlope / RescaleIntercept, a modality LUT), not a real-world value map nor
            # a display (VOI) window: the values dcm2niix writes, which a model trained on converted NIfTI has seen.
            volume = hd.get_volume_from_series(datasets, dtype=np.float32, apply_real_world_transform=False, apply_voi_transform=False)
    except Exception as err:  # highdicom's own geometry and pixel checks
        raise DicomSeriesError(f"{series.describe()}: cannot be read as a volume ({type(err).__name__}: {_first_line(err)})") from err
    return volume


def to_nifti(volume: highdicom.Volume) -> nib.Nifti1Image:
    """``volume`` (``(slice, row, column)``, LPS) as a float32 NIfTI image of axes (column, row, slice) with the RAS affine
    nibabel expects: the grid and orientation ``dcm2niix`` gives, on which labels map back voxel for voxel
    (:func:`from_nifti_grid`)."""
    image = volume.permute_spatial_axes([2, 1, 0]).to_nibabel()
    image.set_data_dtype(np.float32)
    return image


def from_nifti_grid(array: np.ndarray, image: nib.Nifti1Image) -> highdicom.Volume:
    """An array on the grid of a :func:`to_nifti` image (``(X, Y, Z)`` or ``(X, Y, Z, C)``) back as a highdicom volume
    ``(slice, row, column[, C])`` in the source series' geometry."""
    import highdicom as hd

    volume = hd.Volume.from_nibabel(image.__class__(np.zeros(image.shape[:3], dtype=np.uint8), image.affine), coordinate_system="PATIENT")
    volume = volume.permute_spatial_axes([2, 1, 0])  # (slice, row, column), the source's
    if array.ndim == 3:
        return volume.with_array(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    segments = {"SegmentNumber": list(range(1, array.shape[3] + 1))}  # the last axis: one channel per segment
    return volume.with_array(np.ascontiguousarray(np.transpose(array, (2, 1, 0, 3))), channels=segments)


def dicom_cases(folder: str | os.PathLike, staging: str | os.PathLike, in_channels: int | None, modalities: Sequence[str] = (), channels: Mapping[str, str] | None = None) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """The prediction cases of a DICOM folder, and the objects skipped.

    Args:
        folder: searched recursively (:func:`find_series`).
        staging: where each case's channels are written as NIfTI when it is read (:func:`stage_case`).
        in_channels: the model's number of image channels.
        modalities: the model's channel names (``data.modalities``), in channel order.
        channels: channel name -> pattern of the SeriesDescription (``fnmatch``, case-insensitive) or a
            SeriesInstanceUID; required for models of several channels, ``None`` for single-channel ones.

    Returns:
        Case records ``{"case", "image": [staged NIfTI file per channel], "label": None, "dicom": [DicomSeries per
        channel], "source": ["dicom:<SeriesInstanceUID> (<n> files)" per channel]}`` (the file count: a series
        completed since an earlier run is predicted again), with ``"problem"`` (a message naming the
        series or study) for a case that cannot be read, and ``{"series", "reason"}`` of each non-image object.

    Raises:
        DicomSeriesError: no DICOM file, or no image series at all.
        ValueError: ``channels`` missing for a model of several channels, or not naming its channels.
    """
    found = find_series(folder)
    skipped = [{"series": s.uid, "reason": not_an_image_reason(s)} for s in found if not s.image]
    images = [s for s in found if s.image]
    if not images:
        raise DicomSeriesError(f"{folder}: no image series among {len(found)} DICOM series ({'; '.join(r['reason'] for r in skipped[:3])})")
    names = list(modalities) if modalities else [f"channel{i}" for i in range(in_channels or 1)]
    if channels is None:
        if (in_channels or 1) > 1:
            listed = "; ".join(f"{s.uid} {s.description!r}" for s in images[:6])
            raise ValueError(f"the model reads {in_channels} channels ({', '.join(names)}); map them to series with dicom_channels={{{names[0]}: '<SeriesDescription pattern>', ...}} "
                             f"(series found: {listed})")
        groups = [(_case_stem(s, single=True), [s], None) for s in images]
    else:
        if sorted(channels) != sorted(names):
            raise ValueError(f"expected dicom_channels to map exactly the model's channels {names}, got {sorted(channels)}")
        groups = []
        by_study: dict[str, list[DicomSeries]] = defaultdict(list)
        for s in images:
            by_study[s.study_uid].append(s)
        for study, members in by_study.items():
            chosen, problem = [], None
            for name in names:
                pattern = str(channels[name])
                hits = [s for s in members if s.uid == pattern or fnmatch.fnmatch(s.description.lower(), pattern.lower())]
                if len(hits) != 1:
                    listed = "; ".join(f"{s.uid} {s.description!r}" for s in (hits or members)[:6])
                    problem = (f"study {study} (patient {members[0].patient_id}): {'no' if not hits else len(hits)} series match{'es' if len(hits) == 1 else ''} channel {name} "
                               f"(dicom_channels.{name}={pattern!r}); {'matching' if hits else 'its'} series: {listed}")
                    break
                chosen.append(hits[0])
            if problem is None and len({s.uid for s in chosen}) < len(chosen):
                problem = f"study {study} (patient {members[0].patient_id}): one series matches several channels ({', '.join(f'{n}: {s.description!r}' for n, s in zip(names, chosen))}); make the dicom_channels patterns distinct"
            groups.append((_case_stem(members[0], single=False), chosen if problem is None else members, problem))
    cases = []
    stems = [stem for stem, _, _ in groups]
    for (stem, series, problem) in groups:
        case = stem if stems.count(stem) == 1 else f"{stem}_{_uid_tag(series[0].uid)}"
        record: dict[str, Any] = {"case": case, "image": [str(Path(staging) / f"{case}_{i:04d}.nii") for i in range(len(series))], "label": None, "dicom": series, "source": [f"dicom:{s.uid} ({len(s.files)} files)" for s in series]}
        if problem is None:
            issues = [p for s in series for p in series_problems(s)]
            problem = "; ".join(issues) or None
        if problem is not None:
            record["problem"] = problem
        cases.append(record)
    return cases, skipped


def stage_case(record: Mapping[str, Any]) -> None:
    """Read a DICOM case's series and write each as the NIfTI file its record names (``record["image"]``), for the
    preprocessing to read.

    Raises:
        DicomSeriesError: the case's problem (:func:`dicom_cases`), or one found reading it; or its channels' grids differ.
    """
    import nibabel as nib

    from medseg.io import atomic_path

    if record.get("problem"):
        raise DicomSeriesError(record["problem"])
    images = [to_nifti(read_series(s)) for s in record["dicom"]]
    reference = record["dicom"][0]
    for index, (series, image) in enumerate(zip(record["dicom"][1:], images[1:]), start=1):
        if image.shape == images[0].shape and np.allclose(image.affine, images[0].affine, atol=1e-3):
            continue
        if not series.frame_of_reference or series.frame_of_reference != reference.frame_of_reference:
            raise DicomSeriesError(f"{series.describe()}: its grid differs from that of {reference.describe()} and the two do not share a FrameOfReferenceUID, "
                                   "so their patient coordinates cannot be related; register the series first (or export them on one grid)")
        images[index] = resample_to(image, images[0])
    for path, image in zip(record["image"], images):
        with atomic_path(path, keep_suffix=True) as tmp:
            nib.save(image, tmp)


def resample_to(image: nib.Nifti1Image, reference: nib.Nifti1Image) -> nib.Nifti1Image:
    """``image`` resampled (trilinear; its minimum outside its field of view) onto ``reference``'s grid, through the patient
    coordinates both share (one FrameOfReferenceUID: the scanner's, while the patient did not move)."""
    from nibabel.processing import resample_from_to

    background = float(np.min(np.asarray(image.dataobj)))  # outside its field of view: its lowest value (CT air, MR 0)
    return resample_from_to(image, (reference.shape[:3], reference.affine), order=1, mode="constant", cval=background)


def _case_stem(series: DicomSeries, single: bool) -> str:
    """A readable case id: ``<PatientID>_<StudyDate>[_S<SeriesNumber>]``, file-name safe."""
    parts = [series.patient_id or "patient", series.study_date or _uid_tag(series.study_uid)]
    if single:
        parts.append(f"S{series.series_number}" if series.series_number is not None else _uid_tag(series.uid))
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(parts)).strip("-")


def _is_image(ds: Any) -> bool:
    """An instance with a pixel grid placed in patient space: single-frame (ImagePositionPatient and
    ImageOrientationPatient, both with values) or multi-frame in a frame of reference (enhanced CT / MR / PET keep
    the positions per frame; cine ultrasound and angiography, without a FrameOfReferenceUID, are no volumes)."""
    if not ds.get("Rows") or not ds.get("Columns"):
        return False
    if ds.get("ImagePositionPatient") and ds.get("ImageOrientationPatient"):
        return len(ds.ImagePositionPatient) == 3 and len(ds.ImageOrientationPatient) == 6
    return int(ds.get("NumberOfFrames", 1) or 1) > 1 and bool(ds.get("FrameOfReferenceUID"))


def _is_localizer(ds: Any) -> bool:
    """ImageType says LOCALIZER (a one-value ImageType is a string, not a list)."""
    image_type = ds.get("ImageType") or []
    values = [image_type] if isinstance(image_type, str) else list(image_type)
    return "LOCALIZER" in (str(v).strip().upper() for v in values)


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _uid_tag(uid: str) -> str:
    """Eight hex digits of a UID's hash: a short, file-name safe tag that differs between UIDs (their last digits
    often do not: Siemens series end in .0.0.0)."""
    return hashlib.sha1(uid.encode()).hexdigest()[:8]


def _files(folder: Path) -> Iterator[Path]:
    """The files under ``folder`` (recursively, folder by folder in name order), hidden ones and ``DICOMDIR`` excluded."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        yield from (Path(root) / f for f in sorted(files) if not f.startswith(".") and f.upper() != "DICOMDIR")


def _looks_like_dicom(path: Path) -> bool:
    """A DICOM Part 10 file (``DICM`` after the 128-byte preamble), or a ``.dcm`` file."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as file:
            return file.read(132)[128:] == b"DICM"
    except OSError:
        return False
