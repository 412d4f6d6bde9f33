"""Bring any decoded image to 8-bit `L` or `RGB`, upright, the same way in training and in serving.

Pillow's own `convert("RGB")` clips 16-bit and 32-bit integer pixels to 255 (a 16-bit PNG turns
white) and maps float pixels by truncation (a float TIFF in [0, 1] turns black), and it cannot
convert LAB at all. Camera JPEGs store their orientation in EXIF instead of rotating the pixels.
This module fixes all of those once; anything it cannot convert faithfully is refused with
`UnsupportedImage` (the service answers 415) rather than silently mangled.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageCms, ImageOps

from mask_store.errors import UnsupportedImage

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
FLOAT_RANGES = "float pixels must lie in [0, 1] or [0, 255]"


def _rescale_to_uint8(pixels: np.ndarray, scale: float) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(pixels * scale), 0, 255).astype(np.uint8), mode="L")


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer grayscale by the 16-bit range; float grayscale by [0, 1] or [0, 255]."""
    pixels = np.asarray(image, dtype=np.float64)
    if image.mode in SIXTEEN_BIT_MODES:
        return _rescale_to_uint8(pixels, 255.0 / 65535.0)
    if not np.isfinite(pixels).all():
        raise UnsupportedImage(f"image mode {image.mode} holds NaN or infinite pixels")
    low, high = (float(pixels.min()), float(pixels.max())) if pixels.size else (0.0, 0.0)
    if image.mode == "I":  # PNG 16-bit grayscale decodes as I on some Pillow versions
        if low < 0 or high > 65535:
            raise UnsupportedImage(f"integer pixels outside 0..65535 ({low:.0f}..{high:.0f}); save as 8 or 16 bit")
        return _rescale_to_uint8(pixels, 255.0 / 65535.0)
    if low < 0 or high > 255:
        raise UnsupportedImage(f"{FLOAT_RANGES}; this one spans {low:g}..{high:g}")
    return _rescale_to_uint8(pixels, 255.0 if high <= 1.0 else 1.0)


def _lab_to_rgb(image: Image.Image) -> Image.Image:
    lab, srgb = ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB")
    transform = ImageCms.buildTransformFromOpenProfiles(lab, srgb, "LAB", "RGB")
    return ImageCms.applyTransform(image, transform)


def normalize_image(image: Image.Image, mode: str) -> Image.Image:
    """`image` upright (EXIF orientation applied) in 8-bit `mode` ("L" or "RGB").

    Raises UnsupportedImage for pixels that cannot be mapped to 8 bits faithfully.
    """
    if mode not in ("L", "RGB"):
        raise ValueError(f"target mode must be L or RGB, not {mode}")
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a malformed EXIF block is no reason to refuse the pixels
        pass
    if image.mode in (*SIXTEEN_BIT_MODES, "I", "F"):
        image = _high_bit_depth_to_l(image)
    elif image.mode == "LAB":
        image = _lab_to_rgb(image)
    if image.mode == mode:
        return image
    try:
        return image.convert(mode)
    except (ValueError, OSError) as exc:
        raise UnsupportedImage(f"cannot convert image mode {image.mode} to {mode}; save it as 8-bit RGB") from exc
