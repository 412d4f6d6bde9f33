"""An LRU of materialized task weight buffers under a byte budget (0 = apply masks on every request)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch


class TaskWeightCache:
    """Maps a task key to its masked flat weight buffer; evicts least recently used entries to fit.

    `on_event(kind)` is told "hit", "miss" or "evict" (metrics). Thread-safe.
    """

    def __init__(self, budget_bytes: int, on_event: Callable[[str], None] = lambda kind: None):
        self.budget_bytes = int(budget_bytes)
        self.on_event = on_event
        self._entries: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(t.numel() * t.element_size() for t in self._entries.values())

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def will_keep(self, nbytes: int) -> bool:
        """Whether a buffer of this size would be cached (else the caller may reuse scratch memory)."""
        return nbytes <= self.budget_bytes

    def get_or_create(
        self, key: Hashable, create: Callable[[], torch.Tensor], admit: Callable[[], bool] = lambda: True
    ) -> torch.Tensor:
        """The cached buffer for `key`, or `create()`: kept if it fits in the budget and `admit()` holds
        then (checked after the possibly slow `create`, so a key retired meanwhile is not re-inserted)."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.on_event("hit")
                return self._entries[key]
        self.on_event("miss")
        buffer = create()
        size = buffer.numel() * buffer.element_size()
        if not self.will_keep(size) or not admit():
            return buffer
        with self._lock:
            while (
                self._entries
                and sum(t.numel() * t.element_size() for t in self._entries.values()) + size > self.budget_bytes
            ):
                self._entries.popitem(last=False)
                self.on_event("evict")
            self._entries[key] = buffer
        return buffer

    def discard(self, match: Callable[[Hashable], bool]) -> None:
        """Drop every entry whose key matches (a task was unregistered or replaced)."""
        with self._lock:
            for key in [k for k in self._entries if match(k)]:
                del self._entries[key]
