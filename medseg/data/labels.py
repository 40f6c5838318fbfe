"""Label conventions: how a dataset's integer labels become the network's training targets and back.

Two kinds of task:

* ``sigmoid``: overlapping regions, one output channel each, e.g. BraTS whole tumour WT = {1, 2, 4},
  tumour core TC = {1, 4}, enhancing tumour ET = {4}. Targets are multi-hot ``(R, *spatial)``.
* ``softmax``: mutually exclusive classes, e.g. MSD hippocampus anterior = 1, posterior = 2. The network
  has one output per class plus background; targets are class indices ``(1, *spatial)``.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform


@dataclass(frozen=True)
class LabelSpec:
    """What the labels of a dataset mean.

    Args:
        mode: ``"sigmoid"`` (overlapping regions) or ``"softmax"`` (exclusive classes).
        names: region names (sigmoid) or foreground class names (softmax), used in metric keys.
        values: every label value the dataset may contain, background (0) included. In softmax mode the
            i-th value becomes class index i, so ``[0, 1, 2, 4]`` maps BraTS 4 to class 3.
        regions: sigmoid mode only: for each name, the label values it unites.
    """

    mode: Literal["sigmoid", "softmax"]
    names: tuple[str, ...]
    values: tuple[int, ...]
    regions: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in ("sigmoid", "softmax"):
            raise ValueError(f"expected labels.mode 'sigmoid' or 'softmax', got {self.mode!r}")
        if not self.names:
            raise ValueError("expected at least one name in labels.names, got none")
        if 0 not in self.values:
            raise ValueError(f"expected labels.values to include background 0, got {list(self.values)}")
        if self.mode == "sigmoid":
            missing = [n for n in self.names if n not in self.regions]
            if missing:
                raise ValueError(f"expected labels.regions to define every name in labels.names, missing {missing}")
            for name, members in self.regions.items():
                unknown = sorted(set(members) - set(self.values))
                if unknown:
                    raise ValueError(f"labels.regions.{name} uses values {unknown} not in labels.values {list(self.values)}")
        elif len(self.values) != len(self.names) + 1:
            raise ValueError(
                f"expected softmax labels.values to list background plus one value per name "
                f"({len(self.names) + 1} values), got {list(self.values)} for names {list(self.names)}"
            )

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> LabelSpec:
        """Build from the ``data.labels`` config node (a dict or DictConfig)."""
        regions = {str(k): tuple(int(v) for v in vs) for k, vs in dict(cfg.get("regions") or {}).items()}
        return cls(
            mode=cfg["mode"],
            names=tuple(str(n) for n in cfg["names"]),
            values=tuple(int(v) for v in cfg["values"]),
            regions=regions,
        )

    @property
    def num_outputs(self) -> int:
        """Output channels of the network: one per region, or one per class plus background."""
        return len(self.names) + (1 if self.mode == "softmax" else 0)

    @property
    def channel_values(self) -> tuple[tuple[int, ...], ...]:
        """The dataset label values each channel of :meth:`to_channels` covers, in ``names`` order: a region's
        ``regions[name]`` (sigmoid), or a class's one value ``values[r + 1]`` (softmax)."""
        if self.mode == "sigmoid":
            return tuple(tuple(self.regions[name]) for name in self.names)
        return tuple((value,) for value in self.values[1:])

    @property
    def nesting(self) -> tuple[tuple[int, int], ...]:
        """``(outer, inner)`` channel pairs of nested sigmoid regions: ``inner``'s label values are a proper subset
        of ``outer``'s (BraTS: WT ⊇ TC ⊇ ET gives (0, 1), (0, 2), (1, 2)); ``()`` for softmax classes."""
        if self.mode != "sigmoid":
            return ()
        sets = [set(self.regions[n]) for n in self.names]
        return tuple((o, i) for o in range(len(sets)) for i in range(len(sets)) if o != i and sets[i] < sets[o])

    def to_channels(self, label: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Dataset labels to one boolean mask per region (sigmoid) or per foreground class (softmax).

        The same masks as :meth:`to_target` followed by ``> 0.5`` (sigmoid) or ``== r + 1`` for each class
        ``r`` (softmax), i.e. what the metrics compare, without the float target in between.

        Args:
            label: ``(1, *spatial)`` integer label values in the dataset's convention (any integer or float
                dtype holding whole numbers), a tensor (on any device) or a NumPy array. Values outside
                ``values`` are background (:func:`check_label_values` rejects them first where it matters).

        Returns:
            Boolean ``(R, *spatial)``, ``R = len(names)``: channel ``r`` marks the voxels whose value is one of
            ``channel_values[r]``. A tensor on ``label``'s device for a tensor, a NumPy array for an array.
        """
        if isinstance(label, np.ndarray):
            return np.stack([np.isin(label[0], values) for values in self.channel_values])
        return torch.stack([torch.isin(label[0], torch.tensor(values, device=label.device)) for values in self.channel_values])

    def to_target(self, label: torch.Tensor) -> torch.Tensor:
        """Dataset labels ``(1, *spatial)`` -> training target.

        Returns:
            sigmoid: float multi-hot ``(R, *spatial)``; softmax: float class indices ``(1, *spatial)``.
        """
        if self.mode == "sigmoid":
            return self.to_channels(label).to(torch.float32)
        index = torch.zeros_like(label, dtype=torch.float32)
        for i, value in enumerate(self.values):
            if i:
                index[label == value] = i
        return index

    def to_labels(self, prediction: torch.Tensor) -> torch.Tensor:
        """Binary network output back to dataset labels, the inverse of :meth:`to_target`.

        Args:
            prediction: sigmoid: binary ``(R, *spatial)``; softmax: class indices ``(1, *spatial)``.

        Returns:
            Integer labels ``(1, *spatial)`` in the dataset's convention. For overlapping regions each
            voxel gets the value that is in exactly the regions predicted there (BraTS: WT only -> 2,
            WT+TC -> 1, WT+TC+ET -> 4); where the prediction is inconsistent (ET outside TC), the value
            shared by the most predicted regions wins.
        """
        if self.mode == "softmax":
            lut = torch.tensor(self.values, device=prediction.device)
            return lut[prediction.long()]
        flat = prediction.flatten(1).bool()  # (R, N)
        labels = torch.zeros(flat.shape[1], dtype=torch.long, device=flat.device)  # (N,)
        voxels = flat.any(0)  # only voxels with a predicted region need a decision
        pred = flat[:, voxels].float()  # (R, n)
        foreground = [v for v in self.values if v != 0]
        member = torch.tensor(
            [[float(v in self.regions[n]) for n in self.names] for v in foreground], device=pred.device
        )  # (V, R)
        agree = member @ pred  # (V, n)
        distance = member.sum(1, keepdim=True) + pred.sum(0, keepdim=True) - 2 * agree  # Hamming, (V, n)
        # Nearest membership pattern wins; among equally near values, the one sharing more predicted regions.
        best = torch.argmin(distance * (len(self.names) + 1) - agree, dim=0)  # (n,)
        labels[voxels] = torch.tensor(foreground, device=pred.device)[best]
        labels = labels.view(prediction.shape[1:])
        return labels.unsqueeze(0)


def _source_name(data: Mapping[Hashable, Any], key: Hashable) -> str:
    meta = getattr(data[key], "meta", None) or data.get(f"{key}_meta_dict") or {}
    return str(meta.get("filename_or_obj", data.get("case", key)))


class ConvertLabelsd(MapTransform):
    """Check a label volume's values and convert it with :meth:`LabelSpec.to_target`.

    Raises:
        ValueError: naming the file, when the label holds values outside ``spec.values`` or non-integers.
    """

    def __init__(self, keys: str | Sequence[str], spec: LabelSpec, allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spec = spec

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = torch.as_tensor(d[key])
            check_label_values(label, self.spec, _source_name(d, key))
            converted = self.spec.to_target(label)
            if isinstance(d[key], MetaTensor):  # keep the geometry and transform history for inversion
                converted = MetaTensor(converted, meta=d[key].meta, applied_operations=d[key].applied_operations)
            d[key] = converted
        return d


def label_values_problem(values: Iterable[float], spec: LabelSpec) -> str | None:
    """What is wrong with the distinct values of a label volume, or ``None`` when they fit ``spec``.

    Args:
        values: the distinct values of the volume (as from ``unique``), in increasing order.
        spec: the dataset's label convention.

    Returns:
        A message about non-integer values (NaN and Inf included) or values outside ``spec.values``.
    """
    values = [float(v) for v in values]
    non_integers = [v for v in values if not v.is_integer()]
    if non_integers:
        return f"expected integer label values, got non-integers such as {non_integers[:3]}"
    unexpected = sorted({int(v) for v in values} - set(spec.values))
    if unexpected:
        return (
            f"unexpected label values {unexpected}; expected a subset of "
            f"{list(spec.values)} (set data.labels.values if the dataset uses another convention)"
        )
    return None


def check_label_values(label: torch.Tensor, spec: LabelSpec, source: str) -> None:
    """Raise ``ValueError`` naming ``source`` when ``label`` holds non-integers or values outside ``spec.values``."""
    problem = label_values_problem(torch.unique(label).tolist(), spec)
    if problem:
        raise ValueError(f"{source}: {problem}")


def region_sizes(spec: LabelSpec, label: np.ndarray) -> dict[str, int]:
    """Voxel count of every region/class in a dataset label volume ``(*spatial)`` (for reports and tests)."""
    return {n: int(channel.sum()) for n, channel in zip(spec.names, spec.to_channels(torch.as_tensor(label)[None]))}
