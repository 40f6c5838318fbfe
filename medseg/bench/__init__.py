"""The benchmark suite: ``python -m medseg.bench [--quick] [--only NAMES] [--out FILE] [--device D]``.

Every figure is a ratio of two contenders measured side by side in one run (these machines are noisy;
absolute times are context only), printed as a table and written as JSON (layout in
:mod:`medseg.bench.report`). One module per benchmark:

- ``train_step`` (:mod:`~medseg.bench.train_step`): ``SegmentationModule`` in a Lightning ``Trainer`` vs a
  hand-written PyTorch loop. Goal <= 1.05.
- ``data`` (:mod:`~medseg.bench.data_pipeline`): patches/s of the training DataLoader over generated NIfTI
  cases vs patches/s of the training step. Goal >= 1.
- ``cache`` (:mod:`~medseg.bench.cache`): the preprocessing cache at 6, 12 and 24 BraTS-size cases: peak
  memory per training process (MB per case, projection for BraTS 2021), time to the first step (cold and
  warm), patches/s from the disk cache vs in memory vs MONAI ``PersistentDataset``, build rate with 1 and 2
  worker processes, ``.npy`` vs blosc2. Goals: <= 5 MB/case, disk >= 0.8x memory.
- ``inference`` (:mod:`~medseg.bench.inference`): ``medseg.predict`` vs MONAI ``sliding_window_inference``
  on a 4x240x240x155 case; seconds per case, peak memory. Goal <= 1.05.
- ``onnx`` (:mod:`~medseg.bench.onnx`): the sliding-window inference of one case through onnxruntime vs torch, same
  network and weights (CPU provider; on CUDA also the CUDA provider where installed); time ratio, largest difference
  of the probabilities.
- ``predict_memory`` (:mod:`~medseg.bench.predict_memory`): peak memory of ``medseg.predict`` on a 488x404x448
  CT with 3 classes, in float32 probability volumes. Goal <= 2.5.
- ``loss`` (:mod:`~medseg.bench.loss`): ``FocalDiceLoss`` vs MONAI ``DiceFocalLoss``, forward + backward.
- ``blob`` (:mod:`~medseg.bench.blob`): ``BlobLoss`` vs ``FocalDiceLoss`` at 10, 100 and 1000 lesions per
  patch batch; time and peak memory. Goal <= 3x at every count (the cost must not grow with the count).
- ``lesion`` (:mod:`~medseg.bench.lesion`): lesion metrics per case vs the 1 s budget.
- ``sweep`` (:mod:`~medseg.bench.sweep`): the operating-point sweep of an MS-sized case under the one-to-one and
  MSSEG matching rules vs the any-overlap rule. Goal <= 1.5.
- ``scaling`` (:mod:`~medseg.bench.scaling`): step time and memory vs patch size, inference time vs volume
  size, exponent of ``cost ~ voxels^k``.
- ``step_variants`` (:mod:`~medseg.bench.step_variants`): images/s of a training step of the BraTS U-Net and a
  planned DynUNet under float32, bf16-mixed, channels_last_3d and (GPU) torch.compile.

Shared pieces: :mod:`~medseg.bench.timing` (alternating timings, peak memory), :mod:`~medseg.bench.workload`
(configs, batches, generated data, the hand-written training step), :mod:`~medseg.bench.report`.
"""

from __future__ import annotations

# name -> module with ``run(options) -> BenchResult``, in the order the suite runs them.
BENCHMARKS = {
    "train_step": "medseg.bench.train_step",
    "data": "medseg.bench.data_pipeline",
    "cache": "medseg.bench.cache",
    "inference": "medseg.bench.inference",
    "predict_memory": "medseg.bench.predict_memory",
    "loss": "medseg.bench.loss",
    "blob": "medseg.bench.blob",
    "lesion": "medseg.bench.lesion",
    "sweep": "medseg.bench.sweep",
    "scaling": "medseg.bench.scaling",
    "step_variants": "medseg.bench.step_variants",
    "onnx": "medseg.bench.onnx",
}
