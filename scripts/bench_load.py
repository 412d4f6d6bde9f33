r"""Load benchmark (not a test): one task vs a uniform mix of 20 tasks at the same concurrency.

Starts `python -m service` on a free loopback port with the given backbone (random init if no
`--weights`: serving speed does not depend on the weights), registers 20 tasks (random masks:
serving cost does not depend on what a mask learned), then drives it with concurrent clients.
Reports requests/s, latency, the engine's busy fraction (`piggyback_engine_busy_seconds_total`
over wall time), register-to-first-prediction, and raw torch forward throughput of the same
backbone at the same mean batch size, measured in this process after the server stopped, as the
base of an efficiency ratio. The client runs at nice 10, so the server gets the cores first.

    .venv/bin/python scripts/bench_load.py --backbone mobilenet_v2 \
        --weights .cache/demo/mobilenet_v2-b0353104.pth --cache-mb 1024
    .venv/bin/python scripts/bench_load.py --backbone mobilenet_v2 --image-size 224 --profile /tmp/prof
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mask_store import BackboneLayout, Preprocess, artifact_bytes, build_backbone  # noqa: E402
from mask_store.synthetic import random_task_artifact  # noqa: E402
from tests.support.servers import free_port, png_bytes, wait_ready  # noqa: E402

TOKEN = "bench-admin-token-0123456789"


def preprocess_for(size: int) -> Preprocess:
    """Grayscale at small sizes (the demo's digits), RGB from 64 px up (ImageNet-like)."""
    return Preprocess(size=size, grayscale=size < 64)


@contextlib.contextmanager
def running_server(backbone: str, weights: str | None, extra_env: dict[str, str], cpus: set[int] | None = None):
    """`python -m service` on a free port with an empty temporary store; yields (process, base URL).

    `cpus`: the cores the server may run on (all of its threads), so a load client can have the others.
    """
    with tempfile.TemporaryDirectory() as tmp:
        if weights is None:  # random init, saved so the server builds the very same backbone
            torch.manual_seed(0)
            weights = str(Path(tmp) / "backbone.pt")
            torch.save(build_backbone(backbone).state_dict(), weights)
        port = free_port()
        env = {
            **os.environ,
            "PIGGYBACK_BACKBONE": backbone,
            "PIGGYBACK_WEIGHTS": weights,
            "PIGGYBACK_STORE": str(Path(tmp) / "store"),
            "PIGGYBACK_ADMIN_TOKEN": TOKEN,
            "PIGGYBACK_PORT": str(port),
            "PIGGYBACK_LOG_LEVEL": "warning",
            **extra_env,
        }
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        server = subprocess.Popen([sys.executable, "-m", "service"], env=env, preexec_fn=pin)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base, timeout=600, process=server)
            yield server, base, weights
        finally:
            server.terminate()
            server.wait(timeout=120)


def register_tasks(base: str, backbone_name: str, weights: str, names: list[str], size: int, image: bytes) -> list:
    """Registers random-mask tasks; returns register-to-first-prediction times in ms."""
    backbone = build_backbone(backbone_name, weights)
    layout = BackboneLayout.from_model(backbone_name, backbone)
    blobs = [
        artifact_bytes(
            random_task_artifact(
                backbone, backbone_name, task=n, seed=i, density=0.9, preprocess=preprocess_for(size),
                layout=layout, labels=tuple("abcdefghij"),
            )
        )
        for i, n in enumerate(names)
    ]  # fmt: skip
    register_ms = []
    with httpx.Client(timeout=600, headers={"Authorization": f"Bearer {TOKEN}"}) as admin:
        for name, blob in zip(names, blobs, strict=True):
            started = time.perf_counter()
            admin.post(f"{base}/admin/tasks", files={"artifact": (name, blob)}).raise_for_status()
            p = admin.post(f"{base}/tasks/{name}/predict", files=[("images", ("i.png", image, "image/png"))])
            p.raise_for_status()
            register_ms.append(1000 * (time.perf_counter() - started))
    return register_ms


