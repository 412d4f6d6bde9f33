"""Random task artifacts over a real backbone: for tests and benchmarks, where serving cost and
correctness do not depend on the masks having been learned."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from mask_store.artifact import TaskArtifact, make_artifact
from mask_store.backbone import BackboneLayout, maskable_layers
from mask_store.manifest import Preprocess

SMALL_GRAY = Preprocess(size=16, grayscale=True, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def random_task_artifact(
    model: nn.Module,
    arch: str,
    *,
    task: str = "t",
    version: int = 1,
    labels=("a", "b", "c"),
    kind: str = "binary",
    density: float = 0.7,
    seed: int = 0,
    per_task_bn: bool = True,
    preprocess: Preprocess = SMALL_GRAY,
    layout: BackboneLayout | None = None,
    finetuned: tuple[str, ...] = (),
) -> TaskArtifact:
    """Masks keeping `density` of the weights at random (to 1/256; ternary: 20% of kept ones negated),
    a random head, and random per-task BatchNorm parameters and statistics. Layers in `finetuned`
    get their own weights and an all-ones mask, as the "mixed" training method exports them."""
    generator = torch.Generator().manual_seed(seed)
    layout = layout or BackboneLayout.from_model(arch, model)
    masks = {}
    bits = np.random.default_rng(seed)
    for name, module in maskable_layers(model):
        masks[name] = _random_mask(bits, tuple(module.weight.shape), density, ternary=kind == "ternary")
        if name in finetuned:
            masks[name] = torch.ones_like(masks[name])
    in_features = layout.state_shapes[f"{layout.head}.weight"][1]
    tensors = {
        f"{layout.head}.weight": torch.randn(len(labels), in_features, generator=generator),
        f"{layout.head}.bias": torch.randn(len(labels), generator=generator),
    }
    for name in finetuned:
        weight = model.get_submodule(name).weight
        tensors[f"{name}.weight"] = weight.detach() * (1 + 0.1 * torch.randn(weight.shape, generator=generator))
    if per_task_bn:
        for name, module in model.named_modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                tensors[f"{name}.weight"] = 1 + 0.1 * torch.randn(n, generator=generator)
                tensors[f"{name}.bias"] = 0.1 * torch.randn(n, generator=generator)
                tensors[f"{name}.running_mean"] = 0.1 * torch.randn(n, generator=generator)
                tensors[f"{name}.running_var"] = 1 + 0.1 * torch.rand(n, generator=generator)
    return make_artifact(
        layout=layout,
        masks=masks,
        kind=kind,
        threshold=5e-3,
        task=task,
        version=version,
        labels=list(labels),
        task_tensors=tensors,
        preprocess=preprocess,
    )


def _random_mask(bits: np.random.Generator, shape: tuple[int, ...], density: float, ternary: bool) -> torch.Tensor:
    """An int8 mask from random bytes: a 100M-weight layer in a tenth of a second (a float32 draw per
    weight, with its 400 MB buffers, took seconds, which made large-model tests slow)."""
    keep = torch.from_numpy(bits.integers(0, 256, shape, dtype=np.uint8) < round(density * 256)).to(torch.int8)
    if ternary:
        negate = torch.from_numpy(bits.integers(0, 256, shape, dtype=np.uint8) < round(0.2 * 256))
        keep = torch.where(negate, -keep, keep)
    return keep


def renamed(artifact: TaskArtifact, task: str) -> TaskArtifact:
    """The same masks and tensors as another task: the manifest binds the name, so it has its own
    identity (and cache entry). Many distinct tasks for the price of one random artifact."""
    return dataclasses.replace(artifact, manifest=artifact.manifest.model_copy(update={"task": task}))
