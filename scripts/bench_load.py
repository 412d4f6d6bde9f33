r"""Load benchmark (not a test): one task vs a uniform mix of 20 tasks at the same concurrency.

Starts `python -m service` on a free loopback port with the given backbone, registers 20 tasks
(random masks over that backbone: serving cost does not depend on what a mask learned), then
drives it with concurrent clients from this process. Also measures register-to-first-prediction.

    .venv/bin/python scripts/bench_load.py --backbone mobilenet_v2 \
        --weights .cache/demo/mobilenet_v2-b0353104.pth --cache-mb 1024
    .venv/bin/python scripts/bench_load.py --backbone mobilenet_v2 \
        --weights .cache/demo/mobilenet_v2-b0353104.pth --cache-mb 0
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mask_store import BackboneLayout, Preprocess, artifact_bytes, build_backbone  # noqa: E402
from mask_store.synthetic import random_task_artifact  # noqa: E402
from tests.servers import free_port, png_bytes, wait_ready  # noqa: E402

TOKEN = "bench-admin-token-0123456789"


async def drive(base: str, tasks: list[str], concurrency: int, seconds: float, image: bytes) -> dict:
    latencies: list[float] = []
    failures = 0
    deadline = time.perf_counter() + seconds

    async def client(worker: int) -> None:
        nonlocal failures
        async with httpx.AsyncClient(timeout=60) as http:
            i = worker
            while time.perf_counter() < deadline:
                task = tasks[i % len(tasks)]
                i += concurrency
                started = time.perf_counter()
                response = await http.post(
                    f"{base}/tasks/{task}/predict", files=[("images", ("i.png", image, "image/png"))]
                )
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    failures += 1

    started = time.perf_counter()
    await asyncio.gather(*(client(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": len(latencies),
        "failures": failures,
        "rps": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--weights", required=True)
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument(
        "--cache-mb", type=float, default=1024, help="server's task-weight cache; 0 = apply per request"
    )
    parser.add_argument("--kernel", default="auto")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    backbone = build_backbone(args.backbone, args.weights)
    layout = BackboneLayout.from_model(args.backbone, backbone)
    preprocess = Preprocess(size=args.image_size, grayscale=True, mean=(0.5,) * 3, std=(0.5,) * 3)
    names = [f"task{i:02d}" for i in range(args.tasks)]
    artifacts = [
        random_task_artifact(
            backbone,
            args.backbone,
            task=n,
            seed=i,
            density=0.9,
            preprocess=preprocess,
            layout=layout,
            labels=tuple("abcdefghij"),
        )
        for i, n in enumerate(names)
    ]
    image = png_bytes(seed=0, size=args.image_size)
    with tempfile.TemporaryDirectory() as store:
        port = free_port()
        env = {
            **os.environ,
            "PIGGYBACK_BACKBONE": args.backbone,
            "PIGGYBACK_WEIGHTS": args.weights,
            "PIGGYBACK_STORE": store,
            "PIGGYBACK_ADMIN_TOKEN": TOKEN,
            "PIGGYBACK_PORT": str(port),
            "PIGGYBACK_CACHE_BUDGET_MB": str(args.cache_mb),
            "PIGGYBACK_KERNEL": args.kernel,
            "PIGGYBACK_DEVICE": args.device,
            "PIGGYBACK_LOG_LEVEL": "warning",
        }
        server = subprocess.Popen([sys.executable, "-m", "service"], env=env)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base, process=server)
            register_ms = []
            blobs = [artifact_bytes(artifact) for artifact in artifacts]  # serialized before timing
            with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {TOKEN}"}) as admin:
                for name, blob in zip(names, blobs, strict=True):
                    started = time.perf_counter()
                    r = admin.post(f"{base}/admin/tasks", files={"artifact": (name, blob)})
                    r.raise_for_status()
                    p = admin.post(f"{base}/tasks/{name}/predict", files=[("images", ("i.png", image, "image/png"))])
                    p.raise_for_status()
                    register_ms.append(1000 * (time.perf_counter() - started))
            asyncio.run(drive(base, names[:1], args.concurrency, 3, image))  # warm-up
            single = asyncio.run(drive(base, names[:1], args.concurrency, args.seconds, image))
            mixed = asyncio.run(drive(base, names, args.concurrency, args.seconds, image))
            metrics = httpx.get(f"{base}/metrics").text
        finally:
            server.terminate()
            server.wait(timeout=60)
    cache = {
        line.split("{")[1].split('"')[1]: float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("piggyback_task_cache_events_total")
    }
    print(
        f"machine: {platform.node()} {os.cpu_count()} cores, {platform.processor() or platform.machine()}; "
        f"backbone {args.backbone} at {args.image_size}px, {layout.total} masked weights; "
        f"cache {args.cache_mb} MB, kernel {args.kernel}, concurrency {args.concurrency}, {args.seconds}s per run"
    )
    print("| workload | requests | failures | req/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|")
    for label, r in (("1 task", single), (f"{args.tasks} tasks, uniform mix", mixed)):
        print(
            f"| {label} | {r['requests']} | {r['failures']} | {r['rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |"
        )
    print(f"mixed/single throughput ratio: {mixed['rps'] / single['rps']:.3f}")
    print(
        f"register-to-first-prediction: median {statistics.median(register_ms):.0f} ms, max {max(register_ms):.0f} ms"
    )
    print(f"task cache events: {cache}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
