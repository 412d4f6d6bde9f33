"""The embedded default of `make serve`: a backbone pretrained on Fashion-MNIST and demo tasks on digits.

Everything is built from data that ships offline and cached under the output folder, so the first
run takes a few minutes on 2 cores and later runs start at once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mask_store import BackboneLayout, Preprocess, TaskStore, artifact_bytes, build_backbone, build_transform
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
from training.pretrain import pretrain_backbone
from training.trainer import TrainConfig, train_task

DEMO_ARCH = "resnet18"
DEMO_PREPROCESS = Preprocess(size=32, grayscale=True, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
BACKBONE_TRAIN_IMAGES = 8000
DEMO_TASKS = {"mnist": mnist_5k, "digits": sklearn_digits}
OFFLINE = {"mnist5k": mnist_5k, "digits": sklearn_digits, "fashion": lambda: fashion_mnist("test")}


def _sample(dataset: ArrayImageDataset, count: int, seed: int) -> ArrayImageDataset:
    return dataset.subset(np.random.default_rng(seed).permutation(len(dataset))[:count])


def build_demo_backbone(path: Path) -> None:
    transform = build_transform(DEMO_PREPROCESS)
    train = _sample(fashion_mnist("train"), BACKBONE_TRAIN_IMAGES, seed=0).with_transform(transform)
    test = _sample(fashion_mnist("test"), 2000, seed=0).with_transform(transform)
    model, accuracy, seconds = pretrain_backbone(DEMO_ARCH, train, test, num_classes=10, epochs=2)
    print(f"demo backbone {DEMO_ARCH}: Fashion-MNIST test accuracy {accuracy:.4f} ({seconds:.0f}s)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)


def build_demo(out: Path) -> None:
    """Create `out/backbone.pt` and `out/store/` with the demo tasks, skipping whatever already exists."""
    backbone_path = out / "backbone.pt"
    if not backbone_path.exists():
        print("building the demo backbone (first run only)...")
        build_demo_backbone(backbone_path)
    backbone = build_backbone(DEMO_ARCH, backbone_path)
    layout = BackboneLayout.from_model(DEMO_ARCH, backbone)
    store = TaskStore(out / "store")
    transform = build_transform(DEMO_PREPROCESS)
    for name, loader in DEMO_TASKS.items():
        if store.versions(name):
            continue
        print(f"training demo task {name!r} (first run only)...")
        train, val = stratified_split(loader().with_transform(transform), val_fraction=0.2, seed=0)
        config = TrainConfig(epochs=2, per_task_bn=True, lr_scores=1e-3, lr_decay_every=2)
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
    print(f"demo ready: PIGGYBACK_WEIGHTS={backbone_path} PIGGYBACK_STORE={out / 'store'}")


def export_offline_imagefolder(name: str, out: Path, limit: int | None) -> None:
    """Write an offline data set as `out/train/<class>/*.png` and `out/val/<class>/*.png`."""
    dataset = OFFLINE[name]()
    if limit:
        dataset = stratified_sample(dataset, limit, seed=0)
    train, val = stratified_split(dataset, val_fraction=0.2, seed=0)
    write_image_folder(train, out, "train")
    write_image_folder(val, out, "val")
    print(f"wrote {len(train)} training and {len(val)} validation PNGs under {out}")
