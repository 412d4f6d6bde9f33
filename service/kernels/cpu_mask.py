"""Mask application on the CPU: integer bit operations, no float arithmetic, chunked to stay in cache.

Each mask byte selects (index_select, a row gather) one row of a 256-entry table of 8 lane masks
(all-ones or zero words of the weight's width); AND-ing the weight's bit pattern with its lane
mask keeps it or yields +0.0, and XOR with the sign bit negates it (ternary). Same semantics as
`reference.apply_masks_reference`, bit-exact. Works in chunks of CHUNK weights so the gathered
lane masks stay in cache; on 2 cores it reaches about half of a plain copy's bandwidth and 4-10x
the naive per-layer unpack-and-multiply (`python -m service.kernels.benchmark`, docs/benchmarks.md).
"""

from __future__ import annotations

import torch

from service.kernels.reference import BITS_VIEW

CHUNK = 1 << 20  # weights per chunk (a multiple of 8); 4 MB of fp32 lane masks
_tables: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}


def _lane_tables(int_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, sign) tables [256, 8]: keep = all ones where bit set, sign = the sign bit where bit set."""
    if int_dtype not in _tables:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        width = torch.iinfo(int_dtype).bits
        keep = (-bits).to(int_dtype)  # -1 is all ones
        sign = (bits << (width - 1)).to(int_dtype)  # wraps to the sign bit pattern
        _tables[int_dtype] = (keep, sign)
    return _tables[int_dtype]


def apply_masks_cpu(
    weights: torch.Tensor, nonzero: torch.Tensor, negative: torch.Tensor | None, out: torch.Tensor
) -> torch.Tensor:
    if weights.dtype not in BITS_VIEW:
        raise ValueError(f"unsupported dtype {weights.dtype}")
    int_dtype = BITS_VIEW[weights.dtype]
    keep_table, sign_table = _lane_tables(int_dtype)
    w_bits, out_bits = weights.view(int_dtype), out.view(int_dtype)
    n = weights.numel()
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        rows = slice(start // 8, (stop + 7) // 8)
        lanes = torch.index_select(keep_table, 0, nonzero[rows].long()).view(-1)[: stop - start]
        target = out_bits[start:stop]
        if negative is None:
            torch.bitwise_and(w_bits[start:stop], lanes, out=target)
        else:
            signs = torch.index_select(sign_table, 0, negative[rows].long()).view(-1)[: stop - start]
            torch.bitwise_xor(w_bits[start:stop], signs, out=target)
            target &= lanes
    return out
