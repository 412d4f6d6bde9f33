"""Dynamic batching and scheduling: requests for the same task are joined into one forward pass.

Guarantees:
- Admission: at most `max_queued_images` images wait for the engine, counting those still being
  decoded under `admission()` (a lone request larger than that is still admitted into an empty
  queue); beyond it `admission()` and `predict` raise `Overloaded` at once.
- Deadlines: a request whose deadline passes while queued, or whose client disconnects, is removed
  from the queue and never reaches a forward (`piggyback_dropped_images_total`); the caller gets
  `DeadlineExceeded` no later than the deadline.
- No idle engine with work waiting: up to two batches are handed to the single inference thread, so
  the next batch is assembled (and queued in the executor) while the current forward runs. The
  batching delay (`max_delay_s`) is only spent while the engine has nothing else to do.
- No starvation: the next task is the one with the highest `images + age / max_delay_s`, so a
  request gains one image's worth of priority per batching delay it waits; a rare task's lone
  image is overtaken by only a bounded amount of other tasks' work.
- Mixed batches: other tasks waiting with the same input shape and preprocessing join the chosen
  task's forward (`Engine.forward_mixed`) where the cost model (`service.mixed_cost`) measured one
  mixed forward cheaper than their per-task forwards; a batch holds one version of each task. An
  input shape met for the first time is measured on the inference thread, once; until then, per task.
The event loop only ever awaits; forwards run on the one inference thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from service.deadlines import Deadline
from service.engine import Engine, LoadedTask
from service.errors import ClientDisconnected, DeadlineExceeded, Overloaded
from service.mixed_cost import MixedCostModel
from service.mixed_forward import NotMixable

log = logging.getLogger("piggyback.batcher")
PIPELINE_DEPTH = 2  # batches handed to the inference thread: one running, one assembled and ready


@dataclass(eq=False)
class _Pending:
    task: LoadedTask
    images: torch.Tensor
    future: asyncio.Future
    deadline: float | None
    enqueued: float = field(default_factory=time.monotonic)


class Batcher:
    def __init__(
        self,
        engine: Engine,
        max_batch_size: int,
        max_delay_s: float,
        max_queued_images: int | None = None,
        mixing: str = "auto",
    ) -> None:
        self.engine = engine
        self.metrics = engine.metrics
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queued_images = max_queued_images or 4 * max_batch_size
        self.mixing = mixing  # "auto" (the cost model decides), "always" or "off"
        self.costs = MixedCostModel(engine)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._queues: dict[LoadedTask, deque[_Pending]] = {}
        self._queued = 0  # images in self._queues
        self._reserved = 0  # images admitted and still being decoded
        self._running = 0  # batches handed to the executor and not finished
        self._changed = asyncio.Event()  # new work arrived or a batch finished
        self._runner: asyncio.Task | None = None

    def start(self) -> None:
        self._runner = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            try:
                await self._runner
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=True)

    async def calibrate(self, tasks: list[LoadedTask]) -> None:
        """Measure the mixed-batch cost model, on the inference thread, for every input shape that two
        or more of `tasks` share (start-up: the resident tasks, which may mix from the first request).
        Other shapes are measured when two tasks of theirs first wait together."""
        if self.mixing != "auto":
            return
        by_shape: dict[tuple, list[LoadedTask]] = {}
        for task in tasks:
            by_shape.setdefault(task.input_shape, []).append(task)
        loop = asyncio.get_running_loop()
        for shape, same in by_shape.items():
            if len(same) > 1 and self.costs.claim(shape):
                await loop.run_in_executor(self.executor, self.costs.calibrate, same)

    def _calibrate_later(self, shape: tuple, tasks: list[LoadedTask]) -> None:
        if self.costs.claim(shape):
            done = asyncio.get_running_loop().run_in_executor(self.executor, self.costs.calibrate, tasks)
            done.add_done_callback(_log_calibration_failure)

    @contextlib.contextmanager
    def admission(self, count: int) -> Iterator[None]:
        """Holds room for `count` images while the caller decodes them, so decoding work counts against
        the bound too (a burst cannot pile up decodes); raises `Overloaded` if there is no room.
        `predict` right after the block takes the room over without a gap (no await in between)."""
        self.check_admission(count)
        self._reserved += count
        try:
            yield
        finally:
            self._reserved -= count

    def check_admission(self, count: int) -> None:
        """Raise `Overloaded` if `count` more images would overfill the queue (a lone request always fits)."""
        waiting = self._queued + self._reserved
        if waiting and waiting + count > self.max_queued_images:
            self.metrics.rejected.labels(reason="overloaded").inc()
            raise Overloaded(
                f"server overloaded: {waiting} images already wait (at most {self.max_queued_images}); "
                "retry after the Retry-After seconds"
            )

    async def predict(self, task: LoadedTask, images: torch.Tensor, deadline: Deadline | None = None) -> torch.Tensor:
        """Probabilities for `images` under `task`, computed in some batch with other requests.

        Raises `Overloaded` (queue full), `DeadlineExceeded` (deadline passed before the answer) or
        `ClientDisconnected`; in each case the images left the queue without costing a forward.
        """
        count = len(images)
        if deadline is not None and deadline.remaining() <= 0:
            self.metrics.dropped_images.labels(reason="expired").inc(count)
            raise DeadlineExceeded("the request's deadline passed before it could be queued")
        self.check_admission(count)
        pending = _Pending(task, images, asyncio.get_running_loop().create_future(), deadline and deadline.at)
        self._queues.setdefault(task, deque()).append(pending)
        self._queued += count
        self.metrics.queued_images.set(self._queued)
        self._changed.set()

        waiters: set[asyncio.Future] = {pending.future}
        gone = None
        if deadline is not None and deadline.client_gone is not None:
            gone = asyncio.ensure_future(deadline.client_gone())
            waiters.add(gone)
        try:
            timeout = None if deadline is None else deadline.remaining()
            done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self._withdraw(pending, "abandoned")
            raise
        finally:
            if gone is not None:
                gone.cancel()
        if pending.future.done():
            return pending.future.result()
        if gone is not None and gone in done:
            self._withdraw(pending, "abandoned")
            raise ClientDisconnected("client disconnected")
        self._withdraw(pending, "expired")
        raise DeadlineExceeded("the request's deadline passed while it waited for the engine; retry with more time")

    def _withdraw(self, pending: _Pending, reason: str) -> None:
        """Drop a request that is still queued (counted); one already in a batch just loses its answer."""
        pending.future.cancel()
        queue = self._queues.get(pending.task)
        if queue is None or pending not in queue:
            return
        queue.remove(pending)
        if not queue:
            del self._queues[pending.task]
        self._queued -= len(pending.images)
        self.metrics.queued_images.set(self._queued)
        self.metrics.dropped_images.labels(reason=reason).inc(len(pending.images))

    # --- scheduling (event loop) ---------------------------------------------------------------
    def _priority(self, key: LoadedTask, now: float) -> float:
        queue = self._queues[key]
        images = min(sum(len(p.images) for p in queue), self.max_batch_size)
        return images + (now - queue[0].enqueued) / max(self.max_delay_s, 1e-3)

    def _choose(self) -> LoadedTask:
        now = time.monotonic()
        return max(self._queues, key=lambda key: self._priority(key, now))

    async def _wait_change(self, timeout: float | None = None) -> None:
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            pass

    async def _next_task(self) -> LoadedTask:
        """The task to batch next; the batching delay is spent only while nothing else could run."""
        while True:
            if not self._queues:
                await self._wait_change()
                continue
            key = self._choose()
            if self._running or len(self._queues) > 1:
                return key  # a forward runs (this batch queues behind it) or other tasks wait: no delay
            queue = self._queues[key]
            remaining = queue[0].enqueued + self.max_delay_s - time.monotonic()
            if remaining <= 0 or sum(len(p.images) for p in queue) >= self.max_batch_size:
                return key
            await self._wait_change(remaining)  # engine idle, one task: wait briefly for batch-mates

    def _batch_tasks(self, key: LoadedTask) -> tuple[list[LoadedTask], int]:
        """The chosen task alone, or with other waiting tasks of its input shape and preprocessing
        (highest priority first, one version per task name) when one mixed forward is cheaper;
        and how many images the batch may hold."""
        alone = [key], self.max_batch_size
        if self.mixing == "off":
            return alone
        now, names = time.monotonic(), {key.name}
        chosen, counts = [key], [self._waiting(key)]
        for other in sorted(self._queues, key=lambda k: -self._priority(k, now)):
            if other.mix_key == key.mix_key and other.name not in names:
                chosen.append(other)
                counts.append(self._waiting(other))
                names.add(other.name)
        if len(chosen) == 1:
            return alone
        capacity = min(self.max_batch_size, self.engine.mixed_capacity(chosen))
        chosen, counts = _fit(chosen, counts, capacity)
        if len(chosen) == 1:
            return alone
        if self.mixing == "always":
            return chosen, capacity
        if not self.costs.known(key.input_shape):
            self._calibrate_later(key.input_shape, chosen)
            return alone
        return (chosen, capacity) if self.costs.mixed_is_faster(key.input_shape, counts) else alone

    def _waiting(self, key: LoadedTask) -> int:
        return sum(len(p.images) for p in self._queues[key])

    def _take_batch(self, tasks: list[LoadedTask], limit: int) -> list[_Pending]:
        """Dequeue the next batch: for each of `tasks` in turn, its oldest requests, within `limit`
        images (a lone request larger than that still goes, alone)."""
        batch, count, now = [], 0, time.monotonic()
        for key in tasks:
            queue = self._queues[key]
            while queue and (not batch or count + len(queue[0].images) <= limit):
                item = queue.popleft()
                self._queued -= len(item.images)
                if item.deadline is not None and item.deadline <= now:
                    self.metrics.dropped_images.labels(reason="expired").inc(len(item.images))
                    item.future.set_exception(DeadlineExceeded("the request's deadline passed while it was queued"))
                    continue
                batch.append(item)
                count += len(item.images)
            if not queue:
                del self._queues[key]
        self.metrics.queued_images.set(self._queued)
        return batch

    async def _run(self) -> None:
        slots = asyncio.Semaphore(PIPELINE_DEPTH)
        loop = asyncio.get_running_loop()
        while True:
            await slots.acquire()
            batch = self._take_batch(*self._batch_tasks(await self._next_task()))
            if not batch:
                slots.release()
                continue
            now = time.monotonic()
            groups: dict[LoadedTask, list[_Pending]] = {}
            for item in batch:
                self.metrics.queue_wait.labels(task=item.task.name).observe(now - item.enqueued)
                groups.setdefault(item.task, []).append(item)
            # assembled while the previous forward runs; `batch` in group order, as the answers come back
            batch = [item for items in groups.values() for item in items]
            inputs = [(task, torch.cat([item.images for item in items])) for task, items in groups.items()]
            self._running += 1
            done = loop.run_in_executor(self.executor, self._forward, inputs)
            done.add_done_callback(lambda result, batch=batch: self._finish(batch, result, slots))

    def _forward(self, inputs: list[tuple[LoadedTask, torch.Tensor]]) -> list[torch.Tensor]:
        """Runs on the inference thread: each group's probabilities, mixed in one forward when there are
        several groups (per task if their tensors cannot mix). Its time is the engine's busy time."""
        started = time.perf_counter()
        shape = inputs[0][0].input_shape
        try:
            if len(inputs) > 1:
                try:
                    outputs = self.engine.forward_mixed(inputs)
                    self.metrics.batch_tasks.labels(path="mixed").observe(len(inputs))
                    counts = [len(images) for _, images in inputs]
                    self.costs.observe(shape, "mixed", counts, time.perf_counter() - started)
                    return outputs
                except NotMixable as exc:
                    log.warning("these tasks cannot share a forward, running them per task: %s", exc)
            outputs = []
            for task, images in inputs:
                began = time.perf_counter()
                outputs.append(self.engine.forward_task(task, images))
                self.metrics.batch_tasks.labels(path="per_task").observe(1)
                self.costs.observe(shape, "per_task", [len(images)], time.perf_counter() - began)
            return outputs
        finally:
            self.metrics.engine_busy.inc(time.perf_counter() - started)
            for task, images in inputs:
                self.metrics.forwarded_images.labels(task=task.name).inc(len(images))
                self.metrics.batch_size.labels(task=task.name).observe(len(images))

    def _finish(self, batch: list[_Pending], result: asyncio.Future, slots: asyncio.Semaphore) -> None:
        self._running -= 1
        slots.release()
        self._changed.set()
        if result.cancelled():
            for item in batch:
                item.future.cancel()
            return
        if (exc := result.exception()) is not None:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        answers = iter(result.result())  # one tensor per task group, items in group order
        probabilities, start = None, 0
        for index, item in enumerate(batch):
            if index == 0 or item.task is not batch[index - 1].task:
                probabilities, start = next(answers), 0
            if not item.future.done():
                item.future.set_result(probabilities[start : start + len(item.images)])
            start += len(item.images)


def _fit(tasks: list[LoadedTask], counts: list[int], capacity: int) -> tuple[list[LoadedTask], list[int]]:
    """The leading tasks whose images fit `capacity` (the first one always; the last one may be cut)."""
    kept, kept_counts, room = [], [], capacity
    for task, count in zip(tasks, counts, strict=True):
        if kept and room <= 0:
            break
        kept.append(task)
        kept_counts.append(min(count, room) if kept_counts else count)
        room -= count
    return kept, kept_counts


def _log_calibration_failure(result: asyncio.Future) -> None:
    if not result.cancelled() and result.exception() is not None:
        log.error("measuring mixed batches failed, that input shape runs per task: %r", result.exception())
