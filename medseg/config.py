"""Hydra/OmegaConf helpers: custom resolvers and composing the project's configs from Python."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"
# Tools that compose conf/train.yaml like training (data check, cache build) but make no run folder or log file.
NO_RUN_FOLDER = ("hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout")


def run_without_run_folder(hydra_main: Callable[[], None]) -> None:
    """Run a ``@hydra.main`` function composing the training config, without a run folder or log file."""
    sys.argv.extend(NO_RUN_FOLDER)
    hydra_main()


class ConfigError(ValueError):
    """A composed config cannot be used as it is; the message names the key and how to set it."""


def check_required(cfg: DictConfig, hints: dict[str, str] | None = None) -> None:
    """Raise :class:`ConfigError` naming every mandatory value (``???``) left unset.

    Args:
        hints: extra advice per key, e.g. where to get the data for ``data.root``.
    """
    missing = sorted(_missing_keys(cfg))
    if missing:
        advice = " ".join(hints[k] for k in missing if hints and k in hints)
        example = " ".join(f"{k}=..." for k in missing)
        raise ConfigError(f"required config value(s) not set: {', '.join(missing)}; pass them on the command line ({example}). {advice}".strip())


def _missing_keys(node: DictConfig | ListConfig, prefix: str = "") -> list[str]:
    """Keys left ``???``, found without resolving interpolations (a value read from the dataset, such as
    ``${medseg.layout_meta:...,${data.root},...}``, cannot be resolved while ``data.root`` is missing)."""
    found = []
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        name = f"{prefix}{key}" if isinstance(node, DictConfig) else f"{prefix.rstrip('.')}[{key}]"
        if OmegaConf.is_interpolation(node, key):
            continue
        if OmegaConf.is_missing(node, key):
            found.append(name)
            continue
        child = node[key]  # not an interpolation: nothing is resolved
        if isinstance(child, (DictConfig, ListConfig)):
            found.extend(_missing_keys(child, f"{name}."))
    return found


def _num_outputs(mode: str, names: Sequence[str]) -> int:
    """Network output channels for a label convention (see :class:`medseg.data.labels.LabelSpec`)."""
    if mode not in ("sigmoid", "softmax"):
        raise ValueError(f"expected data.labels.mode 'sigmoid' or 'softmax', got {mode!r}")
    return len(names) + (1 if mode == "softmax" else 0)


def _num_channels(modalities: Sequence[str]) -> int:
    """Image channels of a layout whose ``data.modalities`` name the channel files: one file when there are none."""
    return max(1, len(modalities))


def _layout_metadata(layout: str, root: str, key: str) -> object:
    """One value the dataset at ``root`` states itself (:func:`medseg.data.layouts.layout_metadata`)."""
    from medseg.data.layouts import layout_metadata

    value = layout_metadata(str(layout), str(root), str(key))
    return OmegaConf.create(value) if isinstance(value, (dict, list)) else value  # a node: ${data.labels.mode} works


def register_resolvers() -> None:
    """Register ``${medseg.num_outputs:mode,names}``, ``${medseg.layout_meta:layout,root,key}``, ``${medseg.run_id:}``, ``${medseg.rank_zero:x}`` and
    ``${medseg.rank_suffix:}`` (idempotent)."""
    from medseg.distributed import rank_suffix, rank_zero_value, run_id

    if not OmegaConf.has_resolver("medseg.num_outputs"):
        OmegaConf.register_new_resolver("medseg.num_outputs", _num_outputs)
    if not OmegaConf.has_resolver("medseg.run_id"):
        # Cached: one folder name per process, like Hydra's ${now:}.
        OmegaConf.register_new_resolver("medseg.run_id", run_id, use_cache=True)
    if not OmegaConf.has_resolver("medseg.num_channels"):
        OmegaConf.register_new_resolver("medseg.num_channels", _num_channels)
    if not OmegaConf.has_resolver("medseg.layout_meta"):
        # Settings a dataset states itself (nnU-Net's dataset.json: channels, labels), read when first used.
        OmegaConf.register_new_resolver("medseg.layout_meta", _layout_metadata)
    if not OmegaConf.has_resolver("medseg.rank_zero"):
        OmegaConf.register_new_resolver("medseg.rank_zero", rank_zero_value)
        OmegaConf.register_new_resolver("medseg.rank_suffix", rank_suffix)


def compose(config_name: str = "train", overrides: Sequence[str] = ()) -> DictConfig:
    """Compose a config from ``conf/`` outside a Hydra app (tests, notebooks).

    ``hydra:`` interpolations are not available this way: set ``paths.output_dir`` in ``overrides``.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


register_resolvers()
