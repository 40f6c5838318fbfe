"""Build the preprocessing cache ahead of training: ``python -m medseg.data.preprocess +experiment=... data.root=...``.

Takes the training config's ``data`` options (the same overrides as ``medseg.train``), preprocesses every
case that the cache lacks in ``data.preprocess_workers`` processes, and prints the cache folder, what was
built and reused, and its size on disk. Training with the same options then starts from the cache, e.g. a
CPU node builds it before a GPU job. Exit status 1 on a configuration or dataset error.
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from medseg.config import ConfigError, check_required, register_resolvers, run_without_run_folder
from medseg.data.layouts import DATA_HELP, DatasetError

log = logging.getLogger("medseg")


def preprocess(cfg: DictConfig) -> str:
    """Check the dataset of ``cfg.data`` (a composed training config) and build its cache, as training would;
    returns the summary line to print."""
    check_required(cfg, {"data.root": DATA_HELP.get(cfg.data.get("layout"), "")})
    datamodule = instantiate(cfg.data, split_path=None)
    if datamodule.cache == "none":
        raise ConfigError("data.cache=none keeps no cache; use data.cache=disk or memory to build one")
    datamodule.prepare_data()  # as training does: generate synthetic data, check the dataset, build the cache
    summary = datamodule.cache_summary
    cases = summary.built + summary.rebuilt + summary.reused
    return f"{datamodule.case_cache.folder}: {cases} cases; {summary.format()}"


@hydra.main(version_base="1.3", config_path="../../conf", config_name="train")
def _main(cfg: DictConfig) -> None:
    try:
        print(preprocess(cfg))
    except (DatasetError, ConfigError, ValueError) as err:  # one readable line, no traceback
        log.error("%s", err)
        sys.exit(1)


def main() -> None:
    """``python -m medseg.data.preprocess +experiment=... data.root=...``: exit status 1 on an error."""
    run_without_run_folder(_main)


register_resolvers()

if __name__ == "__main__":
    main()
