"""Composed configs to objects, in one place: the LightningModule (:func:`build_model`), the callbacks and
loggers of a group (:func:`instantiate_group`) and the deterministic preprocessing of a ``data`` node
(:func:`preprocessing_from_config`).

Training, prediction, planning and the benchmarks all build through here, so that a checkpoint's saved config
gives the same network and the same preprocessing wherever it is read. The entry points (``medseg.train``,
``medseg.predict``, ``medseg.evaluate``, ``medseg.plan``) import this library module, never each other.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from hydra.utils import instantiate
from monai.transforms import Compose
from omegaconf import DictConfig, OmegaConf

from medseg.data.labels import LabelSpec
from medseg.data.transforms import preprocessing, preprocessing_options
from medseg.module import SegmentationModule
from medseg.precision import resolve_trainer_precision
from medseg.tracking import instantiate_loggers, log_config

# The data keys that choose the preprocessing: the parameters of medseg.data.transforms.preprocessing_options.
PREPROCESSING_KEYS = tuple(inspect.signature(preprocessing_options).parameters)


def build_model(cfg: DictConfig) -> SegmentationModule:
    """The LightningModule of a composed config: ``model`` with ``loss``, ``optimizer`` and ``scheduler``."""
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    model = instantiate(cfg.model, loss=instantiate(cfg.loss), optimizer=instantiate(cfg.optimizer), scheduler=scheduler)
    model.run_config = OmegaConf.to_container(cfg, resolve=True)
    return model


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a callbacks/logger group."""
    return [instantiate(node) for node in (group or {}).values() if isinstance(node, DictConfig) and "_target_" in node]


def build_trainer(cfg: DictConfig, **arguments: Any) -> Any:
    """The Lightning ``Trainer`` of ``cfg.trainer`` with the callbacks and loggers of their groups (``arguments``
    replace any of them; an experiment tracker among the loggers gets the resolved config: :mod:`medseg.tracking`).
    ``trainer.precision: auto`` is resolved for this device first, in ``cfg`` itself, so that
    the run records what it used (:mod:`medseg.precision`)."""
    resolve_trainer_precision(cfg)
    defaults = {"callbacks": instantiate_group(cfg.get("callbacks")), "logger": instantiate_loggers(cfg)}
    trainer = instantiate(cfg.trainer, **{**defaults, **arguments})
    log_config(trainer.loggers, cfg)  # the resolved config to MLflow / W&B (medseg.tracking)
    return trainer


def preprocessing_options_from_config(data_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :func:`medseg.data.transforms.preprocessing` that a ``data`` config node
    chooses (``spacing``, ``intensity``, ``ct_window``, ``ct_zscore``, ``crop_foreground``), as plain values;
    keys the node lacks (a checkpoint's config from an older version) take the defaults of
    :func:`medseg.data.transforms.preprocessing_options`. Equal to the training data module's
    ``preprocess_options`` for the same node."""
    return preprocessing_options(**{key: data_cfg.get(key) for key in PREPROCESSING_KEYS if key in data_cfg})


def preprocessing_from_config(data_cfg: Mapping[str, Any], with_label: bool = True) -> Compose:
    """The training preprocessing of a ``data`` config node (a DictConfig or a plain dict, such as a
    checkpoint's saved ``data``): the labels of ``data.labels`` and :func:`preprocessing_options_from_config`.

    Args:
        data_cfg: the ``data`` node (``labels``, ``spacing``, ``intensity``, ``ct_window``, ...).
        with_label: also load and convert ``label`` (False for prediction on images alone).

    Returns:
        :func:`medseg.data.transforms.preprocessing`'s transform.
    """
    return preprocessing(LabelSpec.from_config(data_cfg["labels"]), with_label=with_label, **preprocessing_options_from_config(data_cfg))
