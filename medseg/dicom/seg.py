"""DICOM SEG objects of a prediction, referencing the source series (what 3D Slicer, OHIF or a PACS opens).

One SEG per case (:func:`write_segmentation`): one segment per label name of the model (its regions, e.g. BraTS
WT/TC/ET, which overlap, or its classes), on the source series' own grid (each frame refers to the source instance
at its position; frames where no segment has a voxel are left out), with the algorithm identification (medseg's
version, the model's name and checksum). Segments are coded generically (SNOMED CT "Tissue" as category and type):
medseg's label configs name regions and classes, not their clinical codes; the label is the segment's name. ``BINARY``
holds the final masks (after the operating point: the NIfTI prediction's labels, segment by segment);
``FRACTIONAL`` holds each region's or class's probability (``PROBABILITY``, 8 bits).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.dicom import require_dicom
from medseg.dicom.series import DicomSeries, from_nifti_grid
from medseg.io import atomic_path

SEG_TYPES = ("binary", "fractional")
SEG_SERIES_NUMBER_OFFSET = 1000  # the SEG's SeriesNumber: its source's + this (source numbers stay readable)


@dataclass(frozen=True)
class Algorithm:
    """What made the segmentation, written into every segment's AlgorithmIdentificationSequence.

    Attributes:
        name: the model's name (its run, cross-validation or exported model).
        version: medseg's version.
        checksum: SHA-256 of the model's weights (``sha256:<hex>``).
    """

    name: str
    version: str
    checksum: str


def write_segmentation(path: str | os.PathLike, masks: np.ndarray, nifti_image, series: DicomSeries, names: Sequence[str], algorithm: Algorithm, seg_type: str = "binary") -> Path:
    """Write the DICOM SEG of one case, atomically.

    Args:
        path: the ``.dcm`` file to write.
        masks: ``(R, X, Y, Z)`` bool final masks (``binary``) or float probabilities in [0, 1] (``fractional``), one
            per name, on the grid of ``nifti_image``.
        nifti_image: the case's image as :func:`medseg.dicom.series.to_nifti` gave it (its grid and affine).
        series: the source series (its instances are referenced; their patient and study attributes are copied).
        names: the segment labels, in ``masks`` order.
        seg_type: ``"binary"`` or ``"fractional"``.

    Raises:
        ValueError: ``seg_type`` unknown, or ``masks`` not of one name per channel on the image's grid.
    """
    require_dicom()
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    if seg_type not in SEG_TYPES:
        raise ValueError(f"expected dicom_seg_type one of {list(SEG_TYPES)}, got {seg_type!r}")
    if masks.ndim != 4 or masks.shape[0] != len(names) or tuple(masks.shape[1:]) != tuple(nifti_image.shape[:3]):
        raise ValueError(f"expected masks of shape ({len(names)}, {', '.join(map(str, nifti_image.shape[:3]))}), got {tuple(masks.shape)}")
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in series.files]
    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm.name, family=codes.cid7162.ArtificialIntelligence, version=algorithm.version, parameters={"model checksum": algorithm.checksum}, source="medseg",
    )  # fmt: skip
    segments = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=str(name), segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=identification,
        )
        for number, name in enumerate(names, start=1)
    ]  # fmt: skip
    if seg_type == "binary":
        channels = np.moveaxis(masks.astype(np.uint8), 0, -1)  # (X, Y, Z, R)
    else:
        channels = np.moveaxis(np.clip(np.asarray(masks, dtype=np.float32), 0.0, 1.0), 0, -1)  # (X, Y, Z, R)
    volume = from_nifti_grid(channels, nifti_image)  # (slice, row, column, R), the source's geometry
    number = (series.series_number or 0) + SEG_SERIES_NUMBER_OFFSET
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=volume, segmentation_type=seg_type.upper(), segment_descriptions=segments,
        series_instance_uid=hd.UID(), series_number=number, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="medseg", manufacturer_model_name=algorithm.name[:64], software_versions=algorithm.version,
        device_serial_number=algorithm.checksum.split(":")[-1][:16], content_label="MEDSEG",
        content_description=f"medseg {algorithm.name}"[:64], series_description=f"medseg {algorithm.name}"[:64],
        max_fractional_value=255, omit_empty_frames=True,  # frames without any segment left out (every instance still referenced)
    )  # fmt: skip
    with atomic_path(path, keep_suffix=True) as tmp:
        seg.save_as(tmp)
    return Path(path)


def read_segmentation(path: str | os.PathLike, nifti_image) -> np.ndarray:
    """A SEG written by :func:`write_segmentation` back on the grid of ``nifti_image``: ``(R, X, Y, Z)`` (bool for
    binary, float in [0, 1] for fractional), segments in segment-number order."""
    require_dicom()
    import highdicom as hd

    seg = hd.seg.segread(str(path))
    fractional = str(seg.SegmentationType) == "FRACTIONAL"
    volume = seg.get_volume(combine_segments=False, rescale_fractional=fractional, dtype=np.float32 if fractional else np.uint8)  # (slice, row, column, R)
    reference = from_nifti_grid(np.zeros(nifti_image.shape[:3], dtype=np.uint8), nifti_image)
    volume = volume.match_geometry(reference)  # the source grid (frames the SEG left out are empty)
    array = np.transpose(volume.array, (3, 2, 1, 0))  # (R, X, Y, Z)
    return array if fractional else array.astype(bool)
