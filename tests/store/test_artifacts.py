"""Artifacts round-trip exactly; the store refuses every bad artifact and stays byte-identical."""

import json
import struct

import pytest
import torch

from mask_store import (
    BackboneMismatch,
    CorruptArtifact,
    TaskNotFound,
    TaskStore,
    TaskVersionExists,
    artifact_bytes,
    build_backbone,
    load_artifact,
    save_artifact,
)
from mask_store.artifact import MANIFEST_KEY
from tests.store.test_store_rules import visible
from tests.support.builders import random_task_artifact


@pytest.mark.parametrize("kind", ["binary", "ternary"])
def test_round_trip_is_exact(tmp_path, resnet18, kind):
    artifact = random_task_artifact(resnet18, "resnet18", kind=kind, density=0.6)
    loaded = load_artifact(save_artifact(artifact, tmp_path / "t.safetensors"))
    assert loaded.manifest == artifact.manifest
    assert loaded.planes == artifact.planes
    for name, mask in artifact.masks().items():
        assert torch.equal(loaded.masks()[name], mask)
    assert loaded.task_tensors.keys() == artifact.task_tensors.keys()
    for name, tensor in artifact.task_tensors.items():
        assert torch.equal(loaded.task_tensors[name], tensor)


def test_bits_per_parameter_at_most_one_for_binary(resnet18):
    manifest = random_task_artifact(resnet18, "resnet18", density=0.5).manifest
    assert manifest.mask.planes == 1 and manifest.bits_per_param <= 1.0
    dense = random_task_artifact(resnet18, "resnet18", density=0.98).manifest
    assert dense.bits_per_param < 0.5 and dense.mask.encoding != "raw"  # compression measured, and used


def test_masks_come_back_in_canonical_layer_order(resnet18, resnet18_layout):
    manifest = random_task_artifact(resnet18, "resnet18").manifest
    assert [layer.name for layer in manifest.layers] == list(resnet18_layout.names)
    assert [layer.bit_offset for layer in manifest.layers] == list(resnet18_layout.offsets)


@pytest.fixture
def store_with_task(store_location, resnet18, resnet18_layout):
    """A store holding task `kept`, on each backend (a directory; a bucket prefix on a real S3 server)."""
    store = TaskStore(store_location[1])
    store.put(artifact_bytes(random_task_artifact(resnet18, "resnet18", task="kept")), resnet18_layout)
    return store


def test_store_put_get_list_versions_delete(store_with_task, resnet18, resnet18_layout):
    store = store_with_task
    store.put(artifact_bytes(random_task_artifact(resnet18, "resnet18", task="kept", version=2)), resnet18_layout)
    assert store.versions("kept") == [1, 2]
    assert store.get("kept").manifest.version == 2
    assert store.get("kept", 1).manifest.version == 1
    assert [m.task for m in store.list()] == ["kept"]
    store.delete("kept")
    assert store.names() == [] and store.objects.list() == ["_index.json"]
    with pytest.raises(TaskNotFound):
        store.get("kept")


def _tamper_tensor_byte(data: bytes) -> bytes:
    header_len = struct.unpack("<Q", data[:8])[0]
    body = bytearray(data)
    body[8 + header_len + 3] ^= 0xFF
    return bytes(body)


def edit_manifest(data: bytes, edit) -> bytes:
    """The artifact with its manifest JSON edited in place (tensors and checksums untouched)."""
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + header_len])
    manifest = json.loads(header["__metadata__"][MANIFEST_KEY])
    edit(manifest)
    header["__metadata__"][MANIFEST_KEY] = json.dumps(manifest)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    return struct.pack("<Q", len(new)) + new + data[8 + header_len :]


def _other_backbone_artifact(resnet18):
    other = build_backbone("resnet18")  # same arch, different weights
    return artifact_bytes(random_task_artifact(other, "resnet18", task="intruder"))


def _wrong_arch_artifact(resnet18):
    return artifact_bytes(random_task_artifact(build_backbone("mobilenet_v2"), "mobilenet_v2", task="intruder"))


BAD_ARTIFACTS = {
    "garbage": (lambda data, r: b"this is not a safetensors file at all", CorruptArtifact),
    "empty": (lambda data, r: b"", CorruptArtifact),
    "truncated": (lambda data, r: data[: len(data) // 2], CorruptArtifact),
    "header-only": (lambda data, r: data[:20], CorruptArtifact),
    "flipped-tensor-byte": (lambda data, r: _tamper_tensor_byte(data), CorruptArtifact),
    "manifest-density-edited": (
        lambda data, r: edit_manifest(data, lambda m: m["layers"][0].update(numel=1)),
        CorruptArtifact,
    ),
    "manifest-checksum-edited": (
        lambda data, r: edit_manifest(data, lambda m: m["checksums"].update({"mask.nonzero": "0" * 64})),
        CorruptArtifact,
    ),
    "bad-task-name": (lambda data, r: edit_manifest(data, lambda m: m.update(task="../escape")), CorruptArtifact),
    "other-backbone-weights": (lambda data, r: _other_backbone_artifact(r), BackboneMismatch),
    "other-architecture": (lambda data, r: _wrong_arch_artifact(r), BackboneMismatch),
    "head-shape-mismatch": (
        lambda data, r: edit_manifest(data, lambda m: m.update(labels=["only-one"])),
        BackboneMismatch,
    ),
    # another artifact at the live version (the very same one again is an idempotent success)
    "same-version-again": (
        lambda data, r: artifact_bytes(random_task_artifact(r, "resnet18", task="kept", seed=5)),
        TaskVersionExists,
    ),
}


@pytest.mark.parametrize("case", BAD_ARTIFACTS, ids=list(BAD_ARTIFACTS))
def test_store_refuses_bad_artifact_and_stays_byte_identical(case, store_with_task, resnet18, resnet18_layout):
    make, error = BAD_ARTIFACTS[case]
    good = artifact_bytes(random_task_artifact(resnet18, "resnet18", task="kept"))
    before = visible(store_with_task)
    with pytest.raises(error) as excinfo:
        store_with_task.put(make(good, resnet18), resnet18_layout)
    assert str(excinfo.value)  # every refusal says what is wrong
    assert visible(store_with_task) == before


def test_head_shape_must_match_labels(resnet18, resnet18_layout):
    bad = random_task_artifact(resnet18, "resnet18", labels=("a", "b"), task="bad")
    bad.task_tensors["fc.bias"] = torch.zeros(3)
    with pytest.raises(BackboneMismatch, match="fc.bias"):
        bad.check_backbone(resnet18_layout)
