"""When one mixed forward beats per-task forwards: measured on this machine and device, per input shape.

Whether mixing pays depends on where the time goes. At 32 px on a 2-core CPU a forward is mostly fixed
cost per call, and 8 tasks in one grouped forward ran 4.3x faster than 8 batch-1 forwards (issue 20's
measurement, weights stacked beforehand); at 224 px the convolutions are compute-bound and the grouped
forward lost (0.78x). On a GPU the break-even moves again. So the batcher asks this model, which times a
few real forwards per input shape (per-task at 1 and B images, mixed at 2 and B images, stacking
included) and fits each path as fixed + per-image cost. A batch is mixed only where the fitted mixed
cost is below the sum of the per-task ones by a margin (`MARGIN`). The four timings are taken in
interleaved rounds and each is the median of its rounds, so a burst of other work on the machine slows
both paths alike instead of deciding for one; the larger batch is as many images as one forward takes in
`PROBE_BUDGET_S` (8 at 32 px, 2 at 224 px on a 2-core CPU), so measuring a large input does not stall
the inference thread for seconds.

A measurement taken once, perhaps while the server was busy, is then kept honest by the forwards
themselves: every forward's time is compared with what its path's line predicts (`observe`), and each
path's prediction is scaled by a running average of that ratio. A path that runs slower under real
load than measured loses the choice, whichever it is.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from service.engine import Engine, LoadedTask

log = logging.getLogger("piggyback.mixed_cost")
PROBE_IMAGES = 8  # the larger batch each path is timed at, at most (capped by the mixed budget too)
PROBE_BUDGET_S = 0.04  # ... and no more images than one per-task forward runs in this long
OBSERVED_WEIGHT = 0.2  # how fast the observed/predicted ratio follows the forwards (running average)
ROUNDS = 5  # interleaved timings of each point, after one warm-up round; the median counts
MARGIN = 0.9  # mixed only when predicted at most 90% of the per-task time: a near tie is not worth the risk


@dataclass(frozen=True)
class Line:
    """Seconds for a forward of n images: fixed + per_image * n."""

    fixed: float
    per_image: float

    def at(self, images: int) -> float:
        return self.fixed + self.per_image * images

    @classmethod
    def through(cls, small: tuple[int, float], large: tuple[int, float]) -> Line:
        if large[0] == small[0]:  # one point (a budget of two images): all of it counted per image
            return cls(fixed=0.0, per_image=small[1] / small[0])
        per_image = max((large[1] - small[1]) / (large[0] - small[0]), 0.0)
        return cls(fixed=max(small[1] - per_image * small[0], 0.0), per_image=per_image)


@dataclass(frozen=True)
class ForwardCosts:
    per_task: Line
    mixed: Line

    def mixed_is_faster(self, counts: list[int], mixed_scale: float = 1.0, per_task_scale: float = 1.0) -> bool:
        """One mixed forward over groups of `counts` images, against one forward per group (each path's
        prediction scaled by how its forwards actually ran against it)."""
        mixed = mixed_scale * self.mixed.at(sum(counts))
        return mixed <= MARGIN * per_task_scale * sum(self.per_task.at(count) for count in counts)

    def describe(self) -> str:
        p, m = self.per_task, self.mixed
        return (
            f"per-task {p.fixed * 1e3:.1f} ms + {p.per_image * 1e3:.2f} ms/image, "
            f"mixed {m.fixed * 1e3:.1f} ms + {m.per_image * 1e3:.2f} ms/image"
        )


class MixedCostModel:
    """Measured costs by input shape; `calibrate` runs forwards, so call it where forwards may run."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._costs: dict[tuple[int, ...], ForwardCosts | None] = {}
        self._started: set[tuple[int, ...]] = set()
        self._scale: dict[tuple[tuple[int, ...], str], float] = {}  # (shape, path) -> observed / predicted
        self._lock = threading.Lock()

    def mixed_is_faster(self, shape: tuple[int, ...], counts: list[int]) -> bool:
        """The choice for a batch of `counts` images per task at `shape` (False while unmeasured)."""
        costs = self._costs.get(shape)
        if costs is None:
            return False
        scale = self._scale.get
        return costs.mixed_is_faster(counts, scale((shape, "mixed"), 1.0), scale((shape, "per_task"), 1.0))

    def observe(self, shape: tuple[int, ...], path: str, counts: list[int], seconds: float) -> None:
        """A forward of `path` ("mixed" or "per_task") over groups of `counts` images took `seconds`."""
        costs = self._costs.get(shape)
        if costs is None:
            return
        line = costs.mixed if path == "mixed" else costs.per_task
        predicted = line.at(sum(counts)) if path == "mixed" else sum(line.at(count) for count in counts)
        ratio = seconds / max(predicted, 1e-6)
        old = self._scale.get((shape, path), 1.0)
        self._scale[(shape, path)] = old + OBSERVED_WEIGHT * (ratio - old)

    def known(self, shape: tuple[int, ...]) -> bool:
        return shape in self._costs

    def claim(self, shape: tuple[int, ...]) -> bool:
        """True once per shape: the caller is the one to calibrate it."""
        with self._lock:
            if shape in self._started:
                return False
            self._started.add(shape)
            return True

    def calibrate(self, tasks: list[LoadedTask]) -> ForwardCosts | None:
        """Time both paths at the input shape of `tasks` (one or more tasks of that shape; two are
        materialized outside the cache and repeated to fill a mixed batch). None (never mix) when the
        mixed budget holds fewer than two images."""
        shape = tasks[0].input_shape
        capacity = min(PROBE_IMAGES, self.engine.mixed_capacity(tasks))
        if capacity < 2:
            self._costs[shape] = None
            log.info("mixed batches at %s: off (PIGGYBACK_MIXED_BUDGET_MB holds %d image)", shape, capacity)
            return None
        engine, tasks = self.engine, tasks[:2]
        params = [engine.materialized(task) for task in tasks]
        batch = torch.randn(capacity, *shape, generator=torch.Generator().manual_seed(0))
        (one,) = _medians([lambda: engine.forward_with(params[0], batch[:1]).cpu()], rounds=1)
        images = max(2, min(capacity, int(PROBE_BUDGET_S / max(one, 1e-6))))
        batch = batch[:images]

        def mixed(n: int) -> Callable[[], object]:
            chosen = [i % len(tasks) for i in range(n)]
            group_tasks, group_params = [tasks[i] for i in chosen], [params[i] for i in chosen]
            group_images = [batch[i : i + 1] for i in range(n)]
            return lambda: engine.forward_mixed_with(group_tasks, group_params, group_images).cpu()

        t1, tb, m2, mb = _medians(
            [
                lambda: engine.forward_with(params[0], batch[:1]).cpu(),
                lambda: engine.forward_with(params[0], batch).cpu(),
                mixed(2),
                mixed(images),
            ]
        )
        costs = ForwardCosts(per_task=Line.through((1, t1), (images, tb)), mixed=Line.through((2, m2), (images, mb)))
        self._costs[shape] = costs
        log.info("mixed batches at %s: %s", shape, costs.describe())
        return costs


def _medians(forwards: list[Callable[[], object]], rounds: int = ROUNDS) -> list[float]:
    """Each forward's median time over `rounds` interleaved rounds, after a warm-up round (the first run
    pays one-off allocations)."""
    for forward in forwards:
        forward()
    samples: list[list[float]] = [[] for _ in forwards]
    for _ in range(rounds):
        for forward, times in zip(forwards, samples, strict=True):
            started = time.perf_counter()
            forward()
            times.append(time.perf_counter() - started)
    return [statistics.median(times) for times in samples]
