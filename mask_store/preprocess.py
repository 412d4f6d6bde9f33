"""The image → tensor transform a task was trained with; training and serving both build it from here."""

from __future__ import annotations

from torchvision import transforms

from mask_store.image_modes import normalize_image
from mask_store.manifest import Preprocess


def build_transform(spec: Preprocess) -> transforms.Compose:
    """PIL image (any mode, EXIF-oriented) → normalized float tensor [3, size, size], as in training.

    Without `resize` the image is squashed to size x size; with it, resized then centre-cropped.
    """
    mode = "L" if spec.grayscale else "RGB"
    steps = [
        transforms.Lambda(lambda image: normalize_image(image, mode)),
    ]
    if spec.resize is None:
        steps.append(transforms.Resize((spec.size, spec.size), interpolation=transforms.InterpolationMode.BILINEAR))
    else:  # torchvision's ImageNet evaluation transform
        steps += [
            transforms.Resize(spec.resize, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(spec.size),
        ]
    if spec.grayscale:
        steps.append(transforms.Grayscale(num_output_channels=3))
    steps += [transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)]
    return transforms.Compose(steps)
