"""Plan a training preset from the dataset: ``python -m medseg.plan +experiment=... data.root=... plan.output=DIR/experiment/NAME.yaml``.

The flow: compose the training config with the ``plan`` node (``conf/plan.yaml``) -> the training cases of the
split -> their fingerprint (``DIR/experiment/fingerprint.json``, earlier records reused) -> the plan (target
spacing, intensity scheme, patch, batch, network, schedule; :mod:`medseg.planning.planner`) for this machine's
device -> the preset ``NAME.yaml`` (one comment per choice) -> the train command, printed.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import medseg.precision
from medseg.config import ConfigError, check_required, register_resolvers
from medseg.data.layouts import DATA_HELP, DatasetError, get_layout
from medseg.io import write_text_atomic
from medseg.planning.fingerprint import dataset_fingerprint, read_fingerprint, write_fingerprint
from medseg.planning.memory import dynunet_activation_elements, measure_training_step, training_step_bytes
from medseg.planning.planner import Choice, Plan, PlanOptions, plan_from_fingerprint, render_preset
from medseg.precision import cuda_precision

log = logging.getLogger("medseg")


def preset_path(output: str) -> Path:
    """``plan.output`` checked: a ``.yaml`` file inside a folder named ``experiment``."""
    path = Path(output).expanduser()
    if path.suffix != ".yaml" or path.parent.name != "experiment":
        raise ConfigError(f"plan.output={output!r}: expected DIR/experiment/NAME.yaml, so that training finds it with hydra.searchpath=[file://DIR] +experiment=NAME")
    return path


def device_profile(plan_cfg: DictConfig) -> dict[str, Any]:
    """The device the plan targets and its defaults: memory budget, widths, precision, training time."""
    cuda = torch.cuda.is_available()
    if cuda:
        properties = torch.cuda.get_device_properties(0)
        memory = min(float(plan_cfg.gpu_memory_fraction) * properties.total_memory, float(plan_cfg.gpu_memory_cap_gb) * 2**30)
        name, precision = f"{properties.name} (cuda)", cuda_precision()
    else:
        memory = float(plan_cfg.cpu_memory_gb) * 2**30
        name, precision = f"CPU ({torch.get_num_threads()} threads)", "bf16-mixed" if medseg.precision.cpu_supports_bf16() else "32-true"
    minutes = plan_cfg.train_minutes
    if minutes == "auto":
        minutes = None if cuda else float(plan_cfg.cpu_train_minutes)
    return {
        "device": "cuda" if cuda else "cpu",
        "name": name,
        "memory_bytes": float(plan_cfg.memory_gb) * 2**30 if plan_cfg.memory_gb else memory,
        "base_features": int(plan_cfg.base_features),
        "max_batch_size": (None if cuda else int(plan_cfg.cpu_max_batch_size)) if plan_cfg.max_batch_size == "auto" else plan_cfg.max_batch_size,
        "precision": precision if plan_cfg.precision == "auto" else str(plan_cfg.precision),
        "train_minutes": float(minutes) if minutes else None,
    }


def plan_options(plan_cfg: DictConfig, profile: dict[str, Any]) -> PlanOptions:
    keys = ("max_features", "min_feature_map_size", "max_pools", "anisotropy_threshold", "min_batch_size", "max_batch_fraction", "foreground_fraction",
            "rare_foreground_fraction", "rare_foreground", "lesion_components_per_case", "ct_min_intensity", "modality", "channels_last", "total_steps", "time_margin", "validations")
    return PlanOptions(memory_bytes=profile["memory_bytes"], base_features=profile["base_features"], precision=profile["precision"], train_minutes=profile["train_minutes"],
                       max_batch_size=profile["max_batch_size"], augment=dict(plan_cfg.augment), **{k: plan_cfg[k] for k in keys})


def declared_modality(cfg: DictConfig) -> str | None:
    """Channel 0's modality as the dataset states it (an MSD or nnU-Net ``dataset.json``), if it does."""
    try:
        return get_layout(str(cfg.data.layout)).declared_modality(cfg.data.root)
    except (DatasetError, OSError, ValueError):
        return None


def carried_choices(cfg: DictConfig, keys: list[str], source: str) -> list[Choice]:
    """The task settings (labels, channels, flips, ...) copied from the composed config into the preset."""
    found = []
    for key in keys:
        value = OmegaConf.select(cfg, key, default="__missing__")
        if isinstance(value, str) and value == "__missing__":
            continue
        plain = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        found.append(Choice(key, plain, f"the task's setting, from {source}"))
    return found


