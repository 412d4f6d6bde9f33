"""Shared fixtures: tiny real torchvision backbones and a trained-looking artifact, all on CPU."""

from __future__ import annotations

import hashlib

import pytest
import torch

from mask_store import BackboneLayout, Preprocess, build_backbone, make_artifact
from mask_store.backbone import maskable_layers

torch.set_num_threads(2)

TINY_PREPROCESS = Preprocess(size=16, grayscale=True, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def state_hash(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer, to prove a backbone was never modified."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def random_task_artifact(model, arch, *, task="t", version=1, labels=("a", "b", "c"), kind="binary",
                         density=0.7, seed=0, per_task_bn=True):
    """An artifact with random masks, a random head and (optionally) random BN: no training needed."""
    generator = torch.Generator().manual_seed(seed)
    layout = BackboneLayout.from_model(arch, model)
    masks = {}
    for name, module in maskable_layers(model):
        keep = (torch.rand(module.weight.shape, generator=generator) < density).float()
        if kind == "ternary":
            keep = keep * torch.where(torch.rand(module.weight.shape, generator=generator) < 0.2, -1.0, 1.0)
        masks[name] = keep
    state = model.state_dict()
    head = layout.head
    tensors = {
        f"{head}.weight": torch.randn(len(labels), state[f"{head}.weight"].shape[1], generator=generator),
        f"{head}.bias": torch.randn(len(labels), generator=generator),
    }
    if per_task_bn:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                tensors[f"{name}.weight"] = 1 + 0.1 * torch.randn(n, generator=generator)
                tensors[f"{name}.bias"] = 0.1 * torch.randn(n, generator=generator)
                tensors[f"{name}.running_mean"] = 0.1 * torch.randn(n, generator=generator)
                tensors[f"{name}.running_var"] = 1 + 0.1 * torch.rand(n, generator=generator)
    return make_artifact(layout=layout, masks=masks, kind=kind, threshold=5e-3, task=task, version=version,
                         labels=list(labels), task_tensors=tensors, preprocess=TINY_PREPROCESS)


@pytest.fixture(scope="session")
def resnet18():
    torch.manual_seed(0)
    return build_backbone("resnet18")


@pytest.fixture(scope="session")
def resnet18_layout(resnet18):
    return BackboneLayout.from_model("resnet18", resnet18)


ADMIN_TOKEN = "test-admin-token-0123456789"


@pytest.fixture(scope="session")
def backbone_file(tmp_path_factory, resnet18):
    path = tmp_path_factory.mktemp("backbone") / "resnet18.pt"
    torch.save(resnet18.state_dict(), path)
    return path


def server_settings(backbone_file, store, **overrides):
    from service.settings import Settings

    values = dict(backbone="resnet18", weights=str(backbone_file), store=store, admin_token=ADMIN_TOKEN,
                  max_batch_delay_ms=2.0)
    values.update(overrides)
    return Settings(**values)
