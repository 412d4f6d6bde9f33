"""Decoding uploads into model inputs, refusing anything that could hurt the server.

Size limits are checked before decoding (bytes) and from the header before pixels are allocated
(decompression bombs, absurd dimensions); truncated or corrupt data fails the full decode.
"""

from __future__ import annotations

import io
import warnings

import torch
from PIL import Image, UnidentifiedImageError

from service.errors import InvalidImage, NotAnImage, PayloadTooLarge

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")


def decode_image(data: bytes, filename: str, max_pixels: int) -> Image.Image:
    """Fully decoded PIL image, or a 400/413/415 error naming the file and the problem."""
    if not data:
        raise InvalidImage(f"{filename}: empty file; upload PNG or JPEG images in the 'images' field")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise PayloadTooLarge(
                    f"{filename}: {width}x{height} pixels is more than the {max_pixels} allowed; downscale it first"
                )
            image.load()
    except PayloadTooLarge:
        raise
    except UnidentifiedImageError as exc:
        raise NotAnImage(f"{filename}: not a supported image ({', '.join(ALLOWED_FORMATS)})") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(f"{filename}: image too large to decode safely ({exc})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidImage(f"{filename}: corrupt or truncated image ({exc})") from exc
    return image


def images_to_batch(blobs: list[tuple[str, bytes]], transform, max_pixels: int) -> torch.Tensor:
    """Decode and preprocess every upload into one [N, 3, H, W] batch (runs in a worker thread)."""
    return torch.stack([transform(decode_image(data, name, max_pixels)) for name, data in blobs])
