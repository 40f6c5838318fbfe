"""Segmentation metrics: voxel overlap scores, HD95 and lesion-wise detection metrics."""

from medseg.metrics.distance import hausdorff_distance_95
from medseg.metrics.lesion import LesionMetrics, lesion_metrics, lesion_table
from medseg.metrics.voxel import OverlapMetrics, confusion_counts, overlap_scores

__all__ = [
    "LesionMetrics",
    "OverlapMetrics",
    "confusion_counts",
    "hausdorff_distance_95",
    "lesion_metrics",
    "lesion_table",
    "overlap_scores",
]
