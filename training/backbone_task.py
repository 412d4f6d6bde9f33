"""Task 0 of a backbone: the backbone's own classifier as a task artifact (`python -m training backbone-task`).

The task is exactly the backbone: every mask bit set, the backbone's own BN and head as task tensors,
its category names and evaluation transform from torchvision's weights metadata (offline, inside
torchvision). Served, it answers what the torchvision model answers on the same image.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

from mask_store import BackboneLayout, Preprocess, TaskArtifact, build_backbone, make_artifact
from training.masking import MaskConfig
from training.trainer import BN_TYPES


def weights_metadata(arch: str, weights: str | Path) -> torchvision.models.WeightsEnum:
    """The torchvision weights entry for a weights name (IMAGENET1K_V1) or a file named as torchvision names it."""
    entries = list(torchvision.models.get_model_weights(arch))
    name = Path(str(weights)).name
    for entry in entries:
        if name in (entry.name, Path(entry.url).name):
            return entry
    known = ", ".join(f"{e.name} ({Path(e.url).name})" for e in entries)
    raise ValueError(f"{weights} is not one of torchvision's {arch} weights ({known}); pass --labels for other weights")


def preprocess_of(entry: torchvision.models.WeightsEnum) -> Preprocess:
    """torchvision's evaluation transform for these weights: resize the shorter side, centre crop, mean/std."""
    transform = entry.transforms()
    return Preprocess(
        size=transform.crop_size[0],
        resize=transform.resize_size[0],
        mean=tuple(transform.mean),
        std=tuple(transform.std),
    )


def backbone_tensors(model: nn.Module, layout: BackboneLayout) -> dict[str, torch.Tensor]:
    """The head and every BatchNorm of the backbone, unchanged, keyed by the backbone's own names."""
    state = model.state_dict()
    keep = {f"{layout.head}.weight", f"{layout.head}.bias"}
    for name, module in model.named_modules():
        if isinstance(module, BN_TYPES):
            keep |= {f"{name}.{suffix}" for suffix in ("weight", "bias", "running_mean", "running_var")}
    return {key: state[key].detach().cpu().clone() for key in sorted(keep) if key in state}


def backbone_task(
    arch: str,
    weights: str | Path,
    *,
    task: str,
    version: int,
    labels: list[str] | None = None,
    preprocess: Preprocess | None = None,
) -> TaskArtifact:
    """An artifact that serves the backbone's own classifier: all-ones mask, original BN and head.

    Labels and preprocessing come from torchvision's metadata for `weights` unless both are given.
    """
    model = build_backbone(arch, weights)
    layout = BackboneLayout.from_model(arch, model)
    if labels is None or preprocess is None:
        entry = weights_metadata(arch, weights)
        labels = labels if labels is not None else list(entry.meta["categories"])
        preprocess = preprocess or preprocess_of(entry)
    head = model.get_submodule(layout.head)
    if len(labels) != head.out_features:
        raise ValueError(f"{len(labels)} labels for a head with {head.out_features} outputs")
    masks = {name: torch.ones(shape) for name, shape in zip(layout.names, layout.shapes, strict=True)}
    return make_artifact(
        layout=layout,
        masks=masks,
        kind="binary",
        threshold=MaskConfig().threshold,
        task=task,
        version=version,
        labels=labels,
        task_tensors=backbone_tensors(model, layout),
        preprocess=preprocess,
        training={"method": "backbone", "weights": Path(str(weights)).name},
    )


def add_parser(sub) -> None:
    """The `backbone-task` subcommand of `python -m training`."""
    p = sub.add_parser("backbone-task", help="turn a backbone's own classifier into a task artifact (task 0)")
    p.add_argument("--backbone", required=True, help="torchvision architecture name, e.g. mobilenet_v2")
    p.add_argument("--weights", required=True, help="state_dict file named as torchvision names it, or a weights name")
    p.add_argument("--task", default="imagenet", help="task name (default: imagenet)")
    p.add_argument("--out", required=True, type=Path, help="artifact file to write")
    p.add_argument("--version", type=int, default=None, help="task version (default: current unix time)")
    p.add_argument("--labels", type=Path, help="a file with one class name per line, in head order (other weights)")
    p.add_argument("--image-size", type=int, default=224, help="with --labels: the centre crop")
    p.add_argument("--resize", type=int, default=256, help="with --labels: the shorter side before cropping")


def run(args: argparse.Namespace) -> int:
    from mask_store import save_artifact

    labels = preprocess = None
    if args.labels:
        labels = [line.strip() for line in args.labels.read_text().splitlines() if line.strip()]
        preprocess = Preprocess(size=args.image_size, resize=args.resize)
    artifact = backbone_task(
        args.backbone,
        args.weights,
        task=args.task,
        version=args.version or int(time.time()),
        labels=labels,
        preprocess=preprocess,
    )
    save_artifact(artifact, args.out)
    size, classes = args.out.stat().st_size, len(artifact.manifest.labels)
    print(f"wrote {args.out} ({size} bytes): task {args.task!r}, {classes} classes")
    return 0
