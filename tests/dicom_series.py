"""DICOM test series written with pydicom from NIfTI volumes: one axial file per slice, as a scanner exports them.

A NIfTI voxel ``(i, j, k)`` becomes pixel ``(row j, column i)`` of slice ``k``; positions and orientation are the
NIfTI affine's, in DICOM's LPS patient coordinates. CT slices are stored as ``(value - intercept) / slope`` with the
rescale slope and intercept in the header, MR slices as rounded integers. Files are named in shuffled order, so that
a reader must sort by ImagePositionPatient, not by file name.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom.encaps
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
LPS = np.diag([-1.0, -1.0, 1.0])  # RAS -> LPS


def write_series(
    image: nib.Nifti1Image | np.ndarray,
    folder: str | Path,
    modality: str = "CT",
    slope: float = 1.0,
    intercept: float = 0.0,
    affine: np.ndarray | None = None,
    shuffle: bool = True,
    description: str = "",
    series_number: int = 1,
    patient_id: str = "PAT001",
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    positions: Sequence[int] | None = None,
    seed: int = 0,
) -> dict:
    """Write ``image`` (``(X, Y, Z)``) as one DICOM file per axial slice into ``folder``.

    Args:
        image: a NIfTI image, or an array with ``affine`` (RAS, as nibabel's).
        modality: ``"CT"`` (stored with ``slope`` / ``intercept``) or ``"MR"`` (rounded integers, no rescale).
        positions: the slice indices ``k`` to write (default: all); leaving one out makes a missing slice.
        transfer_syntax: of the files; for a compressed one the native pixels are only encapsulated (no codestream): a
            series whose decoder is missing, and unreadable by one.

    Returns:
        ``{"study_uid", "series_uid", "frame_of_reference_uid", "values": the (X, Y, Z) float64 values a reader
        must return (after rescale), "affine": RAS}``.
    """
    if isinstance(image, nib.Nifti1Image):
        data, affine = np.asarray(image.dataobj, dtype=np.float64), image.affine
    else:
        data, affine = np.asarray(image, dtype=np.float64), np.eye(4) if affine is None else affine
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid, frame_uid = study_uid or generate_uid(), series_uid or generate_uid(), frame_of_reference_uid or generate_uid()
    stored = np.round((data - intercept) / slope) if modality == "CT" else np.round(data)
    unsigned = stored.min() >= 0
    stored = stored.astype(np.uint16 if unsigned else np.int16)
    values = stored.astype(np.float64) * slope + intercept if modality == "CT" else stored.astype(np.float64)
    lps = LPS @ affine[:3, :3]  # voxel steps in LPS
    spacing = np.linalg.norm(lps, axis=0)  # (3,)
    row_cosines, column_cosines = lps[:, 0] / spacing[0], lps[:, 1] / spacing[1]
    slices = list(positions) if positions is not None else list(range(data.shape[2]))
    order = np.random.default_rng(seed).permutation(len(slices)) if shuffle else np.arange(len(slices))
    for file_index, n in enumerate(order):
        k = slices[n]
        position = LPS @ (affine @ np.array([0.0, 0.0, k, 1.0]))[:3]
        ds = _dataset(folder / f"IM{series_number:03d}{file_index:04d}.dcm", transfer_syntax, CT_IMAGE if modality == "CT" else MR_IMAGE)
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = patient_id, f"Test^{patient_id}", "19700101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20260101", "120000", "1", "ACC1", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = modality, series_number, int(k) + 1, description
        ds.Manufacturer = "medseg tests"
        ds.ImagePositionPatient = [float(v) for v in position]
        ds.ImageOrientationPatient = [float(v) for v in (*row_cosines, *column_cosines)]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # row spacing (between rows: j), column spacing (i)
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0 if unsigned else 1
        if modality == "CT":
            ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "HU"
        pixels = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # (rows=j, columns=i)
        if pydicom.uid.UID(transfer_syntax).is_compressed:  # encapsulated as the syntax requires (not a real codestream)
            pixels = pydicom.encaps.encapsulate([pixels])
        ds.PixelData = pixels
        ds.save_as(ds.filename, enforce_file_format=True)
    return {"study_uid": study_uid, "series_uid": series_uid, "frame_of_reference_uid": frame_uid, "values": values, "affine": affine}


def write_structured_report(path: str | Path, study_uid: str, patient_id: str = "PAT001") -> str:
    """A minimal Comprehensive SR object (no pixels) of study ``study_uid``; returns its SeriesInstanceUID."""
    ds = _dataset(Path(path), ExplicitVRLittleEndian, COMPREHENSIVE_SR)
    ds.PatientID, ds.PatientName, ds.StudyInstanceUID, ds.SeriesInstanceUID = patient_id, f"Test^{patient_id}", study_uid, generate_uid()
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = "SR", 99, 1, "report"
    ds.ValueType, ds.ContentSequence = "CONTAINER", []
    ds.save_as(ds.filename, enforce_file_format=True)
    return str(ds.SeriesInstanceUID)


def _dataset(path: Path, transfer_syntax: str, sop_class: str) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID = sop_class, generate_uid(), transfer_syntax
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    return ds
