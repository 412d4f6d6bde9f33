"""Which layers of a torchvision classifier Piggyback masks, in what order, and the backbone's fingerprint.

The canonical order is `named_modules()` order of the plain (unwrapped) model: every Conv2d and
Linear except the classifier head (the last Linear) and the projections owned by
MultiheadAttention, whose forward reads `.weight` directly rather than calling the module.
Masks are always keyed by these module names, never by position alone.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from mask_store.architectures import check_architecture
from mask_store.errors import BackboneMismatch, UnsupportedArchitecture, WeightsUnavailable
from mask_store.weights import verify_weights_file

MASKABLE_TYPES = (nn.Conv2d, nn.Linear)


def head_module_name(model: nn.Module) -> str:
    """Name of the classifier head: the last Linear in module order (fc, classifier.6, heads.head...)."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise UnsupportedArchitecture(
            f"{type(model).__name__} has no Linear classifier head; Piggyback needs one to replace per task"
        )
    return linears[-1]


def maskable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs that get a mask, in canonical order. Raises if there are none."""
    head = head_module_name(model)
    attention_owned = {
        f"{name}.{child}" if name else child
        for name, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention)
        for child, _ in module.named_children()
    }
    layers = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, MASKABLE_TYPES) and name != head and name not in attention_owned
    ]
    if not layers:
        raise UnsupportedArchitecture(f"{type(model).__name__} has no Conv2d/Linear layers to mask")
    return layers


def replace_head(model: nn.Module, num_classes: int) -> nn.Linear:
    """Swap the classifier head for a fresh Linear with `num_classes` outputs; returns the new head."""
    name = head_module_name(model)
    old = model.get_submodule(name)
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    model.set_submodule(name, new)
    return new


def _load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # weights_only=True refuses arbitrary pickled objects: a state_dict of tensors is all we accept.
    # Its own refusal advises weights_only=False, which would run the file's code: say what to do instead.
    not_plain = f"{path} is not a plain state_dict; save model.state_dict() with torch.save"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UnsupportedArchitecture(not_plain) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UnsupportedArchitecture(not_plain)
    return state


def _torchvision_weights(arch: str, name: str) -> nn.Module:
    """`arch` with torchvision's weights `name`, from torch hub's cache or downloaded (needs internet)."""
    try:
        torchvision.models.get_model_weights(arch).verify(name)
    except (KeyError, ValueError):
        known = ", ".join(w.name for w in torchvision.models.get_model_weights(arch))
        raise WeightsUnavailable(f"{name} is not a torchvision weights name of {arch} (known: {known})") from None
    try:
        return torchvision.models.get_model(arch, weights=name)
    except OSError as exc:  # urllib's URLError (no DNS, no route, refused) and a failed or partial write
        reason = getattr(exc, "reason", None) or exc.strerror or exc
        raise WeightsUnavailable(
            f"tried to download torchvision's {arch} weights {name} and failed ({reason}): a weights name needs "
            "the internet (or torch hub's cache); offline, give a local state_dict file instead"
        ) from exc


def build_backbone(arch: str, weights: str | Path | None = None) -> nn.Module:
    """A torchvision classifier in eval mode with the given weights.

    `weights` is a state_dict file (torch.save or .safetensors), a torchvision weights name such as
    IMAGENET1K_V2 (downloads, needs internet), or None for random initialisation (tests). A file named
    the torchvision way (`mobilenet_v2-b0353104.pth`) must match that sha256 prefix (CorruptWeights).
    The head is resized to whatever the state_dict holds, so a `num_classes=10` backbone loads too.
    """
    check_architecture(arch)
    path = Path(weights) if weights is not None else None
    if path is not None and path.exists():
        verify_weights_file(path)
        state = _load_weights_file(path)
        model = torchvision.models.get_model(arch, weights=None)
        head = head_module_name(model)
        if f"{head}.weight" not in state:
            raise BackboneMismatch(f"{path} has no {head}.weight: it is not a {arch} state_dict")
        if state[f"{head}.weight"].shape[0] != model.get_submodule(head).out_features:
            replace_head(model, state[f"{head}.weight"].shape[0])
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise BackboneMismatch(f"{path} does not fit {arch}: {exc}") from exc
    elif weights is not None and str(weights).isupper():
        model = _torchvision_weights(arch, str(weights))
    elif weights is not None:
        raise FileNotFoundError(f"weights file {weights} does not exist")
    else:
        model = torchvision.models.get_model(arch, weights=None)
    maskable_layers(model)  # fail early, with a clear message, for an architecture we cannot mask
    return model.eval()


@dataclass(frozen=True)
class BackboneLayout:
    """The masked layers of one backbone: names, shapes, flat offsets, and a fingerprint of their weights."""

    arch: str
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    fingerprint: str
    head: str
    state_shapes: dict[str, tuple[int, ...]]  # every parameter and buffer, for checking task overrides

    @classmethod
    def from_model(cls, arch: str, model: nn.Module) -> BackboneLayout:
        layers = maskable_layers(model)
        digest = hashlib.sha256(arch.encode())
        for name, module in layers:
            weight = module.weight.detach().to("cpu", torch.float32).contiguous()
            digest.update(f"{name}:{tuple(weight.shape)}".encode())
            digest.update(weight.numpy())  # the buffer itself: no copy of each weight
        return cls(
            arch=arch,
            names=tuple(name for name, _ in layers),
            shapes=tuple(tuple(module.weight.shape) for _, module in layers),
            fingerprint=digest.hexdigest(),
            head=head_module_name(model),
            state_shapes={name: tuple(t.shape) for name, t in model.state_dict().items()},
        )

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(int(torch.Size(shape).numel()) for shape in self.shapes)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start of each layer in the flat concatenation of all masked weights (and of the mask bits)."""
        starts, total = [], 0
        for numel in self.numels:
            starts.append(total)
            total += numel
        return tuple(starts)

    @property
    def total(self) -> int:
        return sum(self.numels)
