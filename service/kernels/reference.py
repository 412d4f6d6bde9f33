"""The plain-torch definition of mask application, and the naive per-layer baseline benchmarks compare to.

Semantics, as a loop over the flat index i of all masked weights (little-endian bit order):

    keep = (nonzero[i // 8] >> (i % 8)) & 1
    neg  = (negative[i // 8] >> (i % 8)) & 1      # ternary only
    out[i] = (-w[i] if neg else w[i]) if keep else +0.0

Masked-out weights become +0.0 (never -0.0), so results are bit-exact across implementations.
Bytes moved: read N * itemsize (weights) + N / 8 per plane (bits), write N * itemsize.
"""

from __future__ import annotations

import torch

_SHIFTS = torch.arange(8, dtype=torch.uint8)
# The fast paths work on the weights' bit patterns: keep = AND all-ones, drop = +0.0, negate = XOR sign bit.
BITS_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def unpack_plane(plane: torch.Tensor, count: int) -> torch.Tensor:
    """uint8 [ceil(count/8)] → bool [count], little-endian bit order."""
    shifts = _SHIFTS.to(plane.device)
    return ((plane.unsqueeze(1) >> shifts) & 1).reshape(-1)[:count].bool()


def apply_masks_reference(
    weights: torch.Tensor, nonzero: torch.Tensor, negative: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Masked copy of the flat weight buffer. Defines the operation; not tuned for speed."""
    keep = unpack_plane(nonzero, weights.numel())
    signed = weights if negative is None else torch.where(unpack_plane(negative, weights.numel()), -weights, weights)
    result = torch.where(keep, signed, torch.zeros((), dtype=weights.dtype, device=weights.device))
    if out is None:
        return result
    return out.copy_(result)


def apply_masks_naive_per_layer(
    layer_weights: list[torch.Tensor], nonzero: torch.Tensor, offsets: list[int]
) -> list[torch.Tensor]:
    """What a straightforward server does: per layer, unpack its bits to a bool tensor, then multiply.
    The benchmark's baseline (binary masks only)."""
    results = []
    for weight, offset in zip(layer_weights, offsets, strict=True):
        first, last = offset // 8, (offset + weight.numel() + 7) // 8 + 1
        bits = unpack_plane(nonzero[first:last], (last - first) * 8)[offset % 8 : offset % 8 + weight.numel()]
        results.append(weight * bits.view(weight.shape).to(weight.dtype))
    return results
