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

from medseg.build import build_model, instantiate_group
from medseg.checkpoint_io import update_checkpoint
from medseg.config import ConfigError, check_required, register_resolvers
from medseg.data.layouts import DATA_HELP, DatasetError
from medseg.distributed import one_run_per_process_group, patch_lightning_relaunch, resume_checkpoint
from medseg.io import write_csv_atomic, write_json_atomic, write_text_atomic
from medseg.module import NonFiniteLossError, SegmentationModule
from medseg.metrics.cases import region_means
from medseg.postprocess import CHECKPOINT_KEY
from medseg.report import print_metrics_table, to_floats

log = logging.getLogger("medseg")


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
        metrics = evaluate_on_validation(cfg, trainer, model, datamodule, best, metrics)
    return metrics


def evaluate_on_validation(cfg: DictConfig, trainer: L.Trainer, model: SegmentationModule, datamodule: Any, checkpoint: str, fit_metrics: dict[str, float]) -> dict[str, float]:
    """Score ``checkpoint`` on the validation cases, tuning the operating point first when configured;
    returns ``fit_metrics`` updated with the ``test/`` values.

    Pass 1 scores the untuned point and sweeps the grid (``model.operating_point``); the chosen point is written
    to the run folder and into ``checkpoint``; if it differs from the untuned one, pass 2 scores it. The report
    (table, ``metrics.json``, ``test_cases.csv``) is of the final point, with the untuned one beside it.
    """
    tune = bool((cfg.model.get("operating_point") or {}).get("criterion"))
    if tune:
        model.start_sweep()
    trainer.test(model, datamodule=datamodule, ckpt_path=checkpoint or None, verbose=False)
    metrics = {**fit_metrics, **to_floats(trainer.callback_metrics)}
    if not tune or model.sweep_result is None:
        report(cfg, metrics, model, checkpoint)
        return metrics
    untuned, untuned_rows = metrics, model.case_rows
    point, table = model.sweep_result
    save_operating_point(cfg, point, table, checkpoint)
    trainer.strategy.barrier()  # every process reads the checkpoint only once rank 0 has rewritten it
    if (point.threshold, point.min_component_mm3) == (model.postprocessing.threshold, model.postprocessing.min_component_mm3):
        model.postprocessing = point  # the untuned point won: no second pass
        report(cfg, metrics, model, checkpoint, untuned, untuned_rows)
        return metrics
    model.postprocessing = point  # also read back from the checkpoint by the second pass
    trainer.test(model, datamodule=datamodule, ckpt_path=checkpoint or None, verbose=False)
    metrics = {**fit_metrics, **to_floats(trainer.callback_metrics)}
    report(cfg, metrics, model, checkpoint, untuned, untuned_rows)
    return metrics


@rank_zero_only
def save_operating_point(cfg: DictConfig, point: Any, table: list[dict[str, Any]], checkpoint: str) -> None:
    """``operating_point.json``, ``operating_point_sweep.csv`` and ``.png`` in the run folder; the point into
    ``checkpoint``."""
    out = Path(cfg.paths.output_dir)
    write_json_atomic(out / "operating_point.json", {"checkpoint": checkpoint, **point.to_dict()})
    write_csv_atomic(table, out / "operating_point_sweep.csv")
    from medseg.viz import plot_operating_point, save_figure  # matplotlib only when there is a sweep to draw

    save_figure(plot_operating_point(table, point.to_dict()["regions"], point.criterion), out / "operating_point_sweep.png")
    if checkpoint:
        update_checkpoint(checkpoint, CHECKPOINT_KEY, point.to_dict())
    chosen = ", ".join(f"{n}: threshold {t:g}, min component {m:g} mm^3" for n, t, m in zip(point.names, point.threshold, point.min_component_mm3))
    log.info("Operating point (max %s on the validation cases): %s", point.criterion, chosen)


@rank_zero_only
def save_config(cfg: DictConfig) -> None:
    """The resolved config next to the run's outputs (Hydra also keeps the unresolved one in .hydra/)."""
    write_text_atomic(Path(cfg.paths.output_dir) / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


@rank_zero_only
def report(cfg: DictConfig, metrics: dict[str, float], model: SegmentationModule, checkpoint: str, untuned: dict[str, float] | None = None, untuned_rows: list[dict[str, Any]] | None = None) -> None:
    """Print the metrics table and write ``metrics.json`` and ``test_cases.csv`` into the run folder (and the
    untuned point's metrics, ``before_postprocessing`` / ``test_cases_before_postprocessing.csv``, when tuned)."""
    out = Path(cfg.paths.output_dir)
    names = model.label_spec.names
    if untuned is not None:
        print_metrics_table(untuned, names, "test", title=f"Validation cases, {Path(checkpoint).name or 'last weights'}, before post-processing")
    point = model.postprocessing
    where = "" if point.criterion is None else f", tuned operating point (max {point.criterion})"
    print_metrics_table(metrics, names, "test", title=f"Validation cases, {Path(checkpoint).name or 'last weights'}{where}")
    numeric = [k for k, v in (model.case_rows[0] if model.case_rows else {}).items() if isinstance(v, (int, float))]
    summary = {"checkpoint": checkpoint, "operating_point": point.to_dict(), "metrics": metrics, "region_means": region_means(model.case_rows, numeric)}
    if untuned is not None:
        summary["before_postprocessing"] = untuned
        write_csv_atomic(untuned_rows or [], out / "test_cases_before_postprocessing.csv")
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
