"""Bit packing of masks (numpy, little-endian bit order), and the optional compression of the packed bytes.

Layout (the fused kernel relies on it): the masks of all layers are concatenated in canonical
order, flattened row-major, one bit per weight; bit i lives in byte i // 8 at position i % 8
(little-endian bit order). A ternary mask {-1, 0, +1} is two such planes: `nonzero` and `negative`.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
from bitarray import bitarray
from bitarray.util import sc_decode, sc_encode

ENCODINGS = ("raw", "zlib", "sparse")
# level 9 took 6 s on a vgg16 mask for under 1% fewer bytes; level 1 is 2-7x faster but stores a mask that
# keeps 97% of the weights (typical after training) 20% larger
ZLIB_LEVEL = 6
PROBE_BYTES = 1 << 20  # `smallest_encoding` first compresses this much, spread over the mask


def pack_bits(bits: torch.Tensor | np.ndarray) -> bytes:
    """Pack a boolean array (any shape, flattened row-major) into ceil(n / 8) bytes, little-endian bits."""
    return np.packbits(np.asarray(bits, dtype=bool).reshape(-1), bitorder="little").tobytes()


def unpack_bits(data: bytes, count: int) -> np.ndarray:
    """Inverse of `pack_bits`: the first `count` bits of `data` as a bool array."""
    if len(data) * 8 < count:
        raise ValueError(f"{len(data)} bytes hold {len(data) * 8} bits, fewer than the {count} needed")
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count, bitorder="little").view(bool)


def encode(packed: bytes, count: int, encoding: str) -> bytes:
    """Compress packed bits: 'raw' as is, 'zlib', or 'sparse' (bitarray's own sparse compression)."""
    if encoding == "raw":
        return packed
    if encoding == "zlib":
        return zlib.compress(packed, level=ZLIB_LEVEL)
    if encoding == "sparse":
        bits = bitarray(endian="little")
        bits.frombytes(packed)
        return sc_encode(bits[:count])
    raise ValueError(f"unknown mask encoding {encoding!r}; expected one of {ENCODINGS}")


def decode(stored: bytes, count: int, encoding: str) -> bytes:
    """Inverse of `encode`: the raw packed bytes (ceil(count / 8) of them)."""
    if encoding == "raw":
        packed = bytes(stored)
    elif encoding == "zlib":
        packed = zlib.decompress(bytes(stored))
    elif encoding == "sparse":
        bits = sc_decode(bytes(stored))
        if len(bits) != count:
            raise ValueError(f"sparse mask decodes to {len(bits)} bits, expected {count}")
        bits = bitarray(bits, endian="little")
        packed = bits.tobytes()
    else:
        raise ValueError(f"unknown mask encoding {encoding!r}; expected one of {ENCODINGS}")
    if len(packed) != (count + 7) // 8:
        raise ValueError(f"mask decodes to {len(packed)} bytes, expected {(count + 7) // 8}")
    return packed


def smallest_encoding(packed: bytes, count: int) -> tuple[str, bytes]:
    """The encoding that stores these bits in the fewest bytes (raw wins ties). zlib is tried on the
    whole mask only when a spread sample of it compresses: on bits that look random it costs seconds
    at vgg16 size and saves nothing."""
    names = ENCODINGS if _sample_compresses(packed) else tuple(n for n in ENCODINGS if n != "zlib")
    candidates = [(name, encode(packed, count, name)) for name in names]
    return min(candidates, key=lambda item: (len(item[1]), ENCODINGS.index(item[0])))


def _sample_compresses(packed: bytes) -> bool:
    """Whether zlib shrinks eight slices of the mask, spread over its length, by at least 1%."""
    if len(packed) <= PROBE_BYTES:
        return True
    piece, stride = PROBE_BYTES // 8, len(packed) // 8
    sample = b"".join(packed[i * stride : i * stride + piece] for i in range(8))
    return len(zlib.compress(sample, level=1)) < 0.99 * len(sample)
