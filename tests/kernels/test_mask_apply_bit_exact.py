"""Mask-apply kernels: the reference against an independent numpy definition, and every fast path
bit-exact against the reference (odd sizes, every dtype, binary and ternary)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.kernels.cpu_mask import CHUNK, apply_masks_cpu
from service.kernels.reference import BITS_VIEW, apply_masks_naive_per_layer, apply_masks_reference
from service.kernels.triton_mask import BLOCK_BYTES, apply_masks_triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# odd sizes: 1 weight, not a multiple of 8, around a Triton block (8 * BLOCK_BYTES) and a CPU chunk
SIZES = [1, 7, 9, 8 * BLOCK_BYTES - 1, 8 * BLOCK_BYTES + 3, 70_001]
CPU_SIZES = [*SIZES, CHUNK + 13]


def make_case(n: int, dtype: torch.dtype, ternary: bool, seed: int = 0, device="cpu"):
    generator = torch.Generator().manual_seed(seed + n)
    weights = torch.randn(n, generator=generator).to(dtype)
    weights[::17] = -0.0  # signed zeros must come out right too
    planes = [torch.randint(0, 256, ((n + 7) // 8,), dtype=torch.uint8, generator=generator) for _ in range(2)]
    return weights.to(device), planes[0].to(device), (planes[1].to(device) if ternary else None)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(BITS_VIEW[tensor.dtype]).cpu()


@pytest.mark.parametrize("ternary", [False, True])
@pytest.mark.parametrize("n", [1, 9, 1001])
def test_reference_matches_independent_numpy_loop(n, ternary):
    weights, nonzero, negative = make_case(n, torch.float32, ternary)
    keep = np.unpackbits(nonzero.numpy(), bitorder="little")[:n].astype(bool)
    neg = np.unpackbits(negative.numpy(), bitorder="little")[:n].astype(bool) if ternary else np.zeros(n, bool)
    expected = np.zeros(n, dtype=np.float32)
    w = weights.numpy()
    for i in range(n):
        if keep[i]:
            expected[i] = -w[i] if neg[i] else w[i]
    got = apply_masks_reference(weights, nonzero, negative).numpy()
    assert np.array_equal(got.view(np.int32), expected.view(np.int32))


@pytest.mark.parametrize("ternary", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", CPU_SIZES)
def test_cpu_path_is_bit_exact(n, dtype, ternary):
    weights, nonzero, negative = make_case(n, dtype, ternary)
    out = torch.full_like(weights, float("nan"))
    apply_masks_cpu(weights, nonzero, negative, out)
    assert torch.equal(bits(out), bits(apply_masks_reference(weights, nonzero, negative)))


@pytest.mark.parametrize("ternary", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_triton_kernel_is_bit_exact(n, dtype, ternary):
    """On CUDA when present, else under TRITON_INTERPRET=1 (set in conftest)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    weights, nonzero, negative = make_case(n, dtype, ternary, device=device)
    out = torch.full_like(weights, float("nan"))
    apply_masks_triton(weights, nonzero, negative, out)
    assert torch.equal(bits(out), bits(apply_masks_reference(weights, nonzero, negative)))


def test_triton_wrapper_refuses_bad_arguments():
    weights, nonzero, _ = make_case(100, torch.float32, False)
    with pytest.raises(ValueError, match="nonzero plane"):
        apply_masks_triton(weights, nonzero[:5], None, torch.empty_like(weights))
    with pytest.raises(ValueError, match="flat contiguous"):
        apply_masks_triton(weights, nonzero, None, torch.empty(99))


def test_naive_baseline_agrees_with_reference():
    shapes = [(3, 5), (7,), (2, 3, 3)]
    layers = [torch.randn(shape) for shape in shapes]
    flat = torch.cat([w.reshape(-1) for w in layers])
    _, nonzero, _ = make_case(flat.numel(), torch.float32, False)
    offsets = np.cumsum([0] + [w.numel() for w in layers[:-1]]).tolist()
    naive = torch.cat([w.reshape(-1) for w in apply_masks_naive_per_layer(layers, nonzero, offsets)])
    assert torch.equal(naive, apply_masks_reference(flat, nonzero))  # values equal (naive may give -0.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_on_cuda_full_resnet50_size():
    weights, nonzero, negative = make_case(23_454_912, torch.float16, True, device="cuda")
    out = torch.empty_like(weights)
    apply_masks_triton(weights, nonzero, negative, out)
    assert torch.equal(bits(out), bits(apply_masks_reference(weights, nonzero, negative)))
