"""Task 0 over the real ImageNet mobilenet_v2: served answers equal torchvision's own model on real photos,
and the offline weights file is refused when its sha256 does not match its name."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest
import sklearn
import torch
import torchvision
from PIL import Image

from mask_store import CorruptWeights, TaskStore, build_backbone, load_artifact, offline_weights
from tests.support.builders import server_settings
from tests.support.forked import TRAINING, run_forked
from tests.support.servers import serve_in_thread

PHOTOS = [Path(sklearn.__file__).parent / "datasets" / "images" / name for name in ("china.jpg", "flower.jpg")]


@pytest.fixture(scope="module")
def weights_file() -> Path:
    return offline_weights("mobilenet_v2")


@torch.no_grad()
def torchvision_probabilities(weights_file: Path, photo: Path) -> torch.Tensor:
    """The independent reference: torchvision's model and torchvision's own transform for these weights."""
    entry = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
    model = torchvision.models.mobilenet_v2(weights=None)
    model.load_state_dict(torch.load(weights_file, map_location="cpu", weights_only=True))
    image = entry.transforms()(Image.open(photo).convert("RGB"))
    return model.eval()(image[None]).softmax(dim=1)[0]


@pytest.mark.slow  # the CLI in its own process, a real server, two 224-px forwards of a real backbone
def test_served_imagenet_task_equals_torchvision(tmp_path, weights_file):
    artifact_path = tmp_path / "imagenet.safetensors"
    done = run_forked(TRAINING, ["backbone-task", "--backbone", "mobilenet_v2", "--weights", str(weights_file),
                                 "--task", "imagenet", "--version", "1", "--out", str(artifact_path)],
                      dict(os.environ), timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    artifact = load_artifact(artifact_path)
    assert artifact.manifest.labels == tuple(torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])
    assert (artifact.manifest.preprocess.resize, artifact.manifest.preprocess.size) == (256, 224)
    assert artifact.manifest.density == 1.0
    store = tmp_path / "store"
    TaskStore(store).put(artifact_path)  # the server checks it against the backbone it loads

    settings = server_settings(weights_file, store, backbone="mobilenet_v2", admin_token=None)
    with serve_in_thread(settings) as base:
        files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in PHOTOS]
        response = httpx.post(f"{base}/tasks/imagenet/predict", params={"top_k": 1000}, files=files, timeout=120)
    assert response.status_code == 200, response.text
    for photo, prediction in zip(PHOTOS, response.json()["predictions"], strict=True):
        reference = torchvision_probabilities(weights_file, photo)
        served = torch.zeros(1000)
        for item in prediction["top_k"]:
            served[item["index"]] = item["score"]
        assert [item["index"] for item in prediction["top_k"][:5]] == reference.topk(5).indices.tolist()
        assert (served - reference).abs().max().item() <= 1e-4, photo.name
        assert reference.max() > 0.2  # a real photo of a real thing: the reference is confident, not noise


@pytest.mark.slow
def test_corrupted_weights_file_is_refused(tmp_path, weights_file):
    copy = tmp_path / weights_file.name
    shutil.copyfile(weights_file, copy)
    build_backbone("mobilenet_v2", copy)  # the intact copy loads
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0x01
    copy.write_bytes(bytes(data))
    with pytest.raises(CorruptWeights, match="does not start with b0353104"):
        build_backbone("mobilenet_v2", copy)
    out = tmp_path / "x.safetensors"
    argv = ["backbone-task", "--backbone", "mobilenet_v2", "--weights", str(copy), "--out", str(out)]
    result = run_forked(TRAINING, argv, dict(os.environ), timeout=300)
    assert result.returncode != 0 and "does not start with b0353104" in result.stderr
    assert not out.exists()
