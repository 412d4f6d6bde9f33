"""The bookkeeping every prediction shares, whichever front door it came through (our route or /v2)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

from service.errors import status_for
from service.metrics import UNKNOWN_TASK, Metrics


@dataclass
class PredictionRecord:
    task_known: bool = False  # set once the name resolved to a task: unknown names never create a series
    status: int = 500


@contextlib.contextmanager
def observed_prediction(metrics: Metrics, name: str) -> Iterator[PredictionRecord]:
    """In-flight gauge, and the latency histogram by task and final HTTP status."""
    started = time.perf_counter()
    record = PredictionRecord()
    metrics.inflight.inc()
    try:
        yield record
        record.status = 200
    except Exception as exc:
        record.status = status_for(exc)
        raise
    finally:
        metrics.inflight.dec()
        label = name if record.task_known else UNKNOWN_TASK
        metrics.request_latency.labels(task=label, status=str(record.status)).observe(time.perf_counter() - started)
