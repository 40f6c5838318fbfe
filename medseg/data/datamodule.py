"""The Lightning data module: find cases, split them, cache preprocessing on disk, serve patches and volumes."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from monai.data import DataLoader, MetaTensor
from monai.transforms import Compose
from torch.utils.data import Dataset, DistributedSampler

from medseg.data.cache import BuildSummary, CaseCache, CasePreprocessor
from medseg.data.check import check_before_training
from medseg.data.datasets import CACHE_MODES, CaseStore, DiskStore, EvenShards, FreshStore, MemoryStore, PatchDataset, VolumeDataset
from medseg.data.labels import LabelSpec
from medseg.data.layouts import CaseRecord, find_cases, get_layout
from medseg.data.sampling import IndexOptions
from medseg.data.streams import SeedStreams
from medseg.data.transforms import DEFAULT_CT_WINDOW, check_intensity, patches_from_config, preprocessing, preprocessing_options
from medseg.io import write_json_atomic


def split_cases(
    cases: Sequence[CaseRecord],
    val_fraction: float,
    seed: int,
    fold: int | None = None,
    num_folds: int | None = None,
) -> tuple[list[CaseRecord], list[CaseRecord]]:
    """A deterministic train/validation split: the same cases and options give the same split.

    Cases are ordered by id first, so the split does not depend on file system order. Two kinds of split:

    * ``fold`` is ``None``: a seeded random ``val_fraction`` of the cases is held out.
    * ``fold`` is ``k``: case-level k-fold cross-validation. The id-sorted cases are cut into ``num_folds``
      contiguous blocks (sizes differ by at most one, larger blocks first, as scikit-learn's unshuffled
      ``KFold``) and block ``k`` is held out; ``val_fraction`` and ``seed`` are ignored. With as many folds
      as cases this is leave-one-case-out, and fold ``k`` validates on the ``k``-th case id.

    Raises:
        ValueError: ``val_fraction`` outside [0, 1), a split that leaves no training case, ``num_folds``
            not in [2, number of cases] or ``fold`` not in [0, num_folds).
    """
    ordered = sorted(cases, key=lambda c: c["case"])
    if fold is not None:
        return _fold_split(ordered, fold, num_folds)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"expected data.val_fraction in [0, 1), got {val_fraction}")
    n_val = int(round(len(ordered) * val_fraction))
    if val_fraction > 0 and n_val == 0:
        if len(ordered) < 2:
            raise ValueError(f"expected at least 2 cases to hold out validation cases, got {len(ordered)}; set data.val_fraction=0 to train without validation")
        n_val = 1
    if n_val >= len(ordered):
        raise ValueError(f"expected at least one training case, got {len(ordered)} case(s) with data.val_fraction={val_fraction}")
    order = np.random.default_rng(seed).permutation(len(ordered))
    val_idx = set(order[:n_val].tolist())
    train = [c for i, c in enumerate(ordered) if i not in val_idx]
    val = [c for i, c in enumerate(ordered) if i in val_idx]
    return train, val


def check_fold(fold: int | None, num_folds: int | None) -> None:
    """Raise ``ValueError`` unless ``fold`` is ``None`` or an integer in [0, ``num_folds``), ``num_folds`` >= 2."""
    if fold is None:
        return
    if isinstance(num_folds, bool) or not isinstance(num_folds, (int, np.integer)) or num_folds < 2:
        raise ValueError(f"expected data.num_folds to be an integer >= 2 with data.fold={fold}, got {num_folds!r}")
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or not 0 <= fold < num_folds:
        raise ValueError(f"expected data.fold in [0, {num_folds}) (data.num_folds={num_folds}), got {fold!r}")


def _fold_split(ordered: list[CaseRecord], fold: int, num_folds: int | None) -> tuple[list[CaseRecord], list[CaseRecord]]:
    """Fold ``fold`` of ``num_folds`` contiguous blocks of the id-sorted cases: (training, validation)."""
    check_fold(fold, num_folds)
    if num_folds > len(ordered):
        raise ValueError(f"expected data.num_folds <= the number of cases ({len(ordered)}), got {num_folds}")
    blocks = np.array_split(np.arange(len(ordered)), num_folds)  # sizes differ by at most one
    val_idx = set(blocks[fold].tolist())
    train = [c for i, c in enumerate(ordered) if i not in val_idx]
    val = [c for i, c in enumerate(ordered) if i in val_idx]
    return train, val


class SegmentationDataModule(L.LightningDataModule):
    """Cases of a dataset of any layout as training patches and whole validation volumes.

    Args:
        layout: a registered layout name (:mod:`medseg.data.layouts`: ``brats``, ``msd``, ``nnunet``, ``folder``).
        root: dataset folder.
        labels: the ``data.labels`` node (see :class:`medseg.data.labels.LabelSpec`).
        modalities: channel names in order; the BraTS and folder layouts read the files they name (the MSD and
            nnU-Net layouts list their channels in ``dataset.json``).
        in_channels: image channels every case must have (checked when the cases are found).
        out_channels: network outputs; must agree with ``labels`` (one per region, or classes + background).
        patch_size: training patch ``(H, W, D)``.
        batch_size: volumes per training batch; each yields ``samples_per_volume`` patches.
        samples_per_volume: random patches drawn from each loaded volume.
        num_workers: DataLoader worker processes.
        cache: where preprocessed cases are kept: ``"disk"`` (memory-mapped entries of the disk cache: memory
            does not grow with the dataset), ``"memory"`` (the disk cache's entries read into memory once per
            process, for small datasets) or ``"none"`` (preprocessed again at every read). See
            :mod:`medseg.data.cache`.
        cache_dir: the folder of disk caches; this dataset's is ``<cache_dir>/<dataset>-<options hash>``.
        preprocess_workers: processes preprocessing the cases that the cache lacks (0: this process).
        sampling: the ``data.sampling`` node (:class:`medseg.data.sampling.IndexOptions`).
        val_fraction: fraction of cases held out for validation (when ``fold`` is ``None``).
        seed: seed of the split.
        run_seed: seed of the training case order and of the patch and augmentation streams, one per process and
            DataLoader worker (:mod:`medseg.data.streams`); ``None``: the process's torch seed.
        fold: ``None`` for the seeded ``val_fraction`` split, or the cross-validation fold held out for
            validation, in [0, ``num_folds``) (see :func:`split_cases`).
        num_folds: number of cross-validation folds (used only with ``fold``).
        spacing, intensity, ct_window, ct_zscore, crop_foreground: see :func:`medseg.data.transforms.preprocessing`.
        augment: options of :func:`medseg.data.transforms.augmentation`.
        synthetic: if set, ``{"cases": N, "shape": [...], "spacing": [...], "seed": S}``: generate a synthetic
            BraTS-layout dataset into ``root`` first (once; later runs reuse it).
        split_path: where the split is saved as JSON (the run directory); an existing file there is reused,
            so a resumed run validates on the same cases.
        pin_memory: batches in pinned (page-locked) host memory, copied to the GPU without blocking (Lightning
            moves them with ``non_blocking=True``); ``"auto"``: when a CUDA device is present.
        check: the ``data.check`` node: the dataset check run by :meth:`prepare_data` (see
            :func:`medseg.data.check.check_before_training`); ``None`` skips it.
    """

    def __init__(
        self,
        layout: str,
        root: str,
        labels: Mapping[str, Any],
        modalities: Sequence[str] = ("t1", "t1ce", "t2", "flair"),
        in_channels: int | None = None,
        out_channels: int | None = None,
        patch_size: Sequence[int] = (128, 128, 128),
        batch_size: int = 2,
        samples_per_volume: int = 2,
        num_workers: int = 4,
        cache: Literal["disk", "memory", "none"] = "disk",
        cache_dir: str = "outputs/.cache",
        preprocess_workers: int = 0,
        sampling: Mapping[str, Any] | None = None,
        val_fraction: float = 0.2,
        seed: int = 42,
        run_seed: int | None = None,
        fold: int | None = None,
        num_folds: int | None = None,
        spacing: Sequence[float] | None = None,
        intensity: Literal["mri", "ct", "none"] = "mri",
        ct_window: Sequence[float] = DEFAULT_CT_WINDOW,
        ct_zscore: Sequence[float] | None = None,
        crop_foreground: bool = True,
        augment: Mapping[str, Any] | None = None,
        synthetic: Mapping[str, Any] | None = None,
        split_path: str | None = None,
        pin_memory: bool | Literal["auto"] = "auto",
        check: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1 or samples_per_volume < 1:
            raise ValueError(f"expected data.batch_size and data.samples_per_volume >= 1, got {batch_size} and {samples_per_volume}")
        if cache not in CACHE_MODES:
            raise ValueError(f"expected data.cache one of {list(CACHE_MODES)}, got {cache!r}")
        if preprocess_workers < 0:
            raise ValueError(f"expected data.preprocess_workers >= 0, got {preprocess_workers}")
        if len(patch_size) != 3:
            raise ValueError(f"expected a 3D data.patch_size, got {list(patch_size)}")
        check_fold(fold, num_folds)  # fails before the dataset is read; the case count is checked in setup
        check_intensity(intensity, ct_window, ct_zscore)
        get_layout(layout)  # an unknown layout fails here, naming the known ones
        self.layout = layout
        self.root = str(Path(root).expanduser())
        self.label_spec = LabelSpec.from_config(labels)
        if out_channels is not None and out_channels != self.label_spec.num_outputs:
            raise ValueError(f"expected data.out_channels={self.label_spec.num_outputs} for labels {list(self.label_spec.names)} in {self.label_spec.mode} mode, got {out_channels}")
        self.modalities = tuple(modalities)
        self.in_channels = in_channels
        self.patch_size = tuple(int(p) for p in patch_size)
        self.batch_size = batch_size
        self.samples_per_volume = samples_per_volume
        self.num_workers = num_workers
        self.cache = cache
        self.cache_dir = cache_dir
        self.preprocess_workers = preprocess_workers
        self.val_fraction = val_fraction
        self.seed = seed
        self.run_seed = int(run_seed) if run_seed is not None else None
        self.fold = fold
        self.num_folds = num_folds
        # plain lists, ct_zscore only when set: hashed into the cache key (medseg.build reads the same from a data node)
        self.preprocess_options = preprocessing_options(spacing, intensity, ct_window, crop_foreground, ct_zscore)
        self.preprocessor = CasePreprocessor(self.label_spec, self.preprocess_options, IndexOptions.from_config(sampling))
        self.augment = dict(augment or {})
        self.synthetic = dict(synthetic) if synthetic else None
        self.split_path = split_path
        if pin_memory not in (True, False, "auto"):
            raise ValueError(f"expected data.pin_memory true, false or auto, got {pin_memory!r}")
        self.pin_memory = torch.cuda.is_available() if pin_memory == "auto" else bool(pin_memory)
        self.check = dict(check) if check is not None else None
        self.train_cases: list[CaseRecord] = []
        self.val_cases: list[CaseRecord] = []
        self._train_dataset: Dataset | None = None
        self._val_dataset: Dataset | None = None
        self._store: CaseStore | None = None
        self.cache_summary: BuildSummary | None = None  # what the last prepare_cache did
        self._prepared = False
        self._cases: list[CaseRecord] | None = None  # the dataset's listing, made once per process
        self._cache_checked = False  # whether prepare_cache checked (or built) every entry in this process

    # Lightning calls prepare_data on one process per node: generate data here, never in setup.
    def prepare_data(self) -> None:
        """Generate synthetic data (if configured), check the dataset, build the preprocessing cache.

        ``medseg.train`` calls it before Lightning starts other processes; Lightning calls it again
        (local rank 0 of each node), which then does nothing.
        """
        if self._prepared:
            return
        if self.synthetic:
            from medseg.data.synthetic import generate_dataset

            generate_dataset(self.root, self.synthetic["cases"], **{k: v for k, v in self.synthetic.items() if k != "cases"})
        # After generation, so that synthetic data are checked too; raises DatasetError naming the check command.
        check_before_training(self.layout, self.root, self.label_spec, self.modalities, self.in_channels, self.check)
        self.prepare_cache()
        self._prepared = True

    @property
    def case_cache(self) -> CaseCache:
        """The disk cache of this dataset and these preprocessing options."""
        return CaseCache.for_dataset(self.cache_dir, self.layout, self.root, self.modalities, self.preprocessor)

    def prepare_cache(self, progress: bool = True) -> BuildSummary | None:
        """Build the disk cache entries that are missing, outdated or damaged (all cases, so that every split
        and fold shares one cache); ``None`` with ``cache="none"``. Safe to call from every process at once:
        one builds under a file lock while the others wait, then find the entries valid."""
        if self.cache == "none":
            return None
        cache = self.case_cache
        summary = self.cache_summary = cache.ensure(self.find_cases(), self.preprocessor, self.preprocess_workers, progress=progress)
        self._cache_checked = True  # every entry valid now: the store need not check them again in this process
        if summary.built or summary.rebuilt:
            rank_zero_info(f"Preprocessing cache {cache.folder}: {summary.format()}")
        return summary

    def find_cases(self) -> list[CaseRecord]:
        """All labelled cases of the dataset (raises :class:`medseg.data.layouts.DatasetError` with the fix), listed
        once per process (a listing is thousands of metadata operations on a parallel file system)."""
        if self._cases is not None:
            return list(self._cases)
        cases = find_cases(self.layout, self.root, modalities=self.modalities)
        if self.in_channels is not None:
            for case in cases:
                if len(case["image"]) not in (1, self.in_channels):
                    raise ValueError(f"case {case['case']}: expected {self.in_channels} image files (data.in_channels), got {len(case['image'])}")
        self._cases = cases
        return list(cases)

    def setup(self, stage: str | None = None) -> None:
        if self.train_cases:
            return
        cases = self.find_cases()
        saved = Path(self.split_path) if self.split_path else None
        if saved is not None and saved.is_file():
            split = json.loads(saved.read_text())
            if split.get("fold") != self.fold:
                raise ValueError(f"{saved}: the saved split is fold {split.get('fold')}, got data.fold={self.fold}; resume with the same data.fold or use a new run folder")
            by_id = {c["case"]: c for c in cases}
            unknown = [c for c in split["train"] + split["val"] if c not in by_id]
            if unknown:
                raise ValueError(f"{saved}: the saved split names cases not found under {self.root}: {unknown[:5]}")
            self.train_cases = [by_id[c] for c in split["train"]]
            self.val_cases = [by_id[c] for c in split["val"]]
        else:
            self.train_cases, self.val_cases = split_cases(cases, self.val_fraction, self.seed, self.fold, self.num_folds)
            if saved is not None and self.trainer is not None and self.trainer.is_global_zero:
                record = {"seed": self.seed, "val_fraction": self.val_fraction, "fold": self.fold, "num_folds": self.num_folds if self.fold is not None else None}
                write_json_atomic(saved, {**record, "train": [c["case"] for c in self.train_cases], "val": [c["case"] for c in self.val_cases]})
        rank_zero_info(f"Data: {len(self.train_cases)} training and {len(self.val_cases)} validation cases from {self.root}")

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """MONAI MetaTensors to plain tensors, so that metrics and checkpoints stay free of MONAI metadata;
        the voxel spacing in mm (after resampling) is kept as ``batch["spacing"]`` ``(B, 3)`` (the datasets of
        :mod:`medseg.data.datasets` already serve plain tensors and the spacing)."""
        if isinstance(batch, dict) and isinstance(batch.get("image"), MetaTensor) and "spacing" not in batch:
            affine = batch["image"].affine.reshape(-1, 4, 4)  # (B, 4, 4)
            batch["spacing"] = affine[:, :3, :3].pow(2).sum(1).sqrt().float()  # column norms, (B, 3)
            for key in ("image", "label"):
                if isinstance(batch.get(key), MetaTensor):
                    batch[key] = batch[key].as_tensor()
        return batch

    def store(self) -> CaseStore:
        """Where the datasets read preprocessed cases (``data.cache``); made once per process."""
        if self._store is None:
            if self.cache == "none":
                self._store = FreshStore(self.preprocessor)
            else:
                cache = self.case_cache
                if not self._cache_checked and cache.stale(self.train_cases + self.val_cases):
                    self.prepare_cache()  # this process did not prepare the cache (e.g. a direct setup call): build it now
                self._store = DiskStore(cache) if self.cache == "disk" else MemoryStore(cache, self.train_cases + self.val_cases)
        return self._store

    @property
    def preprocessing(self) -> Compose:
        """The deterministic transforms for labelled cases (also used by prediction and evaluation)."""
        return preprocessing(self.label_spec, with_label=True, **self.preprocess_options)

    def train_dataset(self) -> PatchDataset:
        """Training patches (preprocessed cases from the store, patch positions and augmentation random; seeded per
        process and worker by :meth:`train_dataloader`)."""
        if self._train_dataset is None:
            sampler, augment = patches_from_config(self.patch_size, self.label_spec, self.augment)
            self._train_dataset = PatchDataset(self.train_cases, self.store(), sampler, augment, self.samples_per_volume)
        return self._train_dataset

    def val_dataset(self) -> VolumeDataset:
        """Whole preprocessed validation volumes (validation and test)."""
        if self._val_dataset is None:
            self._val_dataset = VolumeDataset(self.val_cases, self.store())
        return self._val_dataset

    def _world(self) -> tuple[int, int] | None:
        """(rank, world size) when training on several processes, else None."""
        trainer = self.trainer
        if trainer is None or trainer.world_size <= 1:
            return None
        return trainer.global_rank, trainer.world_size

    def train_dataloader(self) -> DataLoader:
        world = self._world()
        rank = world[0] if world else 0
        seed = self.run_seed if self.run_seed is not None else torch.initial_seed() % 2**63
        # Its own stream of patches and augmentations for every process and worker, from (run seed, rank, worker,
        # epoch at which the loader starts: a resumed run does not replay epoch 0's stream).
        streams = SeedStreams(seed, rank, self.trainer.current_epoch if self.trainer is not None else 0)
        # Under DDP (with the trainer's use_distributed_sampler=false, see conf/trainer/ddp.yaml) each process
        # draws its share of the shuffled cases, in the run seed's order; Lightning calls set_epoch every epoch.
        sampler = DistributedSampler(self.train_dataset(), num_replicas=world[1], rank=world[0], shuffle=True, seed=seed) if world else None
        loader = DataLoader(
            self.train_dataset(),
            batch_size=self.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            worker_init_fn=streams,
            generator=torch.Generator().manual_seed(streams.seed_of(0)),  # the single-process shuffle
        )
        if self.num_workers == 0:  # the loader is the process itself (MONAI's DataLoader seeded it from torch's state)
            streams.seed_dataset(self.train_dataset(), worker=0)
        return loader

    def val_dataloader(self) -> DataLoader:
        if not self.val_cases:
            return []
        world = self._world()
        # Every validation case exactly once across processes (torch's DistributedSampler would repeat cases and bias
        # the metrics), and the same number of steps on every process, padded with items that score nothing
        # (MONAI's even_divisible=False sampler refuses fewer cases than processes, and uneven step counts hang).
        sampler = EvenShards(len(self.val_cases), num_replicas=world[1], rank=world[0]) if world else None
        # Whole volumes of different sizes: one per batch, sliding-window inference in the module.
        return DataLoader(self.val_dataset(), batch_size=1, sampler=sampler, num_workers=self.num_workers, pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
