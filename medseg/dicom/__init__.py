"""DICOM in and out: scanner series as prediction input (:mod:`medseg.dicom.series`) and DICOM SEG objects that
reference them as output (:mod:`medseg.dicom.seg`).

Both sides use highdicom (on pydicom), an optional extra (``pip install "medseg[dicom]"``): its
``get_volume_from_series`` sorts slices by ImagePositionPatient, applies the modality transform (rescale slope and
intercept) and returns the volume with its patient-space affine; its ``Segmentation`` writes the SEG with the
references to the source instances. One library for both directions keeps the geometry the same object going in
and coming out (highdicom's ``Volume``), so a SEG lands on the voxels the network saw. medseg adds what a clinical
folder needs before that: finding the series, and refusing a broken one with a message that names it.
"""

from __future__ import annotations

DICOM_EXTRA_HELP = "DICOM input and DICOM SEG output need highdicom and pydicom: pip install 'medseg[dicom]'"


def require_dicom() -> None:
    """Raise ``ImportError`` with :data:`DICOM_EXTRA_HELP` when highdicom or pydicom is not installed."""
    try:
        import highdicom  # noqa: F401
        import pydicom  # noqa: F401
    except ImportError as err:
        raise ImportError(f"{DICOM_EXTRA_HELP} ({err})") from err
