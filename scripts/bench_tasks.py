r"""Many registered tasks on one replica (not a test): start-up, memory, cold loads, registration, a long tail.

A store of N tasks (default 10,000) of mobilenet_v2 (random weights) at 32 px, without per-task BN, is
bulk-imported: one artifact whose task name is rewritten per task (the manifest binds the name, so
each task has its own identity and cache entry), every object written, then one index whose entries say
they were proved, as a server's registrations leave them (replicas load them without a proof forward;
the artifact is the same random one for every task). Then a real
`python -m service` with `PIGGYBACK_PRELOAD=pinned` (registered is not resident) is measured:

1. time from process start to `/readyz` 200, and RSS then, against the same server over 20 tasks;
2. the first prediction of cold tasks against a warm one (the difference is the cold load);
3. `POST /admin/tasks` of a new task into the N-task store;
4. a Zipf(1.1) workload over all N tasks, 8 clients, against the same workload over 20 resident tasks:
   twice in a row, `--seconds` each. The first window includes every task's first touch (hundreds of
   cold loads in 20 s); the second is the steady state a long-running replica serves.

    .venv/bin/python scripts/bench_tasks.py --tasks 10000 --seconds 20
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mask_store import BackboneLayout, Preprocess, TaskStore, artifact_bytes, artifact_identity  # noqa: E402
from mask_store.store import INDEX_KEY, StoredVersion, StoreIndex  # noqa: E402
from mask_store.synthetic import random_task_artifact, renamed  # noqa: E402

PX32 = Preprocess(size=32, grayscale=True, mean=(0.5,) * 3, std=(0.5,) * 3)
TOKEN = "bench-admin-token-0123456789"


def register_ms_each(http: httpx.Client, base: str, artifacts: list[bytes]) -> list[float]:
    """`POST /admin/tasks` of each artifact in turn: milliseconds each (the proof forward included)."""
    times = []
    for data in artifacts:
        started = time.perf_counter()
        answer = http.post(f"{base}/admin/tasks", files={"artifact": ("a", data)}, headers=_auth())
        times.append((time.perf_counter() - started) * 1000)
        assert answer.status_code == 201, answer.text
    return times


def build_store(root: Path, count: int, model: torch.nn.Module) -> tuple[Path, bytes]:
    """`count` tasks t00000.. bulk-imported (objects, then one index); returns the store and five new
    artifacts to register."""
    layout = BackboneLayout.from_model("mobilenet_v2", model)
    base = random_task_artifact(model, "mobilenet_v2", task="t", per_task_bn=False, preprocess=PX32, layout=layout)
    store = TaskStore(root)
    tasks = {}
    for i in range(count):
        artifact = renamed(base, f"t{i:05d}")
        identity = artifact_identity(artifact.manifest)
        key = f"t{i:05d}/00000001-{identity[:16]}.safetensors"
        store.objects.put(key, artifact_bytes(artifact))
        tasks[f"t{i:05d}"] = {1: StoredVersion(key=key, identity=identity, proven=True)}
    store.objects.put_if(INDEX_KEY, StoreIndex(generation=1, tasks=tasks).model_dump_json().encode(), None)
    spares = [artifact_bytes(renamed(base, f"new{i}")) for i in range(5)]
    return root, spares


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS:")).split()[1]) / 1024


def start(store: Path, weights: Path, port: int, **settings: str) -> tuple[subprocess.Popen, float]:
    env = {
        **os.environ,
        "PIGGYBACK_BACKBONE": "mobilenet_v2",
        "PIGGYBACK_WEIGHTS": str(weights),
        "PIGGYBACK_STORE": str(store),
        "PIGGYBACK_ADMIN_TOKEN": TOKEN,
        "PIGGYBACK_PORT": str(port),
        "PIGGYBACK_DEVICE": "cpu",
        "PIGGYBACK_LOG_LEVEL": "warning",
        "PIGGYBACK_PRELOAD": "pinned",
        **{f"PIGGYBACK_{k.upper()}": v for k, v in settings.items()},
    }
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "service"], env=env)
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return process, time.monotonic() - started
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise RuntimeError("server exited")
        time.sleep(0.05)


def predict_ms(client: httpx.Client, base: str, name: str, image: bytes) -> float:
    started = time.perf_counter()
    answer = client.post(f"{base}/tasks/{name}/predict", files=[("images", ("a.png", image, "image/png"))])
    assert answer.status_code == 200, answer.text
    return (time.perf_counter() - started) * 1000


def zipf_throughput(base: str, names: list[str], seconds: float, image: bytes, clients: int = 8) -> float:
    """Images per second with tasks drawn from Zipf(1.1) over `names` (rank 1 most popular)."""
    weights = 1 / np.arange(1, len(names) + 1) ** 1.1
    cumulative = np.cumsum(weights / weights.sum())

    def client(seed: int) -> int:
        pick, done = random.Random(seed), 0
        with httpx.Client(timeout=60) as http:
            ends = time.monotonic() + seconds
            while time.monotonic() < ends:
                name = names[int(np.searchsorted(cumulative, pick.random()))]
                predict_ms(http, base, name, image)
                done += 1
        return done

    with ThreadPoolExecutor(clients) as pool:
        return sum(pool.map(client, range(clients))) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--resident-budget-mb", default="256")
    parser.add_argument("--cache-budget-mb", default="256")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None).eval()
    image = _png()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "mobilenet_v2.pt"
        torch.save(model.state_dict(), weights)
        built = time.monotonic()
        many, spares = build_store(Path(tmp) / "many", args.tasks, model)
        few, _ = build_store(Path(tmp) / "few", 20, model)
        print(f"# stores built in {time.monotonic() - built:.0f} s", flush=True)
        budgets = {"resident_budget_mb": args.resident_budget_mb, "cache_budget_mb": args.cache_budget_mb}
        results = {}
        for label, store in (("20 tasks", few), (f"{args.tasks} tasks", many)):
            port = 8600 + len(results)
            process, ready_s = start(store, weights, port, **budgets)
            base = f"http://127.0.0.1:{port}"
            try:
                ready_rss = rss_mb(process.pid)
                names = [f"t{i:05d}" for i in range(int(label.split()[0]))]
                with httpx.Client(timeout=60) as http:
                    cold = [predict_ms(http, base, name, image) for name in names[-10:]]
                    warm = [predict_ms(http, base, names[-1], image) for _ in range(10)]
                    register_ms = statistics.median(register_ms_each(http, base, spares))
                first = zipf_throughput(base, names, args.seconds, image)
                steady = zipf_throughput(base, names, args.seconds, image)
                results[label] = (first, steady)
                rows.append(
                    f"| {label} | {ready_s:.1f} | {ready_rss:.0f} | {rss_mb(process.pid):.0f} | "
                    f"{statistics.median(cold):.1f} | {statistics.median(warm):.1f} | {register_ms:.0f} | "
                    f"{first:.1f} | {steady:.1f} |"
                )
            finally:
                process.terminate()
                process.wait(timeout=60)
    machine = platform.processor() or platform.machine()
    print(f"# {machine}, {os.cpu_count()} cores, torch {torch.__version__}, budgets {budgets}")
    print(
        "| store | ready (s) | RSS at ready (MB) | RSS after load (MB) | cold predict p50 (ms) | "
        "warm predict p50 (ms) | register p50 of 5 (ms) | Zipf(1.1) img/s, first window | "
        "Zipf(1.1) img/s, steady |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    (few_label, few), (many_label, many) = results.items()
    for window, which in (("first window", 0), ("steady", 1)):
        print(f"Zipf throughput ratio {many_label} / {few_label}, {window}: {many[which] / few[which]:.2f}")


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


if __name__ == "__main__":
    main()
