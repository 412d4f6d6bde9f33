"""The HTTP API through a real uvicorn server: answers, metadata, auth, and every kind of bad input."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from mask_store import TaskStore, artifact_bytes, build_backbone
from tests.support.builders import ADMIN_TOKEN, random_task_artifact, server_settings
from tests.support.reference_model import dedicated_network, expected_probabilities
from tests.support.servers import jpeg_bytes, png_bytes, serve_in_process

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def artifacts(resnet18):
    return {
        "alpha": random_task_artifact(resnet18, "resnet18", task="alpha", labels=("a0", "a1", "a2"), seed=1),
        "beta": random_task_artifact(resnet18, "resnet18", task="beta", labels=("b0", "b1"), seed=2, kind="ternary"),
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory, backbone_file, artifacts):
    store = tmp_path_factory.mktemp("store")
    for artifact in artifacts.values():
        TaskStore(store).put(artifact_bytes(artifact))
    settings = server_settings(
        backbone_file,
        store,
        max_images_per_request=4,
        max_image_bytes=200_000,
        max_image_pixels=4_000_000,
        max_request_bytes=1_000_000,
    )
    with serve_in_process(settings) as http:  # the routes' contract: in process, with the app's lifespan
        yield http, store


def post_images(http, task, files, **params):
    return http.post(f"/tasks/{task}/predict", files=[("images", f) for f in files], params=params)


def test_predict_matches_dedicated_networks(server, artifacts, resnet18):
    http, _ = server
    images = [png_bytes(seed) for seed in range(3)]
    for name, artifact in artifacts.items():
        response = post_images(http, name, [(f"{i}.png", data, "image/png") for i, data in enumerate(images)], top_k=2)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["task"] == name and body["version"] == 1 and len(body["predictions"]) == 3
        expected = expected_probabilities(
            dedicated_network(resnet18, artifact), artifact, [Image.open(io.BytesIO(d)) for d in images]
        )
        for prediction, row in zip(body["predictions"], expected, strict=True):
            assert prediction["index"] == int(row.argmax())
            assert prediction["label"] == artifact.manifest.labels[prediction["index"]]
            assert len(prediction["top_k"]) == 2
            got = torch.tensor([item["score"] for item in prediction["top_k"]])
            torch.testing.assert_close(got, row.sort(descending=True).values[:2], rtol=1e-4, atol=1e-5)


def test_task_metadata(server, artifacts):
    http, _ = server
    listed = http.get("/tasks").json()
    assert [t["name"] for t in listed] == ["alpha", "beta"]
    alpha = http.get("/tasks/alpha").json()
    manifest = artifacts["alpha"].manifest
    assert alpha["version"] == 1 and alpha["labels"] == ["a0", "a1", "a2"]
    assert alpha["backbone"]["fingerprint"] == manifest.backbone.fingerprint
    assert alpha["bits_per_parameter"] == pytest.approx(manifest.bits_per_param) and alpha["bits_per_parameter"] <= 1
    assert 0.6 < alpha["mask_density"] < 0.8
    assert http.get("/tasks/beta").json()["mask_kind"] == "ternary"
    assert http.get("/openapi.json").status_code == 200 and http.get("/docs").status_code == 200


def _png(width: int, height: int, bit_depth: int, pixel_data: bytes) -> bytes:
    """A grayscale PNG written chunk by chunk: `pixel_data` is the zlib stream of its rows."""

    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([bit_depth, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixel_data) + chunk(b"IEND", b"")


def _bomb_png() -> bytes:
    """A 30000x30000 one-bit PNG of zeros: ~100 KB on the wire, 900 MB once decoded (zlib on the rows
    directly: Pillow's encoder took seconds for it, in every test worker)."""
    rows, row = zlib.compressobj(9), bytes(1 + 30000 // 8)  # a filter byte, then 30000 bits
    return _png(30000, 30000, 1, b"".join(rows.compress(row * 1000) for _ in range(30)) + rows.flush())


def _absurd_png() -> bytes:
    """A valid PNG header claiming 1 x 2^30 pixels (the pixel data never arrives)."""
    return _png(1, 2**30, 8, zlib.compress(b"\x00\x00" * 10))


BAD_UPLOADS = {
    "empty-file": ([("a.png", b"", "image/png")], 400, "empty"),
    "not-an-image": ([("a.txt", b"hello, I am text", "text/plain")], 415, "not a supported image"),
    "truncated-png": ([("a.png", png_bytes(size=64)[:200], "image/png")], 400, "truncated"),
    "truncated-jpeg": ([("a.jpg", jpeg_bytes()[:400], "image/jpeg")], 400, "truncated"),
    "decompression-bomb": ([("bomb.png", _bomb_png(), "image/png")], 413, "pixels"),
    "absurd-dimensions": ([("tall.png", _absurd_png(), "image/png")], 413, "pixels"),
    "too-many-images": ([(f"{i}.png", png_bytes(i), "image/png") for i in range(5)], 413, "at most 4"),
    "image-too-big": ([("big.png", png_bytes(size=400, mode="RGB"), "image/png")], 413, "larger than"),
    "body-too-big": ([(f"{i}.png", b"x" * 300_000, "image/png") for i in range(4)], 413, "request body larger"),
}


@pytest.mark.parametrize("case", BAD_UPLOADS, ids=list(BAD_UPLOADS))
def test_bad_upload_gets_4xx_with_detail_and_server_stays_healthy(server, case):
    http, _ = server
    files, status, fragment = BAD_UPLOADS[case]
    response = post_images(http, "alpha", files)
    assert response.status_code == status, response.text
    assert fragment in response.json()["detail"]
    assert http.get("/healthz").status_code == 200
    assert post_images(http, "alpha", [("ok.png", png_bytes(), "image/png")]).status_code == 200


def test_missing_images_field_is_a_clear_4xx(server):
    http, _ = server
    response = http.post("/tasks/alpha/predict", files={"other": ("a.png", png_bytes())})
    assert response.status_code == 422 and "images" in response.json()["detail"]


def test_unknown_task_is_404_and_creates_no_metric_series(server):
    http, _ = server
    response = post_images(http, "no-such-task-xyz", [("a.png", png_bytes(), "image/png")])
    assert response.status_code == 404 and "no-such-task-xyz" in response.json()["detail"]
    assert http.get("/tasks/no-such-task-xyz").status_code == 404
    assert "no-such-task-xyz" not in http.get("/metrics").text


def test_admin_requires_the_token(server):
    http, _ = server
    files = {"artifact": ("a.safetensors", b"whatever")}
    assert http.post("/admin/tasks", files=files).status_code == 401
    wrong = http.post("/admin/tasks", files=files, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403 and wrong.json()["detail"]
    assert http.delete("/admin/tasks/alpha").status_code == 401
    assert http.get("/tasks/alpha").status_code == 200


def _tampered(data: bytes) -> bytes:
    body = bytearray(data)
    body[-5] ^= 0x55
    return bytes(body)


def test_bad_artifacts_are_422_and_store_is_byte_identical(server, resnet18):
    http, store = server
    before = snapshot(store)
    good = artifact_bytes(random_task_artifact(resnet18, "resnet18", task="gamma", seed=3))
    other_backbone = artifact_bytes(random_task_artifact(build_backbone("resnet18"), "resnet18", task="gamma"))
    for label, data in {
        "garbage": b"not an artifact",
        "truncated": good[: len(good) // 3],
        "tampered": _tampered(good),
        "wrong-backbone": other_backbone,
    }.items():
        response = http.post("/admin/tasks", files={"artifact": ("g.safetensors", data)}, headers=AUTH)
        assert response.status_code == 422, (label, response.text)
        assert response.json()["detail"], label
        assert snapshot(store) == before, label
    assert http.get("/tasks/gamma").status_code == 404
    empty = http.post("/admin/tasks", files={"artifact": ("g", b"")}, headers=AUTH)
    assert empty.status_code == 400


def test_register_new_version_then_unregister(server, resnet18):
    http, store = server
    v1 = random_task_artifact(resnet18, "resnet18", task="delta", labels=("x", "y"), seed=4)
    v2 = random_task_artifact(resnet18, "resnet18", task="delta", labels=("x", "y", "z"), seed=5, version=2)
    for artifact in (v1, v2):
        response = http.post("/admin/tasks", files={"artifact": ("d", artifact_bytes(artifact))}, headers=AUTH)
        assert response.status_code == 201, response.text
        assert response.json()["version"] == artifact.manifest.version
    again = http.post("/admin/tasks", files={"artifact": ("d", artifact_bytes(v2))}, headers=AUTH)
    assert again.status_code == 201  # the very artifact that is live: a retry, nothing written
    stale = http.post("/admin/tasks", files={"artifact": ("d", artifact_bytes(v1))}, headers=AUTH)
    assert stale.status_code == 409 and "not higher than its live version 2" in stale.json()["detail"]
    answer = post_images(http, "delta", [("a.png", png_bytes(), "image/png")]).json()
    assert answer["version"] == 2 and len(answer["predictions"][0]["top_k"]) == 3
    assert TaskStore(store).versions("delta") == [1, 2]
    assert http.delete("/admin/tasks/delta", headers=AUTH).status_code == 204
    assert post_images(http, "delta", [("a.png", png_bytes(), "image/png")]).status_code == 404
    assert http.delete("/admin/tasks/delta", headers=AUTH).status_code == 404
    assert "delta" not in TaskStore(store).names()


def test_admin_disabled_without_token(tmp_path, backbone_file):
    settings = server_settings(backbone_file, tmp_path, admin_token=None)
    with serve_in_process(settings) as http:
        response = http.post("/admin/tasks", files={"artifact": ("a", b"x")}, headers=AUTH)
        assert response.status_code == 403 and "PIGGYBACK_ADMIN_TOKEN" in response.json()["detail"]


def test_weak_admin_token_is_refused_at_start(backbone_file, tmp_path):
    with pytest.raises(ValueError, match="at least 16"):
        server_settings(backbone_file, tmp_path, admin_token="short")
