"""Segmentation data: dataset layouts, transforms, the Lightning data module and a synthetic generator."""
