"""Segmentation losses: focal, Dice and their combinations, blob loss (one term per lesion), connected-component Dice + CE (one term per lesion's region of influence), cross-entropy baselines, deep supervision.

Every loss maps logits ``(B, C, *spatial)`` and a target to a scalar, in ``mode="sigmoid"`` (multi-label,
target of the logits' shape) or ``mode="softmax"`` (classes with background 0; class indices
``(B, 1, *spatial)`` or one-hot). Compound losses also have ``forward_with_terms`` returning their
unweighted parts. The Hydra group ``conf/loss/`` selects one: ``loss=focal_dice`` (default), ``loss=dice``...
"""

from medseg.losses.blob import BlobLoss
from medseg.losses.ce import BalancedCELoss, CrossEntropyLoss, TopKCELoss
from medseg.losses.compound import DiceCELoss, FocalDiceLoss
from medseg.losses.connected_components import ConnectedComponentDiceCELoss
from medseg.losses.deep_supervision import DeepSupervisionLoss
from medseg.losses.dice import DiceLoss
from medseg.losses.focal import FocalLoss

__all__ = [
    "BalancedCELoss",
    "BlobLoss",
    "ConnectedComponentDiceCELoss",
    "CrossEntropyLoss",
    "DeepSupervisionLoss",
    "DiceCELoss",
    "DiceLoss",
    "FocalDiceLoss",
    "FocalLoss",
    "TopKCELoss",
]
