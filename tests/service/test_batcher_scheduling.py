"""The batcher's choice across tasks: fuller batches first, but a waiting request's priority grows with age."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from service.batcher import Batcher, _Pending
from service.metrics import Metrics
from service.mixed_cost import ForwardCosts, Line

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


def mixing_batcher(mode: str = "auto") -> Batcher:
    engine = SimpleNamespace(metrics=Metrics(), mixed_capacity=lambda tasks: 16)
    return Batcher(engine, MAX_BATCH, DELAY_S, mixing=mode)


@dataclass(eq=False)
class FakeTask:
    """What the batcher reads of a LoadedTask; hashed by identity, as LoadedTask is."""

    name: str
    version: int = 1
    size: int = 32

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (3, self.size, self.size)

    @property
    def mix_key(self) -> tuple:
        return (self.input_shape, "imagenet")


def task(name: str, size: int = 32, version: int = 1) -> FakeTask:
    return FakeTask(name, version, size)


SMALL = ForwardCosts(per_task=Line(fixed=10e-3, per_image=1e-3), mixed=Line(fixed=2e-3, per_image=2e-3))
LARGE = ForwardCosts(per_task=Line(fixed=10e-3, per_image=30e-3), mixed=Line(fixed=10e-3, per_image=50e-3))


def test_other_tasks_join_a_mixed_batch_where_the_measured_cost_says_it_is_faster():
    batcher = mixing_batcher()
    try:
        a, b, c = task("a"), task("b"), task("c")
        big, other_version = task("big", size=224), task("a", version=2)
        for t, age in [(a, 0.02), (b, 0.01), (c, 0.0), (big, 0.0), (other_version, 0.0)]:
            queued(batcher, t, 1, age_s=age)
        batcher.costs._costs[a.input_shape] = SMALL
        tasks, limit = batcher._batch_tasks(a)
        # same input shape and preprocessing, highest priority first; never a second version of "a" nor 224 px
        assert tasks == [a, b, c] and limit == MAX_BATCH
        batcher.costs._costs[a.input_shape] = LARGE  # where mixing is slower, the task goes alone
        assert batcher._batch_tasks(a) == ([a], MAX_BATCH)
    finally:
        batcher.executor.shutdown()


def test_an_unmeasured_input_shape_runs_per_task_and_is_measured_once():
    measured = []

    async def scenario() -> None:
        batcher = mixing_batcher()
        batcher.costs.calibrate = lambda tasks: measured.append([t.name for t in tasks])
        a, b = task("a"), task("b")
        queued(batcher, a, 1, age_s=0.0)
        queued(batcher, b, 1, age_s=0.0)
        assert batcher._batch_tasks(a) == ([a], MAX_BATCH)
        assert batcher._batch_tasks(b) == ([b], MAX_BATCH)
        await batcher.stop()

    asyncio.run(scenario())
    assert measured == [["a", "b"]]


def test_mixing_off_and_always():
    for mode, expected in [("off", 1), ("always", 2)]:
        batcher = mixing_batcher(mode)
        try:
            a, b = task("a"), task("b")
            queued(batcher, a, 1, age_s=0.0)
            queued(batcher, b, 1, age_s=0.0)
            assert len(batcher._batch_tasks(a)[0]) == expected
        finally:
            batcher.executor.shutdown()


def test_forwards_slower_than_measured_take_the_choice_away_from_their_path():
    """The measurement said mixed (SMALL); mixed forwards then run ten times slower than it predicted
    (a busy machine, say): after a few of them the same batch goes per task."""
    batcher = mixing_batcher()
    try:
        a, b, c = task("a"), task("b"), task("c")
        for t in (a, b, c):
            queued(batcher, t, 1, age_s=0.0)
        batcher.costs._costs[a.input_shape] = SMALL
        assert batcher._batch_tasks(a)[0] == [a, b, c]
        for _ in range(20):
            batcher.costs.observe(a.input_shape, "mixed", [1, 1, 1], 10 * SMALL.mixed.at(3))
        assert batcher._batch_tasks(a) == ([a], MAX_BATCH)
        for _ in range(20):  # per-task forwards turn out even slower: mixed wins again
            batcher.costs.observe(a.input_shape, "per_task", [1], 30 * SMALL.per_task.at(1))
        assert batcher._batch_tasks(a)[0] == [a, b, c]
    finally:
        batcher.executor.shutdown()
