"""From a fingerprint to a training preset: every planned choice with the figure it came from.

:func:`plan_from_fingerprint` applies the rules of :mod:`medseg.planning.rules` to the figures of
:mod:`medseg.planning.fingerprint` and returns a :class:`Plan`: a list of :class:`Choice` (config key, value,
one line on why), rendered by :func:`render_preset` as an ``+experiment=`` preset with one comment per choice.

The plan targets a device: its memory budget sizes patch and batch (:mod:`medseg.planning.memory`), and, when
a training time is given, the measured time of one training step of the planned network sizes the schedule.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medseg.planning.rules import Topology, fit_patch_to_budget, target_spacing


@dataclass(frozen=True)
class Choice:
    """One planned config value: ``key`` (dotted, e.g. ``data.patch_size``), ``value`` and ``why``."""

    key: str
    value: Any
    why: str


@dataclass
class Plan:
    """The planned choices, the group overrides of the preset's defaults list, and the figures behind them."""

    choices: list[Choice] = field(default_factory=list)
    groups: dict[str, str] = field(default_factory=dict)  # config group -> option, e.g. {"model": "dynunet"}
    figures: dict[str, Any] = field(default_factory=dict)

    def add(self, key: str, value: Any, why: str) -> None:
        self.choices.append(Choice(key, value, why))

    def value(self, key: str) -> Any:
        """The planned value of ``key`` (``KeyError`` if not planned)."""
        for choice in self.choices:
            if choice.key == key:
                return choice.value
        raise KeyError(key)

    def overrides(self) -> list[str]:
        """The plan as command-line overrides (``key=value``), e.g. to compose it in tests."""
        return [f"{c.key}={json.dumps(c.value)}" for c in self.choices]


@dataclass(frozen=True)
class PlanOptions:
    """What the planner may spend and the thresholds of its rules (the ``plan`` config node).

    Attributes:
        memory_bytes: the memory one training step may use.
        base_features, max_features: features of the first stage (doubling per stage) and their cap.
        min_feature_map_size: down-sample an axis while its feature map stays at least this large.
        max_pools: at most this many down-samplings per axis.
        anisotropy_threshold: the factor of :func:`medseg.planning.rules.target_spacing`.
        min_batch_size: the patch shrinks until this batch fits.
        max_batch_fraction: a batch holds at most this fraction of the dataset's voxels (nnU-Net: 5%).
        max_batch_size: a cap on the batch size (``None``: none).
        foreground_fraction: patches centred on foreground (nnU-Net oversamples 1/3) ...
        rare_foreground_fraction: ... and this many when the foreground is rarer than ``rare_foreground``.
        rare_foreground: mean foreground voxel fraction below which foreground is rare.
        lesion_components_per_case: a region with at least this median number of connected components per case
            is lesion-like: lesion metrics with size buckets from its component sizes; else they are off.
        ct_min_intensity: a dataset is CT when the median 0.5 percentile of its non-zero voxels is below this.
        modality: ``"auto"`` (``dataset.json``'s modality, else the intensity rule), ``"ct"`` or ``"mri"``.
        precision, channels_last: the Trainer precision and memory order the plan trains with.
        train_minutes: the training time to size the schedule to, from a measured step time; ``None`` for
            ``total_steps``.
        total_steps: training steps when ``train_minutes`` is ``None`` (nnU-Net: 1000 epochs x 250 steps).
        time_margin: fraction of ``train_minutes`` left for validation, data loading and evaluation.
        validations: how many times validation runs during training.
        augment: the probabilities of the spatial and intensity augmentation (``data.augment.<key>``).
    """

    memory_bytes: float
    base_features: int = 32
    max_features: int = 320
    min_feature_map_size: int = 4
    max_pools: int = 5
    anisotropy_threshold: float = 3.0
    min_batch_size: int = 2
    max_batch_fraction: float = 0.05
    max_batch_size: int | None = None
    foreground_fraction: float = 0.33
    rare_foreground_fraction: float = 0.5
    rare_foreground: float = 0.01
    lesion_components_per_case: float = 3.0
    ct_min_intensity: float = -500.0
    modality: str = "auto"
    precision: str = "32-true"
    channels_last: bool = False
    train_minutes: float | None = None
    total_steps: int = 250_000
    time_margin: float = 0.15
    validations: int = 10
    augment: Mapping[str, float] = field(default_factory=lambda: {"rotate_prob": 0.2, "zoom_prob": 0.2, "gamma_prob": 0.3, "noise_prob": 0.1, "blur_prob": 0.2})


