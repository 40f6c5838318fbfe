"""The preprocessing cache on disk: same data as fresh preprocessing, exact rebuilds, safe concurrent builds."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.data.cache import CaseCache, PreprocessedCase
from medseg.data.datamodule import SegmentationDataModule
from medseg.data.datasets import FreshStore, PatchDataset
from medseg.data.sampling import IndexOptions, build_sampling_index, read_patch
from medseg.data.transforms import IMAGE, LABEL

from conftest import BRATS_LABELS

REPO = Path(__file__).resolve().parents[1]


def make_datamodule(root, cache_dir, **overrides) -> SegmentationDataModule:
    options = dict(
        layout="brats", root=str(root), labels=BRATS_LABELS, patch_size=(24, 24, 24), batch_size=2, samples_per_volume=3,
        num_workers=0, val_fraction=0.34, seed=1, cache_dir=str(cache_dir), check=None,
    )
    options.update(overrides)
    return SegmentationDataModule(**options)


def entries(cache: CaseCache) -> dict[str, float]:
    """Entry name -> modification time of its meta.json (changes only when the entry is rewritten)."""
    return {p.name: (p / "meta.json").stat().st_mtime_ns for p in cache.folder.iterdir() if p.is_dir() and not p.name.startswith(".")}


def assert_same_case(a: PreprocessedCase, b: PreprocessedCase) -> None:
    np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))
    np.testing.assert_array_equal(np.asarray(a.label), np.asarray(b.label))
    assert a.index.keys() == b.index.keys()
    for key in a.index:
        np.testing.assert_array_equal(a.index[key], b.index[key], err_msg=key)
    assert a.spacing == pytest.approx(b.spacing)
    np.testing.assert_allclose(a.affine, b.affine)


def test_cached_volumes_equal_monai_preprocessing(brats_tree, tmp_path):
    dm = make_datamodule(brats_tree, tmp_path)
    dm.setup("fit")
    transform = dm.preprocessing  # MONAI's pipeline applied directly, no cache involved
    dataset = dm.val_dataset()
    for i, record in enumerate(dm.val_cases):
        fresh = transform({IMAGE: record[IMAGE], LABEL: record[LABEL]})
        item = dataset[i]
        torch.testing.assert_close(item[IMAGE], fresh[IMAGE].as_tensor(), rtol=0, atol=0)
        torch.testing.assert_close(item[LABEL], fresh[LABEL].as_tensor(), rtol=0, atol=0)
        assert item["case"] == record["case"]


@pytest.mark.parametrize("mode", ["memory", "none"])
def test_disk_patches_equal_memory_and_fresh_patches(brats_tree, tmp_path, mode):
    disk = make_datamodule(brats_tree, tmp_path, augment={"foreground_fraction": 0.5})
    other = make_datamodule(brats_tree, tmp_path, augment={"foreground_fraction": 0.5}, cache=mode)
    for dm in (disk, other):
        dm.setup("fit")
    a, b = disk.train_dataset(), other.train_dataset()
    assert type(other.store()).__name__ == {"memory": "MemoryStore", "none": "FreshStore"}[mode]
    for seed in (0, 7):
        a.set_random_state(seed), b.set_random_state(seed)
        for i in range(len(a)):
            for pa, pb in zip(a[i], b[i], strict=True):
                for key in (IMAGE, LABEL, "spacing"):
                    torch.testing.assert_close(pa[key], pb[key], rtol=0, atol=0)
    a.set_random_state(0)
    first = a[0][0][IMAGE].clone()
    a.set_random_state(1)
    assert not torch.equal(first, a[0][0][IMAGE])  # another seed, other patches: the comparison can fail


def test_patches_are_the_sampled_windows_of_the_volume(brats_tree, tmp_path):
    # Without augmentation, each patch is exactly the window of the whole volume at the sampled start.
    dm = make_datamodule(brats_tree, tmp_path, augment={"flip_prob": 0.0, "intensity_scale_prob": 0.0, "intensity_shift_prob": 0.0, "foreground_fraction": 1.0})
    dm.setup("fit")
    dataset = dm.train_dataset()
    case = dm.store().load(dm.train_cases[0])
    dataset.set_random_state(3)
    patches = dataset[0]
    dataset.set_random_state(3)
    starts = dataset.sampler.starts(case.image.shape[1:], case.index, dm.samples_per_volume)
    shape = case.image.shape[1:]
    for patch, start in zip(patches, starts, strict=True):
        inside = tuple(slice(max(s, 0), min(s + 24, n)) for s, n in zip(start, shape))  # the window within the volume
        in_patch = tuple(slice(w.start - s, w.stop - s) for w, s in zip(inside, start))
        np.testing.assert_array_equal(patch[IMAGE].numpy()[(slice(None), *in_patch)], np.asarray(case.image)[(slice(None), *inside)])
        outside = patch[IMAGE].numpy().copy()
        outside[(slice(None), *in_patch)] = 0
        assert not outside.any()  # zero padding where the patch leaves the volume
        assert patch[LABEL].sum() > 0  # foreground_fraction 1: centred on a labelled voxel


def test_read_patch_pads_with_zeros_like_monai():
    from monai.transforms import SpatialPad

    volume = np.random.default_rng(0).normal(size=(2, 5, 9, 4)).astype(np.float32)
    padded = SpatialPad((8, 8, 8))(torch.from_numpy(volume)).numpy()  # symmetric zero padding of short axes
    # Along H (5 < 8) and D (4 < 8) the padded volume starts at -(8-5)//2 = -1 and -(8-4)//2 = -2.
    np.testing.assert_array_equal(read_patch(volume, (-1, 1, -2), (8, 8, 8)), padded[:, :, 1:9, :])
    assert read_patch(volume, (3, 7, 2), (4, 4, 4))[:, 2:, 2:, 2:].sum() == 0


def test_sampling_index_against_a_direct_count():
    from scipy import ndimage

    rng = np.random.default_rng(1)
    target = (rng.random((2, 30, 28, 26)) > 0.985).astype(np.uint8)
    target[0, 2:9, 3:8, 4:10] = 1  # one large component among speckles
    index = build_sampling_index(target, "sigmoid", ["a", "b"], IndexOptions(max_voxels=300, voxels_per_component=5))
    for r, name in enumerate(["a", "b"]):
        mask = target[r] > 0
        labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))  # 26-connectivity
        sizes = np.sort(np.bincount(labels.ravel())[1:])
        np.testing.assert_array_equal(np.sort(index[f"component_size_{name}"]), sizes)
        voxels = index[f"voxels_{name}"]
        assert len(voxels) == min(300, mask.sum()) and len(np.unique(voxels, axis=0)) == len(voxels)
        assert mask[tuple(voxels.T)].all()
        inside = index[f"component_voxels_{name}"]  # (m, 5, 3): voxels of their own component, inside its box
        assert inside.shape == (count, 5, 3)
        for c in range(count):
            ids = labels[tuple(inside[c].T)]
            assert (ids > 0).all() and len(set(ids.tolist())) == 1
            box = index[f"component_bbox_{name}"][c]
            assert ((inside[c] >= box[:3]) & (inside[c] < box[3:])).all()
            assert (labels == ids[0]).sum() == index[f"component_size_{name}"][c]


def test_parallel_build_equals_in_process_build(brats_tree, tmp_path):
    # Worker processes share no transform state: the thread race that once cached a 4-channel image with
    # 1 channel cannot recur, and two workers give bit-identical entries.
    serial = make_datamodule(brats_tree, tmp_path / "serial")
    parallel = make_datamodule(brats_tree, tmp_path / "parallel", preprocess_workers=2)
    assert serial.prepare_cache(progress=False).built == 6
    assert parallel.prepare_cache(progress=False).built == 6
    for record in serial.find_cases():
        case = str(record["case"])
        assert_same_case(serial.case_cache.load(case), parallel.case_cache.load(case))
        assert parallel.case_cache.load(case).image.shape[0] == 4


def test_option_change_or_touched_file_rebuilds_exactly_the_affected_entries(brats_copy, tmp_path):
    dm = make_datamodule(brats_copy, tmp_path)
    first = dm.prepare_cache(progress=False)
    assert (first.built, first.reused) == (6, 0)
    before = entries(dm.case_cache)
    again = dm.prepare_cache(progress=False)
    assert (again.built, again.reused) == (0, 6) and entries(dm.case_cache) == before

    touched = brats_copy / "SYN-0002" / "SYN-0002_t1ce.nii.gz"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    assert dm.case_cache.problem(dm.find_cases()[2]) == "source changed"
    summary = dm.prepare_cache(progress=False)
    assert (summary.built, summary.reused) == (1, 5)
    after = entries(dm.case_cache)
    assert [name for name in before if after[name] != before[name]] == ["SYN-0002"]

    resampled = make_datamodule(brats_copy, tmp_path, spacing=(5.0, 5.0, 5.0))
    assert resampled.case_cache.folder != dm.case_cache.folder
    assert resampled.prepare_cache(progress=False).built == 6
    assert entries(dm.case_cache) == after  # the other options' cache is left as it was
    options = json.loads((resampled.case_cache.folder / "options.json").read_text())
    assert options["preprocessing"]["spacing"] == [5.0, 5.0, 5.0]


def test_damaged_entries_are_detected_and_rebuilt(brats_tree, tmp_path, caplog):
    dm = make_datamodule(brats_tree, tmp_path)
    dm.prepare_cache(progress=False)
    cache, records = dm.case_cache, dm.find_cases()
    reference = {str(r["case"]): cache.load(str(r["case"]), mmap=False) for r in records}
    image = cache.entry("SYN-0001") / "image.npy"
    with open(image, "r+b") as f:
        f.truncate(image.stat().st_size // 2)  # a truncated file (disk full, killed copy)
    label = cache.entry("SYN-0004") / "label.npy"
    np.save(label, np.zeros((3, 2, 2, 2), dtype=np.uint8))  # a file of another shape
    (cache.entry("SYN-0005") / "meta.json").unlink()  # a folder without its commit record
    meta = json.loads((cache.entry("SYN-0003") / "meta.json").read_text())
    (cache.entry("SYN-0003") / "meta.json").write_text(json.dumps({**meta, "files": {"image.npy": {}}}))  # a malformed record
    problems = {str(r["case"]): cache.problem(r) for r in records}
    assert problems["SYN-0001"].startswith("damaged: image.npy has")
    assert problems["SYN-0004"].startswith("damaged: label.npy")
    assert problems["SYN-0005"] == "damaged: meta.json is missing"
    assert problems["SYN-0003"] == "damaged: meta.json lacks the file records"
    assert [c for c, p in problems.items() if p is None] == ["SYN-0000", "SYN-0002"]
    with caplog.at_level(logging.WARNING, logger="medseg"):
        summary = dm.prepare_cache(progress=False)
    assert (summary.built, summary.rebuilt, summary.reused) == (0, 4, 2)
    assert sum("rebuilding" in r.getMessage() for r in caplog.records) == 4
    for case, expected in reference.items():
        assert_same_case(cache.load(case), expected)


def _script(body: str) -> str:
    return textwrap.dedent(
        f"""
        import json, os, sys
        sys.path.insert(0, {str(REPO / 'tests')!r})
        from conftest import BRATS_LABELS
        from medseg.data.datamodule import SegmentationDataModule
        if __name__ == "__main__":
            dm = SegmentationDataModule(layout="brats", root=sys.argv[1], labels=BRATS_LABELS, cache_dir=sys.argv[2], check=None)
        """
    ) + textwrap.indent(textwrap.dedent(body), "    ")


def test_two_processes_building_at_once_make_one_valid_cache(brats_tree, tmp_path):
    script = tmp_path / "build.py"
    script.write_text(_script("s = dm.prepare_cache(progress=False)\nprint(json.dumps([s.built, s.reused]))"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen([sys.executable, str(script), str(brats_tree), str(tmp_path / "cache")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-4000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sum(built for built, _ in results) == 6  # every entry built once, by one of the two
    dm = make_datamodule(brats_tree, tmp_path / "cache")
    assert dm.case_cache.stale(dm.find_cases()) == []
    assert not [p for p in dm.case_cache.folder.iterdir() if p.name.startswith((".tmp-", ".trash-"))]


def test_a_killed_build_leaves_no_entry_read_as_valid(brats_tree, tmp_path):
    # The process dies (os._exit: no cleanup, as SIGKILL) while writing the third entry's arrays.
    script = tmp_path / "killed.py"
    script.write_text(_script(
        """
        import numpy as np
        import medseg.data.cache as cache
        saved = []
        real_save = np.save
        def dying_save(file, array, **kwargs):
            saved.append(1)
            if len(saved) == 5:  # entries 1-2 have 2 arrays each; die in entry 3's second array
                file.write(b"half")
                file.flush()
                os._exit(9)
            real_save(file, array, **kwargs)
        cache.np.save = dying_save
        dm.prepare_cache(progress=False)
        """
    ))
    result = subprocess.run([sys.executable, str(script), str(brats_tree), str(tmp_path / "cache")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 9, result.stderr[-4000:]
    dm = make_datamodule(brats_tree, tmp_path / "cache")
    cache, records = dm.case_cache, dm.find_cases()
    assert [p.name.startswith(".tmp-") for p in cache.folder.iterdir() if p.is_dir()].count(True) == 1
    problems = [cache.problem(r) for r in records]
    assert problems.count(None) == 2 and problems.count("missing") == 4
    summary = dm.prepare_cache(progress=False)
    assert (summary.built, summary.reused) == (4, 2)
    assert not [p for p in cache.folder.iterdir() if p.name.startswith(".tmp-")]
    assert cache.stale(records) == []


def test_fresh_store_reads_what_the_cache_stores(brats_tree, tmp_path):
    dm = make_datamodule(brats_tree, tmp_path)
    dm.setup("fit")
    record = dm.train_cases[0]
    assert_same_case(FreshStore(dm.preprocessor).load(record), dm.store().load(record))
    assert isinstance(dm.train_dataset(), PatchDataset)


def test_bad_cache_options_are_named(brats_tree, tmp_path):
    with pytest.raises(ValueError, match=r"data.cache one of"):
        make_datamodule(brats_tree, tmp_path, cache="ram")
    with pytest.raises(ValueError, match=r"data.preprocess_workers >= 0"):
        make_datamodule(brats_tree, tmp_path, preprocess_workers=-1)
    with pytest.raises(ValueError, match=r"data.sampling.connectivity"):
        make_datamodule(brats_tree, tmp_path, sampling={"connectivity": 4})


@pytest.mark.slow
def test_training_memory_does_not_grow_with_the_number_of_cases(tmp_path_factory, tmp_path):
    from medseg.bench.cache import run_training, training_overrides
    from medseg.data.synthetic import generate_dataset

    sizes, steps = (4, 16), 8  # 8 steps of 2 cases: every case of the larger dataset is read
    roots = {}
    for n in sizes:
        roots[n] = tmp_path_factory.mktemp(f"brats{n}")
        generate_dataset(roots[n], n, shape=(96, 96, 64), spacing=(2.0, 2.0, 2.4), seed=5)
    cache_dir = tmp_path / "cache"
    stored = {}
    for n in sizes:  # built here, so that the training runs below start from a warm cache
        dm = make_datamodule(roots[n], cache_dir)
        dm.prepare_cache(progress=False)
        stored[n] = sum((dm.case_cache.entry(str(r["case"])) / f).stat().st_size for r in dm.find_cases() for f in ("image.npy", "label.npy"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def peak(n: int, *extra: str) -> int:
        run = run_training(training_overrides(roots[n], tmp_path / f"run{n}-{len(extra)}", cache_dir, 32, steps, *extra), tmp_path, env)
        assert run.first_step_s is not None and len(run.peak_bytes) == 1  # one process (num_workers=0)
        return max(run.python_peaks)

    disk_small, disk_large = peak(4), peak(16)
    extra_bytes = stored[16] - stored[4]  # what 12 more cases would cost held in memory (~60 MB)
    assert disk_large - disk_small < 0.2 * extra_bytes, (disk_small, disk_large, extra_bytes)
    # The same measurement sees the cases when they are held in memory: the bound above can fail.
    memory_large = peak(16, "data.cache=memory")
    assert memory_large - disk_large > 0.5 * stored[16], (memory_large, disk_large, stored[16])


def _huge_and_tiny_lesions() -> tuple[np.ndarray, list[tuple[slice, ...]]]:
    """One confluent 20x20x20 lesion and 10 tiny 2x2x2 lesions, far apart, in a 96x96x96 target."""
    target = np.zeros((1, 96, 96, 96), dtype=np.uint8)
    target[0, 10:30, 10:30, 10:30] = 1
    tiny = [tuple(slice(c, c + 2) for c in (50 + 4 * (i % 5), 60 + 20 * (i // 5), 80)) for i in range(10)]
    for box in tiny:
        target[(0, *box)] = 1
    return target, tiny


@pytest.mark.parametrize(("sampling", "weighting"), [("lesion", "uniform"), ("lesion", "inverse_size")])
def test_lesion_sampling_shows_each_tiny_lesion_as_often_as_specified(sampling, weighting):
    from medseg.data.sampling import PatchSampler

    target, tiny = _huge_and_tiny_lesions()
    index = build_sampling_index(target, "sigmoid", ["lesion"])
    draws, patch = 4000, np.array((16, 16, 16))

    def coverage(sampler: PatchSampler) -> np.ndarray:
        """Fraction of patches containing each tiny lesion (centre voxel of the lesion inside the patch)."""
        sampler.set_random_state(0)
        starts = np.array(sampler.starts(target.shape[1:], index, draws))  # (draws, 3)
        centres = np.array([[b.start for b in box] for box in tiny])  # (10, 3)
        inside = ((starts[:, None] <= centres[None]) & (centres[None] < starts[:, None] + patch)).all(-1)  # (draws, 10)
        return inside.mean(0)

    fg = 0.6
    voxel = coverage(PatchSampler(patch, ["lesion"], fg, "voxel"))
    lesion = coverage(PatchSampler(patch, ["lesion"], fg, sampling, lesion_fraction=1.0, lesion_weighting=weighting))
    mixed = coverage(PatchSampler(patch, ["lesion"], fg, sampling, lesion_fraction=0.5, lesion_weighting=weighting))
    # Expected share of patches on each tiny lesion: fg / 11 lesions (uniform), fg * (1/8) / (10/8 + 1/8000)
    # (inverse size); neighbouring tiny lesions 4 voxels apart also fall into each other's patches, so only a
    # lower bound is asserted (3 sigma of a binomial below the expectation).
    expected = fg / 11 if weighting == "uniform" else fg * (1 / 8) / (10 / 8 + 1 / 8000)
    bound = expected - 3 * np.sqrt(expected * (1 - expected) / draws)
    assert (lesion >= bound).all(), (lesion, bound)
    assert (mixed >= 0.5 * bound).all() and mixed.mean() < lesion.mean()  # the mixing weight takes effect
    # Voxel sampling: the 8000-voxel lesion takes almost every foreground patch (80 tiny voxels of 8080); the
    # tiny lesions are then seen mostly by chance in background patches.
    assert lesion.min() > 5 * voxel.max(), (lesion, voxel)


def test_lesion_sampling_options_are_validated(brats_tree, tmp_path):
    from medseg.data.sampling import PatchSampler

    with pytest.raises(ValueError, match="data.augment.sampling"):
        PatchSampler((8, 8, 8), ["a"], sampling="blob")
    with pytest.raises(ValueError, match="data.augment.lesion_weighting"):
        PatchSampler((8, 8, 8), ["a"], sampling="lesion", lesion_weighting="size")
    with pytest.raises(ValueError, match="data.augment.lesion_fraction"):
        PatchSampler((8, 8, 8), ["a"], sampling="lesion", lesion_fraction=1.5)
    dm = make_datamodule(brats_tree, tmp_path, augment={"sampling": "lesion", "lesion_weighting": "inverse_size", "foreground_fraction": 1.0})
    dm.setup("fit")
    dataset = dm.train_dataset()
    assert dataset.sampler.sampling == "lesion" and dataset.sampler.lesion_weighting == "inverse_size"
    assert all(p[LABEL].sum() > 0 for i in range(len(dataset)) for p in dataset[i])


def test_preprocess_command_builds_the_cache_training_reuses(brats_tree, tmp_path):
    from medseg.config import compose
    from medseg.data.preprocess import preprocess

    overrides = ["+experiment=demo", f"data.root={brats_tree}", "data.synthetic=null", f"paths.output_dir={tmp_path / 'run'}",
                 f"paths.cache_dir={tmp_path / 'cache'}", f"data.check.cache_dir={tmp_path / 'checks'}"]  # fmt: skip
    cfg = compose("train", overrides)
    first = preprocess(cfg)
    assert "6 cases; 6 built, 0 rebuilt (damaged), 0 reused" in first
    dm = make_datamodule(brats_tree, tmp_path / "cache")  # training's data module finds the same, valid entries
    assert first.startswith(str(dm.case_cache.folder)) and dm.case_cache.stale(dm.find_cases()) == []
    assert "0 built, 0 rebuilt (damaged), 6 reused" in preprocess(cfg)
    result = subprocess.run([sys.executable, "-m", "medseg.data.preprocess", "+experiment=brats"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 1 and "data.root" in result.stdout + result.stderr
    assert not (tmp_path / "outputs").exists()  # no run folder, no log file


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_file_system_without_flock_builds_under_a_lock_file(brats_tree, tmp_path, monkeypatch):
    import errno

    import medseg.folderlock

    def no_flock(handle, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")  # Lustre mounted without flock

    monkeypatch.setattr(medseg.folderlock.fcntl, "flock", no_flock)
    dm = make_datamodule(brats_tree, tmp_path / "cache")
    # a lock file left by a killed build on this host: its process is gone, so it is broken
    dm.case_cache.folder.mkdir(parents=True)
    (dm.case_cache.folder / ".lock.owner").write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "started": 0.0}))
    summary = dm.prepare_cache(progress=False)
    assert summary.built == 6 and dm.case_cache.stale(dm.find_cases()) == []
    assert not [p.name for p in dm.case_cache.folder.iterdir() if p.name.startswith(".lock.owner")]


def test_a_lock_file_of_another_host_is_waited_for_until_its_heartbeat_stops(tmp_path):
    import time

    from medseg.folderlock import _lock_file

    path = tmp_path / ".lock.owner"
    path.write_text(json.dumps({"host": "another-node", "pid": 1, "started": 0.0, "token": "x"}))
    start = time.monotonic()
    with _lock_file(path, stale_after_s=1.0, poll_s=0.05, what="test"):
        waited = time.monotonic() - start
        assert json.loads(path.read_text())["host"] == socket.gethostname()
    assert 0.5 <= waited < 30 and not path.exists()


def test_the_leftover_sweep_removes_only_builds_whose_owner_is_gone(brats_tree, tmp_path):
    import time

    import medseg.data.cache as cache_module

    dm = make_datamodule(brats_tree, tmp_path / "cache")
    dm.prepare_cache(progress=False)
    cache, records = dm.case_cache, dm.find_cases()
    host, old = cache_module._HOST_TAG, time.time() - 2 * cache_module.LEFTOVER_MAX_AGE_S
    leftovers = {
        f".tmp-a-{host}-{os.getpid()}-00000001": True,  # a build running in a live process of this host
        f".tmp-b-{host}-{_dead_pid()}-00000002": False,  # a killed build of this host
        ".tmp-c-0badc0de-4242-00000003": True,  # another node's build, recent: it may be running (node-local locks)
        ".tmp-d-0badc0de-4242-00000004": False,  # another node's build untouched for 2 hours
        ".trash-e-00000005": True,  # a name of an older version, recent
    }
    for name, kept in leftovers.items():
        (cache.folder / name).mkdir()
        (cache.folder / name / "image.npy").write_bytes(b"partial")
        if name.startswith(".tmp-d"):
            for p in (cache.folder / name / "image.npy", cache.folder / name):
                os.utime(p, (old, old))
    shutil.rmtree(cache.entry(str(records[0]["case"])))  # one entry to build: the sweep runs under the lock
    dm.prepare_cache(progress=False)
    assert sorted(p.name for p in cache.folder.iterdir() if p.name.startswith((".tmp-", ".trash-"))) == sorted(n for n, kept in leftovers.items() if kept)


def test_start_up_lists_the_dataset_once_and_checks_each_entry_once(brats_tree, tmp_path, monkeypatch):
    # What a training process does before its first step, on a built cache: on a parallel file system every
    # listing and every entry check is thousands of metadata operations per rank.
    import medseg.data.datamodule as datamodule_module

    make_datamodule(brats_tree, tmp_path / "cache").prepare_cache(progress=False)  # built by an earlier run
    counts = {"listings": 0, "entry_checks": 0, "walks": 0}
    real_find, real_problem, real_rglob = datamodule_module.find_cases, CaseCache.problem, Path.rglob

    def count(key, fn):
        def counted(*args, **kwargs):
            counts[key] += 1
            return fn(*args, **kwargs)
        return counted

    monkeypatch.setattr(datamodule_module, "find_cases", count("listings", real_find))
    monkeypatch.setattr(CaseCache, "problem", count("entry_checks", real_problem))
    monkeypatch.setattr(Path, "rglob", count("walks", real_rglob))
    dm = make_datamodule(brats_tree, tmp_path / "cache")
    dm.prepare_cache(progress=False)  # what every rank runs before the process group forms
    dm.setup("fit")
    dm.train_dataloader(), dm.val_dataloader()
    assert counts == {"listings": 1, "entry_checks": 6, "walks": 0}  # before: 2 listings, 12 checks, 1 walk of the cache