def scrape(base: str) -> dict[str, float]:
    """Sums of the metric families the benchmarks read, and each labelled series on its own."""
    totals: Counter = Counter()
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith("#") or not line:
            continue
        series, value = line.rsplit(" ", 1)
        totals[series.split("{")[0]] += float(value)
        if "{" in series:
            totals[series] = float(value)
    return dict(totals)


async def drive(base: str, tasks: list[str], concurrency: int, seconds: float, image: bytes) -> dict:
    latencies: list[float] = []
    failures = 0
    before = scrape(base)
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
    after = scrape(base)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    latencies.sort()
    batches = delta.get("piggyback_batch_size_count", 0.0)
    return {
        "requests": len(latencies),
        "failures": failures,
        "rps": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        # engine busy time; servers older than that metric only export the forward time
        "busy": delta.get("piggyback_engine_busy_seconds_total", delta.get("piggyback_forward_seconds_sum", 0.0))
        / elapsed,
        "mean_batch": delta.get("piggyback_batch_size_sum", 0.0) / batches if batches else 0.0,
        # forwards and tasks per forward (servers before mixed batches: one task per forward)
        "forwards": delta.get("piggyback_batch_tasks_count", batches),
        "mixed_share": _mixed_share(before, after),
        "tasks_per_forward": delta.get("piggyback_batch_tasks_sum", batches)
        / max(delta.get("piggyback_batch_tasks_count", batches), 1),
    }


def _mixed_share(before: dict, after: dict) -> float:
    """Fraction of forwards that ran several tasks at once."""
    key = 'piggyback_batch_tasks_count{path="mixed"}'
    total = after.get("piggyback_batch_tasks_count", 0.0) - before.get("piggyback_batch_tasks_count", 0.0)
    return (after.get(key, 0.0) - before.get(key, 0.0)) / total if total else 0.0


def raw_forward_rate(backbone_name: str, weights: str, size: int, batch: int, seconds: float = 5.0) -> float:
    """Images/s of plain `model(x)` under inference_mode: the ceiling the service is compared with."""
    model = build_backbone(backbone_name, weights).eval()
    x = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        model(x)
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            torch.softmax(model(x), dim=1)
            count += batch
    return count / (time.perf_counter() - started)


