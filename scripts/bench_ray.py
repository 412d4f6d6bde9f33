"""Ray Serve benchmark (not a test): task routing vs none, and 1 vs 2 replicas.

(a) 2 replicas, 40 tasks drawn uniformly, each replica's weight cache sized for 20 tasks: cache hit
    rate (summed over the replicas' own /metrics) and throughput, with task routing and without.
(b) throughput with 1 and with 2 replicas (routing on, 10 tasks: every one fits in the cache).

Without --dashboard it starts a local two-node Ray cluster on loopback (one CPU per node, token
auth) and stops it with `ray stop` at the end. On a real cluster, point it at the head and at a
store and backbone path that every node sees (the script writes them):

    .venv/bin/python scripts/bench_ray.py
    RAY_AUTH_MODE=token RAY_AUTH_TOKEN=... .venv/bin/python scripts/bench_ray.py \\
        --dashboard http://HEAD:8265 --proxy http://HEAD:8000 --data /shared/piggyback-bench
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mask_store import TaskStore, artifact_bytes, build_backbone  # noqa: E402
from mask_store.backbone import maskable_layers  # noqa: E402
from mask_store.synthetic import random_task_artifact  # noqa: E402
from tests.support.servers import free_port, png_bytes  # noqa: E402

BIN = Path(sys.executable).parent


def run(args: list[str], env: dict) -> str:
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def prepare(data: Path, arch: str, tasks: int) -> tuple[Path, Path, int]:
    """Backbone file and a store of `tasks` random-mask tasks; returns them and one task's weight bytes."""
    torch.manual_seed(0)
    model = build_backbone(arch)
    weights, store = data / "backbone.pt", data / "store"
    torch.save(model.state_dict(), weights)
    for i in range(tasks):
        TaskStore(store).put(artifact_bytes(random_task_artifact(model, arch, task=f"t{i:02d}", seed=i)))
    per_task = sum(m.weight.numel() * 4 for _, m in maskable_layers(model))
    return weights, store, per_task


def deploy(env: dict, dashboard: str, proxy_port: int, replicas: int, routing: bool, variables: dict) -> None:
    config = yaml.safe_load((ROOT / "docker" / "ray-serve.yaml").read_text())
    config["http_options"] = {"host": "0.0.0.0", "port": proxy_port}
    app = config["applications"][0]
    app["args"]["routing"] = routing
    app["runtime_env"]["env_vars"].update(variables)
    replica = next(d for d in app["deployments"] if d["name"] == "PiggybackReplica")
    replica.pop("autoscaling_config", None)
    replica["num_replicas"] = replicas
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as file:
        yaml.safe_dump(config, file)
    run([str(BIN / "serve"), "deploy", file.name, f"--address={dashboard}"], env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = yaml.safe_load(run([str(BIN / "serve"), "status", f"--address={dashboard}"], env))
        app_status = status.get("applications", {}).get("piggyback", {})
        states = app_status.get("deployments", {}).get("PiggybackReplica", {}).get("replica_states", {})
        if app_status.get("status") == "RUNNING" and states == {"RUNNING": replicas}:
            return
        time.sleep(2)
    raise TimeoutError("deployment did not reach RUNNING")


def cache_events(proxy: str) -> dict[str, float]:
    """piggyback_task_cache_events_total by event, summed over every live replica's own /metrics."""
    totals: dict[str, float] = {}
    for target in httpx.get(f"{proxy}/metrics/targets", timeout=30).json():
        text = httpx.get(f"http://{target['targets'][0]}/metrics", timeout=30).text
        for family in text_string_to_metric_families(text):
            if family.name == "piggyback_task_cache_events":
                for sample in family.samples:
                    if sample.name.endswith("_total"):
                        event = sample.labels["event"]
                        totals[event] = totals.get(event, 0) + sample.value
    return totals


def drive(proxy: str, tasks: list[str], concurrency: int, seconds: float) -> dict:
    image = png_bytes(0)
    done, failed, lock = [0], [0], threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(worker: int) -> None:
        rng = random.Random(worker)
        with httpx.Client(timeout=120) as http:
            while time.perf_counter() < deadline:
                task = rng.choice(tasks)
                response = http.post(f"{proxy}/tasks/{task}/predict", files=[("images", ("x.png", image, "image/png"))])
                with lock:
                    (done if response.status_code == 200 else failed)[0] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"requests": done[0], "failed": failed[0], "rps": done[0] / (time.perf_counter() - started)}


