"""onnxruntime against torch: the sliding-window inference of one case by the same network with the same weights.

The network is the config's with random weights (its time does not depend on them), exported by
:func:`medseg.onnx_backend.export_network`; the onnxruntime contender is the same ``SegmentationModule`` after
:func:`medseg.onnx_backend.use_onnxruntime`, so both run :func:`medseg.prediction.infer_probabilities` (what
``medseg.predict`` runs: windows of ``model.inferer``, stitched by MONAI, then the output activation) on one random
case-sized volume already on the device, under ``torch.inference_mode``. onnxruntime gets torch's thread count
(``--threads``) as its ``intra_op_num_threads``.

- CPU: onnxruntime's CPU provider vs torch on the CPU, the demo experiment's small U-Net (the BraTS network takes
  minutes per case on a CPU) with a 64^3 window, on a 4x144x176x144 volume (a BraTS brain box at 1 mm).
- CUDA (``--device cuda``): the BraTS experiment's network as configured, onnxruntime's CUDA provider (input and output
  bound on the GPU) vs torch in float32 (no autocast on either side); skipped, with the reason in ``details``, where
  onnxruntime has no CUDA provider (``onnxruntime-gpu`` not installed).

Each figure is onnxruntime time / torch time per case (below 1: onnxruntime is faster); the note gives the largest
absolute difference of the probabilities (the two compute the same thing: within
:data:`medseg.onnx_backend.PROBABILITY_TOLERANCE`).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from medseg.bench.report import BenchResult, Contender, Figure
from medseg.bench.timing import time_alternating
from medseg.bench.workload import BenchOptions, compose_config, patch_override
from medseg.build import build_model
from medseg.module import SegmentationModule
from medseg.onnx_backend import export_network, require, use_onnxruntime
from medseg.prediction import infer_probabilities

NAME = "onnx"


@dataclass(frozen=True)
class OnnxSettings:
    """Experiment (network, sliding-window options), cubic window (``None``: the config's patch size) and the
    ``(C_in, H, W, D)`` shape of the volume."""

    experiment: str
    window: int | None
    shape: tuple[int, int, int, int]


SETTINGS = {
    "quick": OnnxSettings("demo", 32, (4, 64, 64, 48)),
    "cpu": OnnxSettings("demo", 64, (4, 144, 176, 144)),
    "gpu": OnnxSettings("brats", None, (4, 144, 176, 144)),
}
REPEATS = {"quick": 2, "cpu": 3, "gpu": 5}
# Untimed runs of each first, besides the one that measures the difference (itself a warm-up: onnxruntime's and
# oneDNN's first runs); on a GPU also cuDNN's algorithm search.
WARMUP = {"quick": 0, "cpu": 0, "gpu": 1}


def compare(model: SegmentationModule, settings: OnnxSettings, options: BenchOptions, device: torch.device, repeats: int, warmup: int, label: str) -> tuple[Figure, dict[str, Any]]:
    """Export ``model``'s network, then time torch and onnxruntime on one volume on ``device``; the figure and details."""
    model = model.eval().to(device)
    inferer = model.inferer
    start = time.perf_counter()
    path = export_network(model.net, settings.shape[0], options.work_dir / f"{label}.onnx", inferer["roi_size"])
    export_s = time.perf_counter() - start
    onnx_model = use_onnxruntime(copy.deepcopy(model), path)
    image = torch.randn(settings.shape, generator=torch.Generator().manual_seed(0)).to(device)  # (C_in, H, W, D)

    def torch_fn() -> Tensor:
        return infer_probabilities(model, image)

    def onnx_fn() -> Tensor:
        return infer_probabilities(onnx_model, image)

    difference = float((onnx_fn() - torch_fn()).abs().max())
    timing = time_alternating({"onnxruntime": onnx_fn, "torch": torch_fn}, device, repeats, warmup)
    threads = torch.get_num_threads()
    net = f"{settings.experiment} network, window {inferer['roi_size'][0]}^3, overlap {inferer['overlap']}, sw_batch_size {inferer['sw_batch_size']}"
    volume = "x".join(map(str, settings.shape))
    provider = "CUDA provider" if device.type == "cuda" else f"CPU provider, {threads} threads"
    figure = Figure.compare(
        NAME,
        f"per case on {device.type}, {net}, volume {volume}",
        Contender.from_timing(f"onnxruntime ({provider})", timing["onnxruntime"]),
        Contender.from_timing("torch" + ("" if device.type == "cuda" else f", {threads} threads"), timing["torch"]),
        None,
        f"same network, weights and sliding window; max |probability difference| {difference:.1e}; export {export_s:.1f} s (once)",
    )
    return figure, {"max_abs_difference": difference, "export_s": export_s, "threads": threads, "inferer": dict(inferer), "file_bytes": path.stat().st_size}


def run(options: BenchOptions) -> BenchResult:
    """onnxruntime vs torch per case: on the CPU, and on CUDA with onnxruntime's CUDA provider when available."""
    ort = require("onnxruntime")
    tier = options.tier
    cpu_settings = SETTINGS["quick" if options.quick else "cpu"]
    repeats, warmup = options.repeats_or(REPEATS[tier]), WARMUP[tier]
    cpu = torch.device("cpu")

    def model_of(s: OnnxSettings, device: torch.device) -> SegmentationModule:
        cfg = compose_config(s.experiment, dataclasses.replace(options, device=device), [patch_override(s.window)] if s.window else [])
        torch.manual_seed(0)
        return build_model(cfg)

    figure, cpu_details = compare(model_of(cpu_settings, cpu), cpu_settings, options, cpu, repeats, warmup, "cpu")
    figures, details = [figure], {"cpu": cpu_details}
    settings: dict[str, Any] = {"cpu": asdict(cpu_settings), "repeats": repeats, "warmup": warmup, "onnxruntime": ort.__version__, "providers": ort.get_available_providers()}
    if options.device.type == "cuda":
        cuda_settings = SETTINGS["quick" if options.quick else "gpu"]
        settings["cuda"] = asdict(cuda_settings)
        if "CUDAExecutionProvider" in ort.get_available_providers():
            figure, details["cuda"] = compare(model_of(cuda_settings, options.device), cuda_settings, options, options.device, repeats, warmup, "cuda")
            figures.append(figure)
        else:
            details["cuda_skipped"] = f"onnxruntime {ort.__version__} has no CUDA provider here (providers {ort.get_available_providers()}): pip install onnxruntime-gpu"
    return BenchResult(figures, settings=settings, details=details)
