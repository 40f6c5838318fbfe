"""The preprocessing cache at growing dataset sizes: memory per process, start-up time, patch and build rates.

Datasets are generated in the BraTS layout at BraTS size (4x240x240x155 at 1 mm; tiny in quick mode).

- memory: peak resident memory (``VmHWM``) of every process of a real training run
  (``python -m medseg.train``, one epoch over all cases) at several case counts, with ``data.cache=disk``
  and, for contrast, ``data.cache=memory`` (every case held in memory, as MONAI's ``CacheDataset`` did);
  the slope in MB per case, and the projection for BraTS 2021 (1,251 cases) on 8 processes. A 2-process
  DDP run on CPU (gloo) at the largest size shows the per-process figure holds under DDP.
- start-up: seconds from launching the training command to its first training step, with a cold cache
  (built in ``data.preprocess_workers`` processes) and a warm one, at each case count.
- patches: patches per second one loader worker gets (``num_workers=0``: this process) from the disk cache
  vs the in-memory cache vs MONAI's ``PersistentDataset`` with the MONAI crop pipeline of earlier versions.
  The disk cache's files were just written, so they are read from the OS page cache, as on a node whose
  RAM holds the cache (see the README's sizing); a cold read from disk is slower.
- build: cases per second preprocessed into the cache with 1 and 2 worker processes.
- format: bytes on disk and random patch read time of ``.npy`` (memory-mapped) vs a blosc2 chunked,
  compressed array (nnU-Net's format), when ``blosc2`` is installed.

The training runs are subprocesses; a thread samples ``/proc/<pid>/status`` of the process tree.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback

from medseg.bench.report import BenchResult, Contender, Figure, Goal
from medseg.bench.timing import time_alternating
from medseg.bench.workload import BenchOptions, compose_config, patch_override, synthetic_dataset
from medseg.data.datamodule import SegmentationDataModule
from medseg.data.transforms import patches_from_config

NAME = "cache"
BRATS_2021_CASES = 1251
NODE_PROCESSES = 8  # one per GPU of a typical node
MB = 1e6
GOALS = {"slope": Goal("<=", 5.0), "patches": Goal(">=", 0.8), "warm_start": Goal("<=", 1.2)}
FIRST_STEP_FILE = "first_step.txt"


@dataclass(frozen=True)
class CacheSettings:
    """Case counts of the memory and start-up runs, generated case shape and spacing, the cubic training
    patch of those runs and of the patch-rate figure, items timed per patch-rate repeat (the build figure
    preprocesses the smallest dataset), whether the in-memory contrast and the DDP run are made, and warm runs per case count."""

    sizes: tuple[int, ...]
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    train_patch: int
    read_patch: int
    items: int
    contrast: bool
    warm_runs: int  # start-up times vary by a second between identical runs here: the fastest counts


SETTINGS = {
    "quick": CacheSettings((2, 4), (64, 64, 48), (3.0, 3.0, 3.0), 32, 32, 2, False, 1),
    "cpu": CacheSettings((6, 12, 24), (240, 240, 155), (1.0, 1.0, 1.0), 64, 128, 6, True, 2),
    "gpu": CacheSettings((6, 12, 24), (240, 240, 155), (1.0, 1.0, 1.0), 64, 128, 12, True, 2),
}
REPEATS = {"quick": 1, "cpu": 3, "gpu": 3}


# ----------------------------------------------------------------------------------------- process memory
@dataclass
class RunMemory:
    """A training run's outcome: peak resident bytes of each of its processes (by pid, the launched process
    first), seconds from launch to the first training step (``None`` if unknown) and the run's wall time."""

    peak_bytes: dict[int, int] = field(default_factory=dict)
    first_step_s: float | None = None
    seconds: float = 0.0

    @property
    def python_peaks(self) -> list[int]:
        return list(self.peak_bytes.values())


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return found


