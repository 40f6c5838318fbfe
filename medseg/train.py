"""Train a segmentation model: ``python -m medseg.train +experiment=<name> [key=value ...]``.

The flow: compose the config (Hydra) -> data module -> model -> callbacks and loggers -> Trainer ->
fit -> validate the best checkpoint -> print and save the metrics. ``train(cfg)`` is the whole job, so
tests and sweeps call it directly; ``main`` only adds Hydra and readable errors.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from medseg.config import ConfigError, check_required, register_resolvers
from medseg.data.datamodule import write_json_atomic
from medseg.data.layouts import BRATS_HELP, MSD_HELP, DatasetError
from medseg.module import SegmentationModule
from medseg.report import print_metrics_table, to_floats

log = logging.getLogger("medseg")
DATA_HELP = {"brats": BRATS_HELP, "msd": MSD_HELP}


def build_model(cfg: DictConfig) -> SegmentationModule:
    """The LightningModule of a composed config: ``model`` with ``loss``, ``optimizer`` and ``scheduler``."""
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    model = instantiate(cfg.model, loss=instantiate(cfg.loss), optimizer=instantiate(cfg.optimizer), scheduler=scheduler)
    model.run_config = OmegaConf.to_container(cfg, resolve=True)
    return model


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a callbacks/logger group."""
    return [instantiate(node) for node in (group or {}).values() if isinstance(node, DictConfig) and "_target_" in node]


def train(cfg: DictConfig) -> dict[str, float]:
    """Train, then validate the best checkpoint. Returns the final metrics as floats."""
    check_required(cfg, {"data.root": DATA_HELP.get(cfg.data.get("layout"), "")})
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = build_model(cfg)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=instantiate_group(cfg.get("callbacks")), logger=instantiate_group(cfg.get("logger")))
    save_config(cfg)

    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = to_floats(trainer.callback_metrics)
    if cfg.get("validate_best") and datamodule.val_cases:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.validate(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)
        metrics.update(to_floats(trainer.callback_metrics))
        report(cfg, metrics, model.label_spec.names, best)
    return metrics


@rank_zero_only
def save_config(cfg: DictConfig) -> None:
    """The resolved config next to the run's outputs (Hydra also keeps the unresolved one in .hydra/)."""
    from pathlib import Path

    path = Path(cfg.paths.output_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path, resolve=True)


@rank_zero_only
def report(cfg: DictConfig, metrics: dict[str, float], names: tuple[str, ...], checkpoint: str) -> None:
    print_metrics_table(metrics, names, "val", title=f"Validation metrics ({checkpoint or 'last weights'})")
    write_json_atomic(f"{cfg.paths.output_dir}/metrics.json", {"checkpoint": checkpoint, "metrics": metrics})
    log.info("Run folder: %s", cfg.paths.output_dir)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except (DatasetError, ConfigError) as err:  # user mistakes: one readable message, no traceback
        log.error("%s", err)
        sys.exit(1)


register_resolvers()

if __name__ == "__main__":
    main()
