"""Memory under a long tail of tasks, as production meets it: RSS of the real server over a churning load.

200 mobilenet_v2 tasks (each weight buffer 8.4 MB, under glibc's largest mmap threshold, so a freed one
stays in the heap) behind a cache budget of three buffers, 8 clients on random tasks: nearly every
request is a miss that evicts. The weight buffers must come from a pool allocated once, so the
process holds the budget, not the budget plus every buffer it ever freed.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
import torchvision

from mask_store import BackboneLayout, Preprocess, TaskStore, artifact_bytes
from mask_store.synthetic import renamed
from tests.support.builders import random_task_artifact
from tests.support.servers import metric, png_bytes, rss_mb, start_service, stop_process

TASKS = 200
CLIENTS = 8
WARM_UP_S, CHURN_S = 3, 12  # about 1,500 misses on 2 cores: every one a freed buffer, were there no pool
PX32 = Preprocess(size=32, grayscale=True, mean=(0.5,) * 3, std=(0.5,) * 3)
BUFFERS = 3


@pytest.fixture(scope="module")
def long_tail_store(tmp_path_factory):
    model = torchvision.models.mobilenet_v2(weights=None).eval()
    weights = tmp_path_factory.mktemp("backbone") / "mobilenet_v2.pt"
    torch.save(model.state_dict(), weights)
    layout = BackboneLayout.from_model("mobilenet_v2", model)
    store = tmp_path_factory.mktemp("store")
    tasks = TaskStore(store)
    one = random_task_artifact(model, "mobilenet_v2", task="t", per_task_bn=False, preprocess=PX32, layout=layout)
    for i in range(TASKS):
        tasks.put(artifact_bytes(renamed(one, f"t{i:03d}")))  # each its own identity, cache entry and miss
    buffer_mb = layout.total * 4 / 2**20  # the maskable weights in float32: about 8.4 MB
    return store, weights, buffer_mb


def load(port: int, seconds: float, stop: threading.Event) -> list[int]:
    """8 clients on uniformly random tasks for `seconds`; the statuses they got."""
    image = png_bytes(seed=5, size=32)
    url = f"http://127.0.0.1:{port}/tasks/{{}}/predict"

    def client(seed: int) -> list[int]:
        pick = random.Random(seed)
        statuses = []
        with httpx.Client(timeout=30) as http:
            ends = time.monotonic() + seconds
            while time.monotonic() < ends and not stop.is_set():
                files = [("images", ("a.png", image, "image/png"))]
                statuses.append(http.post(url.format(f"t{pick.randrange(TASKS):03d}"), files=files).status_code)
        return statuses

    with ThreadPoolExecutor(CLIENTS) as pool:
        return [status for statuses in pool.map(client, range(CLIENTS)) for status in statuses]


@pytest.mark.slow  # 200 tasks into a store, a server process, 15 s of load: about 20 s
def test_rss_stays_within_the_cache_budget_under_a_churning_long_tail(long_tail_store):
    store, weights, buffer_mb = long_tail_store
    budget_mb = BUFFERS * buffer_mb + 1
    process, port = start_service(store, weights, backbone="mobilenet_v2", cache_budget_mb=f"{budget_mb:.2f}")
    stop = threading.Event()
    try:
        base = f"http://127.0.0.1:{port}"
        assert load(port, WARM_UP_S, stop)
        warm = rss_mb(process.pid)
        statuses = load(port, CHURN_S, stop)
        grown = rss_mb(process.pid) - warm
        assert statuses and set(statuses) == {200}
        misses = metric(base, "piggyback_task_cache_events_total", event="miss")
        allocations = metric(base, "piggyback_task_cache_events_total", event="allocate")
        assert misses > 10 * allocations  # a churning workload...
        assert allocations == BUFFERS  # ...served from three buffers allocated once
        assert grown < budget_mb + 150, f"RSS grew {grown:.0f} MB after warm-up"
        print(f"RSS {warm:.0f} MB after warm-up, grew {grown:.0f} MB; {misses:.0f} misses, {allocations:.0f} buffers")
    finally:
        stop.set()
        stop_process(process, grace_s=30)
