"""Every architecture family the README names trains one step and serves one prediction; the rest are refused."""

from __future__ import annotations

import pytest
import torch

from mask_store import BackboneLayout, Preprocess, UnsupportedArchitecture, artifact_bytes, build_backbone
from mask_store.architectures import SUPPORTED_FAMILIES, supported_architectures
from service.engine import Engine
from service.metrics import Metrics
from service.registry import TaskRegistry
from tests.support.builders import server_settings
from training.export import export_artifact
from training.trainer import TrainConfig, train_task

# one member of each supported family (the smallest), plus the names the contract gives as examples
FAST = {"resnet18": 16, "mobilenet_v2": 16, "mobilenet_v3_small": 16, "mnasnet0_5": 16, "shufflenet_v2_x0_5": 16,
        "efficientnet_b0": 16, "regnet_x_400mf": 16}  # fmt: skip
SLOW = {"alexnet": 64, "convnext_tiny": 32, "densenet121": 32, "resnet50": 16, "resnext50_32x4d": 16,
        "wide_resnet50_2": 16, "vgg16_bn": 32}  # fmt: skip


class Noise(torch.utils.data.Dataset):
    """Four random images of two classes at `size` px: enough for one training step with per-task BN."""

    def __init__(self, size: int):
        self.images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        return self.images[index], index % 2


def train_and_serve(arch: str, size: int, tmp_path) -> None:
    torch.manual_seed(0)
    backbone = build_backbone(arch)
    weights = tmp_path / f"{arch}.pt"
    torch.save(backbone.state_dict(), weights)
    config = TrainConfig(epochs=1, batch_size=4, per_task_bn=True, progress=False)
    result = train_task(backbone, Noise(size), Noise(size), 2, config)
    artifact = export_artifact(
        result,
        BackboneLayout.from_model(arch, backbone),
        task="t",
        version=1,
        labels=["a", "b"],
        preprocess=Preprocess(size=size),
    )
    engine = Engine(server_settings(weights, tmp_path / "store", backbone=arch, cache_budget_mb=0), Metrics())
    registry = TaskRegistry.over_store_of(engine)
    task = registry.register(artifact_bytes(artifact))
    images = Noise(size).images[:2]
    served = engine.forward_task(task, images)
    with torch.no_grad():
        trained = torch.softmax(result.model(images), dim=1)
    assert served.shape == (2, 2)
    torch.testing.assert_close(served, trained, rtol=1e-4, atol=1e-5)
    assert task.manifest.backbone.arch == arch


@pytest.mark.parametrize("arch,size", FAST.items())
def test_supported_family_trains_and_serves(arch, size, tmp_path):
    train_and_serve(arch, size, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("arch,size", SLOW.items())
def test_supported_large_family_member_trains_and_serves(arch, size, tmp_path):
    train_and_serve(arch, size, tmp_path)


def test_every_supported_family_has_a_tested_member():
    for family in SUPPORTED_FAMILIES:
        assert any(arch.startswith(family) for arch in {*FAST, *SLOW}), family
    assert {*FAST, *SLOW} <= set(supported_architectures())


@pytest.mark.parametrize("arch", ["swin_t", "googlenet", "inception_v3", "vit_b_16", "maxvit_t"])
def test_unusable_architectures_are_refused_with_the_supported_list(arch):
    with pytest.raises(UnsupportedArchitecture, match="supported torchvision architectures: alexnet, convnext"):
        build_backbone(arch)
