"""An LRU of materialized task weight buffers in a pool allocated once, under a byte budget.

Every buffer has the backbone's flat-weight size, so the budget is a number of buffers. They are
allocated on first need, up to that number, and never freed: a miss with the pool full evicts the
least recently used task and writes the new task's weights into its buffer. Allocating a fresh
multi-MB buffer per miss instead lets the allocator keep what evictions free (glibc does), and a long
tail of tasks then grows the process far past the budget.

Reuse is safe because the engine fills and reads buffers only under its forward lock: a buffer handed
to one forward is not rewritten before that forward ends.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch


class TaskWeightCache:
    """Maps a task key to its masked flat weight buffer (budget 0: no buffers, masks applied per request).

    `on_event(kind)` is told "hit", "miss", "evict" or "allocate" (metrics). Thread-safe.
    """

    def __init__(self, budget_bytes: int, on_event: Callable[[str], None] = lambda kind: None):
        self.budget_bytes = int(budget_bytes)
        self.on_event = on_event
        self._entries: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._free: list[torch.Tensor] = []
        self.allocated = 0  # buffers ever allocated: at most the budget's worth
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(_nbytes(t) for t in self._entries.values())

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def holds(self, key: Hashable, buffer: torch.Tensor) -> bool:
        """Whether `buffer` is (still) the cached entry of `key`."""
        with self._lock:
            return self._entries.get(key) is buffer

    def capacity(self, like: torch.Tensor) -> int:
        """How many buffers shaped like `like` the budget holds."""
        return self.budget_bytes // max(_nbytes(like), 1)

    def get_or_fill(
        self,
        key: Hashable,
        like: torch.Tensor,
        fill: Callable[[torch.Tensor], None],
        admit: Callable[[], bool] = lambda: True,
    ) -> torch.Tensor | None:
        """The cached buffer for `key`; else a pool buffer (free, new, or the LRU entry's) passed to
        `fill` and kept if `admit()` still holds after the fill (a key retired meanwhile is not put
        back). None when the budget holds no buffer: the caller applies into scratch memory."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.on_event("hit")
                return self._entries[key]
            self.on_event("miss")
            buffer = self._take(like)
        if buffer is None:
            return None
        try:
            fill(buffer)
        except BaseException:
            with self._lock:
                self._free.append(buffer)
            raise
        with self._lock:
            if admit() and key not in self._entries:
                self._entries[key] = buffer
            else:  # still this caller's to read: forwards are serialised, so the next taker comes after it
                self._free.append(buffer)
        return buffer

    def _take(self, like: torch.Tensor) -> torch.Tensor | None:
        if self._free:
            return self._free.pop()
        if self.allocated < self.capacity(like):
            self.allocated += 1
            self.on_event("allocate")
            return torch.empty_like(like)
        if self._entries:
            _, buffer = self._entries.popitem(last=False)
            self.on_event("evict")
            return buffer
        return None

    def discard(self, match: Callable[[Hashable], bool]) -> None:
        """Free every entry whose key matches (a task was unregistered or replaced); its buffer is reused."""
        with self._lock:
            for key in [k for k in self._entries if match(k)]:
                self._free.append(self._entries.pop(key))


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