def profile(pid: int, seconds: float, out: Path) -> subprocess.Popen:
    """py-spy sampling of the server (all threads, idle included) in raw collapsed-stack format."""
    spy = Path(sys.executable).with_name("py-spy")  # installed beside this interpreter, else on PATH
    command = [str(spy) if spy.exists() else "py-spy", "record", "--pid", str(pid), "--duration", str(int(seconds)),
               "--rate", "50",
               "--format", "raw", "--threads", "--idle", "--nonblocking", "--output", str(out)]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarize_profile(path: Path, top: int = 12) -> None:
    """Per thread name, the share of samples in each leaf function (idle waits included)."""
    by_thread: dict[str, Counter] = {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1]  # "thread (TID): NAME"; the decode workers share one name
        by_thread.setdefault(thread, Counter())[frames[-1]] += int(count)
    for thread, leaves in sorted(by_thread.items(), key=lambda item: -sum(item[1].values())):
        total = sum(leaves.values())
        print(f"thread {thread}: {total} samples")
        for leaf, n in leaves.most_common(top):
            print(f"  {100 * n / total:5.1f}%  {leaf}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--weights", help="state_dict file; default: random init (fine for speed)")
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--cache-mb", type=float, default=1024, help="server's task-weight cache; 0 = per request")
    parser.add_argument("--kernel", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--mixed", choices=["auto", "always", "off"], default="auto",
                        help="PIGGYBACK_MIXED_BATCHES: images of different tasks in one forward")  # fmt: skip
    parser.add_argument("--torch-threads", type=int, default=0, help="PIGGYBACK_TORCH_THREADS; 0 = default")
    parser.add_argument("--profile", type=Path, help="directory for py-spy profiles of the server (one per run)")
    args = parser.parse_args()
    threads = args.torch_threads or torch.get_num_threads()  # what the server will use (it inherits OMP_NUM_THREADS)
    torch.set_num_threads(threads)  # the raw forward runs on as many threads as the server's

    names = [f"task{i:02d}" for i in range(args.tasks)]
    image = png_bytes(seed=0, size=args.image_size, mode="L" if args.image_size < 64 else "RGB")
    env = {"PIGGYBACK_CACHE_BUDGET_MB": str(args.cache_mb), "PIGGYBACK_KERNEL": args.kernel,
           "PIGGYBACK_DEVICE": args.device, "PIGGYBACK_TORCH_THREADS": str(threads),
           "PIGGYBACK_MIXED_BATCHES": args.mixed}  # fmt: skip
    with running_server(args.backbone, args.weights, env) as (server, base, weights):
        register_ms = register_tasks(base, args.backbone, weights, names, args.image_size, image)
        # raw forwards at full priority while the server idles (its weights file lives only as long as it does)
        # (each as long as a workload, at most 5 s, so that a short rehearsal stays short)
        raw_s, warm_up_s = min(5.0, args.seconds), min(3.0, args.seconds)
        raw_by_batch = {
            b: raw_forward_rate(args.backbone, weights, args.image_size, b, raw_s) for b in (1, args.concurrency)
        }
        os.nice(10)  # from here on this process is only the load client: the server gets the cores first
        asyncio.run(drive(base, names[:1], args.concurrency, warm_up_s, image))  # warm-up
        results = {}
        for label, tasks in (("1 task", names[:1]), (f"{args.tasks} tasks, uniform mix", names)):
            spy = None
            if args.profile:
                args.profile.mkdir(parents=True, exist_ok=True)
                spy = profile(server.pid, args.seconds, args.profile / f"{len(tasks)}-tasks.txt")
            results[label] = asyncio.run(drive(base, tasks, args.concurrency, args.seconds, image))
            if spy is not None:
                spy.wait(timeout=60)
        cache = {
            line.split('"')[1]: float(line.split()[-1])
            for line in httpx.get(f"{base}/metrics").text.splitlines()
            if line.startswith("piggyback_task_cache_events_total")
        }
    print(
        f"machine: {platform.node()} {os.cpu_count()} cores, {platform.processor() or platform.machine()}; "
        f"torch {torch.__version__}, {threads} threads (server and raw forward); backbone {args.backbone} at "
        f"{args.image_size}px; cache {args.cache_mb} MB, kernel {args.kernel}, mixed batches {args.mixed}, "
        f"concurrency {args.concurrency}, "
        f"{args.seconds}s per run; client at nice 10 in the same VM"
    )
    nearest = {label: min(raw_by_batch, key=lambda b: abs(b - r["mean_batch"])) for label, r in results.items()}
    raw = {label: raw_by_batch[batch] for label, batch in nearest.items()}
    print(f"raw torch forward, images/s by batch size: { {b: round(v, 1) for b, v in raw_by_batch.items()} }")
    print(
        "| workload | requests | failures | req/s | p50 ms | p99 ms | images per task per forward | tasks per forward "
        "| mixed forwards | busy | raw img/s | req/s / raw |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, r in results.items():
        print(
            f"| {label} | {r['requests']} | {r['failures']} | {r['rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
            f"| {r['mean_batch']:.2f} | {r['tasks_per_forward']:.2f} | {r['mixed_share']:.0%} | {r['busy']:.2f} "
            f"| {raw[label]:.1f} | {r['rps'] / raw[label]:.2f} |"
        )
    single, mixed = results.values()
    print(f"mixed/single throughput ratio: {mixed['rps'] / single['rps']:.3f}")
    print(
        f"register-to-first-prediction: median {statistics.median(register_ms):.0f} ms, max {max(register_ms):.0f} ms"
    )
    print(f"task cache events: {cache}")
    if args.profile:
        for path in sorted(args.profile.glob("*.txt")):
            print(f"--- py-spy profile {path.name}")
            summarize_profile(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
