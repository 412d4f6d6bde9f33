"""`python -m training ...`: train a task mask, build the demo store, export offline data as ImageFolder."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

from torchvision import transforms

from mask_store import BackboneLayout, Preprocess, TaskStore, artifact_bytes, build_backbone, build_transform
from mask_store.errors import MaskStoreError
from mask_store.fsio import atomic_write_bytes
from mask_store.object_location import is_s3_location, open_objects
from training import backbone_task
from training.data import class_counts, image_folder
from training.export import export_artifact
from training.masking import MaskConfig
from training.trainer import TrainConfig, train_task
from training.validate import (
    ADMIN_TOKEN_VARIABLE,
    InvalidArgument,
    admin_token,
    bad_images,
    check_classes,
    check_input_size,
    check_train_args,
    check_url,
    finetune_leaves,
    image_size,
    positive_float,
    positive_int,
)

AUGMENTATIONS = ("none", "flip", "crop-flip")


def augmentations(name: str, size: int) -> list:
    """PIL-level augmentations applied before the task's own transform, training only."""
    flip = [transforms.RandomHorizontalFlip()]
    return {"none": [], "flip": flip, "crop-flip": [transforms.RandomResizedCrop(size, scale=(0.6, 1.0)), *flip]}[name]


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="learn a task mask over a frozen backbone and write its artifact")
    p.add_argument("--backbone", required=True, help="torchvision architecture name, e.g. resnet18")
    p.add_argument("--weights", required=True, help="state_dict file, or a torchvision weights name (needs internet)")
    p.add_argument("--data", required=True, type=Path, help="ImageFolder root with train/ and val/")
    p.add_argument("--task", required=True, help="task name (letters, digits, . _ -)")
    p.add_argument(
        "--out", required=True, help="artifact file to write, or a store s3://bucket/prefix to publish the task to"
    )
    p.add_argument("--version", type=int, default=None, help="task version >= 1 (default: current unix time)")
    p.add_argument("--method", choices=("piggyback", "mixed"), default="piggyback")
    p.add_argument("--finetune-layers", default="", help="mixed: comma-separated Conv2d/Linear layers or blocks")
    p.add_argument("--epochs", type=positive_int, default=30)
    p.add_argument("--lr-decay-every", type=positive_int, default=15)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--lr-scores", type=positive_float, default=1e-4)
    p.add_argument("--lr-head", type=positive_float, default=1e-3)
    p.add_argument("--per-task-bn", action="store_true", help="learn BatchNorm per task (else frozen)")
    p.add_argument("--ternary", action="store_true", help="masks in {-1, 0, +1} (2 bit planes)")
    p.add_argument("--mask-init", choices=("constant", "uniform"), default="constant")
    p.add_argument("--image-size", type=image_size, default=224)
    p.add_argument("--grayscale", action="store_true", help="inputs are grayscale (replicated to 3 channels)")
    p.add_argument("--augment", choices=AUGMENTATIONS, default="flip")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--register", metavar="URL", help="upload the artifact to a running server when done")
    _token_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no live progress bar (epoch summaries stay)")


def _token_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token", help="the server's admin token (shown in the process list: prefer the two below)")
    p.add_argument("--token-file", type=Path, help="a file holding the admin token (surrounding whitespace ignored)")
    p.epilog = f"The admin token is --token, else --token-file, else the {ADMIN_TOKEN_VARIABLE} variable."


def _admin_token(args: argparse.Namespace) -> str:
    from_environment = os.environ.get(ADMIN_TOKEN_VARIABLE)
    if args.token is None and args.token_file is None and from_environment is None:
        needs = "--register needs" if args.command == "train" else "register needs"
        raise InvalidArgument(
            f"{needs} the server's admin token: pass --token TOKEN or --token-file FILE, or export "
            f"{ADMIN_TOKEN_VARIABLE} in this shell (`{ADMIN_TOKEN_VARIABLE}=... make serve` sets it for make alone)"
        )
    return admin_token(args.token, args.token_file, from_environment)


