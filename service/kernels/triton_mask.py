"""Fused mask application in Triton: ONE launch for all masked layers of the backbone.

Each program takes BLOCK_BYTES bytes of the packed plane(s) and the 8 * BLOCK_BYTES weights they
cover: every mask byte is read once, expanded to 8 lanes in registers ([BLOCK_BYTES, 8] tile), and
the weights are read and written contiguously. Nothing unpacked ever reaches memory. The kernel
moves the weights' bit patterns (int32 for fp32, int16 for fp16/bf16): dropping writes +0.0 and
negating flips the sign bit, so the result is exact for every dtype on every backend.
Bytes moved for N weights of itemsize s: read N*s + N/8 per plane, write N*s.

Reference semantics: `service.kernels.reference.apply_masks_reference` (held bit-exact by tests,
on CUDA and under TRITON_INTERPRET=1 on the CPU). Benchmark: `python -m service.kernels.benchmark`.
"""

from __future__ import annotations

import torch

from service.kernels.reference import BITS_VIEW

try:  # Triton is imported only where it exists; the CPU path never needs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - every supported torch build ships Triton on Linux
    triton = None

BLOCK_BYTES = 512  # 4096 weights per program


if triton is not None:

    @triton.jit
    def _apply_masks_kernel(
        weights_ptr,
        nonzero_ptr,
        negative_ptr,
        out_ptr,
        n_weights,
        SIGN_BIT: tl.constexpr,
        HAS_NEGATIVE: tl.constexpr,
        BLOCK_BYTES: tl.constexpr,
    ):
        pid = tl.program_id(0)
        byte_index = pid * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
        lane = tl.arange(0, 8)
        weight_index = byte_index[:, None] * 8 + lane[None, :]  # [BLOCK_BYTES, 8], contiguous per row
        in_range = weight_index < n_weights
        n_bytes = (n_weights + 7) // 8
        keep_bytes = tl.load(nonzero_ptr + byte_index, mask=byte_index < n_bytes, other=0).to(tl.int32)
        keep = ((keep_bytes[:, None] >> lane[None, :]) & 1) != 0
        w = tl.load(weights_ptr + weight_index, mask=in_range, other=0)
        if HAS_NEGATIVE:
            neg_bytes = tl.load(negative_ptr + byte_index, mask=byte_index < n_bytes, other=0).to(tl.int32)
            negative = ((neg_bytes[:, None] >> lane[None, :]) & 1) != 0
            w = tl.where(negative, (w ^ SIGN_BIT).to(w.dtype), w)
        out = tl.where(keep, w, tl.zeros_like(w))  # all-zero bits: +0.0 for dropped weights
        tl.store(out_ptr + weight_index, out, mask=in_range)


def apply_masks_triton(
    weights: torch.Tensor, nonzero: torch.Tensor, negative: torch.Tensor | None, out: torch.Tensor
) -> torch.Tensor:
    """Host wrapper: checks, grid, launch. `weights`/`out` flat and contiguous, planes uint8."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    n = weights.numel()
    if weights.dim() != 1 or not weights.is_contiguous() or out.shape != weights.shape or out.dtype != weights.dtype:
        raise ValueError("weights and out must be equal flat contiguous tensors")
    if nonzero.dtype != torch.uint8 or nonzero.numel() < (n + 7) // 8:
        raise ValueError(f"nonzero plane must be uint8 with at least {(n + 7) // 8} bytes")
    if negative is not None and (negative.dtype != torch.uint8 or negative.numel() < (n + 7) // 8):
        raise ValueError("negative plane must be uint8 and as long as the nonzero plane")
    if not (weights.device == nonzero.device == out.device):
        raise ValueError("weights, planes and out must be on one device")
    if weights.dtype not in BITS_VIEW:
        raise ValueError(f"unsupported dtype {weights.dtype}")
    bits_dtype = BITS_VIEW[weights.dtype]
    grid = (triton.cdiv((n + 7) // 8, BLOCK_BYTES),)
    _apply_masks_kernel[grid](
        weights.view(bits_dtype),
        nonzero,
        negative if negative is not None else nonzero,
        out.view(bits_dtype),
        n,
        SIGN_BIT=-(1 << (torch.iinfo(bits_dtype).bits - 1)),
        HAS_NEGATIVE=negative is not None,
        BLOCK_BYTES=BLOCK_BYTES,
    )
    return out
