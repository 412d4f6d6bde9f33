"""Run a module with some of its parameters and buffers replaced, for one forward, cheaply.

`torch.func.functional_call` does the same, but its generic machinery (name resolution, tied-weight
checks, setattr per tensor) cost about 3 ms per call on mobilenet_v2's 314 tensors on the 2-core
VM, a tenth of a 224-px single-image forward (docs/benchmarks.md). Here every name is resolved once,
to the module dict that holds it; a swap is then a dict store per tensor, undone in `finally`.
The module's own tensors are never written, only displaced while the forward runs, so callers must
serialise forwards (the engine's `_forward_lock`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn


class TensorSlots:
    """Where each named parameter and buffer of `module` lives: (the dict holding it, its key)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._slots: dict[str, tuple[dict, str]] = {}
        for prefix, owner in module.named_modules():
            for store in (owner._parameters, owner._buffers):
                for key, value in store.items():
                    if value is not None:
                        self._slots[f"{prefix}.{key}" if prefix else key] = (store, key)

    @contextlib.contextmanager
    def substituted(self, tensors: Mapping[str, torch.Tensor]) -> Iterator[nn.Module]:
        """The module with `tensors` in place of its own (by state_dict name) until the block exits."""
        unknown = tensors.keys() - self._slots.keys()
        if unknown:
            raise KeyError(f"not a parameter or buffer of the module: {sorted(unknown)[:5]}")
        saved = [(store, key, store[key]) for store, key in (self._slots[name] for name in tensors)]
        try:
            for name, tensor in tensors.items():
                store, key = self._slots[name]
                store[key] = tensor
            yield self.module
        finally:
            for store, key, original in saved:
                store[key] = original
