"""Pick the mask-apply implementation for a device: Triton on CUDA, the CPU path otherwise."""

from __future__ import annotations

from collections.abc import Callable

import torch

from service.kernels.reference import apply_masks_reference

MaskApply = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]


def select_mask_apply(device: torch.device, preference: str = "auto") -> tuple[str, MaskApply]:
    """(name, fn) where fn(weights, nonzero, negative_or_None, out) writes the masked weights into `out`."""
    if preference in ("auto", "torch"):
        return "torch", apply_masks_reference
    raise ValueError(f"unknown mask kernel {preference!r}")
