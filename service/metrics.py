"""Prometheus metrics of one app instance (own registry, so tests can build several apps).

Label values are bounded: `task` only ever takes registered task names (a request for an unknown
name is counted under UNKNOWN_TASK), `status` HTTP codes, `kind` error class names, `kernel` the
few mask-apply implementations.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

UNKNOWN_TASK = "_unknown"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_latency = Histogram(
            "piggyback_request_latency_seconds",
            "End-to-end predict latency, decode to response",
            ["task", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "piggyback_queue_wait_seconds",
            "Time a request waited for its batch to start",
            ["task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.mask_apply = Histogram(
            "piggyback_mask_apply_seconds",
            "Time to materialize a task's masked weights",
            ["kernel"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.forward = Histogram(
            "piggyback_forward_seconds", "Forward pass time per batch", ["task"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "piggyback_batch_size", "Images per forward pass", ["task"], buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_tasks = Histogram(
            "piggyback_batch_tasks",
            "Tasks per forward pass, by path: one task per forward (per_task) or several in one (mixed)",
            ["path"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge("piggyback_inflight_requests", "Predict requests being served", registry=r)
        self.registered_tasks = Gauge("piggyback_registered_tasks", "Tasks currently registered", registry=r)
        self.resident_tasks = Gauge(
            "piggyback_resident_tasks", "Registered tasks loaded on this replica's device", registry=r
        )
        self.resident_bytes = Gauge(
            "piggyback_resident_bytes", "Device bytes of the resident tasks' masks, BN and heads", registry=r
        )
        self.host_tier_tasks = Gauge(
            "piggyback_host_tier_tasks",
            "Verified task artifacts kept in host memory (PIGGYBACK_HOST_BUDGET_MB)",
            registry=r,
        )
        self.host_tier_bytes = Gauge("piggyback_host_tier_bytes", "Host bytes of the kept artifacts", registry=r)
        self.host_tier_hits = Counter(
            "piggyback_host_tier_hits", "Task loads served from host memory instead of the store", registry=r
        )
        self.host_tier_evictions = Counter(
            "piggyback_host_tier_evictions", "Artifacts dropped to keep within PIGGYBACK_HOST_BUDGET_MB", registry=r
        )
        self.cold_loads = Histogram(
            "piggyback_cold_load_seconds",
            "Loading a task on its first use here: from the host tier or the store (read, checksums, a proof "
            "forward if no server proved it), to the device",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.resident_evictions = Counter(
            "piggyback_resident_evictions", "Tasks unloaded to keep within PIGGYBACK_RESIDENT_BUDGET_MB", registry=r
        )
        self.errors = Counter("piggyback_errors", "Client and server errors by kind", ["kind"], registry=r)
        self.cache_events = Counter(
            "piggyback_task_cache_events",
            "Task weight cache hits, misses, evictions and pool buffer allocations",
            ["event"],
            registry=r,
        )
        # overload and deadlines: proof that refused, expired and abandoned work never reaches a forward
        self.rejected = Counter(
            "piggyback_rejected_requests", "Predictions refused at once with 503", ["reason"], registry=r
        )
        self.dropped_images = Counter(
            "piggyback_dropped_images", "Queued images dropped before any forward pass", ["reason"], registry=r
        )
        self.forwarded_images = Counter(
            "piggyback_forwarded_images", "Images that entered a forward pass", ["task"], registry=r
        )
        self.queued_images = Gauge("piggyback_queued_images", "Images waiting for the engine", registry=r)
        self.engine_busy = Counter(
            "piggyback_engine_busy_seconds",
            "Inference-thread time spent on batches; rate() of it is the engine's busy fraction",
            registry=r,
        )

        self.task_load_failures = Counter(
            "piggyback_task_load_failures",
            "Stored task versions this replica could not load or prove (it keeps serving the previous one)",
            ["kind"],
            registry=r,
        )
        self.store_sync_errors = Counter(
            "piggyback_store_sync_errors",
            "Polls of the shared store that failed (the replica keeps serving what it has)",
            ["kind"],
            registry=r,
        )

    def forget_task(self, name: str) -> None:
        """Remove every series labelled with task `name`, so unregistered tasks do not pile up in /metrics."""
        for metric in vars(self).values():
            if isinstance(metric, MetricWrapperBase) and "task" in metric._labelnames:
                metric.remove_by_labels({"task": name})

    def cache_event(self, event: str) -> None:
        self.cache_events.labels(event=event).inc()
