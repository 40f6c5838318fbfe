"""Segment new scans with a trained checkpoint: ``python -m medseg.predict ckpt_path=... input=... output=...``.

The job is :func:`medseg.prediction.predict` (read, preprocess, sliding window, back to the input's geometry,
labels, atomic writes); this entry point adds Hydra and readable errors, and exits with 1 when a case failed.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from medseg.config import ConfigError, register_resolvers
from medseg.data.layouts import DatasetError
from medseg.prediction import predict

log = logging.getLogger("medseg")


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    try:
        results = predict(cfg)
    except (DatasetError, ConfigError) as err:  # user mistakes: one readable message, no traceback
        log.error("%s", err)
        sys.exit(1)
    if any("error" in r for r in results):
        sys.exit(1)


register_resolvers()

if __name__ == "__main__":
    main()
