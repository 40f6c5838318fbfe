"""Cross-validate an experiment: ``python -m medseg.crossval +experiment=<name> data.root=... [crossval.folds=5]``.

The job is :func:`medseg.crossvalidation.crossval` (folds, out-of-fold predictions, the operating point tuned once on
all of them, the report); this entry point adds Hydra, readable errors and the printed tables.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from medseg.config import ConfigError, register_resolvers
from medseg.crossvalidation import crossval
from medseg.data.labels import LabelSpec
from medseg.data.layouts import DatasetError
from medseg.module import NonFiniteLossError
from medseg.report import print_metrics_table

log = logging.getLogger("medseg")


@hydra.main(version_base="1.3", config_path="../conf", config_name="crossval")
def main(cfg: DictConfig) -> None:
    try:
        summary = crossval(cfg)
    except (DatasetError, ConfigError, NonFiniteLossError) as err:  # one readable message, no traceback
        log.error("%s", err)
        sys.exit(1)
    if summary is None:
        return
    names = LabelSpec.from_config(cfg.data.labels).names
    point = summary["operating_point"]
    if "before_postprocessing" in summary:
        print_metrics_table({f"oof/{k}": v for k, v in summary["before_postprocessing"].items()}, names, "oof", title="Out-of-fold cases, before post-processing")
    print_metrics_table({f"oof/{k}": v for k, v in summary["metrics"].items()}, names, "oof", title=f"Out-of-fold cases, {summary['folds']} folds pooled, operating point tuned once (max {point['criterion']})")
    for fold, metrics in summary["per_fold"].items():
        log.info("fold %s: Dice %.4f", fold, metrics["dice"])
    log.info("Cross-validation folder (the model medseg.predict ckpt_path=<folder> ensembles): %s", cfg.paths.output_dir)


register_resolvers()

if __name__ == "__main__":
    main()
