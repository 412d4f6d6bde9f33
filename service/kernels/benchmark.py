"""Mask-apply benchmark: `python -m service.kernels.benchmark [--device cuda] [--dtype float16]`.

For the masked-layer shapes of resnet50, vgg16 and densenet121 (random weights and 90%-dense random
masks: speed does not depend on what was learned) it reports, per backbone: the fused apply time,
its effective bandwidth (weights read + bits read + weights written), the same run's plain
device-copy bandwidth as the ceiling and the fraction reached, and the speed-up over the naive
per-layer implementation (unpack to bool per layer, multiply).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch
import torchvision

from mask_store import BackboneLayout, maskable_layers
from mask_store.packing import pack_bits
from service.kernels.reference import apply_masks_naive_per_layer, apply_masks_reference
from service.kernels.select import KERNELS

ARCHS = ("resnet50", "vgg16", "densenet121")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of `fn()` (triton's do_bench on CUDA, wall clock on CPU)."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=200) / 1000
    fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def bench_arch(arch: str, device: torch.device, dtype: torch.dtype, kernel: str, repeats: int) -> dict:
    model = torchvision.models.get_model(arch, weights=None)
    layout = BackboneLayout.from_model(arch, model)
    weights = [m.weight.detach().to(device, dtype) for _, m in maskable_layers(model)]
    flat = torch.cat([w.reshape(-1) for w in weights])
    bits = np.random.default_rng(0).random(layout.total) < 0.9
    nonzero = torch.frombuffer(bytearray(pack_bits(bits)), dtype=torch.uint8).to(device)
    out = torch.empty_like(flat)
    apply = KERNELS[kernel]
    apply(flat, nonzero, None, out)
    reference = apply_masks_reference(flat, nonzero)
    exact = torch.equal(out.view(torch.uint8), reference.view(torch.uint8))
    n, size = flat.numel(), flat.element_size()
    moved = 2 * n * size + nonzero.numel()
    fused = timed(lambda: apply(flat, nonzero, None, out), device, repeats)
    copy = timed(lambda: out.copy_(flat), device, repeats)
    naive = timed(
        lambda: apply_masks_naive_per_layer(weights, nonzero, list(layout.offsets)), device, max(3, repeats // 3)
    )
    return {
        "arch": arch,
        "weights": n,
        "layers": len(weights),
        "exact": exact,
        "fused_ms": 1000 * fused,
        "fused_gbs": moved / fused / 1e9,
        "copy_gbs": 2 * n * size / copy / 1e9,
        "naive_ms": 1000 * naive,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--kernel", default=None, help="default: triton on cuda, cpu on cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--archs", nargs="+", choices=ARCHS, default=ARCHS, help="backbones to measure")
    args = parser.parse_args()
    device = torch.device(args.device)
    kernel = args.kernel or ("triton" if device.type == "cuda" else "cpu")
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
        )
    )
    print(f"device: {name}; dtype {args.dtype}; kernel {kernel}; torch {torch.__version__}")
    columns = [
        "backbone",
        "masked weights",
        "layers",
        "fused ms",
        "fused GB/s",
        "copy GB/s",
        "% of copy",
        "naive ms",
        "speed-up",
        "bit-exact",
    ]
    print("| " + " | ".join(columns) + " |")
    print("|---" * len(columns) + "|")
    for arch in args.archs:
        r = bench_arch(arch, device, DTYPES[args.dtype], kernel, args.repeats)
        print(
            f"| {arch} | {r['weights']:,} | {r['layers']} | {r['fused_ms']:.2f} | {r['fused_gbs']:.1f} | "
            f"{r['copy_gbs']:.1f} | {100 * r['fused_gbs'] / r['copy_gbs']:.0f}% | {r['naive_ms']:.2f} | "
            f"{r['naive_ms'] / r['fused_ms']:.1f}x | {r['exact']} |"
        )


if __name__ == "__main__":
    main()
