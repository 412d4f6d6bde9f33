"""Soak benchmark (not a test): offer several times the server's capacity and watch what it does.

Starts `python -m service` (default mobilenet_v2, random init: fine for speed, at 224 px RGB) with
one task, measures its capacity closed-loop (8 clients), then offers `--overload` x that rate
open-loop (a request every 1/rate seconds, whatever the answers) for `--seconds`. Reports
goodput vs capacity, the share of 503s, p50/p99 of accepted requests, every other outcome, and
the server's resident memory at start, peak and end. The client runs at nice 10, or, with `--pin`,
on a core of its own: the server (one forward thread) gets core 0 and the client core 1, so time
the client spends waiting for a CPU does not show up as server latency.

    .venv/bin/python scripts/bench_soak.py --seconds 60
    .venv/bin/python scripts/bench_soak.py --seconds 60 --pin
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_load import drive, png_bytes, register_tasks, running_server  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def open_loop(base: str, task: str, rate: float, seconds: float, image: bytes, pid: int) -> dict:
    outcomes: Counter = Counter()
    accepted: list[float] = []
    peak = rss_mb(pid)
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)

    url = f"{base}/tasks/{task}/predict"
    upload = httpx.Request("POST", url, files=[("images", ("i.png", image, "image/png"))])
    body, content_type = upload.read(), upload.headers["content-type"]  # encoded once: the client stays cheap

    async with httpx.AsyncClient(timeout=120, limits=limits) as http:

        async def one() -> None:
            started = time.perf_counter()
            try:
                r = await http.post(url, content=body, headers={"content-type": content_type})
            except httpx.HTTPError as exc:
                outcomes[type(exc).__name__] += 1
                return
            outcomes[r.status_code] += 1
            if r.status_code == 200:
                accepted.append(time.perf_counter() - started)
            elif r.status_code == 503:
                assert "Retry-After" in r.headers, r.headers

        pending = set()
        started = time.perf_counter()
        sent = 0
        while (now := time.perf_counter() - started) < seconds:
            while sent < now * rate:
                pending.add(asyncio.create_task(one()))
                sent += 1
            pending = {t for t in pending if not t.done()}
            peak = max(peak, rss_mb(pid))
            await asyncio.sleep(0.005)
        await asyncio.gather(*pending)
        elapsed = time.perf_counter() - started
    accepted.sort()
    return {
        "sent": sent,
        "outcomes": dict(outcomes),
        "goodput": len(accepted) / elapsed,
        "p50_ms": 1000 * statistics.median(accepted) if accepted else float("nan"),
        "p99_ms": 1000 * accepted[min(len(accepted) - 1, int(0.99 * len(accepted)))] if accepted else float("nan"),
        "peak_mb": peak,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--weights", help="state_dict file; default: random init (fine for speed)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--overload", type=float, default=4.0, help="offered rate as a multiple of capacity")
    parser.add_argument("--request-timeout", type=float, default=5.0, help="PIGGYBACK_REQUEST_TIMEOUT_S")
    parser.add_argument("--pin", action="store_true", help="server on core 0 (1 forward thread), client on core 1")
    args = parser.parse_args()

    image = png_bytes(seed=0, size=args.image_size, mode="L" if args.image_size < 64 else "RGB")
    env = {"PIGGYBACK_REQUEST_TIMEOUT_S": str(args.request_timeout)}
    if args.pin:
        env["PIGGYBACK_TORCH_THREADS"] = "1"
    with running_server(args.backbone, args.weights, env, cpus={0} if args.pin else None) as (server, base, weights):
        register_tasks(base, args.backbone, weights, ["soak"], args.image_size, image)
        if args.pin:
            os.sched_setaffinity(0, {1})  # this process is only the load client from here on, on its own core
        else:
            os.nice(10)
        asyncio.run(drive(base, ["soak"], 8, 3, image))  # warm-up
        capacity = asyncio.run(drive(base, ["soak"], 8, 10, image))["rps"]
        start_mb = rss_mb(server.pid)
        result = asyncio.run(open_loop(base, "soak", args.overload * capacity, args.seconds, image, server.pid))
        end_mb = rss_mb(server.pid)
        metrics = httpx.get(f"{base}/metrics").text
    rejected = sum(float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith("piggyback_rejected_requests_total"))  # fmt: skip
    outcomes = result["outcomes"]
    print(
        f"machine: {platform.node()} {os.cpu_count()} cores, {platform.machine()}; backbone {args.backbone} "
        f"(random init) at {args.image_size}px; default batching and queue bound; "
        f"PIGGYBACK_REQUEST_TIMEOUT_S={args.request_timeout}; "
        + ("server on core 0, client on core 1" if args.pin else "client at nice 10 in the same VM")
    )
    print(f"capacity (closed loop, 8 clients, 10 s): {capacity:.1f} req/s")
    print(f"offered: {args.overload:.1f}x = {args.overload * capacity:.1f} req/s for {args.seconds:.0f} s "
          f"({result['sent']} requests)")  # fmt: skip
    print(f"goodput: {result['goodput']:.1f} req/s = {result['goodput'] / capacity:.2f} x capacity")
    share = outcomes.get(503, 0) / max(1, result["sent"])
    print(f"outcomes: {outcomes}; 503 share {share:.1%} (server counted {rejected:.0f} refusals)")
    print(f"accepted latency: p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms")
    print(f"server RSS: start {start_mb:.0f} MB, peak {result['peak_mb']:.0f} MB, end {end_mb:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