EstimateBytes = Callable[[Topology, int], float]
StepSeconds = Callable[[Mapping[str, Any], Sequence[int], int], float]


def resampled_shapes(rows: Sequence[Mapping[str, Any]], spacing: Sequence[float]) -> np.ndarray:
    """Each case's shape ``(N, 3)`` after resampling to ``spacing`` mm."""
    shapes = np.array([r["shape"] for r in rows], dtype=np.float64)
    spacings = np.array([r["spacing"] for r in rows], dtype=np.float64)
    return np.round(shapes * spacings / np.asarray(spacing, dtype=np.float64))


def is_ct(fingerprint: Mapping[str, Any], options: PlanOptions, declared: str | None = None) -> tuple[bool, str]:
    """Whether the dataset is CT, and why: the option, the declared modality (``dataset.json``), or the
    intensities (CT's air is about -1000 HU; MRI has no negative unit)."""
    if options.modality in ("ct", "mri"):
        return options.modality == "ct", f"plan.modality={options.modality}"
    if declared:
        return declared.strip().upper() == "CT", f"dataset.json modality {declared!r}"
    lows = [r["intensity"][0]["nonzero"]["p0.5"] for r in fingerprint["cases"]]
    lows = [v for v in lows if v is not None]
    if not lows:
        return False, "every image is all zeros"
    low = float(np.median(lows))
    verdict = low < options.ct_min_intensity
    return verdict, f"median 0.5 percentile of non-zero voxels {low:.0f} {'<' if verdict else '>='} {options.ct_min_intensity:.0f}"


def _round_sig(value: float, digits: int = 2) -> float:
    if value <= 0:
        return 0.0
    return float(round(value, -int(math.floor(math.log10(value))) + digits - 1))


def _fmt(values: Sequence[float], digits: int = 3) -> str:
    return "x".join(f"{float(v):.{digits}g}" for v in values)


