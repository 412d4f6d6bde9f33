"""Which layers are masked, for the architectures the project promises, and clear refusals."""

import pytest
import torch
from torch import nn

from mask_store import BackboneLayout, UnsupportedArchitecture, build_backbone, head_module_name, maskable_layers
from training.masking import MaskConfig
from training.trainer import TrainConfig, prepare_model

ARCHS = {
    "resnet18": "fc",
    "resnet50": "fc",
    "vgg16_bn": "classifier.6",
    "densenet121": "classifier",
    "mobilenet_v2": "classifier.1",
}
LARGE = {"vgg16_bn"}  # 138M weights: seconds to build and train a step, so not in the fast tier


@pytest.mark.parametrize(
    "arch,head", [pytest.param(a, h, marks=[pytest.mark.slow] if a in LARGE else []) for a, h in ARCHS.items()]
)
def test_every_conv_and_linear_but_the_head_is_masked_and_trains(arch, head):
    model = build_backbone(arch)
    assert head_module_name(model) == head
    layers = dict(maskable_layers(model))
    expected = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n != head]
    assert list(layers) == expected
    layout = BackboneLayout.from_model(arch, model)
    assert layout.total == sum(m.weight.numel() for m in layers.values())
    trainable = prepare_model(model, 4, TrainConfig(mask=MaskConfig()))
    size = 64 if arch.startswith("vgg") or arch.startswith("dense") else 32
    out = trainable(torch.randn(2, 3, size, size))
    out.sum().backward()
    assert out.shape == (2, 4)
    assert all(p.grad is None for p in model.parameters())  # the backbone itself got no gradient


def test_fingerprint_depends_on_weights():
    a, b = build_backbone("resnet18"), build_backbone("resnet18")
    assert BackboneLayout.from_model("resnet18", a).fingerprint != BackboneLayout.from_model("resnet18", b).fingerprint
    b.load_state_dict(a.state_dict())
    assert BackboneLayout.from_model("resnet18", a).fingerprint == BackboneLayout.from_model("resnet18", b).fingerprint


def test_state_dict_with_other_head_size_loads(tmp_path):
    model = build_backbone("resnet18")
    from mask_store import replace_head

    replace_head(model, 10)
    torch.save(model.state_dict(), tmp_path / "bb.pt")
    loaded = build_backbone("resnet18", tmp_path / "bb.pt")
    assert loaded.fc.out_features == 10
    assert torch.equal(loaded.conv1.weight, model.conv1.weight)


def test_unknown_architecture_is_refused():
    with pytest.raises(UnsupportedArchitecture, match="unknown architecture"):
        build_backbone("resnet9000")


def test_architecture_without_linear_head_is_refused():
    with pytest.raises(UnsupportedArchitecture, match="no Linear classifier head"):
        build_backbone("squeezenet1_0")


def test_wrong_state_dict_is_refused(tmp_path):
    torch.save(build_backbone("resnet18").state_dict(), tmp_path / "r18.pt")
    from mask_store import BackboneMismatch

    with pytest.raises(BackboneMismatch):
        build_backbone("resnet50", tmp_path / "r18.pt")
