r"""Per-forward cost of serving a task (not a test): the engine's forward vs plain `model(x)`.

A uniform many-task load gets one-image batches, so whatever the engine adds per forward (the task's
tensors substituted into the backbone, the softmax) is paid per request. This times, in one
process and one run, at the same batch: plain `model(x)`; the engine's forward for one task over
and over; the engine's forward for 20 tasks in turn (cached weights); and the same substitution done
by `torch.func.functional_call`, the engine's former method, as the comparison.

    .venv/bin/python scripts/bench_task_switch.py --image-size 224
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mask_store import BackboneLayout, Preprocess, artifact_bytes, build_backbone  # noqa: E402
from mask_store.synthetic import random_task_artifact  # noqa: E402
from service.engine import Engine  # noqa: E402
from service.metrics import Metrics  # noqa: E402
from service.registry import TaskRegistry
from service.settings import Settings  # noqa: E402


def per_call_ms(fn, calls: int) -> float:
    for i in range(3):
        fn(i)
    started = time.perf_counter()
    for i in range(calls):
        fn(i)
    return (time.perf_counter() - started) / calls * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--calls", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_backbone(args.backbone).eval()
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(model.state_dict(), f"{tmp}/weights.pt")
        settings = Settings(
            backbone=args.backbone, weights=f"{tmp}/weights.pt", store=f"{tmp}/store", admin_token="b" * 32
        )
        engine = Engine(settings, Metrics())
        registry = TaskRegistry.over_store_of(engine)
        preprocess = Preprocess(size=args.image_size, grayscale=False)
        layout = BackboneLayout.from_model(args.backbone, model)
        tasks = [
            registry.register(
                artifact_bytes(
                    random_task_artifact(
                        model, args.backbone, task=f"t{i}", seed=i, preprocess=preprocess, layout=layout
                    )
                )
            )
            for i in range(args.tasks)
        ]
        images = torch.randn(args.batch, 3, args.image_size, args.image_size)

        @torch.inference_mode()
        def via_functional_call(i: int) -> torch.Tensor:
            task = tasks[i % len(tasks)]
            return torch.softmax(functional_call(engine.backbone, engine.task_parameters(task), (images,)), dim=1)

        print(
            f"machine: {platform.node() or 'vm'}, {platform.machine()}, torch {torch.__version__}, "
            f"{args.threads} threads; {args.backbone} at {args.image_size}px, batch {args.batch}, {args.tasks} tasks"
        )
        columns = ["round", "model(x) ms", "engine, 1 task", "engine, tasks in turn", "functional_call, in turn"]
        print("| " + " | ".join([*columns, "in turn / model(x)"]) + " |")
        print("|---|---|---|---|---|---|")
        for round_ in range(1, args.rounds + 1):
            raw = per_call_ms(lambda i: torch.inference_mode()(engine.backbone)(images), args.calls)
            one = per_call_ms(lambda i: engine.forward_task(tasks[0], images), args.calls)
            turn = per_call_ms(lambda i: engine.forward_task(tasks[i % len(tasks)], images), args.calls)
            old = per_call_ms(via_functional_call, args.calls)
            print(f"| {round_} | {raw:.2f} | {one:.2f} | {turn:.2f} | {old:.2f} | {turn / raw:.3f} |")


if __name__ == "__main__":
    main()
