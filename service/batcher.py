"""Dynamic batching: requests for the same task are joined into one forward pass.

A single dispatcher coroutine takes the task whose oldest request has waited longest, waits until
that task has `max_batch_size` images queued or its oldest request is `max_delay` old, and runs
the batch on the one inference thread. The event loop only ever awaits; it never runs a forward.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from service.engine import Engine, LoadedTask


@dataclass(eq=False)
class _Pending:
    task: LoadedTask
    images: torch.Tensor
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(self, engine: Engine, max_batch_size: int, max_delay_s: float):
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._queues: dict[LoadedTask, deque[_Pending]] = defaultdict(deque)
        self._wakeup = asyncio.Event()
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

    async def run_in_inference_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def predict(self, task: LoadedTask, images: torch.Tensor) -> torch.Tensor:
        """Probabilities for `images` under `task`, computed in some batch with other requests."""
        pending = _Pending(task, images, asyncio.get_running_loop().create_future())
        self._queues[task].append(pending)
        self._wakeup.set()
        return await pending.future

    def _queued_images(self, key) -> int:
        return sum(len(p.images) for p in self._queues[key])

    def _take_batch(self, key) -> list[_Pending]:
        queue, batch, count = self._queues[key], [], 0
        while queue and (not batch or count + len(queue[0].images) <= self.max_batch_size):
            item = queue.popleft()
            batch.append(item)
            count += len(item.images)
        if not queue:
            del self._queues[key]
        return batch

    async def _run(self) -> None:
        while True:
            if not any(self._queues.values()):
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            key = min((k for k, q in self._queues.items() if q), key=lambda k: self._queues[k][0].enqueued)
            deadline = self._queues[key][0].enqueued + self.max_delay_s
            while self._queued_images(key) < self.max_batch_size and (remaining := deadline - time.perf_counter()) > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout=remaining)
                except TimeoutError:
                    break
            batch = [p for p in self._take_batch(key) if not p.future.cancelled()]
            if batch:
                await self._run_batch(batch)

    async def _run_batch(self, batch: list[_Pending]) -> None:
        task = batch[0].task
        started = time.perf_counter()
        name = task.manifest.task
        for item in batch:
            self.engine.metrics.queue_wait.labels(task=name).observe(started - item.enqueued)
        images = torch.cat([item.images for item in batch])
        self.engine.metrics.batch_size.labels(task=name).observe(len(images))
        try:
            probabilities = await self.run_in_inference_thread(self.engine.forward_task, task, images)
        except Exception as exc:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        start = 0
        for item in batch:
            if not item.future.done():
                item.future.set_result(probabilities[start : start + len(item.images)])
            start += len(item.images)
