"""Split, caching and the batches the data module serves."""

from __future__ import annotations

import json

import pytest
import torch

from medseg.data.datamodule import SegmentationDataModule, split_cases

from conftest import BRATS_LABELS


def make_datamodule(root, tmp_path, **overrides) -> SegmentationDataModule:
    options = dict(
        layout="brats", root=str(root), labels=BRATS_LABELS, patch_size=(32, 32, 32), batch_size=2, samples_per_volume=2,
        num_workers=0, cache_dir=str(tmp_path / "cache"), val_fraction=0.34, seed=1, split_path=str(tmp_path / "split.json"),
    )
    options.update(overrides)
    return SegmentationDataModule(**options)


def cases(n):
    return [{"case": f"c{i:02d}"} for i in range(n)]


def test_split_is_deterministic_and_independent_of_listing_order():
    train, val = split_cases(cases(10), 0.2, seed=5)
    train2, val2 = split_cases(list(reversed(cases(10))), 0.2, seed=5)
    assert [c["case"] for c in val] == [c["case"] for c in val2] and len(val) == 2 and len(train) == 8
    assert {c["case"] for c in train} | {c["case"] for c in val} == {c["case"] for c in cases(10)}
    assert any(split_cases(cases(10), 0.2, seed=s)[1] != val for s in range(6, 10))


@pytest.mark.parametrize(("n", "fraction", "message"), [(1, 0.5, "at least 2 cases"), (2, 0.9, "at least one training case"), (5, 1.0, r"in \[0, 1\)")])
def test_bad_splits(n, fraction, message):
    with pytest.raises(ValueError, match=message):
        split_cases(cases(n), fraction, seed=0)


def test_split_is_saved_and_reused(brats_tree, tmp_path):
    dm = make_datamodule(brats_tree, tmp_path)
    dm.trainer = type("T", (), {"is_global_zero": True})()
    dm.setup("fit")
    saved = json.loads((tmp_path / "split.json").read_text())
    assert saved["val"] == [c["case"] for c in dm.val_cases] and len(saved["val"]) == 2 and len(saved["train"]) == 4
    other = make_datamodule(brats_tree, tmp_path, seed=99)  # a resumed run keeps the saved split
    other.setup("fit")
    assert [c["case"] for c in other.val_cases] == saved["val"]


def test_training_batches_are_foreground_patches(brats_tree, tmp_path):
    dm = make_datamodule(brats_tree, tmp_path, augment={"foreground_fraction": 1.0})
    dm.setup("fit")
    batch = dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch["image"].shape == (4, 4, 32, 32, 32) and batch["label"].shape == (4, 3, 32, 32, 32)
    assert type(batch["image"]) is torch.Tensor and batch["image"].dtype == torch.float32
    assert all(batch["label"][i].sum() > 0 for i in range(4))  # every patch is centred on a tumour voxel
    torch.testing.assert_close(batch["spacing"], torch.tensor([[4.0, 4.0, 4.8]] * 4))


def test_validation_batches_are_whole_cropped_volumes(brats_tree, tmp_path):
    dm = make_datamodule(brats_tree, tmp_path)
    dm.setup("fit")
    batches = list(dm.val_dataloader())
    assert len(batches) == len(dm.val_cases) == 2
    for batch in batches:
        image, label = batch["image"], batch["label"]
        assert image.shape[:2] == (1, 4) and label.shape[:2] == (1, 3) and image.shape[2:] == label.shape[2:]
        assert all(s <= full for s, full in zip(image.shape[2:], (48, 48, 32)))  # cropped to the brain


def test_out_channels_must_agree_with_labels(brats_tree, tmp_path):
    with pytest.raises(ValueError, match=r"expected data.out_channels=3"):
        make_datamodule(brats_tree, tmp_path, out_channels=4)


def test_wrong_channel_count_is_reported(msd_tree, tmp_path):
    dm = make_datamodule(msd_tree, tmp_path, layout="msd", in_channels=4)
    with pytest.raises(ValueError, match=r"expected 4 image files"):
        dm.setup("fit")


def rank_streams(root, tmp_path, rank, run_seed=7, epoch=0):
    """What process ``rank`` of 2 draws: its case order and the first draws of its patch and augmentation streams."""
    from types import SimpleNamespace

    dm = make_datamodule(root, tmp_path, run_seed=run_seed)
    dm.trainer = SimpleNamespace(world_size=2, global_rank=rank, current_epoch=epoch, is_global_zero=rank == 0)
    dm.setup("fit")
    loader = dm.train_dataloader()
    dataset = dm.train_dataset()
    order = []
    for shuffle in (0, 1):
        loader.sampler.set_epoch(shuffle)
        order.append([dm.train_cases[i]["case"] for i in loader.sampler])
    return order, dataset.sampler.R.randint(2**31, size=4).tolist(), dataset.augment.R.randint(2**31, size=4).tolist()


def test_each_process_draws_its_own_reproducible_stream(brats_tree, tmp_path):
    first = rank_streams(brats_tree, tmp_path, rank=0)
    assert rank_streams(brats_tree, tmp_path, rank=0) == first  # the same seed reproduces it
    other = rank_streams(brats_tree, tmp_path, rank=1)
    assert other[1] != first[1] and other[2] != first[2]  # another process: other patches and augmentations
    resumed = rank_streams(brats_tree, tmp_path, rank=0, epoch=3)
    assert resumed[1] != first[1]  # a run resumed at epoch 3 does not replay epoch 0's stream
    # the run's seed (not the split's) orders the cases: some other seed orders them differently
    assert any(rank_streams(brats_tree, tmp_path, rank=0, run_seed=s)[0] != first[0] for s in (8, 9, 10))


def test_every_process_and_worker_has_a_distinct_stream():
    import pickle

    from medseg.data.streams import SeedStreams

    seeds = {SeedStreams(7, rank).seed_of(worker) for rank in range(8) for worker in range(4)}
    assert len(seeds) == 32
    assert pickle.loads(pickle.dumps(SeedStreams(7, 1, 2))).seed_of(3) == SeedStreams(7, 1, 2).seed_of(3)  # spawned workers