def usage_error(message: str) -> NoReturn:
    """A refused argument: one line, exit status 2 as argparse's own refusals (a failed run is 1)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def cmd_train(args: argparse.Namespace) -> int:
    """Validate everything (arguments, backbone, input size, every image) first, then train, export, register."""
    preprocess = Preprocess(size=args.image_size, grayscale=args.grayscale)
    try:
        check_train_args(args)
        token = _admin_token(args) if args.register else None
        backbone = build_backbone(args.backbone, args.weights)
        finetune_layers = finetune_leaves(backbone, args.finetune_layers)
        check_input_size(backbone, args.image_size)
        train_set, val_set = image_folder(args.data, "train", preprocess), image_folder(args.data, "val", preprocess)
        check_classes(train_set.classes, val_set.classes)
    except InvalidArgument as exc:
        usage_error(str(exc))
    except (MaskStoreError, FileNotFoundError) as exc:
        sys.exit(f"error: {exc}")
    bad = bad_images([path for ds in (train_set, val_set) for path, _ in ds.samples], args.grayscale)
    if bad:
        sys.exit(f"error: {len(bad)} unreadable images; fix or remove them:\n" + "\n".join(bad))
    layout = BackboneLayout.from_model(args.backbone, backbone)
    train_set.transform = transforms.Compose(
        [*augmentations(args.augment, args.image_size), build_transform(preprocess)]
    )
    print(
        f"{len(train_set)} training images, {len(val_set)} validation images, classes: "
        + ", ".join(f"{c}={n}" for c, n in zip(train_set.classes, class_counts(train_set), strict=True))
    )
    config = TrainConfig(
        method=args.method,
        epochs=args.epochs,
        lr_decay_every=args.lr_decay_every,
        batch_size=args.batch_size,
        lr_scores=args.lr_scores,
        lr_head=args.lr_head,
        per_task_bn=args.per_task_bn,
        finetune_layers=finetune_layers,
        mask=MaskConfig(kind="ternary" if args.ternary else "binary", init=args.mask_init),
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
    )
    result = train_task(backbone, train_set, val_set, len(train_set.classes), config)
    artifact = export_artifact(
        result,
        layout,
        task=args.task,
        version=args.version or int(time.time()),
        labels=list(train_set.classes),
        preprocess=preprocess,
    )
    data = artifact_bytes(artifact)
    if is_s3_location(args.out):  # published through the store's index: replicas polling it serve it
        try:
            TaskStore(open_objects(args.out, named_by="--out")).put(data, layout)
        except MaskStoreError as exc:  # never lose a finished model to the upload
            kept = Path(f"{artifact.manifest.task}-{artifact.manifest.version}.safetensors").absolute()
            atomic_write_bytes(kept, data)
            sys.exit(f"error: could not publish to {args.out}: {exc} (the artifact is kept in {kept})")
        wrote = f"published to {args.out} ({len(data)} bytes)"
    else:
        atomic_write_bytes(Path(args.out), data)
        wrote = f"wrote {args.out} ({len(data)} bytes)"
    m = artifact.manifest
    accuracy = "unavailable" if result.val_accuracy is None else f"{result.val_accuracy:.4f}"
    print(
        f"validation accuracy {accuracy}; {wrote}: "
        f"{m.mask.numel} masked parameters, {m.bits_per_param:.3f} bits/parameter ({m.mask.encoding}), "
        f"density {m.density:.3f}"
    )
    if args.register:
        return cmd_register(data, args.register, token, kept=args.out, trained=True)
    return 0


def cmd_register(
    source: Path | bytes, url: str, token: str, kept: str | Path | None = None, trained: bool = False
) -> int:
    """Upload an artifact (a file, or bytes kept at `kept`; `trained`: by `train --register`); any failure
    is one line on stderr and exit status 1 (the artifact is kept)."""
    from training.register import RegistrationFailed, VersionNotHigher, register_artifact

    try:
        print(register_artifact(source, url, token))
    except VersionNotHigher as exc:
        # register has no --version: the version was fixed when train wrote the artifact
        higher = f"--version {exc.live + 1} or higher"
        todo = f"train again with {higher}" if trained else f"train it again with {higher}, then register that file"
        sys.exit(f"error: registration failed: {exc}; {todo} (the artifact {kept or source} is kept)")
    except (RegistrationFailed, InvalidArgument) as exc:
        sys.exit(f"error: registration failed: {exc} (the artifact {kept or source} is kept)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    demo = sub.add_parser("demo", help="build the embedded default: a backbone and demo tasks (cached)")
    demo.add_argument("--out", type=Path, default=Path(".cache/demo"))
    export = sub.add_parser("export-imagefolder", help="write an offline data set as an ImageFolder of PNGs")
    export.add_argument("--dataset", choices=("mnist5k", "digits", "fashion"), required=True)
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--limit", type=positive_int, default=None, help="at most this many images, stratified")
    register = sub.add_parser("register", help="upload an existing task artifact to a running server")
    register.add_argument("file", type=Path, help="task artifact (.safetensors) written by train")
    register.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    _token_arguments(register)
    backbone_task.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "backbone-task":
        return backbone_task.run(args)
    if args.command == "train":
        return cmd_train(args)
    if args.command == "register":
        try:
            check_url(args.url)
            token = _admin_token(args)
        except InvalidArgument as exc:
            usage_error(str(exc))
        return cmd_register(args.file, args.url, token)
    if args.command == "demo":
        from training.demo import build_demo

        build_demo(args.out)
        return 0
    from training.demo import export_offline_imagefolder

    try:
        export_offline_imagefolder(args.dataset, args.out, args.limit)
    except ValueError as exc:
        sys.exit(f"error: --limit: {exc}")
    return 0
