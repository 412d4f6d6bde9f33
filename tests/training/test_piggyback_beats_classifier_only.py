"""The paper's central claim, small enough for CI: on a shifted task, Piggyback clearly beats
training only a new classifier on the same frozen backbone (benchmark preset `ci`)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tests.support.builders import write_digits_imagefolder
from training.benchmark import PRESETS, run


@pytest.mark.slow
def test_piggyback_beats_classifier_only_on_a_shifted_task(tmp_path):
    report = run(PRESETS["ci"], tmp_path)
    accuracy = {(r["task"], r["method"]): r["accuracy"] for r in report["rows"]}
    assert report["backbone_accuracy"] > 0.5  # the backbone really learned Fashion-MNIST (chance 0.1)
    piggyback, classifier = accuracy[("mnist-inverted", "piggyback+bn")], accuracy[("mnist-inverted", "classifier")]
    assert piggyback > classifier + 0.10, (piggyback, classifier)
    assert all(report["order_check"]["bit_identical"].values()), report["order_check"]
    row = next(r for r in report["rows"] if r["method"] == "piggyback+bn")
    assert row["bits_per_param"] <= 1.0
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == report["rows"]
    assert (tmp_path / "masked_out_per_layer.png").stat().st_size > 10_000


@pytest.mark.slow
def test_benchmark_runs_on_imagefolder_tasks_with_a_given_backbone(tmp_path, backbone_file):
    """The real-data path (the paper's CUBS, Cars, ... as ImageFolders over ImageNet weights), tiny."""
    for name, seed in (("one", 0), ("two", 1)):
        write_digits_imagefolder(tmp_path / name, count=120, seed=seed)
    folders = tuple((name, str(tmp_path / name)) for name in ("one", "two"))
    config = dataclasses.replace(
        PRESETS["ci"], weights=str(backbone_file), imagefolders=folders, epochs=1, task_images=64,
        order_check_images=32, methods=("classifier", "piggyback+bn"),
    )  # fmt: skip
    report = run(config, tmp_path / "out")
    assert report["backbone_accuracy"] is None
    assert {(r["task"], r["method"]) for r in report["rows"]} == {
        (t, m) for t in ("one", "two") for m in ("classifier", "piggyback+bn")
    }
    assert report["order_check"]["bit_identical"] == {"one": True, "two": True}
