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

import torch
from torch import nn

from medseg.planning.rules import Topology


def features_per_stage(num_stages: int, base: int = 32, maximum: int = 320) -> list[int]:
    """``base * 2**s`` features at stage ``s``, capped at ``maximum`` (nnU-Net's 32 ... 320)."""
    if num_stages < 1 or base < 1 or maximum < base:
        raise ValueError(f"expected num_stages >= 1 and 1 <= base <= maximum, got {num_stages}, {base}, {maximum}")
    return [min(base * 2**s, maximum) for s in range(num_stages)]


def dynunet_arguments(topology: Topology, in_channels: int, out_channels: int, base_features: int = 32, max_features: int = 320, deep_supervision: bool = False) -> dict[str, Any]:
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
        "res_block": True,
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
