"""Peak memory of ``medseg.predict`` on one large CT: how many float32 probability volumes it holds at once.

Workload: one CT-like volume (Hounsfield units, one channel; full tier 488x404x448 as the shared abdominal CT
upsampled, quick tier 96x80x88), predicted with the ``ct_abdomen`` network (untrained: memory does not depend on
the weights) into 3 softmax classes with no resampling, no crop and ``prefetch=0``: reading, the sliding window,
the way back to the input grid, labels and writing, in this process. The figure is the growth of the process's
peak resident memory during the case, in units of one float32 probability volume on the input grid
(``3 x X x Y x Z x 4`` bytes). Goal <= 2.5: one probability volume plus what is being written, not several copies.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import torch

from medseg.bench.report import BenchResult, Contender, Figure, Goal
from medseg.bench.timing import peak_rss_growth
from medseg.bench.workload import BenchOptions, compose_config
from medseg.build import build_model, preprocessing_from_config
from medseg.prediction import PredictOptions, predict_cases

NAME = "predict_memory"
SHAPES = {"quick": (96, 80, 88), "cpu": (488, 404, 448), "gpu": (488, 404, 448)}
WINDOW = {"quick": [48, 48, 48], "cpu": [128, 128, 128], "gpu": [128, 128, 128]}
GOAL = Goal("<=", 2.5)


def write_ct(path, shape: tuple[int, int, int], seed: int = 0) -> None:
    """A CT-like int16 volume in Hounsfield units (air around a soft-tissue body), 1 mm voxels."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in shape), indexing="ij"))
    body = (grid[:2] ** 2).sum(0) < 0.8
    hu = np.where(body, 40.0, -1000.0).astype(np.float32) + rng.normal(0, 20, shape).astype(np.float32)
    nib.save(nib.Nifti1Image(hu.astype(np.int16), np.eye(4)), path)


def run(options: BenchOptions) -> BenchResult:
    shape = SHAPES[options.tier]
    folder = options.work_dir / "predict_memory"
    folder.mkdir(parents=True, exist_ok=True)
    image = folder / "ct.nii.gz"
    write_ct(image, shape)
    small = folder / "warmup.nii.gz"
    write_ct(small, (40, 40, 40))
    # A narrow network and windows without overlap: the sliding window's own cost does not change what the pipeline
    # around it holds (stitched logits, probabilities, their copies), which is what this measures.
    overrides = ["data.spacing=null", "data.crop_foreground=false", f"data.patch_size={WINDOW[options.tier]}", "model.inferer.overlap=0.0", "model.net.channels=[4,8,16,32]"]
    cfg = compose_config("ct_abdomen", options, overrides, data_root=folder)
    torch.manual_seed(0)
    model = build_model(cfg).eval().to(options.device)
    transform = preprocessing_from_config(cfg.data, with_label=False)
    predict_options = PredictOptions(output=folder / "out", device=options.device, in_channels=1)
    predict_options.output.mkdir(exist_ok=True)

    def predict(path) -> None:
        (result,) = predict_cases([{"case": path.name.split(".")[0], "image": [str(path)]}], model, transform, model.label_spec, predict_options, prefetch=0)
        if "error" in result:
            raise RuntimeError(f"prediction failed: {result['error']}")

    predict(small)  # imports, allocator and thread pools warm: the figure is the case's own memory
    growth = peak_rss_growth(lambda: predict(image))
    volume = 3 * int(np.prod(shape)) * 4
    if growth is None:
        return BenchResult([], settings={"shape": list(shape)}, details={"skipped": "peak RSS needs Linux /proc"})
    figure = Figure.compare(NAME, f"peak RSS growth predicting one {'x'.join(map(str, shape))} CT (3 classes, prefetch 0) / one float32 probability volume",
                            Contender("medseg predict_cases", growth / 2**20, "MiB"), Contender("3 x X x Y x Z float32", volume / 2**20, "MiB"), GOAL,
                            f"no resampling or crop, window {WINDOW[options.tier][0]}^3, network channels {list(cfg.model.net.channels)}")  # fmt: skip
    return BenchResult([figure], settings={"shape": list(shape), "window": WINDOW[options.tier]}, details={"peak_rss_growth_bytes": growth, "probability_volume_bytes": volume})
