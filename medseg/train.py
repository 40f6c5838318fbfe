"""Train a segmentation model: ``python -m medseg.train +experiment=<name> [key=value ...]``.

The flow: compose the config (Hydra) -> data module -> model -> callbacks and loggers -> Trainer ->
fit -> evaluate the best checkpoint on the validation cases -> print and save the metrics. ``train(cfg)`` is the whole job, so
tests and sweeps call it directly; ``main`` only adds Hydra and readable errors.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from medseg.config import ConfigError, check_required, register_resolvers
from medseg.data.datamodule import write_json_atomic
from medseg.data.layouts import DATA_HELP, DatasetError
from medseg.distributed import one_run_per_process_group, patch_lightning_relaunch, resume_checkpoint
from medseg.module import NonFiniteLossError, SegmentationModule
from medseg.metrics.cases import region_means
from medseg.report import print_metrics_table, to_floats, write_csv_atomic

log = logging.getLogger("medseg")


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
    """Train, then evaluate the best checkpoint on the validation cases. Returns the final metrics as floats."""
    check_required(cfg, {"data.root": DATA_HELP.get(cfg.data.get("layout"), "")})
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    if rank_zero_only.rank == 0:
        # Generate demo data, check the dataset and build the preprocessing cache now, before Lightning starts
        # other processes, so that a broken dataset ends the run with one message (Lightning calls it again).
        datamodule.prepare_data()
    elif not datamodule.synthetic:
        # Ranks started together (SLURM, torchrun) wait on the cache's lock (or share the build) before the
        # process group forms, so that a long first build never runs into the group's timeout.
        datamodule.prepare_cache(progress=False)
    model = build_model(cfg)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=instantiate_group(cfg.get("callbacks")), logger=instantiate_group(cfg.get("logger")))
    save_config(cfg)

    trainer.fit(model, datamodule=datamodule, ckpt_path=resume_checkpoint(cfg.get("ckpt_path"), cfg.paths.output_dir))
    metrics = to_floats(trainer.callback_metrics)
    if cfg.get("evaluate_best") and datamodule.val_cases:
        # The best checkpoint on the validation cases: metrics table, metrics.json, per-case CSV.
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)
        metrics.update(to_floats(trainer.callback_metrics))
        report(cfg, metrics, model, best)
    return metrics


@rank_zero_only
def save_config(cfg: DictConfig) -> None:
    """The resolved config next to the run's outputs (Hydra also keeps the unresolved one in .hydra/)."""
    path = Path(cfg.paths.output_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path, resolve=True)


@rank_zero_only
def report(cfg: DictConfig, metrics: dict[str, float], model: SegmentationModule, checkpoint: str) -> None:
    """Print the metrics table and write ``metrics.json`` and ``test_cases.csv`` into the run folder."""
    out = Path(cfg.paths.output_dir)
    print_metrics_table(metrics, model.label_spec.names, "test", title=f"Validation cases, {Path(checkpoint).name or 'last weights'}")
    numeric = [k for k, v in (model.case_rows[0] if model.case_rows else {}).items() if isinstance(v, (int, float))]
    summary = {"checkpoint": checkpoint, "metrics": metrics, "region_means": region_means(model.case_rows, numeric)}
    write_json_atomic(out / "metrics.json", summary)
    write_csv_atomic(model.case_rows, out / "test_cases.csv")
    log.info("Run folder: %s (checkpoints/, metrics.json, test_cases.csv, csv/metrics.csv, tensorboard/)", out)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    patch_lightning_relaunch()  # DDP ranks of a multirun job run that job, not the sweep again
    try:
        with one_run_per_process_group():
            train(cfg)
    except (DatasetError, ConfigError, NonFiniteLossError) as err:  # one readable message, no traceback
        log.error("%s", err)
        sys.exit(1)
    except SIGTERMException:  # Lightning stops cleanly on SIGTERM, but as a SystemExit with status 0
        log.error("Training stopped by SIGTERM. Continue it with: hydra.run.dir=%s ckpt_path=last", cfg.paths.output_dir)
        sys.exit(128 + signal.SIGTERM)


register_resolvers()

if __name__ == "__main__":
    main()
