"""Random streams of training data: one per process and DataLoader worker, reproducible from the run's seed.

Every random choice of a training item (the patch position, each augmentation) is drawn from the dataset's own
``RandomState`` (MONAI's ``Randomizable``), not from the global generators. MONAI's ``DataLoader`` seeds it from
torch's global generator, which ``seed_everything`` makes equal on every DDP process, so without this module every
process would draw the same stream (and Lightning's rank-aware worker seeding never runs: MONAI installs its own
``worker_init_fn``). Here the stream of worker ``w`` of process ``r`` is seeded by ``SeedSequence([seed, r, w,
epoch])``: distinct across processes and workers, the same for the same run seed, and different after a resume
(``epoch`` is the epoch the loader starts at).
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import get_worker_info

MAX_SEED = 2**31  # numpy RandomState seeds are < 2**32; MONAI draws sub-seeds below 2**31


def stream_seed(seed: int, rank: int, worker: int, epoch: int = 0) -> int:
    """The seed of one training data stream (process ``rank``, loader worker ``worker``)."""
    return int(np.random.SeedSequence([int(seed) % 2**63, int(rank), int(worker), int(epoch)]).generate_state(1, dtype=np.uint32)[0]) % MAX_SEED


class SeedStreams:
    """``worker_init_fn`` of the training loader (picklable): seeds the worker's dataset copy and its global
    generators (``random``, ``numpy``, ``torch``) from :func:`stream_seed`."""

    def __init__(self, seed: int, rank: int, epoch: int = 0) -> None:
        self.seed, self.rank, self.epoch = int(seed), int(rank), int(epoch)

    def seed_of(self, worker: int) -> int:
        return stream_seed(self.seed, self.rank, worker, self.epoch)

    def seed_dataset(self, dataset, worker: int) -> None:
        """Seed ``dataset`` (a ``Randomizable``: its patch sampler and augmentations) for stream ``worker``."""
        dataset.set_random_state(self.seed_of(worker))

    def __call__(self, worker_id: int) -> None:
        """In a loader worker: its dataset copy and its global generators (a worker's own process)."""
        value = self.seed_of(worker_id)
        get_worker_info().dataset.set_random_state(value)
        random.seed(value)
        np.random.seed(value)
        torch.manual_seed(value)
