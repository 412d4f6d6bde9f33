"""Piggyback's scored layers: a real-valued score per weight, thresholded in the forward pass.

One wrapper class per layer kind holds the original `base_layer` untouched (its weight and bias are
frozen and never written); `wrap_maskable` is the single dispatch that picks the wrapper by type.
The gradient reaches the scores through a straight-through estimator: d(mask)/d(score) := 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mask_store import maskable_layers


class BinarizeSTE(torch.autograd.Function):
    """mask = 1[score > threshold]; backward passes the gradient to the scores unchanged."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, threshold: float) -> torch.Tensor:
        return (scores > threshold).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_output, None


class TernarizeSTE(torch.autograd.Function):
    """mask = +1 where score > threshold, -1 where score < 0, else 0 (the reference code's ternarizer)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, threshold: float) -> torch.Tensor:
        return (scores > threshold).to(scores.dtype) - (scores < 0).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_output, None


@dataclass(frozen=True)
class MaskConfig:
    kind: Literal["binary", "ternary"] = "binary"
    threshold: float = 5e-3  # paper: scores start at 1e-2, so every weight starts kept
    init: Literal["constant", "uniform"] = "constant"
    init_scale: float = 1e-2  # constant value, or half-width of the uniform init


class MaskedLayer(nn.Module):
    """Base for the wrappers: owns the scores, never changes `base_layer`."""

    def __init__(self, base_layer: nn.Module, config: MaskConfig):
        super().__init__()
        self.base_layer = base_layer
        self.config = config
        for param in base_layer.parameters():
            param.requires_grad_(False)
        scores = torch.empty_like(base_layer.weight, dtype=torch.float32)
        if config.init == "uniform":
            scores.uniform_(-config.init_scale, config.init_scale)
        else:
            scores.fill_(config.init_scale)
        self.scores = nn.Parameter(scores)

    def mask(self) -> torch.Tensor:
        """The thresholded mask, differentiable w.r.t. the scores through the STE."""
        quantize = TernarizeSTE if self.config.kind == "ternary" else BinarizeSTE
        return quantize.apply(self.scores, self.config.threshold)

    def masked_weight(self) -> torch.Tensor:
        return self.base_layer.weight * self.mask().to(self.base_layer.weight.dtype)


class MaskedConv2d(MaskedLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer._conv_forward(x, self.masked_weight(), self.base_layer.bias)


class MaskedLinear(MaskedLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight(), self.base_layer.bias)


WRAPPERS: dict[type[nn.Module], type[MaskedLayer]] = {nn.Conv2d: MaskedConv2d, nn.Linear: MaskedLinear}


def wrap_maskable(module: nn.Module, config: MaskConfig) -> MaskedLayer:
    """Pick the wrapper for a layer by its type (subclasses such as NonDynamicallyQuantizableLinear too)."""
    for kind, wrapper in WRAPPERS.items():
        if isinstance(module, kind):
            return wrapper(module, config)
    raise TypeError(f"no mask wrapper for {type(module).__name__}")


def apply_masking(model: nn.Module, config: MaskConfig, skip: frozenset[str] = frozenset()) -> list[str]:
    """Wrap every maskable layer of `model` in place (except `skip`); returns the wrapped names."""
    wrapped = []
    for name, module in maskable_layers(model):
        if name not in skip:
            model.set_submodule(name, wrap_maskable(module, config))
            wrapped.append(name)
    return wrapped


@torch.no_grad()
def learned_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The final thresholded masks by layer name (the name the layer had before wrapping)."""
    return {
        name: module.mask().detach().cpu() for name, module in model.named_modules() if isinstance(module, MaskedLayer)
    }
