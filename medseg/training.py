"""The training job as a library function, :func:`train` (``python -m medseg.train`` is its entry point).

The flow: compose the config (Hydra) -> data module -> model -> callbacks and loggers -> Trainer -> fit -> the final
evaluation of the best checkpoint on the validation cases, done as ``medseg.predict`` + ``medseg.evaluate`` would
do it (:mod:`medseg.final_evaluation`) -> the operating point into the run folder and every checkpoint -> print and
save the metrics. ``train(cfg)`` is the whole job, so tests, sweeps and cross-validation call it directly;
:mod:`medseg.train` only adds Hydra and readable errors.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from medseg.build import build_model, build_trainer
from medseg.checkpoint_io import AtomicCheckpointIO, update_checkpoint
from medseg.config import check_required
from medseg.data.layouts import DATA_HELP
from medseg.distributed import on_rank_zero, process_rank, resume_checkpoint
from medseg.final_evaluation import FinalEvaluation, evaluate_cases
from medseg.io import write_csv_atomic, write_json_atomic, write_text_atomic
from medseg.module import SegmentationModule
from medseg.postprocess import CHECKPOINT_KEY, TUNED_ON
from medseg.precision import resolve_trainer_precision
from medseg.report import print_metrics_table, to_floats
from medseg.tracking import log_final_report

log = logging.getLogger("medseg")
# Prefix of the final evaluation's values among train()'s returned metrics (the per-epoch validation's is val/).
FINAL = "final_val"
VALIDATION_DIR = "validation"


def train(cfg: DictConfig) -> dict[str, float]:
    """Train, then evaluate the best checkpoint on the validation cases. Returns the final metrics as floats."""
    check_required(cfg, {"data.root": DATA_HELP.get(cfg.data.get("layout"), "")})
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    if process_rank(devices_per_node=cfg.trainer.get("devices")) == 0:
        # Generate demo data, check the dataset and build the preprocessing cache now, before Lightning starts
        # other processes, so that a broken dataset ends the run with one message (Lightning calls it again).
        datamodule.prepare_data()
    elif not datamodule.synthetic:
        # Ranks started together (SLURM, torchrun) wait on the cache's lock (or share the build) before the
        # process group forms, so that a long first build never runs into the group's timeout.
        datamodule.prepare_cache(progress=False)
    resolve_trainer_precision(cfg)  # trainer.precision: auto -> this device's, before the model records its config
    model = build_model(cfg)
    trainer: L.Trainer = build_trainer(cfg)
    save_config(cfg)

    trainer.fit(model, datamodule=datamodule, ckpt_path=resume_checkpoint(cfg.get("ckpt_path"), cfg.paths.output_dir))
    metrics = to_floats(trainer.callback_metrics)
    if cfg.get("evaluate_best") and datamodule.val_cases:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        metrics = final_evaluation(cfg, trainer, model, datamodule.val_cases, best, metrics)
    return metrics


def final_evaluation(cfg: DictConfig, trainer: L.Trainer, model: SegmentationModule, cases: list[dict[str, Any]], checkpoint: str, fit_metrics: dict[str, float]) -> dict[str, float]:
    """The best checkpoint's final evaluation on the validation cases (:func:`medseg.final_evaluation.evaluate_cases`,
    into ``<run>/validation/``), its operating point saved with the run, and the report; returns ``fit_metrics``
    with the final values as ``final_val/<metric>``."""
    if checkpoint:
        model.load_state_dict(AtomicCheckpointIO().load_checkpoint(checkpoint, map_location="cpu")["state_dict"])
    out = Path(cfg.paths.output_dir)
    result = evaluate_cases(model, cfg, cases, out / VALIDATION_DIR, trainer.strategy.root_device, checkpoint=checkpoint)
    model.postprocessing = result.point
    # On rank 0, every process waiting for it (and failing with it): checkpoints and reports are complete after.
    on_rank_zero(save_operating_point, cfg, result, checkpoint, Path(trainer.checkpoint_callback.dirpath) if trainer.checkpoint_callback else None)
    on_rank_zero(report, cfg, result, model, checkpoint, fit_metrics)
    on_rank_zero(log_final_report, trainer, out, result.summary["metrics"])  # final_val/* and the report files to every logger
    return {**fit_metrics, **{f"{FINAL}/{k}": float(v) for k, v in result.summary["metrics"].items()}}


def save_operating_point(cfg: DictConfig, result: FinalEvaluation, checkpoint: str, checkpoint_dir: Path | None) -> None:
    """``operating_point.json`` (and with a sweep ``operating_point_sweep.csv`` / ``.png``) in the run folder, and the
    point into every checkpoint of the run: it belongs to the run, whichever checkpoint a user predicts with."""
    out, point = Path(cfg.paths.output_dir), result.point
    write_json_atomic(out / "operating_point.json", {"checkpoint": checkpoint, **point.to_dict()})
    if result.sweep_table:
        write_csv_atomic(result.sweep_table, out / "operating_point_sweep.csv")
        from medseg.viz import plot_operating_point, save_figure  # matplotlib only when there is a sweep to draw

        save_figure(plot_operating_point(result.sweep_table, point.to_dict()["regions"], str(point.criterion)), out / "operating_point_sweep.png")
        chosen = ", ".join(f"{n}: threshold {t:g}, min component {m:g} mm^3, min component score {c:g}" for n, t, m, c in zip(point.names, point.threshold, point.min_component_mm3, point.min_component_score))
        log.info("Operating point (max %s on the validation cases): %s", point.criterion, chosen)
    # Every checkpoint carries the point, with the name of the one whose probabilities it was tuned on (prediction
    # with other weights warns).
    for path in sorted(checkpoint_dir.glob("*.ckpt")) if checkpoint_dir is not None and checkpoint_dir.is_dir() else []:
        update_checkpoint(path, CHECKPOINT_KEY, {**point.to_dict(), TUNED_ON: Path(checkpoint).name})


@rank_zero_only
def save_config(cfg: DictConfig) -> None:
    """The resolved config next to the run's outputs (Hydra also keeps the unresolved one in .hydra/)."""
    write_text_atomic(Path(cfg.paths.output_dir) / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


def report(cfg: DictConfig, result: FinalEvaluation, model: SegmentationModule, checkpoint: str, fit_metrics: dict[str, float]) -> None:
    """Print the final evaluation's table(s) and write ``metrics.json``: the summary of ``validation/evaluation/``
    (what ``medseg.evaluate`` writes for the same files), the checkpoint, the point, the untuned point's metrics
    (``before_postprocessing``) and the last training values (``training``)."""
    out = Path(cfg.paths.output_dir)
    names = model.label_spec.names
    weights = Path(checkpoint).name or "last weights"
    if result.untuned is not None:
        print_metrics_table({f"{FINAL}/{k}": v for k, v in result.untuned["metrics"].items()}, names, FINAL, title=f"Validation cases, {weights}, before post-processing (original geometry)")
    point = result.point
    configured = (point.threshold, point.min_component_mm3, point.min_component_score) == ((float(cfg.model.threshold),) * len(names), (float(cfg.model.get("min_component_mm3") or 0.0),) * len(names), (0.0,) * len(names))
    where = "" if point.criterion is None else f", {'configured' if configured else 'tuned'} operating point (max {point.criterion})"
    print_metrics_table({f"{FINAL}/{k}": v for k, v in result.summary["metrics"].items()}, names, FINAL, title=f"Validation cases, {weights}{where} (original geometry)")
    summary = {**result.summary, "checkpoint": checkpoint, "operating_point": point.to_dict(), "training": fit_metrics}
    if result.untuned is not None:
        summary["before_postprocessing"] = result.untuned["metrics"]
    write_json_atomic(out / "metrics.json", summary)
    log.info("Run folder: %s (checkpoints/, metrics.json, validation/ predictions and evaluation/, csv/metrics.csv, tensorboard/)", out)
