"""An independently built dedicated network for a task: backbone copy with the mask multiplied in.

Uses only the artifact's unpacked masks (bitarray path) and plain module surgery, none of the
service's engine, kernels or functional_call, so agreement with the server means something.
"""

from __future__ import annotations

import copy

import torch

from mask_store import TaskArtifact, build_transform, replace_head


def dedicated_network(backbone: torch.nn.Module, artifact: TaskArtifact) -> torch.nn.Module:
    model = copy.deepcopy(backbone).float().eval()
    replace_head(model, len(artifact.manifest.labels))
    with torch.no_grad():
        for name, mask in artifact.masks().items():
            model.get_submodule(name).weight.mul_(mask)
        state = model.state_dict()
        for name, tensor in artifact.task_tensors.items():
            state[name].copy_(tensor)
    return model


def expected_probabilities(model: torch.nn.Module, artifact: TaskArtifact, images) -> torch.Tensor:
    """Softmax of the dedicated network on PIL images, preprocessed as the task declares."""
    transform = build_transform(artifact.manifest.preprocess)
    with torch.no_grad():
        return torch.softmax(model(torch.stack([transform(image) for image in images])), dim=1)
