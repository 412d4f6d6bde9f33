"""16-bit training images reach the model rescaled to 8 bits, exactly as the service decodes them (issue 15, item 6)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from mask_store import Preprocess, build_transform
from training.data import image_folder

PREPROCESS = Preprocess(size=16, grayscale=True)


def save_16bit(path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((16, 16), value, dtype=np.uint16)
    pixels[:8] = value // 2  # some structure, so the transform is not a constant
    Image.fromarray(pixels).save(path)  # uint16 → mode I;16


def test_two_16bit_classes_stay_distinct_and_match_their_8bit_equivalents(tmp_path):
    save_16bit(tmp_path / "train" / "bright" / "0.png", 200 * 257)
    save_16bit(tmp_path / "train" / "dim" / "0.png", 100 * 257)
    assert Image.open(tmp_path / "train" / "bright" / "0.png").mode.startswith("I")  # really 16-bit on disk
    ds = image_folder(tmp_path, "train", PREPROCESS)
    (bright, bright_label), (dim, dim_label) = ds[0], ds[1]
    assert (ds.classes[bright_label], ds.classes[dim_label]) == ("bright", "dim")
    assert not torch.equal(bright, dim)  # Pillow's convert("RGB") would saturate both to white
    transform = build_transform(PREPROCESS)
    for tensor, value in ((bright, 200), (dim, 100)):
        eight_bit = np.full((16, 16), value, dtype=np.uint8)
        eight_bit[:8] = value // 2
        assert torch.equal(tensor, transform(Image.fromarray(eight_bit, mode="L")))