def plan(cfg: DictConfig, data_group: str = "brats", source: str = "the command line") -> tuple[Plan, Path]:
    """Fingerprint the training cases of ``cfg`` (the composed ``conf/plan.yaml``), plan, write the preset and
    the fingerprint; returns the plan and the preset's path."""
    check_required(cfg, {"data.root": DATA_HELP.get(cfg.data.get("layout"), ""), "plan.output": "e.g. plan.output=plans/experiment/my_task.yaml"})
    output = preset_path(cfg.plan.output)
    datamodule = instantiate(cfg.data, split_path=None)
    if datamodule.synthetic:
        datamodule.prepare_data()  # generate the demo data first
    datamodule.setup("fit")
    records = datamodule.train_cases
    fingerprint_path = output.parent / "fingerprint.json"
    previous, previous_samples = read_fingerprint(fingerprint_path)
    fingerprint, samples = dataset_fingerprint(records, datamodule.label_spec, previous, previous_samples, int(cfg.plan.workers), int(cfg.plan.samples_per_case))
    output.parent.mkdir(parents=True, exist_ok=True)
    write_fingerprint(fingerprint_path, fingerprint, samples)

    profile = device_profile(cfg.plan)
    options = plan_options(cfg.plan, profile)
    in_channels, out_channels = fingerprint["dataset"]["channels"], datamodule.label_spec.num_outputs
    if options.precision not in cfg.plan.activation_bytes or options.precision not in cfg.plan.overhead_mb:
        raise ConfigError(f"plan.precision={options.precision!r} has no memory model: add it to plan.activation_bytes and plan.overhead_mb")
    bytes_per_activation, overhead = float(cfg.plan.activation_bytes[options.precision]), float(cfg.plan.overhead_mb[options.precision]) * 2**20

    def estimate(topology: Any, batch: int) -> float:
        activations, parameters = dynunet_activation_elements(topology, in_channels, out_channels, batch, base_features=options.base_features, max_features=options.max_features, deep_supervision=topology.num_stages > 2)
        return training_step_bytes(activations, parameters, bytes_per_activation, float(cfg.plan.parameter_bytes), overhead)

    def step_seconds(arguments: dict[str, Any], patch: list[int], batch: int) -> float:
        log.info("Timing a training step of the planned network (patch %s, batch %d) on %s", patch, batch, profile["name"])
        return measure_training_step(arguments, patch, batch, profile["device"], options.precision, options.channels_last)[0]

    result = plan_from_fingerprint(
        fingerprint, options, in_channels, out_channels, estimate, step_seconds, train_cases=len(records),
        samples_per_volume=1, flip_axes=list(cfg.data.get("augment", {}).get("flip_axes", (0, 1, 2))),
        declared_modality=declared_modality(cfg), device_name=profile["name"],
    )
    name = output.stem
    header = [
        f"Planned by python -m medseg.plan from {len(records)} training cases of {cfg.data.root} (fingerprint.json beside this file), for {profile['name']}.",
        f"Train: python -m medseg.train hydra.searchpath=[file://{output.parent.parent.resolve()}] +experiment={name} data.root={cfg.data.root}",
    ]
    text = render_preset(result, name, header, data_group, carried_choices(cfg, list(cfg.plan.carry), source))
    write_text_atomic(output, text)
    return result, output


@hydra.main(version_base="1.3", config_path="../conf", config_name="plan")
def main(cfg: DictConfig) -> None:
    choices = HydraConfig.get().runtime.choices
    experiment = choices.get("experiment")
    try:
        result, output = plan(cfg, data_group=choices.get("data", "brats"), source=f"+experiment={experiment}" if experiment else "the command line")
    except (DatasetError, ConfigError, ValueError) as err:  # one readable message, no traceback
        log.error("%s", err)
        sys.exit(1)
    for choice in result.choices:
        log.info("  %-36s %-28s %s", choice.key, OmegaConf.to_yaml({"v": choice.value}).strip()[3:], choice.why)
    print(f"Preset: {output}\nFingerprint: {output.parent / 'fingerprint.json'}\nTrain with:\n  python -m medseg.train hydra.searchpath=[file://{output.parent.parent.resolve()}] +experiment={output.stem} data.root={cfg.data.root}")


register_resolvers()

if __name__ == "__main__":
    main()
