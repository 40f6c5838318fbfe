"""Experiment trackers (MLflow, Weights & Biases) as Lightning loggers of the ``logger`` group
(``logger=mlflow``, ``logger=wandb``: ``conf/logger/``), and what medseg sends them beyond Lightning's per-step values.

A run reaches its tracker in three parts:

1. the resolved config, as the run's parameters (:func:`log_config`, once the Trainer is built);
2. every value the LightningModule logs (``train/*``, ``val/*``), by Lightning itself, per step;
3. the final evaluation (:func:`log_final_report`): ``final_val/<metric>`` to every logger of the Trainer (the CSV
   and TensorBoard loggers too: the values of ``metrics.json``), and the report files as artifacts where the logger
   keeps files (MLflow: the run's artifacts; W&B: the run's files).

:func:`instantiate_loggers` builds the group: a tracker whose package is missing is a :class:`ConfigError` that says
what to install, a tracker's run is named after the run folder, and a leftover W&B run of an earlier training in the
same process (cross-validation folds) is finished first. The tracker packages are imported only when chosen.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, MLFlowLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from medseg.config import ConfigError
from medseg.report import CASE_REPORT_FILES, REPORT_FILES

log = logging.getLogger("medseg")

# Logger class name -> (the package it needs, its run-name argument).
TRACKERS = {"MLFlowLogger": ("mlflow", "run_name"), "WandbLogger": ("wandb", "name")}
INSTALL_HINT = "pip install 'medseg[tracking]'"
# The final report's files, relative to the run folder (the tracker is the team's own: the per-case files too).
TRACKED_FILES = ("config.yaml", *REPORT_FILES, *CASE_REPORT_FILES)
# A per-case table of a large validation set stays in the run folder only.
MAX_ARTIFACT_BYTES = 20 * 2**20


def require_package(key: str, package: str) -> None:
    """Raise :class:`ConfigError` ``"logger=<key> needs <package>: pip install 'medseg[tracking]'"`` when
    ``package`` cannot be imported (before Hydra's instantiate would wrap Lightning's error in a traceback)."""
    try:
        importlib.import_module(package)
    except ImportError as err:
        raise ConfigError(f"logger={key} needs {package}: {INSTALL_HINT} (import {package}: {err})") from err


def run_name(output_dir: str | Path, task_dir: str | Path) -> str:
    """A tracker's name for the run in ``output_dir``: its path under ``<task_dir>/runs`` (``<date>_<time>``), else
    under ``task_dir`` (a sweep's job: ``multiruns/<date>_<time>/<n>``), else the folder's name."""
    out = Path(output_dir).resolve()
    for base in (Path(task_dir).resolve() / "runs", Path(task_dir).resolve()):
        if out != base and out.is_relative_to(base):
            return out.relative_to(base).as_posix()
    return out.name


def instantiate_loggers(cfg: DictConfig) -> list[Logger]:
    """Every ``_target_`` entry of ``cfg.logger``, a tracker's checked and named first (see the module docstring).

    Raises:
        ConfigError: a chosen tracker's package cannot be imported.
    """
    loggers = []
    for key, node in (cfg.get("logger") or {}).items():
        if not (isinstance(node, DictConfig) and "_target_" in node):
            continue
        tracker = TRACKERS.get(str(node._target_).rsplit(".", 1)[-1])
        if tracker is None:
            loggers.append(instantiate(node))
            continue
        package, name_key = tracker
        require_package(str(key), package)
        arguments = {}
        if node.get(name_key) is None:
            arguments[name_key] = run_name(cfg.paths.output_dir, Path(cfg.paths.log_dir) / str(cfg.task_name))
        if package == "mlflow":
            allow_file_store(node.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or "file:")
        elif sys.modules["wandb"].run is not None:  # an earlier train() in this process (a fold) left its run open
            log.info("Finishing the open W&B run %s before this run's", sys.modules["wandb"].run.name)
            sys.modules["wandb"].finish()
        loggers.append(instantiate(node, **arguments))
    return loggers


def allow_file_store(tracking_uri: str) -> None:
    """MLflow >= 3.7 refuses a local file store (``file:`` URI or a path) unless ``MLFLOW_ALLOW_FILE_STORE=true``; its
    database store needs the full ``mlflow`` package, not ``mlflow-skinny``. Set it for a file store, unless set."""
    scheme = urlparse(str(tracking_uri)).scheme
    if scheme in ("", "file") or len(scheme) == 1:  # a path, a file: URI or a Windows drive letter
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def trackers(loggers: Sequence[Logger]) -> list[Logger]:
    """The loggers among ``loggers`` that are experiment trackers (not CSV or TensorBoard)."""
    return [logger for logger in loggers if isinstance(logger, (MLFlowLogger, WandbLogger))]


def log_config(loggers: Sequence[Logger], cfg: DictConfig) -> None:
    """The resolved config as the hyperparameters of every tracker among ``loggers`` (MLflow: flattened params,
    ``loss/gamma``; W&B: the run's config). The module keeps its own out of the loggers (``logger=False``). This
    starts the tracker's run, so that a run without a W&B login fails here, before training.

    Raises:
        ConfigError: W&B online without an API key (``wandb login``), with the offline alternative.
    """
    chosen = trackers(loggers)
    if chosen:
        config = OmegaConf.to_container(cfg, resolve=True)
        for logger in chosen:
            try:
                logger.log_hyperparams(config)
            except Exception as err:
                if isinstance(logger, WandbLogger) and isinstance(err, sys.modules["wandb"].errors.UsageError):
                    raise ConfigError(f"logger=wandb: {err} Or run offline (upload later with wandb sync): logger.wandb.offline=true or WANDB_MODE=offline") from err
                raise


def log_final_report(trainer: Any, out_dir: str | Path, metrics: Mapping[str, Any]) -> None:
    """The final evaluation into every logger of ``trainer``: ``final_val/<metric>`` at the last step, and the report
    files of ``out_dir`` (:data:`TRACKED_FILES`, up to :data:`MAX_ARTIFACT_BYTES` each) as artifacts of an MLflow or
    W&B run; the W&B run is then finished (the job is over, and offline its files are complete). Rank 0 only.

    Args:
        trainer: the Lightning ``Trainer`` that trained the run (its ``loggers`` and ``global_step``).
        out_dir: the run folder, with ``metrics.json`` and the other report files written.
        metrics: the final evaluation's values by name (``metrics.json``'s ``metrics``: ``dice_wt``, ...).
    """
    from medseg.training import FINAL  # here: medseg.training imports this module (through medseg.build)

    values = {f"{FINAL}/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    out = Path(out_dir)
    files = [out / name for name in TRACKED_FILES if (out / name).is_file() and (out / name).stat().st_size <= MAX_ARTIFACT_BYTES]
    for logger in trainer.loggers:
        try:
            logger.log_metrics(values, step=trainer.global_step)
            logger.save()  # the CSV logger writes its buffered rows now
            if isinstance(logger, MLFlowLogger):
                for path in files:
                    folder = path.parent.relative_to(out).as_posix()
                    logger.experiment.log_artifact(logger.run_id, str(path), artifact_path=None if folder == "." else folder)
            elif isinstance(logger, WandbLogger):
                run = logger.experiment
                for path in files:
                    run.save(str(path), base_path=str(out), policy="now")
                run.finish()
        except Exception as err:  # a tracker server or network failing now must not fail a run whose results are saved
            log.warning("%s: the final report did not reach it (%s: %s); the run folder %s holds it", type(logger).__name__, type(err).__name__, err, out)
