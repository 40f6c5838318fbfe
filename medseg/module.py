"""The LightningModule: a segmentation network trained on patches, validated on whole volumes."""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.utilities.warnings import PossibleUserWarning
from monai.inferers import sliding_window_inference
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torchmetrics import MeanMetric

from medseg.data.datasets import PADDING
from medseg.data.labels import LabelSpec
from medseg.metrics.lesion import LesionMetrics
from medseg.metrics.operating_point import CRITERIA
from medseg.metrics.voxel import OverlapMetrics, binarize, target_channels
from medseg.postprocess import CHECKPOINT_KEY, OperatingPoint, flip_averaged_probabilities, logits_of, postprocess, probabilities

# Lesion-wise values logged every validation, besides per-bucket recalls and reference-lesion counts.
LOGGED_LESION_KEYS = ("lesion_recall", "lesion_precision", "lesion_f1", "lesion_f1_case_mean", "lesion_dice", "fp_per_case")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
NONFINITE_ACTIONS = ("stop", "skip")
log = logging.getLogger("medseg")
# Validation values are torchmetrics results, already reduced over processes; train/loss is the value of rank 0's
# batches (syncing it every step would cost a collective per step).
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('(train|val)/", category=PossibleUserWarning)


class NonFiniteLossError(RuntimeError):
    """Training met a NaN or infinite loss or gradient; the message names the step and the batch's cases."""


class SegmentationModule(L.LightningModule):
    """Trains ``net`` with ``loss`` on random patches; validates with sliding-window inference.

    Args:
        net: a 3D segmentation network mapping ``(B, C_in, H, W, D)`` to logits ``(B, C_out, H, W, D)``
            (a MONAI ``UNet``, ``DynUNet``, ``SegResNet``, ...).
        loss: maps ``(logits, target)`` to a scalar; if it has ``forward_with_terms``, its parts are
            logged as ``train/loss_<name>``.
        optimizer: a partial optimizer (``_partial_: true`` in the config) completed with the parameters.
        scheduler: a partial learning-rate scheduler completed with the optimizer, or ``None``.
        labels: the ``data.labels`` node: mode (sigmoid/softmax) and region or class names.
        inferer: sliding-window options: ``roi_size``, ``sw_batch_size``, ``overlap``, ``mode``.
        threshold: probability above which a sigmoid output counts as foreground (until a tuned operating
            point replaces it, see ``operating_point``).
        min_component_mm3: predicted components smaller than this are removed before scoring (0: none).
        operating_point: the final evaluation's sweep (:mod:`medseg.final_evaluation`): ``criterion``
            (``"dice"``, ``"lesion_f1"``, or ``None`` to keep ``threshold`` / ``min_component_mm3``), ``thresholds``,
            ``min_component_mm3`` and ``min_component_score`` (the grid), ``component_score``; the chosen point becomes :attr:`postprocessing` and travels in
            checkpoints.
        empty_score: metric value for a case where reference and prediction are both empty.
        scheduler_interval: step the scheduler every ``"epoch"`` or every ``"step"``.
        lesion_metrics: options of :class:`medseg.metrics.lesion.LesionMetrics` (connectivity, size buckets,
            ...) to track lesion-wise detection per region, or ``None`` to skip them.
        nonfinite: what a NaN or infinite loss or gradient does: ``"stop"`` training with
            :class:`NonFiniteLossError` naming the step and the batch's cases, or ``"skip"`` that optimizer step
            (the weights stay as they were). Either way no non-finite weights are ever written.
        max_skipped_steps: with ``"skip"``, stop anyway after this many skipped steps in a row.
        channels_last: keep the network's weights and its input batches in ``channels_last_3d`` memory order
            (same results; faster or slower by network and device: see ``conf/model/module.yaml``).
        tta_flip_axes: mirroring test-time augmentation of the final evaluation (and, as recorded with the tuned
            point, of prediction): probabilities averaged over every combination of flips of these spatial axes.
        compile: ``False`` or a ``torch.compile`` mode (``"default"``, ``"max-autotune"``, ...): run the network
            compiled (training steps and sliding windows); the weights, state dict and checkpoints are unchanged.
        compile_backend: the ``torch.compile`` backend (``"inductor"``; ``"aot_eager"`` needs no C++ compiler).
        connectivity: of the predicted components post-processing removes by size (6, 18, 26; the config's
            ``connectivity``); ``None``: ``lesion_metrics``' (26 without).

    Logged keys: ``train/loss``; ``val/dice``, ``val/<score>_<region>`` for Dice, IoU, recall, precision;
    ``val/lesion_recall_<region>``, ``val/lesion_recall_<bucket>_<region>``, ``val/lesion_precision_<region>``,
    ``val/lesion_f1_<region>``, ``val/lesion_f1_case_mean_<region>``, ``val/fp_per_case_<region>``,
    ``val/lesion_dice_<region>``. The per-epoch validation scores the preprocessed (resampled, cropped) grid at
    the untuned point: it picks checkpoints. What a run reports is the final evaluation of the label files its
    predictions give in each case's original geometry (:mod:`medseg.final_evaluation`).
    """

    def __init__(
        self,
        net: nn.Module,
        loss: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        labels: Mapping[str, Any],
        inferer: Mapping[str, Any],
        scheduler: Callable[..., Any] | None = None,
        threshold: float = 0.5,
        empty_score: float = 1.0,
        scheduler_interval: str = "epoch",
        lesion_metrics: Mapping[str, Any] | None = None,
        nonfinite: Literal["stop", "skip"] = "stop",
        max_skipped_steps: int = 10,
        min_component_mm3: float = 0.0,
        operating_point: Mapping[str, Any] | None = None,
        channels_last: bool = False,
        tta_flip_axes: Sequence[int] = (),
        compile: bool | str = False,
        compile_backend: str = "inductor",
        connectivity: int | None = None,
    ) -> None:
        super().__init__()
        if nonfinite not in NONFINITE_ACTIONS:
            raise ValueError(f"expected nonfinite in {NONFINITE_ACTIONS}, got {nonfinite!r}")
        if max_skipped_steps < 1:
            raise ValueError(f"expected max_skipped_steps >= 1, got {max_skipped_steps}")
        if compile not in (False, None, *COMPILE_MODES):
            raise ValueError(f"expected model.compile false or one of {COMPILE_MODES} (torch.compile modes), got {compile!r}")
        labels, inferer = _plain(labels), _plain(inferer)
        lesion_metrics = _plain(lesion_metrics) if lesion_metrics else None
        operating_point = _plain(operating_point) if operating_point else None
        if operating_point and operating_point.get("criterion") not in (None, *CRITERIA):
            raise ValueError(f"expected model.operating_point.criterion in {(None, *CRITERIA)}, got {operating_point.get('criterion')!r}")
        # Plain containers only, so that checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(
            {"labels": labels, "inferer": inferer, "threshold": threshold, "empty_score": empty_score, "scheduler_interval": scheduler_interval, "lesion_metrics": lesion_metrics,
             "nonfinite": nonfinite, "max_skipped_steps": max_skipped_steps, "min_component_mm3": min_component_mm3, "operating_point": operating_point},
            logger=False,
        )
        self.memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
        self.net = net.to(memory_format=self.memory_format)
        self.compile_mode = compile or None
        self.compile_backend = compile_backend
        self._compiled_net: nn.Module | None = None  # torch.compile(net), made on first use
        self.tta_flip_axes = tuple(int(a) for a in tta_flip_axes)
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.label_spec = LabelSpec.from_config(labels)
        self.mode = self.label_spec.mode
        self.inferer = inferer
        names = self.label_spec.names
        self.metrics = nn.ModuleDict({"val": OverlapMetrics(names, empty_score=empty_score)})
        # The validation loss as a metric state (a sum and a count, synced by every process at compute), not through
        # self.log(sync_dist=True), which syncs only on processes that logged it: one without a case would hang.
        self.val_loss = MeanMetric(nan_strategy="disable")
        self.lesion_options = {**(lesion_metrics or {}), "empty_score": empty_score}
        self.lesion_metrics = nn.ModuleDict({"val": nn.ModuleDict({n: LesionMetrics(**self.lesion_options) for n in names})}) if lesion_metrics else None
        # What turns probabilities into masks for scoring and prediction; replaced by the tuned point.
        self.postprocessing = OperatingPoint.uniform(names, threshold, min_component_mm3, component_score=str((operating_point or {}).get("component_score") or "max"))
        # Checkpoints of earlier versions have no model.connectivity: their lesion metrics' then, as before.
        self.connectivity = int(connectivity if connectivity is not None else (lesion_metrics or {}).get("connectivity", 26))
        if self.connectivity not in (6, 18, 26):
            raise ValueError(f"expected connectivity 6, 18 or 26, got {self.connectivity}")
        if lesion_metrics and int(lesion_metrics.get("connectivity", self.connectivity)) != self.connectivity:
            raise ValueError(f"expected model.lesion_metrics.connectivity equal to model.connectivity ({self.connectivity}): the sweep and post-processing "
                             f"would count other components than the metrics; set the one top-level key, connectivity=, got {lesion_metrics.get('connectivity')}")
        self.run_config: dict[str, Any] | None = None  # the composed Hydra config, saved in checkpoints
        self._last_batch: tuple[Tensor, list[str]] | None = None  # (loss, cases) of this process's current step
        self._skipped_in_a_row = 0

    def forward(self, image: Tensor) -> Tensor:
        """Logits ``(B, C_out, H, W, D)`` for a batch of patches ``(B, C_in, H, W, D)``."""
        return self.network(image.contiguous(memory_format=self.memory_format))

    @property
    def network(self) -> nn.Module:
        """The network as it runs: :attr:`net`, or its ``torch.compile`` (``model.compile``), which shares its weights."""
        if self.compile_mode is None:
            return self.net
        if self._compiled_net is None:
            mode = self.compile_mode if self.compile_backend == "inductor" else None  # modes are inductor's
            # Not a registered submodule: the state dict, checkpoints and DDP see the plain network.
            object.__setattr__(self, "_compiled_net", torch.compile(self.net, mode=mode, backend=self.compile_backend))
        return self._compiled_net

    def sliding_window(self, image: Tensor) -> Tensor:
        """Sliding-window logits ``(B, C_out, H, W, D)`` of whole volumes ``(B, C_in, H, W, D)`` (``model.inferer``).

        Windows run where ``inferer.sw_device`` says (default: the volume's device) and are stitched where
        ``inferer.device`` says (default: the same). A GPU that runs out of memory stitching a large volume gets
        the volume stitched on the CPU instead (the windows still run on the GPU), for the rest of the run.
        """
        return self.with_memory_fallback(lambda: sliding_window_inference(image, predictor=self.forward, **self.inferer), f"stitching a {'x'.join(map(str, image.shape[2:]))} volume")

    def with_memory_fallback(self, work: Callable[[], Tensor], what: str) -> Tensor:
        """``work()``; if the GPU runs out of memory, ``work()`` again with volumes stitched on the CPU
        (``model.inferer.device=cpu``, for the rest of the run). ``work`` must read :attr:`inferer` when it runs."""
        try:
            return work()
        except torch.OutOfMemoryError:
            if str(self.inferer.get("device")) == "cpu":  # nothing left to move (a CPU out of memory is a RuntimeError)
                raise
        # Retried outside the except block: the failed attempt's tensors, which its traceback holds, are freed first.
        torch.cuda.empty_cache()
        log.warning("Out of GPU memory %s: stitching on the CPU from now on (model.inferer.device=cpu)", what)
        self.inferer = {**self.inferer, "device": "cpu"}
        return work()

    def predict_volume(self, image: Tensor, flip_axes: Sequence[int] = ()) -> Tensor:
        """Logits ``(B, C_out, H, W, D)`` for whole volumes ``(B, C_in, H, W, D)`` of any size, by sliding-window
        inference; with ``flip_axes``, the logits of the probabilities averaged over their flips (see
        :func:`medseg.postprocess.flip_averaged_probabilities`)."""
        if not flip_axes:
            return self.sliding_window(image)
        return logits_of(self.predict_probabilities(image, flip_axes), self.mode)

    def predict_probabilities(self, image: Tensor, flip_axes: Sequence[int] = ()) -> Tensor:
        """Sigmoid or softmax probabilities ``(B, C_out, H, W, D)`` of whole volumes ``(B, C_in, H, W, D)``,
        averaged over the flips of ``flip_axes`` (mirroring test-time augmentation) when given. Out of GPU memory
        in any pass (stitching, activations, the running sum), every pass is done again stitched on the CPU."""
        return self.with_memory_fallback(lambda: flip_averaged_probabilities(self.predict_volume, image, self.mode, flip_axes), "averaging test-time flips")

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        image, target = batch["image"], batch["label"]  # (B, C_in, *patch), (B, R, *patch)
        logits = self(image)
        if hasattr(self.loss, "forward_with_terms"):
            loss, terms = self.loss.forward_with_terms(logits, target)
            self.log_dict({f"train/loss_{k}": v.detach() for k, v in terms.items()}, on_step=False, on_epoch=True, batch_size=image.shape[0])
        else:
            loss = self.loss(logits, target)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=image.shape[0])
        self._last_batch = (loss.detach(), list(batch.get("case") or []))  # looked at only if the step goes wrong
        return loss

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None) -> None:
        """Clip gradients (``trainer.gradient_clip_val``) and stop or skip the step when one is NaN or infinite.

        One pass over the gradients gives both: their total norm, computed after the DDP all-reduce, so that
        every process decides alike. With a float16 ``GradScaler`` (``precision=16-mixed``) overflowing steps
        are the scaler's to skip and are left to it.
        """
        if gradient_clip_algorithm not in (None, "norm"):
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return
        total_norm = torch.nn.utils.get_total_norm(grads)
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
            torch.nn.utils.clip_grads_with_norm_(self.parameters(), gradient_clip_val, total_norm)
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None or bool(torch.isfinite(total_norm)):
            self._skipped_in_a_row = 0
            return
        where = f"step {self.global_step} (epoch {self.current_epoch}): {self._nonfinite_culprits()}"
        if self.hparams.nonfinite == "stop" or self._skipped_in_a_row >= self.hparams.max_skipped_steps:
            reason = "" if self.hparams.nonfinite == "stop" else f" after {self._skipped_in_a_row} skipped steps in a row"
            raise NonFiniteLossError(
                f"non-finite loss or gradients at {where}{reason}. Training stopped before the weights changed; "
                "try a lower optimizer.lr, trainer.gradient_clip_val, check the data (python -m medseg.data.check), "
                "or skip such steps with model.nonfinite=skip"
            )
        optimizer.zero_grad(set_to_none=True)  # parameters without a gradient are left alone by the optimizer
        self._skipped_in_a_row += 1
        if self.trainer.is_global_zero:
            log.warning("Skipped the optimizer step at %s", where)
        self.log("train/skipped_steps", 1.0, on_step=False, on_epoch=True, reduce_fx="sum", batch_size=1)

    def _nonfinite_culprits(self) -> str:
        """What every process saw in this step (collective: called by all processes alike)."""
        mine = None
        if self._last_batch is not None and not torch.isfinite(self._last_batch[0]):
            mine = f"loss {self._last_batch[0].item()} on cases {list(dict.fromkeys(self._last_batch[1]))}"
        seen = [mine]
        if dist.is_available() and dist.is_initialized():
            seen = [None] * dist.get_world_size()
            dist.all_gather_object(seen, mine)
        named = [f"rank {rank}: {what}" if len(seen) > 1 else what for rank, what in enumerate(seen) if what]
        return "; ".join(named) or "non-finite gradients with a finite loss"

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Score one preprocessed validation volume at :attr:`postprocessing` (the per-epoch validation). A padding
        item (:data:`medseg.data.datasets.PADDING_INDEX`: a process with fewer cases than the others) scores nothing."""
        if PADDING in batch and bool(torch.as_tensor(batch[PADDING]).any()):
            return
        image, target = batch["image"], batch["label"]  # (1, C_in, H, W, D), (1, R, H, W, D)
        logits = self.predict_volume(image)
        spacing = batch.get("spacing")  # (B, 3) mm
        try:
            loss, pred, truth = self._score_volume(logits, target.to(logits.device), spacing)
        except torch.OutOfMemoryError:  # the whole-volume loss and masks did not fit beside the logits
            loss = None
        if loss is None:  # outside the except block, so that the failed attempt's tensors are freed first
            torch.cuda.empty_cache()
            log.warning("Out of GPU memory scoring a %s validation volume: scoring it on the CPU", "x".join(map(str, image.shape[2:])))
            loss, pred, truth = self._score_volume(logits.cpu(), target.cpu(), spacing, copy.deepcopy(self.loss).cpu())
        self.val_loss.update(loss.detach().to(self.val_loss.device), image.shape[0])
        self.metrics["val"].update(pred, truth)
        if self.lesion_metrics is not None:
            for r, name in enumerate(self.label_spec.names):
                self.lesion_metrics["val"][name].update(pred[:, r], truth[:, r], spacing=spacing)

    def _score_volume(self, logits: Tensor, target: Tensor, spacing: Tensor | None, loss: nn.Module | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The loss (``loss``: a copy on the logits' device, else :attr:`loss`), the masks at :attr:`postprocessing`
        and the reference masks ``(B, R, H, W, D)`` of one volume."""
        return (loss or self.loss)(logits, target), self.masks(logits, spacing), target_channels(target, self.mode, logits.shape[1])

    def masks(self, logits: Tensor, spacing: Tensor | None = None) -> Tensor:
        """Binary masks ``(B, R, *spatial)`` of logits ``(B, C, *spatial)`` at :attr:`postprocessing`, post-processed as
        :mod:`medseg.prediction` does (``spacing`` ``(B, 3)`` mm turns sizes into voxels)."""
        point = self.postprocessing
        if not point.filters_components and len(set(point.threshold)) == 1 and not self.label_spec.nesting:
            return binarize(logits, self.mode, point.threshold[0])  # on the logits' device, no copy to the CPU
        probs = probabilities(logits, self.mode)
        spacings = spacing.tolist() if spacing is not None else [[1.0, 1.0, 1.0]] * logits.shape[0]
        masks = [postprocess(probs[b], self.mode, point, float(np.prod(spacings[b])), self.connectivity, self.label_spec.nesting) for b in range(logits.shape[0])]
        return torch.from_numpy(np.stack(masks)).to(logits.device)

    def on_validation_epoch_end(self) -> None:
        # compute() already reduces across processes (torchmetrics sync), so no sync_dist here.
        values = self.metrics["val"].compute()
        logged = {f"val/{k}": v for k, v in values.items()}
        logged["val/loss"] = self.val_loss.compute().float()
        self.val_loss.reset()
        if self.lesion_metrics is not None:
            for name, metric in self.lesion_metrics["val"].items():
                lesion = metric.compute()
                lesion["fp_per_case"] = lesion["false_positives"].double() / lesion["n_cases"].clamp_min(1)
                logged.update({f"val/{k}_{name}": v.float() for k, v in lesion.items() if k in LOGGED_LESION_KEYS or k.startswith(("lesion_recall_", "n_ref_lesions_"))})
                metric.reset()
        self.log_dict({k: v for k, v in logged.items() if k != "val/dice"})
        self.log("val/dice", values["dice"], prog_bar=True)
        self.metrics["val"].reset()

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.hparams.scheduler_interval}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.run_config is not None:
            checkpoint["medseg_config"] = self.run_config
        if self.postprocessing.criterion is not None:
            checkpoint[CHECKPOINT_KEY] = self.postprocessing.to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.run_config = checkpoint.get("medseg_config", self.run_config)
        # A stored point belongs to the stored weights: not adopted when training goes on from them (resume or
        # fine-tune: validation and new checkpoints use the configured point) nor by a pass about to tune anew.
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        if checkpoint.get(CHECKPOINT_KEY) and not fitting:
            self.postprocessing = OperatingPoint.from_dict(checkpoint[CHECKPOINT_KEY])


def _plain(node: Mapping[str, Any]) -> dict[str, Any]:
    """A DictConfig or mapping as a plain dict (interpolations resolved)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
