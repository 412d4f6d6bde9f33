r"""Mixed-forward benchmark (not a test): forward time per image, per-task vs mixed, by batch and input size.

In one process, an engine over the backbone (random init: speed does not depend on the weights) with
8 random-mask tasks per input size. For B images of B different tasks it times:
- per task: B forwards of one image each (task weights from the cache, as a warm server has them);
- mixed: one forward of the B images (`Engine.forward_mixed`), the stacking of the B tasks' weights
  from the cache into the arena included; and that stacking alone;
- mixed, applied: the alternative stacking, the mask-apply kernel writing each task straight into a
  sample-major [B, weights] buffer (no cache), the forward then reading strided weight views.
Each is the median of `--repeats` runs after a warm-up. Prints a markdown table and, as the last
line, the rows as JSON (`scripts/gpu_check.py` reads it).

    .venv/bin/python scripts/bench_mixed.py --backbone mobilenet_v2 --sizes 32 64 224
    .venv/bin/python scripts/bench_mixed.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mask_store import Preprocess, artifact_bytes, build_backbone  # noqa: E402
from mask_store.synthetic import random_task_artifact  # noqa: E402
from service.engine import Engine  # noqa: E402
from service.metrics import Metrics  # noqa: E402
from service.registry import TaskRegistry
from service.settings import Settings  # noqa: E402

TASKS = 8


def timed(fn, device: torch.device, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def stack_by_applying(engine: Engine, tasks, counts):
    """The alternative to stacking from the cache: masks applied straight into a sample-major buffer,
    the masked layers' stacked weights then strided views of it (BN and heads stacked as usual)."""
    batch = engine.mixer.prepare([t.substituted_shapes for t in tasks], counts)
    rows = torch.empty(len(tasks), engine.flat_weights.numel(), dtype=engine.flat_weights.dtype, device=engine.device)
    masked = {layer.name: layer for layer in tasks[0].manifest.layers}
    for i, task in enumerate(tasks):
        engine._mask_apply(engine.flat_weights, task.nonzero, task.negative, rows[i])
        for owner, keys in batch.stacked.items():
            for key, stacked in keys.items():
                if not (key == "weight" and owner in masked):
                    source = task.overrides.get(f"{owner}.{key}", getattr(engine.mixer._modules[owner], key))
                    stacked[i, : source.shape[0]] = source
        batch.filled[i] = True
    for name, layer in masked.items():
        view = rows[:, layer.bit_offset : layer.bit_offset + layer.numel]
        batch.stacked[name]["weight"] = view.view(len(tasks), *layer.shape)
    return batch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 224])
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--torch-threads", type=int, default=0)
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    device = torch.device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = build_backbone(args.backbone)
        weights = Path(tmp) / "backbone.pt"
        torch.save(model.state_dict(), weights)
        settings = Settings(backbone=args.backbone, weights=str(weights), store=str(Path(tmp) / "store"),
                            device=args.device, cache_budget_mb=4096, mixed_budget_mb=1024)  # fmt: skip
        engine = Engine(settings, Metrics())
        registry = TaskRegistry.over_store_of(engine)
        for size in args.sizes:
            preprocess = Preprocess(size=size)
            tasks = [
                registry.register(
                    artifact_bytes(random_task_artifact(model, args.backbone, task=f"s{size}t{i}", seed=i,
                                                        density=0.9, preprocess=preprocess, labels=tuple("abcdefghij")))
                )
                for i in range(TASKS)
            ]  # fmt: skip
            for batch in args.batches:
                chosen = tasks[:batch]
                images = torch.randn(batch, 3, size, size)
                groups = [(task, images[i : i + 1]) for i, task in enumerate(chosen)]
                per_task = timed(lambda g=groups: [engine.forward_task(t, x) for t, x in g],
                                 device, args.repeats)  # fmt: skip
                mixed = timed(lambda g=groups: engine.forward_mixed(g), device, args.repeats)

                @torch.inference_mode()
                def stack_only(chosen=chosen, batch=batch):
                    prepared = engine.mixer.prepare([t.substituted_shapes for t in chosen], [1] * batch)
                    for i, task in enumerate(chosen):
                        engine.mixer.fill(prepared, i, engine.task_parameters(task))

                stacking = timed(stack_only, device, args.repeats)

                def applied(chosen=chosen, batch=batch, images=images):
                    with torch.inference_mode():
                        prepared = stack_by_applying(engine, chosen, [1] * batch)
                        engine.mixer.run(prepared, images.to(device))

                mixed_applied = timed(applied, device, args.repeats)
                rows.append({"size": size, "batch": batch, "per_task_ms": 1e3 * per_task / batch,
                             "mixed_ms": 1e3 * mixed / batch, "stacking_ms": 1e3 * stacking / batch,
                             "mixed_applied_ms": 1e3 * mixed_applied / batch, "speedup": per_task / mixed})  # fmt: skip
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(
        f"machine: {platform.node()} {os.cpu_count()} cores, {where}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {args.backbone} on {device}, float32; median of {args.repeats}"
    )
    print("| input px | images (tasks) | per-task ms/image | mixed ms/image | of which stacking | "
          "mixed, masks applied into the stack | per-task / mixed |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['batch']} | {r['per_task_ms']:.2f} | {r['mixed_ms']:.2f} | {r['stacking_ms']:.2f} "
              f"| {r['mixed_applied_ms']:.2f} | {r['speedup']:.2f}x |")  # fmt: skip
    print(json.dumps({"device": str(device), "backbone": args.backbone, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
