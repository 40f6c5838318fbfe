"""Whole-volume inference: ``medseg.predict`` against MONAI's ``sliding_window_inference`` called directly
with the same network and window settings (``roi_size``, ``sw_batch_size``, ``overlap``, ``mode``).

The cases are generated in the BraTS layout at BraTS size (4x240x240x155 at 1 mm); the network is the
config's with random weights. The network's time does not depend on them; the labels stage of a case does:
random weights mark most of the brain box as foreground (a trained network a few percent), so that stage
is an upper bound. On a CPU the full run uses the demo
experiment's small U-Net with a 64^3 window, since the BraTS network takes minutes per case there; on a
GPU the BraTS experiment as configured.

- inference: :func:`medseg.prediction.infer_probabilities` vs ``sigmoid(sliding_window_inference(...))`` on
  the same preprocessed tensor already on the device (both under ``torch.inference_mode``).
- per case: :func:`medseg.prediction.predict_case` (read the NIfTI files, preprocess, infer, map back to the
  input's grid, labels, write the NIfTI file) vs the same MONAI call on the resident tensor: what a case
  costs a user against the network's share of it. A breakdown per stage is in ``details``.
- folder: :func:`medseg.prediction.predict_cases` (what ``medseg.predict`` runs on a folder: the next cases
  read and the previous ones written by worker threads beside the sliding window, ``prefetch`` of
  ``conf/predict.yaml``) on a folder of generated cases vs the MONAI call on each case's resident tensor,
  both per case: what a case of a folder costs once the pipeline is full, plus the first case's reading and
  the last one's writing, spread over the folder.
- command line (full mode only, one run): ``python -m medseg.predict`` on the case in a subprocess,
  against ``predict_case``: interpreter start, imports, checkpoint loading.

Peak memory: tensor memory (see :mod:`medseg.bench.timing`); for the per-case figure also the growth of the
process's resident memory, which counts NumPy buffers (file reading, labels) too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.inferers import sliding_window_inference
from omegaconf import DictConfig
from torch import Tensor, nn

from medseg.bench.report import BenchResult, Contender, Figure, Goal
from medseg.bench.timing import Timing, clock, peak_memory, peak_rss_growth, time_alternating
from medseg.bench.workload import BenchOptions, compose_config, patch_override, synthetic_dataset
from medseg.build import build_model, preprocessing_from_config
from medseg.config import compose
from medseg.data.transforms import IMAGE
from medseg.io import write_nifti_atomic
from medseg.module import SegmentationModule
from medseg.prediction import PredictOptions, find_input_cases, infer_probabilities, predict_case, predict_cases, segment, to_original_geometry

NAME = "inference"
GOAL = Goal("<=", 1.05)  # issue 8: medseg.predict within 5% of calling MONAI directly
FOLDER_GOAL = Goal("<=", 1.2)  # a folder's cases cost little more than their sliding windows


@dataclass(frozen=True)
class InferenceSettings:
    """Experiment (network, sliding-window options), cubic window (``None``: the config's patch size),
    generated case shape and spacing in mm, and whether the command line is timed too."""

    experiment: str
    window: int | None
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    command_line: bool


SETTINGS = {
    "quick": InferenceSettings("demo", 32, (64, 64, 48), (3.0, 3.0, 3.0), False),
    "cpu": InferenceSettings("demo", 64, (240, 240, 155), (1.0, 1.0, 1.0), True),
    "gpu": InferenceSettings("brats", None, (240, 240, 155), (1.0, 1.0, 1.0), True),
}
REPEATS = {"quick": 2, "cpu": 3, "gpu": 5}
WARMUP = {"quick": 1, "cpu": 1, "gpu": 2}
# Cases generated for the folder figure (the other figures use the first). The first case's reading and the
# last one's writing overlap no inference: (read + write) / cases per case on top of the steady state.
FOLDER_CASES = {"quick": 2, "cpu": 6, "gpu": 8}


def monai_probabilities(net: nn.Module, image: Tensor, inferer: Mapping[str, Any], mode: str) -> Tensor:
    """The reference: MONAI's sliding-window inference called directly, then the output activation.

    Args:
        image: ``(C_in, H, W, D)`` on the network's device.
        inferer: ``roi_size``, ``sw_batch_size``, ``overlap``, ``mode`` (and any further keyword).

    Returns:
        ``(C_out, H, W, D)`` float32 probabilities.
    """
    with torch.inference_mode():
        logits = sliding_window_inference(image[None], predictor=net, **inferer).float()  # (1, C_out, H, W, D)
        probs = torch.sigmoid(logits) if mode == "sigmoid" else torch.softmax(logits, dim=1)
    return probs[0]


def prediction_transform(cfg: DictConfig, model: SegmentationModule) -> Any:
    """The preprocessing ``medseg.predict`` builds from a checkpoint's config (images only)."""
    return preprocessing_from_config(cfg.data, with_label=False)


def stage_seconds(record: dict[str, Any], model: SegmentationModule, transform: Any, options: PredictOptions) -> dict[str, float]:
    """Seconds of each stage of :func:`medseg.prediction.predict_case`, run once stage by stage."""
    device, spec = options.device, model.label_spec
    times = [clock(device)]
    data = transform({IMAGE: list(record["image"])})  # (C_in, H, W, D) MetaTensor
    times.append(clock(device))
    probs = infer_probabilities(model, data[IMAGE].as_tensor().to(device))  # (C_out, H, W, D)
    times.append(clock(device))
    probs = to_original_geometry(probs, data, transform)  # (C_out, X, Y, Z)
    times.append(clock(device))
    labels = segment(probs, spec, options.point)  # (X, Y, Z)
    times.append(clock(device))
    target = options.output / "stages.nii.gz"
    write_nifti_atomic(labels.astype(np.min_scalar_type(max(spec.values))), nib.load(record["image"][0]), target)
    times.append(clock(device))
    target.unlink()
    names = ("read_preprocess", "inference", "to_input_grid", "labels", "write")
    return {name: b - a for name, a, b in zip(names, times, times[1:])}


def command_line_seconds(model: SegmentationModule, case_dir: Path, options: BenchOptions) -> float:
    """Wall-clock seconds of ``python -m medseg.predict`` on one case with ``model`` saved as a checkpoint."""
    work = options.work_dir / "cli"
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "bench.ckpt"
    torch.save({"state_dict": model.state_dict(), "medseg_config": model.run_config}, ckpt)
    threads = str(torch.get_num_threads())  # the subprocess gets this run's thread count
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    command = [sys.executable, "-m", "medseg.predict", f"ckpt_path={ckpt}", f"input={case_dir}", f"output={work / 'out'}", f"device={options.device}"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"expected python -m medseg.predict to succeed, got exit status {done.returncode}: {done.stderr[-2000:]}")
    shutil.rmtree(work)
    return seconds


def per_case(timing: Timing, n_cases: int) -> Timing:
    """The times of runs over ``n_cases`` cases, per case."""
    return Timing(tuple(t / n_cases for t in timing.times_s))


def run(options: BenchOptions) -> BenchResult:
    """medseg's inference and prediction (of one case, of a folder) against MONAI's sliding window called directly."""
    s = SETTINGS[options.tier]
    warmup, repeats, device = WARMUP[options.tier], options.repeats_or(REPEATS[options.tier]), options.device
    n_cases = FOLDER_CASES[options.tier]
    root, generate_s = synthetic_dataset(options, n_cases, s.shape, s.spacing)
    cfg = compose_config(s.experiment, options, [patch_override(s.window)] if s.window else [], data_root=root)
    torch.manual_seed(0)
    model = build_model(cfg).eval().to(device)
    transform = prediction_transform(cfg, model)
    case_dir = root / "SYN-0000"
    records = find_input_cases(str(root), list(cfg.data.modalities)).cases
    record = records[0]
    output = options.work_dir / "predictions"
    output.mkdir(parents=True, exist_ok=True)
    predict_options = PredictOptions(output=output, device=device, in_channels=int(cfg.data.in_channels))
    images = [transform({IMAGE: list(r["image"])})[IMAGE].as_tensor().to(device) for r in records]  # (C_in, H, W, D) each
    image = images[0]
    inferer = dict(model.inferer)
    prefetch = int(compose("predict").prefetch)  # what medseg.predict does by default

    def medseg_fn() -> Tensor:
        return infer_probabilities(model, image)

    def monai_fn() -> Tensor:
        return monai_probabilities(model.net, image, inferer, model.mode)

    def case_fn() -> dict[str, Any]:
        return predict_case(record, model, transform, model.label_spec, predict_options)

    def folder_fn() -> None:
        failed = [r for r in predict_cases(records, model, transform, model.label_spec, predict_options, prefetch) if "error" in r]
        if failed:
            raise RuntimeError(f"expected every generated case to be predicted, got {failed}")

    def monai_folder_fn() -> None:
        for each in images:
            monai_probabilities(model.net, each, inferer, model.mode)

    max_difference = float((medseg_fn() - monai_fn()).abs().max())  # the two compute the same thing
    core = time_alternating({"medseg": medseg_fn, "monai": monai_fn}, device, repeats, warmup)
    core_monai = Contender.from_timing("MONAI sliding_window_inference", core["monai"], peak_memory(monai_fn, device))
    core_medseg = Contender.from_timing("medseg infer_probabilities", core["medseg"], peak_memory(medseg_fn, device))
    one_case = time_alternating({"case": case_fn, "monai": monai_fn}, device, repeats, warmup)
    case_peak = peak_memory(case_fn, device)
    case_rss = peak_rss_growth(case_fn)
    stages = stage_seconds(record, model, transform, predict_options)
    # No warm-up: the network, the allocator and the files' pages are warm from the figures above.
    folder = time_alternating({"folder": folder_fn, "monai": monai_folder_fn}, device, repeats, warmup=0)
    folder_case, folder_monai = per_case(folder["folder"], n_cases), per_case(folder["monai"], n_cases)

    net = f"{s.experiment} network, window {inferer['roi_size'][0]}^3, overlap {inferer['overlap']}, {inferer['mode']}"
    preprocessed = "x".join(map(str, image.shape))
    stage_note = ", ".join(f"{k} {v:.2f} s" for k, v in stages.items())
    rss_note = f"; process RSS +{case_rss / 2**20:.0f} MiB" if case_rss is not None else ""
    figures = [
        Figure.compare(NAME, f"inference, {net}, preprocessed {preprocessed}", core_medseg, core_monai, GOAL, f"same tensor on the device; max |difference| {max_difference:.1e}"),
        Figure.compare(NAME, f"per case, {'x'.join(map(str, s.shape))} NIfTI in -> labels out", Contender.from_timing("medseg predict_case", one_case["case"], case_peak), Contender.from_timing("MONAI sliding_window_inference", one_case["monai"]), GOAL, f"stages: {stage_note}{rss_note}"),
        Figure.compare(
            NAME,
            f"folder of {n_cases} cases, per case",
            Contender.from_timing(f"medseg predict_cases, prefetch {prefetch}", folder_case),
            Contender.from_timing("MONAI sliding_window_inference", folder_monai),
            FOLDER_GOAL,
            f"reading and writing in worker threads beside the sliding window (not the first case's reading nor the last one's writing); one case after another (predict_case): {one_case['case'].median_s:.2f} s",
        ),
    ]
    cli_s = command_line_seconds(model, case_dir, options) if s.command_line else None
    if cli_s is not None:
        figures.append(Figure.compare(NAME, "command line, one case (one run)", Contender("python -m medseg.predict", cli_s, "s"), Contender("predict_case", one_case["case"].median_s, "s"), None, "interpreter start, imports, checkpoint loading"))
    return BenchResult(
        figures,
        settings={**asdict(s), "inferer": inferer, "preprocessed_shape": list(image.shape), "warmup": warmup, "repeats": repeats, "folder_cases": n_cases, "prefetch": prefetch},
        details={"generate_s": generate_s, "max_abs_difference": max_difference, "stages_s": stages, "case_rss_growth_bytes": case_rss, "command_line_s": cli_s},
    )