def _python_tree(pid: int) -> list[int]:
    """``pid`` and its descendants that run Python (DDP ranks, loader workers; not a resource tracker)."""
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += _children(p)
    return [p for p in tree if _is_worker_python(p)]


def _is_worker_python(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ")
    except OSError:
        return False
    return b"python" in cmd and b"resource_tracker" not in cmd


def _peak_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def run_training(overrides: Sequence[str], cwd: Path, env: dict[str, str] | None = None, interval_s: float = 0.1, timeout_s: float = 1800) -> RunMemory:
    """Run ``python -m medseg.train <overrides>`` and record every Python process's peak resident memory.

    A callback (:class:`FirstStep`) writes the time of the first training step into ``cwd``.

    Raises:
        RuntimeError: the run failed (with the end of its output).
    """
    marker = cwd / FIRST_STEP_FILE
    marker.unlink(missing_ok=True)
    command = [sys.executable, "-m", "medseg.train", *overrides, f"+callbacks.first_step._target_={__name__}.FirstStep", f"+callbacks.first_step.path={marker}"]
    result = RunMemory()
    start = time.time()
    log = open(cwd / "train.out", "w+")
    process = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env or os.environ.copy())

    def sample() -> None:
        while process.poll() is None:
            for pid in _python_tree(process.pid):
                kib = _peak_kib(pid)
                if kib is not None:
                    result.peak_bytes[pid] = max(result.peak_bytes.get(pid, 0), kib * 1024)
            time.sleep(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        process.wait(timeout=timeout_s)
    finally:
        if process.poll() is None:
            process.kill()
        sampler.join()
    result.seconds = time.time() - start
    if process.returncode != 0:
        log.seek(0)
        raise RuntimeError(f"training run failed (exit {process.returncode}): {' '.join(overrides)}\n{log.read()[-4000:]}")
    log.close()
    if marker.exists():
        result.first_step_s = float(marker.read_text()) - start
    return result


class FirstStep(Callback):
    """Lightning callback: write the wall-clock time of the first training step (global rank 0) to ``path``."""

    def __init__(self, path: str) -> None:
        self.path, self.done = Path(path), False

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if not self.done and trainer.is_global_zero:
            self.path.write_text(repr(time.time()))
        self.done = True


def training_overrides(root: Path, run_dir: Path, cache_dir: Path, patch: int, steps: int, *extra: str) -> list[str]:
    """``steps`` training steps on the cases of ``root`` (no validation) with the demo's small network.

    The same number of steps at every dataset size, so that memory is compared at the same point of
    training (the optimizer's state appears at the first step); ``steps * batch_size`` should reach the
    largest case count, so that every case is read.
    """
    return [
        "+experiment=demo", f"data.root={root}", "data.synthetic=null", "data.val_fraction=0", "evaluate_best=false",
        patch_override(patch), f"trainer.max_steps={steps}", "trainer.max_epochs=1000", "data.num_workers=0", f"hydra.run.dir={run_dir}",
        f"paths.cache_dir={cache_dir}", f"data.check.cache_dir={run_dir.parent / '.data_checks'}", "~callbacks.model_summary",
        "~callbacks.progress_bar", *extra,
    ]  # fmt: skip


def fit_slope(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares line ``y = intercept + slope * x``: (slope, intercept)."""
    slope, intercept = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(slope), float(intercept)


# ----------------------------------------------------------------------------------------- the benchmark
def run(options: BenchOptions) -> BenchResult:
    s = SETTINGS[options.tier]
    repeats = options.repeats_or(REPEATS[options.tier])
    work = options.work_dir / "cache-bench"
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // 2)))}
    details: dict[str, Any] = {"runs": []}
    figures: list[Figure] = []

    # Memory and start-up against the number of cases.
    steps = -(-max(s.sizes) // 2)  # the demo's batch_size of 2: every case of the largest dataset read once
    roots = {n: synthetic_dataset(options, n, s.shape, s.spacing)[0] for n in s.sizes}
    disk_peak, cold, warm = {}, {}, {}
    for n in s.sizes:
        cache_dir = work / f"cache-{n}"
        runs = []
        for state in ("cold", *["warm"] * s.warm_runs):
            runs.append(run_training(training_overrides(roots[n], work / f"run-{n}-{len(runs)}", cache_dir, s.train_patch, steps, "data.preprocess_workers=2"), work, env))
            details["runs"].append({"cases": n, "cache": "disk", "state": state, **asdict(runs[-1])})
        cold[n] = runs[0]
        warm[n] = min(runs[1:], key=lambda r: r.first_step_s or math.inf)  # the least disturbed start
        disk_peak[n] = max(p for r in runs[1:] for p in r.python_peaks)
    figure, slope, intercept = _slope_figure("disk cache", disk_peak, GOALS["slope"])
    figures.append(figure)
    projected = intercept + slope * BRATS_2021_CASES
    details["disk"] = {"peak_bytes": disk_peak, "slope_bytes_per_case": slope, "intercept_bytes": intercept, "projected_bytes_per_process": projected, "projected_bytes_node": NODE_PROCESSES * projected}

    if s.contrast:
        small = s.sizes[:2]
        memory_peak = {}
        for n in small:
            memory = run_training(training_overrides(roots[n], work / f"run-{n}-memory", work / f"cache-{n}", s.train_patch, steps, "data.cache=memory"), work, env)
            memory_peak[n] = max(memory.python_peaks)
            details["runs"].append({"cases": n, "cache": "memory", "state": "warm", **asdict(memory)})
        figure, mslope, _ = _slope_figure("in-memory cache", memory_peak)
        figures.append(figure)
        details["memory"] = {"peak_bytes": memory_peak, "slope_bytes_per_case": mslope}
        n = s.sizes[-1]
        ddp = run_training(training_overrides(roots[n], work / f"run-{n}-ddp", work / f"cache-{n}", s.train_patch, steps, "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu"), work, {**env, "OMP_NUM_THREADS": "1"})
        details["runs"].append({"cases": n, "cache": "disk", "state": "warm", "ddp": 2, **asdict(ddp)})
        ranks = sorted(ddp.python_peaks, reverse=True)[:2]
        figures.append(Figure.compare(NAME, f"peak RSS per DDP process (2, gloo) vs one process, {n} cases, disk cache", Contender("DDP rank, largest", ranks[0] / MB, "MB"), Contender("one process", disk_peak[n] / MB, "MB"),
                                      note=f"ranks {', '.join(f'{b / MB:.0f}' for b in ranks)} MB; one cache shared by both"))

    big, few = s.sizes[-1], s.sizes[0]
    if warm[big].first_step_s and warm[few].first_step_s:
        figures.append(Figure.compare(NAME, f"time to first step, warm cache: {big} vs {few} cases", Contender(f"{big} cases", warm[big].first_step_s, "s"), Contender(f"{few} cases", warm[few].first_step_s, "s"), GOALS["warm_start"],
                                      note="launch to first step: " + "; ".join(f"{n} cases cold {cold[n].first_step_s:.1f} s, warm {warm[n].first_step_s:.1f} s" for n in s.sizes)))
        figures.append(Figure.compare(NAME, f"time to first step, cold vs warm cache, {big} cases", Contender("cold (builds the cache)", cold[big].first_step_s, "s"), Contender("warm", warm[big].first_step_s, "s"),
                                      note="cold builds with data.preprocess_workers=2"))

    # Patches per second for one loader worker.
    figures += _patch_rates(options, s, roots[s.sizes[0]], work, repeats, details)
    # Preprocessing throughput with 1 and 2 worker processes.
    figures += _build_rates(options, s, roots[s.sizes[0]], work, details)
    # Storage format.
    figures += _format_figures(work, details, s, repeats)
    settings = {**asdict(s), "repeats": repeats, "omp_threads": env["OMP_NUM_THREADS"]}
    shutil.rmtree(work, ignore_errors=True)
    return BenchResult(figures, settings=settings, details=details)


def _slope_figure(cache: str, peaks: dict[int, int], goal: Goal | None = None) -> tuple[Figure, float, float]:
    """The MB-per-case figure of peak RSS against case count, with the projection for BraTS 2021; also the
    fitted slope and intercept in bytes."""
    slope, intercept = fit_slope(list(peaks), list(peaks.values()))
    projected = intercept + slope * BRATS_2021_CASES
    note = (f"peak {', '.join(f'{n}: {b / MB:.0f} MB' for n, b in peaks.items())}; projected {BRATS_2021_CASES} cases: "
            f"{projected / 2**30:.2f} GiB/process, {NODE_PROCESSES * projected / 2**30:.1f} GiB for {NODE_PROCESSES} processes")
    name = f"peak RSS per training process, {cache}: MB per case ({', '.join(map(str, peaks))} cases)"
    return Figure(NAME, name, slope / MB, Contender("slope", slope / MB, "MB/case"), kind="value", goal=goal, note=note), slope, intercept


def _datamodule(options: BenchOptions, root: Path, patch: int, cache_dir: Path, *extra: str) -> SegmentationDataModule:
    cfg = compose_config("brats", options, [patch_override(patch), f"paths.cache_dir={cache_dir}", "data.check.enabled=false", "data.val_fraction=0", *extra], data_root=root)
    datamodule: SegmentationDataModule = instantiate(cfg.data, split_path=None)
    datamodule.setup("fit")
    return datamodule


def _patch_rates(options: BenchOptions, s: CacheSettings, root: Path, work: Path, repeats: int, details: dict[str, Any]) -> list[Figure]:
    from monai.data import PersistentDataset
    from monai import transforms as T

    cache_dir = work / f"cache-{s.sizes[0]}"
    disk = _datamodule(options, root, s.read_patch, cache_dir)
    memory = _datamodule(options, root, s.read_patch, cache_dir, "data.cache=memory")
    patch = (s.read_patch,) * 3
    keys = ["image", "label"]
    sampler, augment = patches_from_config(patch, disk.label_spec, disk.augment)
    # The MONAI pipeline of earlier medseg versions: the whole preprocessed case loaded, then cropped; then
    # the same flips and intensity changes as the disk cache's patches get.
    monai_random = T.Compose([
        T.SpatialPadd(keys, spatial_size=patch),
        T.RandCropByPosNegLabeld(keys, label_key="label", spatial_size=patch, pos=sampler.foreground_fraction, neg=1 - sampler.foreground_fraction, num_samples=disk.samples_per_volume, allow_smaller=False),
        *augment.transforms,
    ])  # fmt: skip
    persistent = PersistentDataset(disk.train_cases, T.Compose([disk.preprocessing, monai_random]).flatten(), cache_dir=work / "persistent")
    for i in range(len(persistent)):
        persistent[i]  # writes MONAI's cache (not timed)
    datasets = {"disk cache (memory-mapped)": disk.train_dataset(), "in-memory cache": memory.train_dataset(), "MONAI PersistentDataset": persistent}
    counter = {name: 0 for name in datasets}

    def fetch(name: str):
        def items() -> None:
            dataset = datasets[name]
            for _ in range(s.items):
                dataset[counter[name] % len(dataset)]
                counter[name] += 1
        return items

    timing = time_alternating({name: fetch(name) for name in datasets}, options.device, repeats, warmup=1)
    per_item = disk.samples_per_volume
    rates = {name: s.items * per_item / t.median_s for name, t in timing.items()}
    details["patches"] = {"rates": rates, "patch": s.read_patch, "samples_per_volume": per_item, "times_s": {k: list(t.times_s) for k, t in timing.items()}}
    a, b, c = (Contender(name, rates[name], "patches/s") for name in datasets)
    note = f"{s.read_patch}^3 patches, {per_item} per case read, one worker; the 'data' benchmark compares the loader with the training step"
    return [Figure.compare(NAME, "patches/s per worker: disk cache vs in-memory cache", a, b, GOALS["patches"], note),
            Figure.compare(NAME, "patches/s per worker: disk cache vs MONAI PersistentDataset", a, c, None, note)]


def _build_rates(options: BenchOptions, s: CacheSettings, root: Path, work: Path, details: dict[str, Any]) -> list[Figure]:
    seconds = {}
    for workers in (1, 2):
        cache_dir = work / f"build-{workers}"
        datamodule = _datamodule(options, root, s.read_patch, cache_dir, f"data.preprocess_workers={workers}")
        start = time.perf_counter()
        summary = datamodule.prepare_cache(progress=False)
        seconds[workers] = time.perf_counter() - start
        details.setdefault("build", {})[workers] = {"seconds": seconds[workers], "cases": summary.built, "bytes": summary.size_bytes}
        shutil.rmtree(cache_dir, ignore_errors=True)
    cases = len(datamodule.find_cases())
    per_case = details["build"][1]["bytes"] / cases
    details["build"]["bytes_per_case"] = per_case
    return [Figure.compare(NAME, f"preprocessing throughput: 2 vs 1 worker processes ({cases} cases)", Contender("2 workers", cases / seconds[2], "cases/s"), Contender("1 worker", cases / seconds[1], "cases/s"),
                           note=f"{per_case / MB:.1f} MB per case on disk; {BRATS_2021_CASES} cases: {BRATS_2021_CASES * per_case / 2**30:.0f} GiB; worker start-up included")]


def _format_figures(work: Path, details: dict[str, Any], s: CacheSettings, repeats: int) -> list[Figure]:
    try:
        import blosc2
    except ImportError:
        details["format"] = "blosc2 not installed: pip install blosc2 to compare"
        return []
    entry = next(p for p in (work / f"cache-{s.sizes[0]}").rglob("image.npy"))
    image = np.load(entry)
    chunks = (1, *(min(s.read_patch, n) for n in image.shape[1:]))
    compressed = blosc2.asarray(np.ascontiguousarray(image), urlpath=str(work / "image.b2nd"), mode="w", chunks=chunks, blocks=(1, *(min(32, n) for n in image.shape[1:])), cparams={"codec": blosc2.Codec.ZSTD, "clevel": 8})
    del compressed
    rng = np.random.default_rng(0)
    starts = [tuple(int(rng.integers(0, max(n - s.read_patch, 0) + 1)) for n in image.shape[1:]) for _ in range(8)]

    def window(st: tuple[int, ...]) -> tuple[slice, ...]:
        return (slice(None), *(slice(a, a + s.read_patch) for a in st))

    def npy() -> None:
        for st in starts:
            np.array(np.load(entry, mmap_mode="r")[window(st)])

    def b2() -> None:
        for st in starts:
            blosc2.open(str(work / "image.b2nd"), mode="r")[window(st)]

    import torch

    timing = time_alternating({"npy": npy, "blosc2": b2}, torch.device("cpu"), repeats, warmup=1)
    sizes = {"npy": entry.stat().st_size, "blosc2": (work / "image.b2nd").stat().st_size}
    details["format"] = {"bytes": sizes, "times_s": {k: list(t.times_s) for k, t in timing.items()}, "chunks": chunks, "codec": "zstd, clevel 8, shuffle"}
    note = f"one preprocessed {'x'.join(map(str, image.shape))} image, 8 random {s.read_patch}^3 patches"
    return [Figure.compare(NAME, "bytes on disk: .npy vs blosc2 (zstd)", Contender(".npy", sizes["npy"] / MB, "MB"), Contender("blosc2", sizes["blosc2"] / MB, "MB"), note=note),
            Figure.compare(NAME, "patch read time: .npy (mmap) vs blosc2", Contender.from_timing(".npy", timing["npy"]), Contender.from_timing("blosc2", timing["blosc2"]), note=note)]
