"""Images of different tasks in one forward (`service.mixed_forward`) give each task's own answer.

One member of every supported family; tasks mixing binary and ternary masks, per-task BN and the
backbone's, a fine-tuned layer, and heads of different sizes. Compared with each task's own forward.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

from mask_store import Preprocess, artifact_bytes, build_backbone
from mask_store.backbone import BackboneLayout, maskable_layers
from mask_store.synthetic import random_task_artifact
from service.engine import Engine
from service.metrics import Metrics
from service.mixed_cost import MixedCostModel
from service.registry import TaskRegistry
from tests.service.test_architecture_families import FAST, SLOW
from tests.support.builders import server_settings
from tests.support.servers import metric, png_bytes, serve_in_thread

TOLERANCE = 1e-5


def mixed_tasks(model, arch: str, size: int) -> list[bytes]:
    """Three tasks covering what an artifact may substitute: binary and ternary masks, per-task BN and
    the backbone's, a fine-tuned layer, and heads of three sizes."""
    first_layer = next(name for name, _ in maskable_layers(model))
    layout = BackboneLayout.from_model(arch, model)  # fingerprinted once, not per task
    common = dict(preprocess=Preprocess(size=size), layout=layout)
    kinds = [  # density 0.5: bits that do not compress, so that storing vgg16's is not seconds of zlib
        dict(kind="binary", per_task_bn=True, labels=("a", "b", "c"), density=0.5),
        dict(kind="ternary", per_task_bn=False, labels=("a", "b"), density=0.5),
        dict(kind="binary", per_task_bn=False, labels=tuple("abcde"), finetuned=(first_layer,), density=0.5),
    ]
    return [
        artifact_bytes(random_task_artifact(model, arch, task=f"t{i}", seed=i, **common, **kind))
        for i, kind in enumerate(kinds)
    ]


def engine_with_tasks(arch: str, size: int, tmp_path, **settings) -> tuple[Engine, list]:
    torch.manual_seed(0)
    model = build_backbone(arch)
    weights = tmp_path / f"{arch}.pt"
    torch.save(model.state_dict(), weights)
    engine = Engine(server_settings(weights, tmp_path / "store", backbone=arch, **settings), Metrics())
    registry = TaskRegistry.over_store_of(engine)
    return engine, [registry.register(data) for data in mixed_tasks(model, arch, size)]


