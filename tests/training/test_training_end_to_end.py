"""Training end to end on shipped data: it learns, leaves the backbone untouched, and the CLI writes artifacts."""

import numpy as np
import pytest
import torch

from mask_store import BackboneLayout, build_backbone, build_transform, load_artifact, replace_head
from tests.support.builders import TINY_PREPROCESS, run_training_cli, state_hash, write_digits_imagefolder
from training.data import sklearn_digits, stratified_split
from training.export import export_artifact
from training.masking import MaskConfig, MaskedLayer
from training.trainer import TrainConfig, train_task


@pytest.fixture(scope="module")
def digits():
    ds = sklearn_digits().with_transform(build_transform(TINY_PREPROCESS))
    return stratified_split(ds, 0.25, seed=0)


@pytest.mark.parametrize("method,per_task_bn", [("piggyback", True), ("piggyback", False), ("finetune", False)])
def test_training_never_touches_the_backbone(resnet18, digits, method, per_task_bn):
    before = state_hash(resnet18)
    train, val = digits
    small = train.subset(np.arange(64))
    train_task(
        resnet18,
        small,
        val.subset(np.arange(32)),
        10,
        TrainConfig(method=method, per_task_bn=per_task_bn, epochs=1, progress=False),
    )
    assert state_hash(resnet18) == before


@pytest.mark.slow
def test_piggyback_learns_digits_and_exports_exact_masks(resnet18, resnet18_layout, digits):
    train, val = digits
    config = TrainConfig(epochs=2, per_task_bn=True, lr_scores=1e-3, progress=False)
    result = train_task(resnet18, train, val, 10, config)
    assert result.val_accuracy > 0.6  # chance is 0.1
    masks = {n: m.mask().detach() for n, m in result.model.named_modules() if isinstance(m, MaskedLayer)}
    assert any((mask == 0).any() for mask in masks.values())  # the masks really moved
    artifact = export_artifact(
        result, resnet18_layout, task="digits", version=1, labels=list(train.classes), preprocess=TINY_PREPROCESS
    )
    for name, mask in artifact.masks().items():
        assert torch.equal(mask, masks[name])
    assert artifact.manifest.bits_per_param <= 1.0


def test_ternary_and_mixed_export(resnet18, resnet18_layout, digits):
    train, val = digits
    small, small_val = train.subset(np.arange(64)), val.subset(np.arange(32))
    config = TrainConfig(
        method="mixed",
        finetune_layers=("layer4.1.conv2",),
        epochs=1,
        progress=False,
        mask=MaskConfig(kind="ternary", init="uniform"),
    )
    result = train_task(resnet18, small, small_val, 10, config)
    artifact = export_artifact(
        result, resnet18_layout, task="m", version=1, labels=list(train.classes), preprocess=TINY_PREPROCESS
    )
    assert artifact.manifest.mask.kind == "ternary"
    assert set(artifact.masks()["layer1.0.conv1"].unique().tolist()) == {-1.0, 0.0, 1.0}
    assert torch.all(artifact.masks()["layer4.1.conv2"] == 1)
    assert "layer4.1.conv2.weight" in artifact.task_tensors
    assert not torch.equal(artifact.task_tensors["layer4.1.conv2.weight"], resnet18.layer4[1].conv2.weight)


@pytest.mark.slow
def test_cli_trains_on_imagefolder_of_pngs(tmp_path):
    model = build_backbone("resnet18")
    replace_head(model, 10)
    torch.save(model.state_dict(), tmp_path / "bb.pt")
    write_digits_imagefolder(tmp_path / "data")
    out = tmp_path / "task.safetensors"
    run = run_training_cli(tmp_path / "bb.pt", tmp_path / "data", "t", out, "--augment", "none", "--version", "3")
    assert run.returncode == 0, run.stderr
    assert "validation accuracy" in run.stdout and "bits/parameter" in run.stdout
    artifact = load_artifact(out)
    assert artifact.manifest.task == "t" and artifact.manifest.version == 3
    assert artifact.manifest.labels == tuple(str(d) for d in range(10))
    assert artifact.manifest.bits_per_param <= 1.0
    artifact.check_backbone(BackboneLayout.from_model("resnet18", build_backbone("resnet18", tmp_path / "bb.pt")))
