"""Datasets over preprocessed cases: random training patches and whole validation volumes.

Where the preprocessed cases come from is a *store* (``data.cache``):

* :class:`DiskStore` (``disk``, the default): entries of the disk cache, memory-mapped; a training patch
  reads only its own bytes, so a process's memory does not grow with the number of cases.
* :class:`MemoryStore` (``memory``): the same entries read into memory once per process, for small
  datasets (fewer page faults; memory grows with the dataset, in every process).
* :class:`FreshStore` (``none``): every case preprocessed again each time it is read (nothing written).

Items carry plain tensors (no MONAI metadata): ``image`` ``(C, H, W, D)`` float32, ``label``
``(R, H, W, D)`` float32 (multi-hot, or ``(1, H, W, D)`` class indices), ``case`` (its id) and ``spacing``
``(3,)`` float32 in mm. Validation items also carry ``padding`` (bool): :class:`EvenShards` gives every process
the same number of validation steps, the missing ones as :data:`PADDING_INDEX` items that score nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Randomizable
from torch.utils.data import Dataset, Sampler

from medseg.data.cache import CaseCache, CasePreprocessor, PreprocessedCase
from medseg.data.layouts import CaseRecord
from medseg.data.sampling import PatchSampler, read_patch
from medseg.data.transforms import IMAGE, LABEL

CACHE_MODES = ("disk", "memory", "none")


class CaseStore(Protocol):
    def load(self, record: CaseRecord) -> PreprocessedCase: ...


class DiskStore:
    """Cases from the disk cache, memory-mapped (opened per read, so no mapping outlives the item)."""

    def __init__(self, cache: CaseCache) -> None:
        self.cache = cache

    def load(self, record: CaseRecord) -> PreprocessedCase:
        return self.cache.load(str(record["case"]), mmap=True)


class MemoryStore:
    """Cases from the disk cache, read into memory when the store is made."""

    def __init__(self, cache: CaseCache, records: Sequence[CaseRecord]) -> None:
        self.cases = {str(r["case"]): cache.load(str(r["case"]), mmap=False) for r in records}

    def load(self, record: CaseRecord) -> PreprocessedCase:
        return self.cases[str(record["case"])]


class FreshStore:
    """Cases preprocessed anew at every read (no cache)."""

    def __init__(self, preprocessor: CasePreprocessor) -> None:
        self.preprocessor = preprocessor

    def load(self, record: CaseRecord) -> PreprocessedCase:
        return self.preprocessor(record)


def _item(case: PreprocessedCase, image: np.ndarray, label: np.ndarray) -> dict[str, Any]:
    return {
        IMAGE: torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
        LABEL: torch.from_numpy(np.asarray(label, dtype=np.float32)),
        "case": case.case,
        "spacing": torch.tensor(case.spacing, dtype=torch.float32),
    }


class PatchDataset(Dataset, Randomizable):
    """``samples_per_volume`` random patches per case, each augmented; one item per case.

    Args:
        records: the training cases.
        store: where their preprocessed arrays come from.
        sampler: the patch positions (:class:`medseg.data.sampling.PatchSampler`).
        augment: random transforms applied to each patch dict (flips, intensity).
        samples_per_volume: patches per item.

    Returns (per item):
        a list of ``samples_per_volume`` dicts (MONAI's ``list_data_collate`` makes them one batch).
    """

    def __init__(self, records: Sequence[CaseRecord], store: CaseStore, sampler: PatchSampler, augment: Compose, samples_per_volume: int) -> None:
        self.records = list(records)
        self.store = store
        self.sampler = sampler
        self.augment = augment
        self.samples_per_volume = samples_per_volume

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> PatchDataset:
        """Seed the patch positions and the augmentation (MONAI's DataLoader calls it in every worker)."""
        super().set_random_state(seed, state)
        self.sampler.set_random_state(seed=int(self.R.randint(2**31)))
        self.augment.set_random_state(seed=int(self.R.randint(2**31)))
        return self

    def randomize(self, data: Any = None) -> None:
        pass

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> list[dict[str, Any]]:
        case = self.store.load(self.records[i])
        size = self.sampler.patch_size
        patches = []
        for start in self.sampler.starts(case.image.shape[1:], case.index, self.samples_per_volume):
            item = self.augment(_item(case, read_patch(case.image, start, size), read_patch(case.label, start, size)))
            patches.append({k: v.as_tensor() if isinstance(v, MetaTensor) else v for k, v in item.items()})
        return patches


PADDING = "padding"  # the item key saying a validation item is padding (no case)
PADDING_INDEX = -1  # the index :class:`EvenShards` pads with


class EvenShards(Sampler[int]):
    """Validation cases ``rank, rank + W, ...`` of ``n`` (each case once over all ``W`` processes), padded with
    :data:`PADDING_INDEX` to ``ceil(n / W)`` items, so that every process runs the same number of validation steps
    and meets the same collectives, even with fewer cases than processes (a process without a case runs only
    padding steps, which score nothing). No case is repeated, so the metrics are those of one process."""

    def __init__(self, n: int, num_replicas: int, rank: int) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"expected 0 <= rank < num_replicas, got rank {rank} of {num_replicas}")
        self.n, self.num_replicas, self.rank = int(n), int(num_replicas), int(rank)

    def __len__(self) -> int:
        return -(-self.n // self.num_replicas)

    def __iter__(self):
        mine = list(range(self.rank, self.n, self.num_replicas))
        return iter(mine + [PADDING_INDEX] * (len(self) - len(mine)))


class VolumeDataset(Dataset):
    """Whole preprocessed cases (validation, test), one per item; :data:`PADDING_INDEX` gives a padding item."""

    def __init__(self, records: Sequence[CaseRecord], store: CaseStore) -> None:
        self.records = list(records)
        self.store = store

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i == PADDING_INDEX:
            empty = torch.zeros(1, 1, 1, 1)
            return {IMAGE: empty, LABEL: empty.clone(), "case": "", "spacing": torch.ones(3), PADDING: True}
        case = self.store.load(self.records[i])
        return {**_item(case, np.array(case.image), np.array(case.label)), PADDING: False}
