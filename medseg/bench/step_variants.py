"""Training-step throughput of the speed options: images/s of one network under float32, bf16 mixed precision,
``channels_last_3d`` and ``torch.compile``, side by side in one run.

Networks: the BraTS U-Net (``+experiment=brats``) and the DynUNet ``medseg.plan`` derives for a 1 mm isotropic
patch of the tier's size (4 channels in, 3 out, 32 base features, nnU-Net's topology). Each step is what
``SegmentationModule.training_step`` does with the network (forward under autocast, focal + Dice, backward,
SGD with Nesterov momentum, ``zero_grad``), on one batch already on the device. Sizes: 2x4x128^3 on a GPU
(the anchor of NVIDIA's nnU-Net for PyTorch, DynUNet with AMP: 27.5 images/s on one A100 80GB at batch 2),
2x4x48^3 on a CPU, 1x4x32^3 quick. ``torch.compile`` runs on a GPU only (minutes of compiling on a CPU, where
the inductor backend also needs a C++ compiler). Figures: each variant's step time / the float32 step
(below 1: faster), and each variant's images/s as a value.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from medseg.bench.report import BenchResult, Contender, Figure
from medseg.bench.timing import peak_memory, time_alternating
from medseg.bench.workload import BenchOptions, compose_config, patch_override
from medseg.build import build_model
from medseg.losses import FocalDiceLoss

NAME = "step_variants"
SIZES = {"quick": (1, 32), "cpu": (2, 48), "gpu": (2, 128)}  # (batch, cubic patch)
REPEATS = {"quick": 2, "cpu": 5, "gpu": 20}
WARMUP = {"quick": 1, "cpu": 2, "gpu": 5}  # cuDNN's algorithm search, compilation, allocator growth


@dataclass(frozen=True)
class Variant:
    """One way to run the step."""

    name: str
    precision: str  # a Lightning precision: 32-true, bf16-mixed, 16-mixed
    channels_last: bool = False
    compile: bool = False


VARIANTS = (
    Variant("float32", "32-true"),
    Variant("float32 + channels_last_3d", "32-true", channels_last=True),
    Variant("bf16-mixed", "bf16-mixed"),
    Variant("bf16-mixed + channels_last_3d", "bf16-mixed", channels_last=True),
    Variant("bf16-mixed + torch.compile", "bf16-mixed", compile=True),
)


def networks(options: BenchOptions, patch: int) -> dict[str, nn.Module]:
    """The BraTS U-Net of the preset and the planned DynUNet for a ``patch``^3 patch at 1 mm."""
    from medseg.planning.memory import build_dynunet, dynunet_arguments
    from medseg.planning.rules import network_topology

    unet = build_model(compose_config("brats", options, [patch_override(patch)])).net
    topology = network_topology([1.0, 1.0, 1.0], [patch] * 3)
    return {"BraTS U-Net": unet, "planned DynUNet": build_dynunet(dynunet_arguments(topology, 4, 3, base_features=32))}


def training_step(net: nn.Module, variant: Variant, batch: int, patch: int, device: torch.device) -> Callable[[], None]:
    """One training step of ``net`` (a private copy) as ``variant`` runs it, on a fixed random batch."""
    memory_format = torch.channels_last_3d if variant.channels_last else torch.contiguous_format
    net = copy.deepcopy(net).to(device).to(memory_format=memory_format).train()
    run = torch.compile(net) if variant.compile else net
    loss_fn = FocalDiceLoss("sigmoid")
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(batch, 4, patch, patch, patch, generator=generator).to(device).contiguous(memory_format=memory_format)
    target = (torch.rand(batch, 3, patch, patch, patch, generator=generator) > 0.9).float().to(device)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(variant.precision)
    scaler = torch.amp.GradScaler(device.type) if variant.precision == "16-mixed" else None

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = run(image)
            logits = logits[:, 0] if logits.dim() == 6 else logits  # deep supervision heads: the full-size one
        loss = loss_fn(logits.float(), target)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

    return step


def run(options: BenchOptions) -> BenchResult:
    """Every variant of every network, alternating step by step."""
    batch, patch = SIZES[options.tier]
    repeats, warmup = options.repeats_or(REPEATS[options.tier]), WARMUP[options.tier]
    variants = [v for v in VARIANTS if not v.compile or options.device.type == "cuda"]
    figures, details = [], []
    for net_name, net in networks(options, patch).items():
        steps = {v.name: training_step(net, v, batch, patch, options.device) for v in variants}
        times = time_alternating(steps, options.device, repeats, warmup=warmup)
        peaks = {name: peak_memory(fn, options.device) for name, fn in steps.items()}
        contenders = {name: Contender.from_timing(f"{net_name}, {name}", times[name], peaks[name]) for name in steps}
        shape = f"{batch}x4x{patch}^3"
        for v in variants[1:]:
            figures.append(Figure.compare(NAME, f"{net_name} step, {v.name} vs float32, {shape}", contenders[v.name], contenders["float32"], None, "below 1: faster"))
        for v in variants:
            images_per_s = batch / times[v.name].median_s
            a = Contender(f"{net_name}, {v.name}", images_per_s, "images/s")
            figures.append(Figure(NAME, f"{net_name} images/s, {v.name}, {shape}", images_per_s, a, kind="value",
                                  note="anchor: 27.5 images/s, DynUNet AMP on one A100 80GB at batch 2, 128^3" if options.device.type == "cuda" and "DynUNet" in net_name else ""))
            details.append({"network": net_name, "variant": v.name, "precision": v.precision, "channels_last": v.channels_last, "compile": v.compile,
                            "step_median_s": times[v.name].median_s, "images_per_s": images_per_s, "peak_bytes": peaks[v.name]})
    return BenchResult(figures, settings={"batch": batch, "patch": patch, "repeats": repeats, "warmup": warmup, "variants": [v.name for v in variants]}, details={"steps": details})
