"""Segmentation metrics: voxel overlap scores and lesion-wise detection metrics."""
