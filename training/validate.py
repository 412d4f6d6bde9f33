"""Check every `train` argument and the data before any training, so a finished run never fails at export.

Each check raises `InvalidArgument` with one line that names the option or the file and what to do;
the CLI prints it and exits non-zero. Numeric options are checked at parse time by the argparse types.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import torch
from PIL import Image
from torch import nn

from mask_store import TaskStore, maskable_layers
from mask_store.errors import MaskStoreError
from mask_store.image_modes import normalize_image
from mask_store.manifest import MAX_VERSION, TASK_NAME_PATTERN, Preprocess
from mask_store.object_location import is_s3_location, open_objects

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
MAX_IMAGE_SIZE = Preprocess.model_fields["size"].metadata[1].le  # the artifact schema's own bound
ADMIN_TOKEN_VARIABLE = "PIGGYBACK_ADMIN_TOKEN"  # the server's own variable: one export serves both


class InvalidArgument(ValueError):
    """A command-line argument or the data it names cannot produce a valid artifact."""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (learning rates)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def image_size(text: str) -> int:
    """argparse type: an image side the artifact schema accepts (1..1024)."""
    value = positive_int(text)
    if value > MAX_IMAGE_SIZE:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_IMAGE_SIZE}, not {value}")
    return value


def check_url(url: str) -> None:
    """An http(s) URL with a host, e.g. http://127.0.0.1:8000; checked before training, not when uploading."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a port that is no number in 0..65535)
        httpx.URL(url)
    except (ValueError, httpx.InvalidURL) as exc:
        raise InvalidArgument(f"server URL {url!r} is malformed ({exc}); e.g. http://127.0.0.1:8000") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidArgument(f"server URL {url!r} must start with http:// or https:// and name a host")


def admin_token(token: str | None, token_file: Path | None, from_environment: str | None) -> str:
    """The admin token from --token, else --token-file, else PIGGYBACK_ADMIN_TOKEN, stripped as the server strips it.

    The file and the variable keep the token out of the process list, where --token shows it for a whole
    training run. Checked before training: a token no HTTP header can carry would only fail at the upload.
    """
    if token is not None:
        source, value = "--token", token
    elif token_file is not None:
        source = f"--token-file {token_file}"
        try:
            value = token_file.read_bytes().decode("utf-8", errors="replace")
        except OSError as exc:
            raise InvalidArgument(f"{source}: cannot read it ({exc.strerror or exc})") from None
    elif from_environment is not None:
        source, value = ADMIN_TOKEN_VARIABLE, from_environment
    else:
        raise InvalidArgument(f"no admin token: set {ADMIN_TOKEN_VARIABLE}, or pass --token-file FILE (or --token)")
    value = value.strip()
    if not value:
        raise InvalidArgument(f"the admin token from {source} is empty")
    if not all(" " <= char <= "~" for char in value):  # httpx sends header values as ASCII
        raise InvalidArgument(
            f"the admin token from {source} has a non-ASCII or control character, which no HTTP header carries; "
            "use the server's token, e.g. one made by `openssl rand -hex 32`"
        )
    return value


def check_train_args(args: argparse.Namespace) -> None:
    """Everything that can be checked from the arguments alone, against the artifact schema."""
    if not re.fullmatch(TASK_NAME_PATTERN, args.task):
        raise InvalidArgument(
            f"--task {args.task!r}: 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    if args.version is not None and not 1 <= args.version <= MAX_VERSION:
        raise InvalidArgument(
            f"--version must be 1 to {MAX_VERSION}, not {args.version} (omit it to use the current time)"
        )
    if is_s3_location(args.out):
        TaskStore(open_objects(args.out, named_by="--out"))  # wrong credentials or a missing bucket: said now
    else:
        _check_out_file(Path(args.out))
    if args.per_task_bn and args.batch_size < 2:
        raise InvalidArgument("--per-task-bn needs --batch-size of at least 2 (BatchNorm learns from batch statistics)")
    if args.method == "mixed" and not args.finetune_layers.strip():
        raise InvalidArgument("--method mixed needs --finetune-layers (comma-separated layer names)")
    if args.method != "mixed" and args.finetune_layers.strip():
        raise InvalidArgument("--finetune-layers needs --method mixed")
    if args.register:
        check_url(args.register)


def _check_out_file(out: Path) -> None:
    if out.is_dir():
        raise InvalidArgument(f"--out {out} is a directory; name the artifact file, e.g. {out}/task.safetensors")
    parent = next((p for p in out.absolute().parents if p.exists()), None)
    if parent is None or not parent.is_dir():
        raise InvalidArgument(f"--out {out}: {parent} is not a directory")


def finetune_leaves(model: nn.Module, spec: str) -> tuple[str, ...]:
    """Comma-separated names (whitespace ignored) as masked Conv2d/Linear leaves; a block expands to its leaves.

    BatchNorm inside a block follows --per-task-bn; the head is always trained.
    """
    maskable = [name for name, _ in maskable_layers(model)]
    modules = dict(model.named_modules())
    leaves: list[str] = []
    for name in (part.strip() for part in spec.split(",")):
        if not name:
            continue
        if name not in modules:
            raise InvalidArgument(f"--finetune-layers: {name!r} is no layer of this backbone (e.g. {maskable[-1]})")
        inside = [n for n in maskable if n == name or n.startswith(name + ".")]
        if not inside:
            kind = "BatchNorm (use --per-task-bn)" if isinstance(modules[name], BN_TYPES) else "not a masked layer"
            raise InvalidArgument(f"--finetune-layers: {name!r} is {kind}; name Conv2d/Linear layers or blocks")
        leaves += [n for n in inside if n not in leaves]
    return tuple(leaves)


def check_classes(train_classes: list[str], val_classes: list[str]) -> None:
    if train_classes != val_classes:
        raise InvalidArgument(f"train classes {train_classes} differ from val classes {val_classes}")
    if len(train_classes) < 2:
        raise InvalidArgument(
            f"found {len(train_classes)} class ({', '.join(train_classes)}): a classifier needs two classes or more"
        )


def bad_images(paths: list[str], grayscale: bool) -> list[str]:
    """`path: reason` for every file that cannot be decoded and brought to 8 bits as training will."""
    from training.data import open_image

    bad = []
    for path in paths:
        try:
            normalize_image(open_image(path), "L" if grayscale else "RGB")
        except (OSError, SyntaxError, ValueError, MaskStoreError, Image.DecompressionBombError) as exc:
            bad.append(f"{path}: {exc}")
    return bad


@torch.no_grad()
def _forward_fits(model: nn.Module, size: int) -> bool:
    try:
        model(torch.zeros(1, 3, size, size))
    except RuntimeError:
        return False
    return True


def check_input_size(model: nn.Module, size: int) -> None:
    """A dry forward (eval mode, no gradient) at `size`; if too small, name the smallest size that fits."""
    model.eval()
    if _forward_fits(model, size):
        return
    low, high = size, size
    while not _forward_fits(model, high):
        low, high = high, high * 2
        if high > MAX_IMAGE_SIZE:
            raise InvalidArgument(f"--image-size {size}: this backbone fails at every size up to {MAX_IMAGE_SIZE}")
    while high - low > 1:  # smallest size that fits lies in (low, high]
        middle = (low + high) // 2
        low, high = (low, middle) if _forward_fits(model, middle) else (middle, high)
    raise InvalidArgument(f"--image-size {size} is too small for this backbone: use at least {high}")
