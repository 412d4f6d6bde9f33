"""The batcher's choice across tasks: fuller batches first, but a waiting request's priority grows with age."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from types import SimpleNamespace

import torch

from service.batcher import Batcher, _Pending
from service.metrics import Metrics

MAX_BATCH, DELAY_S = 8, 0.005


def queued(batcher: Batcher, task: str, images: int, age_s: float) -> None:
    now = time.monotonic()
    item = _Pending(task, torch.zeros(images, 1), asyncio.Future(loop=asyncio.new_event_loop()), None, now - age_s)
    batcher._queues.setdefault(task, deque()).append(item)


def test_fuller_batch_wins_until_the_rare_task_has_waited_its_bound():
    batcher = Batcher(SimpleNamespace(metrics=Metrics()), MAX_BATCH, DELAY_S)
    try:
        queued(batcher, "busy", MAX_BATCH, age_s=0.0)
        queued(batcher, "rare", 1, age_s=0.5 * DELAY_S)
        assert batcher._choose() == "busy"  # a full batch beats a fresh lone image
        # a lone image gains one image of priority per batching delay: after MAX_BATCH delays it wins
        # even against a full batch that has itself just arrived
        now = time.monotonic()
        batcher._queues["busy"][0].enqueued = now
        batcher._queues["rare"][0].enqueued = now - MAX_BATCH * DELAY_S
        assert batcher._choose() == "rare"
    finally:
        batcher.executor.shutdown()


def test_equal_sizes_are_served_oldest_first():
    batcher = Batcher(SimpleNamespace(metrics=Metrics()), MAX_BATCH, DELAY_S)
    try:
        for i, task in enumerate(["a", "b", "c"]):
            queued(batcher, task, 2, age_s=0.01 * (i + 1))
        assert batcher._choose() == "c"
    finally:
        batcher.executor.shutdown()