def check_mixed_equals_own(engine: Engine, tasks, size: int, counts=(1, 2, 3)) -> None:
    generator = torch.Generator().manual_seed(1)
    groups = [(task, torch.randn(n, 3, size, size, generator=generator)) for task, n in zip(tasks, counts, strict=True)]
    mixed = engine.forward_mixed(groups)
    for (task, images), got in zip(groups, mixed, strict=True):
        own = engine.forward_task(task, images)
        assert got.shape == own.shape == (len(images), len(task.manifest.labels))
        torch.testing.assert_close(got, own, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("arch,size", FAST.items())
def test_a_mixed_batch_equals_each_tasks_own_forward(arch, size, tmp_path):
    engine, tasks = engine_with_tasks(arch, size, tmp_path, cache_budget_mb=0)
    check_mixed_equals_own(engine, tasks, size)


@pytest.mark.parametrize("buffers", [2, 64])
def test_a_mixed_batch_stacks_cached_weights_correctly(buffers, tmp_path):
    """64 buffers: every task's weights cached at once, stacked in one copy per tensor; 2 buffers for 3
    tasks: a later task's fill reuses an earlier one's buffer, so tasks are stacked one at a time."""
    flat_mb = 11_166_912 * 4 / 2**20  # resnet18's masked weights in fp32
    engine, tasks = engine_with_tasks("resnet18", 16, tmp_path, cache_budget_mb=buffers * flat_mb + 1)
    assert engine.cache.capacity(engine.flat_weights) == buffers
    check_mixed_equals_own(engine, tasks, 16)
    check_mixed_equals_own(engine, tasks, 16)  # again, now from cache hits


@pytest.mark.slow
@pytest.mark.parametrize("arch,size", SLOW.items())
def test_a_mixed_batch_equals_each_tasks_own_forward_large_families(arch, size, tmp_path):
    engine, tasks = engine_with_tasks(arch, size, tmp_path, cache_budget_mb=0)
    check_mixed_equals_own(engine, tasks, size, counts=(1, 1, 1))  # one image each: vgg16's stack is 0.5 GB an image


def test_mixed_batches_through_the_real_server_answer_as_each_task_alone(tmp_path):
    """Concurrent requests for three tasks share forwards (`piggyback_batch_tasks{path="mixed"}`) and get
    the answers the same images get alone."""
    size = 16
    engine, tasks = engine_with_tasks("mobilenet_v2", size, tmp_path)
    settings = engine.settings.model_copy(update={"mixed_batches": "always", "max_batch_delay_ms": 50})
    requests = [(task.name, png_bytes(seed=i, size=size, mode="RGB")) for i, task in enumerate(tasks * 3)]
    labels = {task.name: len(task.manifest.labels) for task in tasks}

    def scores(answer: httpx.Response) -> list[float]:
        assert answer.status_code == 200, answer.text
        return [s["score"] for s in sorted(answer.json()["predictions"][0]["top_k"], key=lambda s: s["index"])]

    async def concurrently(base: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            return await asyncio.gather(*(
                client.post(f"/tasks/{name}/predict", params={"top_k": labels[name]}, files={"images": ("x.png", data)})
                for name, data in requests
            ))  # fmt: skip

    with serve_in_thread(settings) as base:
        together = asyncio.run(concurrently(base))
        mixed_forwards = metric(base, "piggyback_batch_tasks_count", path="mixed")
        alone = [
            httpx.post(
                f"{base}/tasks/{name}/predict", params={"top_k": labels[name]}, files={"images": ("x.png", data)}
            )
            for name, data in requests
        ]
    assert mixed_forwards >= 1
    for got, own in zip(together, alone, strict=True):
        torch.testing.assert_close(torch.tensor(scores(got)), torch.tensor(scores(own)), rtol=0, atol=TOLERANCE)


def test_the_cost_model_times_both_paths_on_this_machine_without_touching_the_cache(tmp_path):
    engine, tasks = engine_with_tasks("mobilenet_v2", 16, tmp_path)
    before = (engine.cache.allocated, [task.identity in engine.cache for task in tasks])
    costs = MixedCostModel(engine).calibrate(tasks[:2])
    assert costs is not None
    for line in (costs.per_task, costs.mixed):
        assert line.fixed >= 0 and line.per_image >= 0 and line.at(8) > 0
    assert isinstance(costs.mixed_is_faster([1, 1, 1]), bool)
    assert (engine.cache.allocated, [task.identity in engine.cache for task in tasks]) == before
    (tmp_path / "tight").mkdir()
    tight, tight_tasks = engine_with_tasks("mobilenet_v2", 16, tmp_path / "tight", mixed_budget_mb=12)
    assert MixedCostModel(tight).calibrate(tight_tasks[:2]) is None  # 12 MB hold one mobilenet_v2 image: never mixed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["mobilenet_v2", "resnet18"])
def test_on_cuda_a_mixed_batch_equals_each_tasks_own_forward(arch, tmp_path, monkeypatch):
    """The engine on the GPU (Triton mask-apply, grouped convs on CUDA): per-task and mixed forwards agree
    (in full fp32: TF32 convolutions would differ by more than the tolerance on their own)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    engine, tasks = engine_with_tasks(arch, 32, tmp_path, device="cuda")
    assert engine.device.type == "cuda" and engine.kernel_name == "triton"
    check_mixed_equals_own(engine, tasks, 32)
