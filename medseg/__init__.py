"""medseg: 3D medical image segmentation with PyTorch Lightning, MONAI and Hydra."""

__version__ = "0.1.0"
