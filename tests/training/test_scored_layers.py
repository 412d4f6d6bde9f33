"""The scored layers: threshold semantics, straight-through gradient, masked forward == weight * mask."""

import pytest
import torch
from torch import nn

from training.masking import (
    BinarizeSTE,
    MaskConfig,
    MaskedConv2d,
    MaskedLinear,
    TernarizeSTE,
    apply_masking,
    wrap_maskable,
)


def test_binary_threshold_is_strict():
    scores = torch.tensor([-1.0, 0.0, 5e-3, 5.0001e-3, 1e-2])
    assert BinarizeSTE.apply(scores, 5e-3).tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]


def test_ternary_threshold_semantics():
    scores = torch.tensor([-1.0, -1e-9, 0.0, 4e-3, 5e-3, 6e-3])
    assert TernarizeSTE.apply(scores, 5e-3).tolist() == [-1.0, -1.0, 0.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("quantize", [BinarizeSTE, TernarizeSTE])
def test_straight_through_gradient_is_identity(quantize):
    scores = torch.randn(7, 5, requires_grad=True)
    upstream = torch.randn(7, 5)
    (quantize.apply(scores, 5e-3) * upstream).sum().backward()
    assert torch.equal(scores.grad, upstream)


def test_scores_gradient_through_layer_is_weight_times_upstream():
    """d loss / d score = d loss / d (masked weight) * weight, passed straight through the threshold."""
    base = nn.Linear(4, 3)
    layer = MaskedLinear(base, MaskConfig())
    x = torch.randn(2, 4)
    layer(x).sum().backward()
    expected = torch.ones(2, 3).T @ x * base.weight.detach()  # grad wrt masked weight, times weight
    torch.testing.assert_close(layer.scores.grad, expected)
    assert base.weight.grad is None


CASES = [
    ("conv", lambda: nn.Conv2d(3, 6, 3, padding=1), (2, 3, 9, 9)),
    ("grouped-conv", lambda: nn.Conv2d(6, 6, 3, stride=2, groups=3, bias=False), (2, 6, 9, 9)),
    ("depthwise-reflect", lambda: nn.Conv2d(4, 4, 3, groups=4, padding=1, padding_mode="reflect"), (1, 4, 7, 7)),
    ("linear", lambda: nn.Linear(11, 5), (3, 11)),
]


@pytest.mark.parametrize("kind", ["binary", "ternary"])
@pytest.mark.parametrize("name,make,shape", CASES, ids=[c[0] for c in CASES])
def test_masked_forward_equals_plain_layer_with_masked_weight(name, make, shape, kind):
    torch.manual_seed(0)
    base = make()
    wrapped = wrap_maskable(base, MaskConfig(kind=kind, init="uniform"))
    mask = wrapped.mask().detach()
    assert set(mask.unique().tolist()) <= {-1.0, 0.0, 1.0}
    reference = type(base)(**_ctor_args(base))
    reference.load_state_dict(base.state_dict())
    with torch.no_grad():
        reference.weight.mul_(mask)
    x = torch.randn(shape)
    torch.testing.assert_close(wrapped(x), reference(x), rtol=0, atol=0)


def _ctor_args(module):
    if isinstance(module, nn.Linear):
        return {"in_features": module.in_features, "out_features": module.out_features, "bias": module.bias is not None}
    return {
        "in_channels": module.in_channels,
        "out_channels": module.out_channels,
        "kernel_size": module.kernel_size,
        "stride": module.stride,
        "padding": module.padding,
        "groups": module.groups,
        "bias": module.bias is not None,
        "padding_mode": module.padding_mode,
    }


def test_constant_init_keeps_every_weight():
    layer = MaskedConv2d(nn.Conv2d(2, 2, 3), MaskConfig())
    assert torch.all(layer.scores == 1e-2) and torch.all(layer.mask() == 1)


def test_apply_masking_wraps_all_but_head_and_skip():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 4), nn.Linear(4, 2))
    wrapped = apply_masking(model, MaskConfig(), skip=frozenset({"2"}))
    assert wrapped == ["0"]
    assert isinstance(model[0], MaskedConv2d) and type(model[2]) is nn.Linear and type(model[3]) is nn.Linear
    x = torch.randn(1, 3, 3, 3)
    assert model(x).shape == (1, 2)