def measure(proxy: str, tasks: list[str], concurrency: int, seconds: float) -> dict:
    drive(proxy, tasks, concurrency, min(5.0, seconds))  # warm: first materializations, connections
    before = cache_events(proxy)
    result = drive(proxy, tasks, concurrency, seconds)
    after = cache_events(proxy)
    hits = after.get("hit", 0) - before.get("hit", 0)
    misses = after.get("miss", 0) - before.get("miss", 0)
    result["hit_rate"] = hits / max(hits + misses, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dashboard", help="Ray dashboard URL of a running cluster (default: start a local one)")
    parser.add_argument("--proxy", help="Serve proxy URL of that cluster")
    parser.add_argument("--data", type=Path, help="directory every node sees, for the backbone and the store")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--cached-tasks", type=int, default=20, help="tasks a replica keeps resident and cached")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30)
    args = parser.parse_args()

    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    local = args.dashboard is None
    data = args.data or Path(tempfile.mkdtemp(prefix="bench-ray-"))
    data.mkdir(parents=True, exist_ok=True)
    weights, store, per_task = prepare(data, args.arch, args.tasks)
    variables = {
        "PIGGYBACK_BACKBONE": args.arch,
        "PIGGYBACK_WEIGHTS": str(weights),
        "PIGGYBACK_STORE": str(store),
        "PIGGYBACK_DEVICE": "auto",
        "PIGGYBACK_CACHE_BUDGET_MB": str((args.cached_tasks + 0.5) * per_task / 2**20),
        # the resident set (and so Serve's routing): a task's bit-packed masks plus BN and head, with room
        "PIGGYBACK_RESIDENT_BUDGET_MB": str((args.cached_tasks + 0.5) * (per_task / 4 / 8 + 65536) / 2**20),
    }
    proxy_port = free_port() if local else int(args.proxy.rsplit(":", 1)[1])
    if local:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
        gcs, dashboard_port = free_port(), free_port()
        node = ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
        run([str(BIN / "ray"), "start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard_port}",
             "--dashboard-host=127.0.0.1", *node], env)  # fmt: skip
        run([str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs}", f"--dashboard-agent-listen-port={free_port()}",
             f"--metrics-export-port={free_port()}", *node], env)  # fmt: skip
        args.dashboard, args.proxy = f"http://127.0.0.1:{dashboard_port}", f"http://127.0.0.1:{proxy_port}"
    all_tasks = [f"t{i:02d}" for i in range(args.tasks)]
    rows = []
    try:
        for label, replicas, routing, tasks in [
            (f"(a) 2 replicas, {args.tasks} tasks, task routing", 2, True, all_tasks),
            (f"(a) 2 replicas, {args.tasks} tasks, no routing", 2, False, all_tasks),
            ("(b) 1 replica, 10 tasks", 1, True, all_tasks[:10]),
            ("(b) 2 replicas, 10 tasks", 2, True, all_tasks[:10]),
        ]:
            deploy(env, args.dashboard, proxy_port, replicas, routing, variables)
            result = measure(args.proxy, tasks, args.concurrency, args.seconds)
            rows.append((label, result))
            print(f"{label}: {result}", flush=True)
    finally:
        if local:
            subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{args.arch} 16px gray, concurrency {args.concurrency}, {args.seconds:.0f} s per row\n")  # fmt: skip
    print("| setup | requests/s | cache hit rate | failed |\n|---|---|---|---|")
    for label, r in rows:
        print(f"| {label} | {r['rps']:.1f} | {r['hit_rate']:.1%} | {r['failed']} |")
    one = next(r["rps"] for label, r in rows if "1 replica" in label)
    two = next(r["rps"] for label, r in rows if label.startswith("(b) 2"))
    print(f"\n2 vs 1 replica throughput ratio: {two / one:.2f}")


if __name__ == "__main__":
    main()