def plan_from_fingerprint(
    fingerprint: Mapping[str, Any],
    options: PlanOptions,
    in_channels: int,
    out_channels: int,
    estimate_bytes: EstimateBytes,
    step_seconds: StepSeconds | None = None,
    train_cases: int | None = None,
    samples_per_volume: int = 1,
    flip_axes: Sequence[int] = (0, 1, 2),
    declared_modality: str | None = None,
    device_name: str = "cpu",
) -> Plan:
    """Plan a training preset for the dataset of ``fingerprint`` (see the module docstring).

    Args:
        estimate_bytes: ``(topology, batch) -> bytes`` of one training step (with the planned widths).
        step_seconds: ``(net arguments, patch, batch) -> seconds`` of one measured training step; needed when
            ``options.train_minutes`` is set.
        train_cases: the cases trained on (the split's training part); default all fingerprinted cases.
        flip_axes: the training flips (``data.augment.flip_axes``), mirrored again at test time.
        declared_modality: the dataset's own statement (``dataset.json`` ``modality`` of channel 0), if any.
    """
    from medseg.planning.memory import dynunet_arguments

    rows = fingerprint["cases"]
    dataset = fingerprint["dataset"]
    plan = Plan(groups={"model": "dynunet", "loss": "deep_supervision_dice_ce", "optimizer": "sgd", "scheduler": "poly"})
    n = len(rows)
    train_cases = int(train_cases or n)

    # Spacing.
    spacings = np.array([r["spacing"] for r in rows], dtype=np.float64)
    shapes = np.array([r["shape"] for r in rows], dtype=np.float64)
    spacing = target_spacing(spacings, shapes, options.anisotropy_threshold)
    median = np.median(spacings, axis=0)
    lowres = [a for a in range(3) if not math.isclose(spacing[a], median[a], rel_tol=1e-6)]
    why = f"median spacing of {n} cases {_fmt(median)} mm"
    if lowres:
        why += f"; axis {lowres[0]} is >{options.anisotropy_threshold:g}x coarser with few slices: its 10th percentile {spacing[lowres[0]]:.3g} mm (anisotropy rule)"
    spacing = [round(float(s), 4) for s in spacing]
    plan.add("data.spacing", spacing, why)
    target_shapes = resampled_shapes(rows, spacing)
    median_shape = np.median(target_shapes, axis=0)
    plan.figures.update(target_spacing=spacing, median_resampled_shape=median_shape.tolist())

    # Intensity.
    ct, reason = is_ct(fingerprint, options, declared_modality)
    if ct:
        stats = dataset["foreground_intensity"][0]
        if stats["mean"] is None:
            raise ValueError("CT normalisation needs foreground voxels, but no training case has any label > 0")
        window = [round(stats["p0.5"], 1), round(stats["p99.5"], 1)]
        plan.add("data.intensity", "ct", f"CT ({reason}): clip and z-score with the dataset's foreground statistics")
        plan.add("data.ct_window", window, "the 0.5 / 99.5 percentiles of all cases' foreground voxels (HU)")
        plan.add("data.ct_zscore", [round(stats["mean"], 2), round(max(stats["std"], 1e-3), 2)], "mean and std of all cases' foreground voxels (HU), applied after clipping")
    else:
        plan.add("data.intensity", "mri", f"MRI ({reason}): per-case z-score over the non-zero region, as intensities have no unit")

    # Patch, batch and network.
    budget = fit_patch_to_budget(spacing, median_shape, estimate_bytes, options.memory_bytes, options.min_batch_size, None, options.min_feature_map_size, options.max_pools)
    batch, estimated, max_batch = budget.batch_size, budget.estimated_bytes, None
    if options.max_batch_fraction:
        # nnU-Net's cap: a batch sees at most this fraction of all training voxels (else it over-fits early).
        training_voxels = float(np.prod(target_shapes, axis=1).sum() * train_cases / n)
        max_batch = max(options.min_batch_size, int(options.max_batch_fraction * training_voxels / np.prod(budget.topology.patch_size)))
        if batch > max_batch:
            batch, estimated = max_batch, float(estimate_bytes(budget.topology, max_batch))
    capped = bool(options.max_batch_size and batch > options.max_batch_size)
    if capped:
        batch, estimated = int(options.max_batch_size), float(estimate_bytes(budget.topology, int(options.max_batch_size)))
    topology = budget.topology
    patch = [int(p) for p in topology.patch_size]
    plan.figures.update(estimated_step_bytes=estimated, memory_budget_bytes=options.memory_bytes, max_batch_by_dataset=max_batch)
    plan.add("data.patch_size", patch, f"median resampled case {_fmt(median_shape, 4)} voxels, fitted to the {options.memory_bytes / 2**30:.1f} GiB budget, divisible by {_fmt(topology.divisible_by)}")
    batch_why = f"what the budget holds at this patch (step estimated at {estimated / 2**30:.2f} GiB)"
    if capped:
        batch_why = f"plan.max_batch_size (the budget holds {budget.batch_size}; step estimated at {estimated / 2**30:.2f} GiB)"
    elif max_batch is not None and batch == max_batch and batch < budget.batch_size:
        batch_why = f"a batch holds at most {options.max_batch_fraction:.0%} of the training voxels (step estimated at {estimated / 2**30:.2f} GiB)"
    plan.add("data.batch_size", batch, batch_why)
    plan.add("data.samples_per_volume", samples_per_volume, "one patch per loaded case per batch slot")
    arguments = dynunet_arguments(topology, in_channels, out_channels, options.base_features, options.max_features, deep_supervision=topology.num_stages > 2)
    shapes_at_stages = topology.feature_map_shapes()
    plan.add("model.net.kernel_size", arguments["kernel_size"], "3 per axis; 1 along an axis more than 2x coarser than the finest (nnU-Net)")
    plan.add("model.net.strides", arguments["strides"], f"down-sample an axis while it is within 2x of the finest spacing and its map stays >= {options.min_feature_map_size}: bottleneck {_fmt(shapes_at_stages[-1])}")
    plan.add("model.net.upsample_kernel_size", arguments["upsample_kernel_size"], "the strides, undone")
    plan.add("model.net.filters", arguments["filters"], f"{options.base_features} features doubling per stage, at most {options.max_features}")
    plan.add("model.net.res_block", False, "plain convolution blocks, as nnU-Net's default")
    plan.add("model.net.deep_supervision", arguments["deep_supervision"], "loss at the lower-resolution outputs too (nnU-Net)")
    plan.add("model.net.deep_supr_num", arguments["deep_supr_num"], "outputs supervised below full resolution")
    plan.add("model.channels_last", options.channels_last, "plan.channels_last (the step_variants benchmark: no faster with InstanceNorm on a CPU)")
    plan.add("model.tta_flip_axes", [int(a) for a in flip_axes], "mirroring test-time augmentation over the training flips (data.augment.flip_axes)")
    plan.add("trainer.precision", options.precision, f"what {device_name} trains fastest with")

    # Sampling and lesion metrics.
    foreground = float(np.mean([r["foreground_fraction"] for r in rows]))
    rare = foreground < options.rare_foreground
    plan.add("data.augment.foreground_fraction", options.rare_foreground_fraction if rare else options.foreground_fraction,
             f"foreground is {foreground:.2%} of the voxels: " + ("rare, so half the patches are centred on it" if rare else "a third of the patches centred on it (nnU-Net)"))
    for key, probability in options.augment.items():
        plan.add(f"data.augment.{key}", float(probability), "nnU-Net's augmentation against over-fitting (plan.augment)")
    coarse = int(np.argmax(spacing))
    if spacing[coarse] > options.anisotropy_threshold * min(spacing):
        plan.add("data.augment.rotate_axes", [coarse], f"thick slices (axis {coarse}): rotate in-plane only, as nnU-Net")
    lesion_regions = {name: r for name, r in dataset["regions"].items() if r["components_per_case_median"] >= options.lesion_components_per_case and r["component_mm3_percentiles"]}
    if lesion_regions:
        name, region = max(lesion_regions.items(), key=lambda item: item[1]["components_per_case_median"])
        sizes = region["component_mm3_percentiles"]
        edges = sorted({_round_sig(sizes["25"]), _round_sig(sizes["75"])})
        if len(edges) == 1:
            edges = [edges[0], _round_sig(edges[0] * 10)]
        plan.add("model.lesion_metrics.size_buckets_mm3", edges,
                 f"{name}: median {region['components_per_case_median']:g} components per case; edges at the 25th / 75th percentile of their sizes (median {sizes['50']:.3g} mm^3)")
        plan.add("model.lesion_metrics.bucket_names", ["small", "medium", "large"], "one name per size bucket")
    else:
        most = max(r["components_per_case_median"] for r in dataset["regions"].values()) if dataset["regions"] else 0
        plan.add("model.lesion_metrics", None, f"at most {most:g} connected components per case and region: structures, not lesions")

    # Schedule.
    steps_per_epoch = max(1, math.ceil(train_cases * samples_per_volume / batch))
    if options.train_minutes:
        if step_seconds is None:
            raise ValueError("plan.train_minutes needs a measured step time")
        seconds = float(step_seconds(arguments, patch, batch))
        steps = options.train_minutes * 60.0 * (1.0 - options.time_margin) / seconds
        epochs = max(1, int(steps // steps_per_epoch))
        plan.figures.update(step_seconds=seconds)
        epochs_why = f"{options.train_minutes:g} min less {options.time_margin:.0%}, at a measured {seconds:.3f} s per step on {device_name}, {steps_per_epoch} steps per epoch"
    else:
        epochs = max(1, int(round(options.total_steps / steps_per_epoch)))
        epochs_why = f"{options.total_steps} steps (nnU-Net's 1000 epochs x 250), {steps_per_epoch} steps per epoch"
    plan.add("trainer.max_epochs", epochs, epochs_why)
    plan.add("trainer.check_val_every_n_epoch", max(1, epochs // max(1, options.validations)), f"validate about {options.validations} times")
    plan.figures.update(steps_per_epoch=steps_per_epoch, total_steps=epochs * steps_per_epoch)
    return plan


def _yaml_value(value: Any) -> str:
    return "null" if value is None else json.dumps(value)


def render_preset(plan: Plan, name: str, header: Sequence[str], data_group: str, carried: Sequence[Choice] = ()) -> str:
    """The ``+experiment=<name>`` preset text: the defaults list, then every choice as ``key: value`` under
    its parents, each preceded by its one-line reason; ``carried`` choices (the task's labels, layout, ...)
    come first, unchanged from the composed config."""
    lines = ["# @package _global_", *(f"# {h}" for h in header), "defaults:", f"  - override /data: {data_group}"]
    lines += [f"  - override /{group}: {option}" for group, option in plan.groups.items()]
    lines += ["", f"task_name: {name}"]
    tree: dict[str, Any] = {}
    for choice in [*carried, *plan.choices]:
        node = tree
        parts = choice.key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = choice

    def emit(node: Mapping[str, Any], indent: int) -> None:
        for key, item in node.items():
            pad = "  " * indent
            if isinstance(item, Choice):
                lines.append(f"{pad}# {item.why}")
                lines.append(f"{pad}{key}: {_yaml_value(item.value)}")
            else:
                lines.append(f"{pad}{key}:")
                emit(item, indent + 1)

    emit(tree, 0)
    return "\n".join(lines) + "\n"
