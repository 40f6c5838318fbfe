"""Train a segmentation model: ``python -m medseg.train +experiment=<name> [key=value ...]``.

The job itself is :func:`medseg.training.train` (compose -> data -> model -> Trainer -> fit -> final evaluation of the
best checkpoint -> operating point and ``metrics.json``); this entry point adds Hydra, one run per DDP process group
and readable errors.
"""

from __future__ import annotations

import logging
import signal
import sys

import hydra
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from medseg.config import ConfigError, register_resolvers
from medseg.data.layouts import DatasetError
from medseg.distributed import one_run_per_process_group, patch_lightning_relaunch
from medseg.module import NonFiniteLossError
from medseg.training import train

log = logging.getLogger("medseg")


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
