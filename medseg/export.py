"""Export a trained model: ``python -m medseg.export ckpt_path=<run or cross-validation folder> output=<name>.zip``.

``format=zip`` (default): the model zip of :mod:`medseg.model_package` (weights, config without machine paths, operating
point, labels, preprocessing, report, model card), which ``medseg.predict ckpt_path=<name>.zip`` predicts from on any
machine. ``format=onnx``: the network of one checkpoint as ``<name>.onnx`` (:func:`medseg.onnx_backend.export_network`),
batch and spatial axes dynamic, the config (machine paths removed) and operating point as metadata.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from medseg import __version__
from medseg.config import ConfigError, check_required, register_resolvers
from medseg.ensemble import resolve_checkpoints
from medseg.model_package import default_name, source_folder, without_machine_paths, write_model_zip

log = logging.getLogger("medseg")
FORMATS = ("zip", "onnx")
REQUIRED_HELP = {
    "ckpt_path": "ckpt_path is a training run folder, a cross-validation folder, or a checkpoint file of medseg.train.",
    "output": "output is the file to write: <name>.zip (format=zip) or <name>.onnx (format=onnx).",
}


def export(cfg: DictConfig) -> Path:
    """Write ``cfg.output`` in ``cfg.format`` (see the module docstring); returns its path.

    Raises:
        ConfigError: unknown format, an output of the wrong suffix or that exists (without ``overwrite``), several
            checkpoints for ONNX without ``fold``, or no medseg checkpoint at ``ckpt_path``.
    """
    check_required(cfg, REQUIRED_HELP)
    ckpt_path: Any = OmegaConf.to_container(cfg.ckpt_path) if isinstance(cfg.ckpt_path, ListConfig) else str(cfg.ckpt_path)
    output = Path(str(cfg.output)).expanduser()
    if cfg.format not in FORMATS:
        raise ConfigError(f"expected format one of {list(FORMATS)}, got {cfg.format!r}")
    if cfg.format == "zip":
        if cfg.get("fold") is not None:
            raise ConfigError("fold= chooses the network of format=onnx; a zip holds every fold (drop fold=, or use format=onnx)")
        manifest = write_model_zip(ckpt_path, output, cfg.get("name"), bool(cfg.include_onnx), bool(cfg.overwrite), bool(cfg.get("case_reports", False)))
        log.info("Wrote %s: model %r, %d checkpoint(s)%s, %s", output, manifest["name"], len(manifest["members"]), " with ONNX networks" if manifest["onnx"] else "", "MODEL_CARD.md inside")
        return output
    return export_onnx(ckpt_path, output, cfg.get("fold"), cfg.get("name"), bool(cfg.overwrite))


def export_onnx(ckpt_path: Any, output: Path, fold: int | None = None, name: str | None = None, overwrite: bool = False) -> Path:
    """The network of one checkpoint as an ONNX file, its config (machine paths removed) and operating point as metadata."""
    from medseg.onnx_backend import export_network
    from medseg.postprocess import CHECKPOINT_KEY
    from medseg.prediction import load_model

    if output.suffix != ".onnx":
        raise ConfigError(f"expected output=<name>.onnx for format=onnx, got {str(output)!r}")
    if output.exists() and not overwrite:
        raise ConfigError(f"{output} exists; choose another name or pass overwrite=true")
    paths = resolve_checkpoints(ckpt_path)
    if fold is None and len(paths) > 1:
        raise ConfigError(f"ckpt_path names {len(paths)} checkpoints (a cross-validation); ONNX holds one network: pass fold=<0..{len(paths) - 1}>, or format=zip include_onnx=true for all")
    if fold is not None and not 0 <= int(fold) < len(paths):
        raise ConfigError(f"expected fold in 0..{len(paths) - 1}, got {fold}")
    path = paths[int(fold or 0)]
    model, cfg = load_model(path)
    source = source_folder(ckpt_path, paths)
    point = model.postprocessing.to_dict()
    metadata = {
        "medseg_version": __version__, "model": name or default_name(source, [path]), CHECKPOINT_KEY: json.dumps(point),
        "medseg_config": json.dumps(without_machine_paths(OmegaConf.to_container(cfg, resolve=True))),
    }  # fmt: skip
    export_network(model.net, int(cfg.data.in_channels), output, list(model.inferer["roi_size"]), metadata=metadata)
    log.info("Wrote %s: the network of %s (input 'image' (B, %d, H, W, D), output 'logits'; dynamic batch and spatial size)", output, path, int(cfg.data.in_channels))
    return output


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    try:
        export(cfg)
    except (ConfigError, ImportError) as err:  # user mistakes and missing extras: one readable message
        log.error("%s", err)
        sys.exit(1)


register_resolvers()

if __name__ == "__main__":
    main()
