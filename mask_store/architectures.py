"""Which torchvision architectures Piggyback serves, and why the others are refused up front.

A family is supported when every Conv2d/Linear is called as a module (so the scored wrapper sees it),
the model returns plain logits in training, and it accepts small inputs. One member of each family
is trained for a step and served in tests/service/test_architecture_families.py.
"""

from __future__ import annotations

import torchvision

from mask_store.errors import UnsupportedArchitecture

SUPPORTED_FAMILIES = (
    "alexnet",
    "convnext_",
    "densenet",
    "efficientnet_",
    "mnasnet",
    "mobilenet_v2",
    "mobilenet_v3_",
    "regnet_",
    "resnet",
    "resnext",
    "shufflenet_v2_",
    "vgg",
    "wide_resnet",
)
REFUSED_FAMILIES = {
    "googlenet": "returns auxiliary logits in training and its auxiliary heads keep 1000 classes",
    "inception_v3": "returns auxiliary logits in training and its auxiliary head keeps 1000 classes",
    "swin_": "its attention reads qkv.weight directly, bypassing the mask",
    "squeezenet": "it has no Linear classifier head (its classifier is a convolution)",
    "vit_": "needs exactly 224-px inputs and its attention projections cannot be masked",
    "maxvit_": "needs exactly 224-px inputs",
}


def supported_architectures() -> list[str]:
    """Every torchvision classification model name that Piggyback trains and serves."""
    names = torchvision.models.list_models(module=torchvision.models)
    return [name for name in names if name.startswith(SUPPORTED_FAMILIES)]


def check_architecture(arch: str) -> None:
    """Raise UnsupportedArchitecture, naming the supported families, unless `arch` is one of them."""
    if arch in supported_architectures():
        return
    families = ", ".join(f"{f.rstrip('_')}*" if f.endswith("_") else f for f in SUPPORTED_FAMILIES)
    reason = next((why for prefix, why in REFUSED_FAMILIES.items() if arch.startswith(prefix)), None)
    what = f"{arch!r} is not supported: {reason}" if reason else f"unknown architecture {arch!r}"
    raise UnsupportedArchitecture(f"{what}; supported torchvision architectures: {families}")
