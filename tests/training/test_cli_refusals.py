"""The training CLI refuses bad arguments and data before training, and never loses a finished model (issue 15)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mask_store import build_backbone, load_artifact
from mask_store.synthetic import random_task_artifact
from tests.support.builders import ADMIN_TOKEN, run_cli, server_settings, write_folder
from tests.support.servers import free_port, serve_in_thread


def train_argv(weights, data, out, *extra: str) -> list[str]:
    return ["train", "--backbone", "resnet18", "--weights", str(weights), "--data", str(data), "--task", "t",
            "--out", str(out), "--epochs", "1", "--image-size", "16", "--grayscale", "--augment", "none",
            "--batch-size", "4", "--version", "1", *extra]  # fmt: skip


@pytest.fixture
def data(tmp_path):
    return write_folder(tmp_path / "data")


def assert_refused_before_training(code, out, err, out_file: Path, *words: str) -> None:
    assert code != 0
    assert "epoch" not in out, "the refusal came after training"
    assert not out_file.exists()
    assert "Traceback" not in err
    for word in words:
        assert word in err, err


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--task", "my digits"], ["--task"]),
        (["--version", "-1"], ["--version"]),
        (["--version", "0"], ["--version"]),
        (["--epochs", "0"], ["--epochs"]),
        (["--lr-decay-every", "0"], ["--lr-decay-every"]),
        (["--batch-size", "0"], ["--batch-size"]),
        (["--batch-size", "1", "--per-task-bn"], ["--batch-size"]),
        (["--lr-scores", "nan"], ["--lr-scores"]),
        (["--lr-head", "-1"], ["--lr-head"]),
        (["--image-size", "0"], ["--image-size"]),
        (["--image-size", "4096"], ["--image-size", "1024"]),
        (["--finetune-layers", "layer4.1.conv2"], ["--method mixed"]),
        (["--method", "mixed"], ["--finetune-layers"]),
        (["--method", "mixed", "--finetune-layers", "layer9"], ["layer9"]),
        (["--method", "mixed", "--finetune-layers", "bn1"], ["bn1", "--per-task-bn"]),
        (["--register", "http://127.0.0.1:9"], ["--token"]),
        (["--register", "127.0.0.1:8000", "--token", "x"], ["http://"]),
    ],
)
def test_bad_arguments_are_refused_before_training(capsys, backbone_file, data, tmp_path, extra, words):
    out_file = tmp_path / "task.safetensors"
    argv = train_argv(backbone_file, data, out_file, *extra)  # argparse keeps an option's last value
    assert_refused_before_training(*run_cli(capsys, *argv), out_file, *words)


def test_out_that_is_a_directory_is_refused(capsys, backbone_file, data, tmp_path):
    (tmp_path / "dir").mkdir()
    code, out, err = run_cli(capsys, *train_argv(backbone_file, data, tmp_path / "dir"))
    assert_refused_before_training(code, out, err, tmp_path / "dir" / "nothing", "--out", "directory")


def test_one_class_is_refused(capsys, backbone_file, tmp_path):
    data = write_folder(tmp_path / "data", classes=("only",))
    code, out, err = run_cli(capsys, *train_argv(backbone_file, data, tmp_path / "t.safetensors"))
    assert_refused_before_training(code, out, err, tmp_path / "t.safetensors", "two classes")


def test_corrupt_images_in_both_splits_are_all_named_before_training(capsys, backbone_file, data, tmp_path):
    good = (data / "val" / "a" / "0.png").read_bytes()
    (data / "val" / "b" / "0.png").write_bytes(good[: len(good) // 2])  # truncated
    (data / "train" / "a" / "x.png").write_bytes(b"not an image at all")
    code, out, err = run_cli(capsys, *train_argv(backbone_file, data, tmp_path / "t.safetensors"))
    assert_refused_before_training(code, out, err, tmp_path / "t.safetensors", "2 unreadable images")
    assert str(data / "val" / "b" / "0.png") in err and str(data / "train" / "a" / "x.png") in err


def test_unreadable_validation_data_after_training_keeps_the_model(resnet18):
    from mask_store import build_transform
    from tests.support.builders import TINY_PREPROCESS
    from training.data import sklearn_digits
    from training.trainer import TrainConfig, train_task

    train = sklearn_digits().subset(np.arange(20)).with_transform(build_transform(TINY_PREPROCESS))

    class VanishedFiles(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            raise OSError(f"image {index} was deleted during training")

    result = train_task(resnet18, train, VanishedFiles(), 10, TrainConfig(epochs=1, batch_size=8, progress=False))
    assert result.val_accuracy is None
    assert result.model(torch.zeros(1, 3, 16, 16)).shape == (1, 10)


def test_finetuning_a_block_trains_its_leaves_and_never_the_masked_weights(capsys, backbone_file, data, tmp_path):
    out_file = tmp_path / "t.safetensors"
    code, out, err = run_cli(
        capsys, *train_argv(backbone_file, data, out_file, "--method", "mixed", "--finetune-layers", " layer4.1 ")
    )
    assert code == 0, err
    artifact = load_artifact(out_file)
    assert artifact.manifest.training["finetune_layers"] == ["layer4.1.conv1", "layer4.1.conv2"]
    backbone = build_backbone("resnet18", backbone_file)
    masks = artifact.masks()
    for name in ("layer4.1.conv1", "layer4.1.conv2"):
        assert torch.all(masks[name] == 1)
        assert not torch.equal(artifact.task_tensors[f"{name}.weight"], backbone.get_submodule(name).weight)
    tuned = {f"{n}.weight" for n in ("layer4.1.conv1", "layer4.1.conv2")}
    assert {k for k in artifact.task_tensors if k.endswith("conv1.weight") or k.endswith("conv2.weight")} == tuned


def test_a_block_given_to_the_trainer_directly_is_refused(resnet18):
    from training.trainer import TrainConfig, prepare_model

    with pytest.raises(ValueError, match="not a masked Conv2d/Linear leaf"):
        prepare_model(resnet18, 2, TrainConfig(method="mixed", finetune_layers=("layer4.1",)))


def test_image_size_too_small_names_the_minimum(capsys, tmp_path, data):
    torch.manual_seed(0)
    alexnet = build_backbone("alexnet")
    torch.save(alexnet.state_dict(), tmp_path / "alexnet.pt")
    argv = train_argv(tmp_path / "alexnet.pt", data, tmp_path / "t.safetensors")
    argv[argv.index("resnet18")] = "alexnet"
    code, out, err = run_cli(capsys, *argv)
    assert_refused_before_training(code, out, err, tmp_path / "t.safetensors", "--image-size 16", "at least")
    minimum = int(err.split("at least")[1].split()[0])
    with torch.no_grad():
        alexnet(torch.zeros(1, 3, minimum, minimum))
        with pytest.raises(RuntimeError):
            alexnet(torch.zeros(1, 3, minimum - 1, minimum - 1))


def test_a_pickled_model_gets_the_projects_own_advice(capsys, tmp_path, data):
    model = build_backbone("resnet18")
    torch.save(model, tmp_path / "whole-model.pt")
    code, out, err = run_cli(capsys, *train_argv(tmp_path / "whole-model.pt", data, tmp_path / "t.safetensors"))
    assert_refused_before_training(code, out, err, tmp_path / "t.safetensors", "not a plain state_dict")
    assert "model.state_dict()" in err and "weights_only" not in err


def test_hidden_folders_are_not_classes(capsys, backbone_file, data, tmp_path):
    for split in ("train", "val"):
        checkpoint = data / split / ".ipynb_checkpoints"
        checkpoint.mkdir()
        (checkpoint / "0-checkpoint.png").write_bytes((data / split / "a" / "0.png").read_bytes())
    (data / "train" / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    code, out, err = run_cli(capsys, *train_argv(backbone_file, data, tmp_path / "t.safetensors"))
    assert code == 0, err
    assert load_artifact(tmp_path / "t.safetensors").manifest.labels == ("a", "b")


def test_one_line_per_epoch_without_a_terminal_and_identical_training_gives_identical_bytes(
    capsys, backbone_file, data, tmp_path
):
    for name, extra in (("first", []), ("second", ["--no-progress"])):
        code, out, err = run_cli(
            capsys, *train_argv(backbone_file, data, tmp_path / f"{name}.safetensors", "--epochs", "2", *extra)
        )
        assert code == 0, err
        assert "\r" not in out + err
        epochs = [line for line in out.splitlines() if " epoch " in line]
        assert len(epochs) == 2 and "epoch 1/2" in epochs[0] and "epoch 2/2" in epochs[1]
    assert (tmp_path / "first.safetensors").read_bytes() == (tmp_path / "second.safetensors").read_bytes()


def test_export_imagefolder_limit_keeps_every_class_in_both_splits(capsys, tmp_path):
    code, out, err = run_cli(
        capsys, "export-imagefolder", "--dataset", "digits", "--out", str(tmp_path / "d"), "--limit", "20"
    )
    assert code == 0, err
    train = sorted(p.name for p in (tmp_path / "d" / "train").iterdir())
    val = sorted(p.name for p in (tmp_path / "d" / "val").iterdir())
    assert train == val == [str(d) for d in range(10)]
    assert sum(1 for _ in (tmp_path / "d").rglob("*.png")) == 20
    code, out, err = run_cli(
        capsys, "export-imagefolder", "--dataset", "digits", "--out", str(tmp_path / "e"), "--limit", "5"
    )
    assert code != 0 and "--limit" in err and "at least 20" in err and "Traceback" not in err


def test_register_uploads_an_existing_artifact(capsys, backbone_file, resnet18, tmp_path):
    artifact_file = tmp_path / "task.safetensors"
    from mask_store import save_artifact

    save_artifact(random_task_artifact(resnet18, "resnet18", task="uploaded"), artifact_file)
    with serve_in_thread(server_settings(backbone_file, tmp_path / "store")) as base:
        code, out, err = run_cli(capsys, "register", str(artifact_file), "--url", base, "--token", ADMIN_TOKEN)
        assert code == 0, err
        assert "registered task uploaded" in out
        import httpx

        assert httpx.get(f"{base}/tasks/uploaded").status_code == 200
        code, out, err = run_cli(
            capsys, "register", str(artifact_file), "--url", base, "--token", "wrong-token-xxxxxxxx"
        )
        assert code == 1 and "403" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "url,words,status", [("127.0.0.1:8000", "http://", 2), ("http://127.0.0.1:{port}", "cannot reach", 1)]
)
def test_register_failures_are_one_clear_line(capsys, tmp_path, resnet18, url, words, status):
    """A refused argument is status 2 before anything is sent; a failed upload is 1 and names the kept file."""
    from mask_store import save_artifact

    artifact_file = tmp_path / "task.safetensors"
    save_artifact(random_task_artifact(resnet18, "resnet18", task="x"), artifact_file)
    url = url.format(port=free_port())  # nothing listens there
    code, _, err = run_cli(capsys, "register", str(artifact_file), "--url", url, "--token", "t")
    assert code == status
    lines = err.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and (status == 2 or str(artifact_file) in lines[0]), err
