"""The LightningModule: a segmentation network trained on patches, validated on whole volumes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from monai.inferers import sliding_window_inference
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from medseg.data.labels import LabelSpec
from medseg.metrics.voxel import OverlapMetrics, binarize, target_channels


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
        threshold: probability above which a sigmoid output counts as foreground.
        empty_score: metric value for a case where reference and prediction are both empty.
        scheduler_interval: step the scheduler every ``"epoch"`` or every ``"step"``.
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
    ) -> None:
        super().__init__()
        labels, inferer = _plain(labels), _plain(inferer)
        # Plain containers only, so that checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(
            {"labels": labels, "inferer": inferer, "threshold": threshold, "empty_score": empty_score, "scheduler_interval": scheduler_interval},
            logger=False,
        )
        self.net = net
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.label_spec = LabelSpec.from_config(labels)
        self.mode = self.label_spec.mode
        self.inferer = inferer
        self.val_metrics = OverlapMetrics(self.label_spec.names, empty_score=empty_score)
        self.test_metrics = OverlapMetrics(self.label_spec.names, empty_score=empty_score)
        self.run_config: dict[str, Any] | None = None  # the composed Hydra config, saved in checkpoints

    def forward(self, image: Tensor) -> Tensor:
        """Logits ``(B, C_out, H, W, D)`` for a batch of patches ``(B, C_in, H, W, D)``."""
        return self.net(image)

    def predict_volume(self, image: Tensor) -> Tensor:
        """Logits for whole volumes ``(B, C_in, H, W, D)`` of any size, by sliding-window inference."""
        return sliding_window_inference(image, predictor=self.net, **self.inferer)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        image, target = batch["image"], batch["label"]  # (B, C_in, *patch), (B, R, *patch)
        logits = self(image)
        if hasattr(self.loss, "forward_with_terms"):
            loss, terms = self.loss.forward_with_terms(logits, target)
            self.log_dict({f"train/loss_{k}": v.detach() for k, v in terms.items()}, on_step=False, on_epoch=True, batch_size=image.shape[0])
        else:
            loss = self.loss(logits, target)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=image.shape[0])
        return loss

    def _evaluate(self, batch: dict[str, Tensor], metrics: OverlapMetrics, stage: str) -> None:
        image, target = batch["image"], batch["label"]  # (1, C_in, H, W, D), (1, R, H, W, D)
        logits = self.predict_volume(image)
        self.log(f"{stage}/loss", self.loss(logits, target), on_epoch=True, batch_size=1, sync_dist=True)
        pred = binarize(logits, self.mode, self.hparams.threshold)
        metrics.update(pred, target_channels(target, self.mode, logits.shape[1]))

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def _log_metrics(self, metrics: OverlapMetrics, stage: str) -> None:
        # compute() already reduces across processes (torchmetrics sync), so no sync_dist here.
        values = metrics.compute()
        self.log_dict({f"{stage}/{k}": v for k, v in values.items() if k != "dice"})
        self.log(f"{stage}/dice", values["dice"], prog_bar=True)
        metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics, "test")

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.hparams.scheduler_interval}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.run_config is not None:
            checkpoint["medseg_config"] = self.run_config

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.run_config = checkpoint.get("medseg_config", self.run_config)


def _plain(node: Mapping[str, Any]) -> dict[str, Any]:
    """A DictConfig or mapping as a plain dict (interpolations resolved)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
