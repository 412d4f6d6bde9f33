"""Helpers the tests (and scripts) import: server settings over a tiny backbone, artifacts, the training CLI."""

from __future__ import annotations

import hashlib
import os
import subprocess

import torch

from mask_store.synthetic import SMALL_GRAY, random_task_artifact  # noqa: F401  (re-exported for the tests)
from tests.support.forked import TRAINING, run_forked

TINY_PREPROCESS = SMALL_GRAY  # 16 px grayscale: every test model runs fast
ADMIN_TOKEN = "test-admin-token-0123456789"


def state_hash(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer, to prove a backbone was never modified."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def server_settings(backbone_file, store, **overrides):
    from service.settings import Settings

    values = dict(
        backbone="resnet18", weights=str(backbone_file), store=store, admin_token=ADMIN_TOKEN, max_batch_delay_ms=2.0
    )
    values.update(overrides)
    return Settings(**values)


def write_digits_imagefolder(root, count: int = 300, seed: int = 0) -> None:
    """A small ImageFolder of sklearn-digit PNGs: root/train/<digit>/*.png and root/val/<digit>/*.png."""
    import numpy as np

    from training.data import sklearn_digits, stratified_split, write_image_folder

    ds = sklearn_digits()
    train, val = stratified_split(ds.subset(np.random.default_rng(seed).permutation(len(ds))[:count]), 0.3, seed=0)
    write_image_folder(train, root, "train")
    write_image_folder(val, root, "val")


def run_training_cli(weights, data, task: str, out, *extra: str) -> subprocess.CompletedProcess:
    """`python -m training train` on resnet18 at 16px grayscale for one epoch, in its own process (forked:
    `tests.support.forked`) as a user would run it."""
    argv = ["train", "--backbone", "resnet18", "--weights", str(weights), "--data", str(data), "--task", task,
            "--out", str(out), "--epochs", "1", "--image-size", "16", "--grayscale", "--no-progress",
            *extra]  # fmt: skip
    return run_forked(TRAINING, argv, dict(os.environ), timeout=300)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`python -m training ...` in this process: (exit status, stdout, stderr) as a shell would see them."""
    from training.cli import main

    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    if isinstance(code, str):  # sys.exit("message") prints the message and exits with 1
        err, code = err + code + "\n", 1
    return code or 0, out, err


def write_folder(root, classes=("a", "b"), train: int = 4, val: int = 2, size: int = 16):
    """A tiny ImageFolder of 8-bit grayscale PNGs whose brightness depends on the class."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(rng.normal(60 + 120 * c, 30, (size, size)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root
