"""Pick the mask-apply implementation for a device: Triton on CUDA, the CPU path otherwise."""

from __future__ import annotations

from collections.abc import Callable

import torch

from service.kernels.cpu_mask import apply_masks_cpu
from service.kernels.reference import apply_masks_reference
from service.kernels.triton_mask import apply_masks_triton, triton

MaskApply = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]
KERNELS: dict[str, MaskApply] = {"torch": apply_masks_reference, "cpu": apply_masks_cpu, "triton": apply_masks_triton}


def select_mask_apply(device: torch.device, preference: str = "auto") -> tuple[str, MaskApply]:
    """(name, fn) where fn(weights, nonzero, negative_or_None, out) writes the masked weights into `out`."""
    if preference == "auto":
        preference = "triton" if device.type == "cuda" and triton is not None else "cpu"
    if preference not in KERNELS:
        raise ValueError(f"unknown mask kernel {preference!r}; choose from {sorted(KERNELS)}")
    if preference == "cpu" and device.type != "cpu":
        raise ValueError("the cpu mask kernel needs PIGGYBACK_DEVICE=cpu")
    if preference == "triton" and device.type != "cuda":
        raise ValueError("the triton mask kernel needs a CUDA device")
    return preference, KERNELS[preference]
