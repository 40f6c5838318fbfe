"""Export a trained model: ``python -m medseg.export ckpt_path=<run or cross-validation folder> output=<name>.zip``.

``format=zip`` (default): the model zip of :mod:`medseg.model_package` (weights, config without machine paths, operating
point, labels, preprocessing, report, model card), which ``medseg.predict ckpt_path=<name>.zip`` predicts from on any
machine. ``format=onnx``: the network of one checkpoint as ``<name>.onnx`` (:func:`medseg.model_package.write_onnx`),
batch and spatial axes dynamic, the config (machine paths removed) and operating point as metadata.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from medseg.config import ConfigError, check_required, register_resolvers
from medseg.model_package import write_model_zip, write_onnx

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
    write_onnx(ckpt_path, output, cfg.get("fold"), cfg.get("name"), bool(cfg.overwrite))
    log.info("Wrote %s: one network (input 'image' (B, C_in, H, W, D), output 'logits'; dynamic batch and spatial size), its config and operating point as metadata", output)
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
