"""Validation under DDP with fewer cases than processes: every process runs the same number of steps, padding steps
score nothing, and the metrics equal one process's."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torchmetrics import MeanMetric

from medseg.data.datasets import PADDING, PADDING_INDEX, EvenShards, VolumeDataset
from medseg.metrics.lesion import LesionMetrics
from medseg.metrics.voxel import OverlapMetrics


@pytest.mark.parametrize("n, world", [(1, 2), (3, 2), (3, 4), (6, 2), (2, 8), (5, 3)])
def test_every_case_once_and_every_process_the_same_number_of_steps(n, world):
    shards = [list(EvenShards(n, world, rank)) for rank in range(world)]
    assert {len(s) for s in shards} == {-(-n // world)}  # equal step counts: no collective left unmatched
    real = sorted(i for s in shards for i in s if i != PADDING_INDEX)
    assert real == list(range(n))  # each case exactly once, none repeated (repeats would bias the metrics)


def test_a_padding_item_names_no_case_and_reads_nothing():
    class NoStore:
        def load(self, record):
            raise AssertionError("a padding item must not read a case")

    item = VolumeDataset([{"case": "a"}], NoStore())[PADDING_INDEX]
    assert item[PADDING] is True and item["case"] == ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cases(seed: int = 0):
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(3):
        target = rng.random((1, 2, 12, 12, 8)) > 0.7
        pred = target ^ (rng.random(target.shape) > 0.85)
        cases.append((torch.from_numpy(pred), torch.from_numpy(target), float(rng.random())))
    return cases


def _scores(cases):
    overlap, loss, lesions = OverlapMetrics(["a", "b"]), MeanMetric(nan_strategy="disable"), LesionMetrics()
    for pred, target, value in cases:
        overlap.update(pred, target)
        loss.update(torch.tensor(value), 1)
        lesions.update(pred[:, 0], target[:, 0])
    return {**overlap.compute(), "loss": loss.compute(), **{f"lesion_{k}": v for k, v in lesions.compute().items()}}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cases = _cases()
        mine = [cases[i] for i in EvenShards(len(cases), world, rank) if i != PADDING_INDEX]  # rank 3 has none
        result = _scores(mine)  # compute() syncs: every process must join, the empty one too
        if rank == world - 1:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_metrics_of_four_processes_for_three_cases_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    expected = _scores(_cases())
    out = str(tmp_path / "got.pt")
    mp.spawn(_worker, args=(4, _free_port(), out), nprocs=4, join=True)
    got = torch.load(out)  # as the process without a case computed it
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.allclose(got[key].double(), value.double(), rtol=1e-6, equal_nan=True), key
