"""Every loader's labels are balanced and aligned with its images; splits keep every class."""

import numpy as np
import pytest

from tests.support.builders import TINY_PREPROCESS
from training.data import (
    class_counts,
    fashion_mnist,
    image_folder,
    mnist_5k,
    sklearn_digits,
    stratified_split,
    write_image_folder,
)

LOADERS = {
    "fashion-train": (lambda: fashion_mnist("train"), 60000, (28, 28)),
    "fashion-test": (lambda: fashion_mnist("test"), 10000, (28, 28)),
    "mnist5k": (mnist_5k, 5000, (28, 28)),
    "digits": (sklearn_digits, 1797, (8, 8)),
}


@pytest.mark.parametrize("name", LOADERS)
def test_loader_size_shape_and_class_balance(name):
    load, size, shape = LOADERS[name]
    ds = load()
    assert len(ds) == size and ds.images.shape[1:] == shape and ds.images.dtype == np.uint8
    counts = class_counts(ds)
    assert len(counts) == 10 and counts.min() > 0.7 * size / 10 and counts.max() < 1.3 * size / 10
    assert ds.images.max() > 200  # intensities really span 0..255 (digits are rescaled from 0..16)


def test_labels_belong_to_their_images():
    """A wrong label column would still be balanced: check that class means differ (images carry the label)."""
    ds = mnist_5k()
    means = np.stack([ds.images[ds.labels == c].mean(axis=0) for c in range(10)])
    # a "1" has far less ink than an "0" or an "8"
    assert means[1].sum() < 0.7 * means[0].sum() and means[1].sum() < 0.7 * means[8].sum()


def test_stratified_split_shuffles_sorted_sources():
    ds = mnist_5k()
    train, val = stratified_split(ds, 0.2, seed=0)
    assert len(train) + len(val) == len(ds)
    assert np.all(class_counts(val) > 0) and np.all(class_counts(train) > 0)
    assert len(set(val.labels[:50].tolist())) > 5  # not sorted by label any more


def test_image_folder_round_trip(tmp_path):
    ds = sklearn_digits().subset(np.arange(40))
    write_image_folder(ds, tmp_path, "train")
    folder = image_folder(tmp_path, "train", TINY_PREPROCESS)
    assert folder.classes == sorted(set(ds.classes[i] for i in ds.labels))
    image, label = folder[0]
    assert image.shape == (3, 16, 16)
