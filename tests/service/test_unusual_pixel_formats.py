"""Uploads in unusual pixel formats through the real server (issue 14, items 3 and 4): they are classified
like their plain 8-bit upright equivalent, or refused with 415, never a 500 and never silently mangled.

The references are built here with numpy and Pillow's plain 8-bit encoders, independent of
`mask_store.image_modes`.
"""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from mask_store import TaskStore, artifact_bytes
from mask_store.manifest import Preprocess
from tests.support.builders import random_task_artifact, server_settings
from tests.support.servers import serve_in_process

SMALL_RGB = Preprocess(size=16, grayscale=False, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
LABELS = ("a", "b", "c", "d", "e")
EXIF_ORIENTATION = 0x0112


@pytest.fixture(scope="module")
def server(tmp_path_factory, backbone_file, resnet18):
    store = tmp_path_factory.mktemp("store")
    for task, preprocess, seed in (("gray", None, 31), ("rgb", SMALL_RGB, 32)):
        extra = {"preprocess": preprocess} if preprocess else {}
        TaskStore(store).put(artifact_bytes(random_task_artifact(resnet18, "resnet18", task=task, labels=LABELS,
                                                                 seed=seed, **extra)))  # fmt: skip
    with serve_in_process(server_settings(backbone_file, store)) as http:  # the decode contract: no socket needed
        yield http


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def probabilities(http: httpx.Client, task: str, data: bytes, filename: str) -> torch.Tensor:
    """The server's full probability vector (indexed by label) for one upload."""
    response = http.post(f"/tasks/{task}/predict", files=[("images", (filename, data))], params={"top_k": len(LABELS)})
    assert response.status_code == 200, response.text
    scores = torch.zeros(len(LABELS), dtype=torch.float64)
    for item in response.json()["predictions"][0]["top_k"]:
        scores[item["index"]] = item["score"]
    return scores


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def gray_pixels(seed: int = 0, shape=(32, 24)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_exif_rotated_phone_photo_is_classified_upright(server):
    height, width = 48, 32
    y, x = np.mgrid[0:height, 0:width]
    upright = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + 2 * y) % 64 * 4], axis=-1)
    # The sensor wrote the pixels turned a quarter counter-clockwise; orientation 6 says "turn 90 degrees
    # clockwise to view", as a phone held upright in portrait records it.
    sideways = Image.fromarray(upright.astype(np.uint8)).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    photo = encode(sideways, "JPEG", quality=95, exif=exif.tobytes())
    decoded = np.asarray(Image.open(io.BytesIO(photo)).convert("RGB"))  # the JPEG's pixels, as stored
    turned_by_hand = encode(Image.fromarray(np.ascontiguousarray(np.rot90(decoded, k=-1))), "PNG")
    as_stored = encode(Image.fromarray(decoded), "PNG")
    for task in ("rgb", "gray"):
        got = probabilities(server, task, photo, "phone.jpg")
        assert same(got, probabilities(server, task, turned_by_hand, "upright.png")), task
        assert not same(got, probabilities(server, task, as_stored, "sideways.png")), "test cannot tell orientation"


def test_16_bit_png_equals_its_8_bit_version(server):
    pixels = gray_pixels(1)
    eight = encode(Image.fromarray(pixels), "PNG")
    sixteen_image = Image.fromarray((pixels.astype(np.uint16) * 257).astype(np.uint16))  # 0..255 -> 0..65535
    assert sixteen_image.mode.startswith("I;16")
    sixteen = encode(sixteen_image, "PNG")
    assert Image.open(io.BytesIO(sixteen)).mode in ("I;16", "I")  # really 16 bits on the wire
    for task in ("gray", "rgb"):
        assert same(probabilities(server, task, sixteen, "deep.png"), probabilities(server, task, eight, "a.png")), task


def test_float_tiff_in_unit_range_equals_its_8_bit_version(server):
    pixels = gray_pixels(2)
    floats = encode(Image.fromarray(pixels.astype(np.float32) / 255.0, mode="F"), "TIFF")
    eight = encode(Image.fromarray(pixels), "PNG")
    black = encode(Image.fromarray(np.zeros_like(pixels)), "PNG")
    for task in ("gray", "rgb"):
        got = probabilities(server, task, floats, "float.tiff")
        assert same(got, probabilities(server, task, eight, "a.png")), task
        assert not same(got, probabilities(server, task, black, "black.png")), task


@pytest.mark.parametrize("task", ["gray", "rgb"])
def test_lab_tiff_is_served_or_refused_never_a_500(server, task):
    rng = np.random.default_rng(3)
    lab = np.stack([rng.integers(0, 256, (16, 16)), rng.integers(96, 160, (16, 16)), rng.integers(96, 160, (16, 16))])
    data = encode(Image.fromarray(np.moveaxis(lab, 0, -1).astype(np.uint8), mode="LAB"), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "LAB"
    response = server.post(f"/tasks/{task}/predict", files=[("images", ("lab.tiff", data))])
    assert response.status_code in (200, 415), response.text
    assert response.headers["content-type"].startswith("application/json")
    if response.status_code == 415:
        assert response.json()["detail"]
