"""What a planned network is, and how many activations one training step of it keeps.

:func:`dynunet_arguments` turns a :class:`medseg.planning.rules.Topology` into the arguments of
``monai.networks.nets.DynUNet`` (``model=dynunet``), with nnU-Net's features per stage (32 doubling per stage,
at most 320). :func:`activation_elements` counts the elements of every layer output in one forward pass of the
network as built, on PyTorch's meta device (no memory, no arithmetic): the figure a training step's memory
grows with, since autograd keeps those outputs for the backward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.planning.rules import Topology


def features_per_stage(num_stages: int, base: int = 32, maximum: int = 320) -> list[int]:
    """``base * 2**s`` features at stage ``s``, capped at ``maximum`` (nnU-Net's 32 ... 320)."""
    if num_stages < 1 or base < 1 or maximum < base:
        raise ValueError(f"expected num_stages >= 1 and 1 <= base <= maximum, got {num_stages}, {base}, {maximum}")
    return [min(base * 2**s, maximum) for s in range(num_stages)]


def dynunet_arguments(topology: Topology, in_channels: int, out_channels: int, base_features: int = 32, max_features: int = 320, deep_supervision: bool = False, res_block: bool = False) -> dict[str, Any]:
    """Keyword arguments of ``monai.networks.nets.DynUNet`` for ``topology`` (the ``model.net`` node)."""
    deep_supr_num = max(1, min(2, topology.num_stages - 2))  # DynUNet needs deep_supr_num < number of up-samplings
    return {
        "spatial_dims": 3,
        "in_channels": int(in_channels),
        "out_channels": int(out_channels),
        "kernel_size": [list(k) for k in topology.kernel_sizes],
        "strides": [list(s) for s in topology.strides],
        "upsample_kernel_size": [list(s) for s in topology.strides[1:]],
        "filters": features_per_stage(topology.num_stages, base_features, max_features),
        "norm_name": "INSTANCE",
        "res_block": bool(res_block),  # nnU-Net's default: plain convolution blocks
        "deep_supervision": bool(deep_supervision),
        "deep_supr_num": deep_supr_num,
    }


def build_dynunet(arguments: dict[str, Any]) -> nn.Module:
    from monai.networks.nets import DynUNet

    return DynUNet(**arguments)


def activation_elements(net: nn.Module, input_shape: Sequence[int]) -> int:
    """Elements of every leaf module's output in one training-mode forward pass on ``input_shape``
    ``(B, C, H, W, D)``; ``net`` may live on the meta device (then nothing is allocated or computed)."""
    device = next(net.parameters()).device
    total = 0

    def count(_module: nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal total
        for tensor in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel()

    leaves = [m for m in net.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        was_training = net.training
        net.train()
        with torch.no_grad():
            net(torch.empty(tuple(int(s) for s in input_shape), device=device))
        net.train(was_training)
    finally:
        for hook in hooks:
            hook.remove()
    return total


def dynunet_activation_elements(topology: Topology, in_channels: int, out_channels: int, batch_size: int, **arguments: Any) -> tuple[int, int]:
    """``(activation elements, parameters)`` of the DynUNet of ``topology`` for one batch of its patch, counted
    on the meta device."""
    with torch.device("meta"):
        net = build_dynunet(dynunet_arguments(topology, in_channels, out_channels, **arguments))
    parameters = sum(p.numel() for p in net.parameters())
    return activation_elements(net, (batch_size, in_channels, *topology.patch_size)), parameters


def training_step_bytes(activations: int, parameters: int, activation_bytes: float, parameter_bytes: float, overhead_bytes: float = 0.0) -> float:
    """The memory model of one training step over the built network: ``activation_bytes`` per activation
    element kept for the backward pass (fewer in bf16/fp16 autocast; fitted to :func:`measure_training_step`),
    ``parameter_bytes`` per parameter (gradient and optimizer state) and a fixed ``overhead_bytes``."""
    return float(activations) * activation_bytes + float(parameters) * parameter_bytes + float(overhead_bytes)


def _reset_peak_rss() -> None:
    """Start the process's peak resident memory afresh (Linux: ``5`` to ``/proc/self/clear_refs``), if allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass


def _peak_rss_bytes() -> float:
    """The peak resident memory of this process's own address space (``VmHWM``).

    Not ``getrusage``'s ``ru_maxrss``: Linux carries that over ``exec``, so a process started by a large one
    (a long pytest run) reports its parent's peak as its own.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) * 1024.0  # kB
    except OSError:
        pass
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024.0  # kilobytes on Linux


def _current_rss_bytes() -> float:
    import os

    with open("/proc/self/statm") as statm:
        return float(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_training_step(
    arguments: dict[str, Any],
    patch_size: Sequence[int],
    batch_size: int,
    device: str = "cpu",
    precision: str = "32-true",
    channels_last: bool = True,
    steps: int = 5,
    warmup: int = 3,  # oneDNN and the allocator settle over the first steps
) -> tuple[float, float]:
    """``(seconds per step, bytes)`` of training steps of the DynUNet of ``arguments`` (forward, Dice + CE
    over its outputs, backward, SGD with momentum) on random batches ``(B, C_in, *patch_size)``.

    The bytes are what the steps add to the built network: CUDA's peak allocation on a GPU; on a CPU the
    process's peak resident memory above its resident memory before the first step (meaningful in a fresh
    process, whose earlier peak cannot hide the step's).
    """
    import time

    net = build_dynunet(arguments).to(device)
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    net = net.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    image = torch.randn(batch_size, arguments["in_channels"], *patch_size, device=device).contiguous(memory_format=memory_format)
    target = torch.randint(0, arguments["out_channels"], (batch_size, 1, *patch_size), device=device).float()
    from medseg.losses import DiceCELoss

    loss_fn = DiceCELoss("softmax")
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    device_type = torch.device(device).type
    cuda = device_type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = float(torch.cuda.memory_allocated(device))
    else:
        before = _current_rss_bytes()
        _reset_peak_rss()
    seconds = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
            outputs = net(image)
        outputs = outputs.unbind(1) if outputs.dim() == 6 else (outputs,)  # deep supervision: (B, S, C, ...)
        loss = sum(loss_fn(o, target) for o in outputs)
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize(device)
        if step >= warmup:
            seconds.append(time.perf_counter() - start)
    peak = float(torch.cuda.max_memory_allocated(device)) if cuda else _peak_rss_bytes()
    return float(np.median(seconds)), max(0.0, peak - before)
