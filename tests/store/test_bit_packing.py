"""Bit packing: bit-exact on odd sizes, against a bit-by-bit reference of the documented layout."""

import numpy as np
import pytest

from mask_store import packing


def reference_pack(bits: np.ndarray) -> bytes:
    """Bit i of the mask is bit i % 8 of byte i // 8 (the layout the kernels read), one bit at a time."""
    out = bytearray((len(bits) + 7) // 8)
    for i in np.flatnonzero(bits):
        out[i // 8] |= 1 << (i % 8)
    return bytes(out)


@pytest.mark.parametrize("count", [1, 7, 8, 9, 63, 1001, 65537])
@pytest.mark.parametrize("density", [0.0, 0.03, 0.5, 0.97, 1.0])
def test_pack_unpack_round_trip_and_layout(count, density):
    bits = np.random.default_rng(count).random(count) < density
    packed = packing.pack_bits(bits)
    assert packed == reference_pack(bits)
    assert len(packed) == (count + 7) // 8
    assert np.array_equal(packing.unpack_bits(packed, count), bits)
    for encoding in packing.ENCODINGS:
        stored = packing.encode(packed, count, encoding)
        assert packing.decode(stored, count, encoding) == packed


def test_smallest_encoding_compresses_dense_masks():
    bits = np.random.default_rng(0).random(100_000) < 0.99
    encoding, stored = packing.smallest_encoding(packing.pack_bits(bits), bits.size)
    assert encoding != "raw" and len(stored) < bits.size / 8 / 2


def test_a_trained_looking_mask_is_stored_within_its_entropy_bound():
    """A mask keeping 97% of the weights (as training leaves them) carries 0.19 bits per weight; stored
    in at most 0.29 (zlib level 6 gives 0.27, level 1 would give 0.33)."""
    bits = np.random.default_rng(2).random(2_000_000) < 0.97
    _, stored = packing.smallest_encoding(packing.pack_bits(bits), bits.size)
    assert len(stored) * 8 / bits.size < 0.29


def test_a_large_mask_is_compressed_only_when_its_sample_compresses(monkeypatch):
    """Beyond the probe size zlib runs on the whole mask only if a spread sample shrinks: random bits
    are not worth seconds of zlib; a mask that is mostly ones still is compressed."""
    calls = []
    encode = packing.encode
    monkeypatch.setattr(packing, "encode", lambda p, n, e: calls.append(e) or encode(p, n, e))
    count = 8 * (packing.PROBE_BYTES * 3)
    random_bits = np.random.default_rng(0).random(count) < 0.5
    encoding, _ = packing.smallest_encoding(packing.pack_bits(random_bits), count)
    assert encoding == "raw" and "zlib" not in calls
    dense = np.random.default_rng(1).random(count) < 0.995
    encoding, stored = packing.smallest_encoding(packing.pack_bits(dense), count)
    assert encoding in ("zlib", "sparse") and len(stored) < count / 8 / 3


def test_unpack_refuses_short_data():
    with pytest.raises(ValueError):
        packing.unpack_bits(b"\x00", 9)
