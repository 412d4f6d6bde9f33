"""The engine's tensor substitution, held to `torch.func.functional_call` as the reference."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from mask_store import build_backbone
from service.tensor_swap import TensorSlots


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_backbone("mobilenet_v2").eval()


def replacements(model, seed: int) -> dict[str, torch.Tensor]:
    """Fresh values for every weight, BN buffer and the head: a different network of the same shape."""
    generator = torch.Generator().manual_seed(seed)
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    return {
        name: (
            torch.rand(t.shape, generator=generator) + 0.5
            if name.endswith("running_var")
            else torch.randn(t.shape, generator=generator) * 0.1
        )
        for name, t in state.items()
        if t.is_floating_point()
    }


def test_substituted_forward_equals_functional_call_and_restores_the_module(model):
    before = {name: t.clone() for name, t in model.state_dict().items()}
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    slots = TensorSlots(model)
    with torch.inference_mode():
        for seed in (1, 2):  # two tasks in turn, as the engine alternates them
            tensors = replacements(model, seed)
            with slots.substituted(tensors) as swapped:
                got = swapped(images)
            assert torch.equal(got, functional_call(model, tensors, (images,)))
        partial = {"classifier.1.bias": torch.full_like(model.classifier[1].bias, 3.0)}  # only the head's bias
        with slots.substituted(partial) as swapped:
            assert torch.equal(swapped(images), functional_call(model, partial, (images,)))
        plain = model(images)
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())
    assert torch.equal(plain, functional_call(model, {}, (images,)))


def test_an_error_inside_the_block_and_unknown_names_leave_the_module_as_it_was(model):
    original = model.features[0][0].weight
    slots = TensorSlots(model)
    with pytest.raises(RuntimeError, match="boom"), slots.substituted({"features.0.0.weight": original * 0}):
        assert model.features[0][0].weight is not original
        raise RuntimeError("boom")
    assert model.features[0][0].weight is original
    with pytest.raises(KeyError, match="features.0.0.nope"):
        with slots.substituted({"features.0.0.weight": original * 0, "features.0.0.nope": original}):
            pass
    assert model.features[0][0].weight is original
