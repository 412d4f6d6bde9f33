"""Service-edge regressions of issue 14 through a real uvicorn server: the admin token is checked before
any of the body is read (8), unexpected errors answer JSON 500 with a request id and storage errors
507/503 (9), a removed task's metric series go with it (10), a token with surrounding whitespace works
(11), and an oversized chunked body is 413 on every route (12)."""

from __future__ import annotations

import dataclasses
import logging
import re

import httpx
import pytest

from mask_store import TaskStore, artifact_bytes
from mask_store.objects import StoreFull, StoreUnavailable
from service.app import create_app
from service.settings import Settings
from tests.support.builders import ADMIN_TOKEN, random_task_artifact, server_settings
from tests.support.servers import png_bytes, serve_in_thread

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MIB = 1024 * 1024
MAX_REQUEST_BYTES = 1_000_000
MAX_ARTIFACT_BYTES = 2 * MIB


@pytest.fixture(scope="module")
def artifact(resnet18):
    return random_task_artifact(resnet18, "resnet18", task="alpha", labels=("a", "b", "c"), seed=41)


@pytest.fixture(scope="module")
def served(tmp_path_factory, backbone_file, artifact):
    """(base URL, app): the app's state is reachable so a test can inject a fault into the engine."""
    store = tmp_path_factory.mktemp("store")
    TaskStore(store).put(artifact_bytes(artifact))
    settings = server_settings(
        backbone_file, store, max_request_bytes=MAX_REQUEST_BYTES, max_artifact_bytes=MAX_ARTIFACT_BYTES
    )
    app = create_app(settings)
    with serve_in_thread(settings, app=app) as base:
        yield base, app


def renamed(artifact, task: str):
    """The same tensors under another task name (the name lives in the manifest, outside the checksums)."""
    return dataclasses.replace(artifact, manifest=artifact.manifest.model_copy(update={"task": task}))


def multipart_stream(field: str, size: int, boundary: str = "b0undary"):
    """A well-formed multipart body with one `size`-byte file, streamed (chunked, no Content-Length),
    and a dict telling how many bytes the client has handed to the connection so far (and the total)."""
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="f"\r\n\r\n'.encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    sent = {"bytes": 0, "total": len(head) + size // MIB * MIB + len(tail)}

    def body():
        for chunk in chunks():
            sent["bytes"] += len(chunk)
            yield chunk

    def chunks():
        yield head
        for _ in range(size // MIB):
            yield b"\x89" * MIB
        yield tail

    return body(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}, sent


# --- 8: the admin token is checked from the headers alone ------------------------------------------
UPLOAD = 200 * MIB


@pytest.fixture(scope="module")
def default_limits(tmp_path_factory, backbone_file):
    """A server with the default 1 GiB artifact limit, so only the token check can stop a 200 MiB upload."""
    with serve_in_thread(server_settings(backbone_file, tmp_path_factory.mktemp("store"))) as base:
        yield base


def refused_upload(base: str, headers: dict, expected: int, declare_length: bool = False) -> httpx.Response:
    """POST a valid 200 MiB multipart artifact upload; assert it is refused while the client is still sending."""
    body, content_type, sent = multipart_stream("artifact", UPLOAD)
    if declare_length:
        headers = {**headers, "Content-Length": str(sent["total"])}
    response = httpx.post(f"{base}/admin/tasks", content=body, headers={**content_type, **headers}, timeout=120)
    assert response.status_code == expected, response.text
    assert response.json()["detail"]
    # What the client got out is what the socket buffers took before the refusal closed the connection,
    # not the 200 MiB that a server reading (and spooling) the body before checking would swallow.
    assert sent["bytes"] < 64 * MIB, sent
    return response


@pytest.mark.parametrize(
    "headers, status",
    [({}, 401), ({"Authorization": "Bearer wrong-token-wrong-token"}, 403), ({"Authorization": "Basic abc"}, 401)],
    ids=["no-token", "wrong-token", "not-bearer"],
)
def test_unauthenticated_upload_is_refused_before_the_body_is_read(default_limits, headers, status):
    refused_upload(default_limits, headers, status)
    assert httpx.get(f"{default_limits}/healthz").status_code == 200


def test_refusal_with_declared_length_answers_at_once(default_limits):
    response = refused_upload(default_limits, {}, 401, declare_length=True)
    assert response.headers["www-authenticate"] == "Bearer"


def test_admin_disabled_refuses_before_reading_too(tmp_path, backbone_file):
    with serve_in_thread(server_settings(backbone_file, tmp_path, admin_token=None)) as base:
        response = refused_upload(base, AUTH, 403)
        assert "PIGGYBACK_ADMIN_TOKEN" in response.json()["detail"]


def test_prefix_match_is_exact(served):
    base, _ = served
    # /administrator is not under /admin: an ordinary 404, not an auth refusal
    assert httpx.get(f"{base}/administrator").status_code == 404


# --- 9: errors are JSON, with a request id; storage errors have their own status ------------------
@pytest.mark.allow_server_errors
def test_unexpected_error_is_json_500_with_request_id_in_header_and_log(served, artifact, monkeypatch, caplog):
    base, app = served

    def bug(data: bytes):
        raise RuntimeError("injected bug in register")

    monkeypatch.setattr(app.state.registry, "register", bug)
    with caplog.at_level(logging.ERROR):
        response = httpx.post(
            f"{base}/admin/tasks", files={"artifact": ("a", artifact_bytes(renamed(artifact, "beta")))}, headers=AUTH
        )
    assert response.status_code == 500
    assert response.headers["content-type"].startswith("application/json")
    request_id = response.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    assert request_id in response.json()["detail"]
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert logged and logged[0].exc_info and "injected bug" in str(logged[0].exc_info[1])
    assert httpx.get(f"{base}/tasks/alpha").status_code == 200


def test_every_answer_carries_a_request_id_and_a_sane_client_id_is_kept(served):
    base, _ = served
    assert re.fullmatch(r"[0-9a-f]{32}", httpx.get(f"{base}/healthz").headers["x-request-id"])
    assert httpx.get(f"{base}/tasks/nope").headers["x-request-id"]
    kept = httpx.get(f"{base}/healthz", headers={"X-Request-ID": "trace-42.a_b"})
    assert kept.headers["x-request-id"] == "trace-42.a_b"
    replaced = httpx.get(f"{base}/healthz", headers={"X-Request-ID": "bad id\twith spaces" + "x" * 200})
    assert re.fullmatch(r"[0-9a-f]{32}", replaced.headers["x-request-id"])


@pytest.mark.parametrize(
    "error, status", [(StoreFull("no space left on device"), 507), (StoreUnavailable("store is read-only"), 503)]
)
def test_storage_errors_map_to_507_and_503(served, artifact, monkeypatch, error, status):
    base, app = served

    def failing_store(data: bytes):
        raise error

    monkeypatch.setattr(app.state.registry, "register", failing_store)
    response = httpx.post(
        f"{base}/admin/tasks", files={"artifact": ("a", artifact_bytes(renamed(artifact, "beta")))}, headers=AUTH
    )
    assert response.status_code == status
    assert str(error) in response.json()["detail"] and response.headers["x-request-id"]


# --- 10: a removed task's metric series are removed -------------------------------------------------
def series(exposition: str) -> list[str]:
    return [line.rsplit(" ", 1)[0] for line in exposition.splitlines() if line and not line.startswith("#")]


@pytest.mark.slow  # 50 uploads and predictions: about 20 s on 2 cores
def test_register_unregister_cycles_do_not_grow_metrics(served, artifact):
    base, _ = served
    baseline = None
    with httpx.Client(base_url=base, timeout=60) as client:
        assert client.post("/tasks/alpha/predict", files=[("images", ("i.png", png_bytes(0)))]).status_code == 200
        for cycle in range(50):
            name = f"cycle-{cycle}"
            data = artifact_bytes(renamed(artifact, name))
            assert client.post("/admin/tasks", files={"artifact": ("a", data)}, headers=AUTH).status_code == 201
            predicted = client.post(f"/tasks/{name}/predict", files=[("images", ("i.png", png_bytes(cycle)))])
            assert predicted.status_code == 200 and predicted.json()["task"] == name
            assert client.delete(f"/admin/tasks/{name}", headers=AUTH).status_code == 204
            now = series(client.get("/metrics").text)
            assert not [s for s in now if f'task="{name}"' in s], name
            baseline = baseline or now
            assert len(now) == len(baseline), cycle
    assert 'task="alpha"' in "\n".join(baseline)  # the served task's series stay


# --- 11: whitespace around the token ----------------------------------------------------------------
def test_token_read_with_trailing_newline_matches_the_stripped_one(monkeypatch, tmp_path, backbone_file):
    monkeypatch.setenv("PIGGYBACK_ADMIN_TOKEN", f"  {ADMIN_TOKEN}\n")  # as read from a secret file
    settings = Settings(backbone="resnet18", weights=str(backbone_file), store=tmp_path)
    assert settings.admin_token.get_secret_value() == ADMIN_TOKEN
    with serve_in_thread(settings) as base:
        assert httpx.delete(f"{base}/admin/tasks/nope", headers=AUTH).status_code == 404  # authorized: no such task
        assert httpx.delete(f"{base}/admin/tasks/nope", headers={"Authorization": "Bearer x"}).status_code == 403


def test_whitespace_does_not_make_a_short_token_long_enough(monkeypatch, tmp_path):
    monkeypatch.setenv("PIGGYBACK_ADMIN_TOKEN", "short" + " " * 20 + "\n")
    with pytest.raises(ValueError, match="at least 16"):
        Settings(store=tmp_path)


# --- 12: oversized chunked bodies -------------------------------------------------------------------
@pytest.mark.parametrize(
    "path, field, size, auth",
    [("/tasks/alpha/predict", "images", 2 * MIB, False), ("/admin/tasks", "artifact", 5 * MIB, True)],
    ids=["predict", "admin-upload"],
)
def test_oversized_chunked_body_is_413(served, path, field, size, auth):
    base, _ = served
    body, headers, _ = multipart_stream(field, size)
    response = httpx.post(f"{base}{path}", content=body, headers={**headers, **(AUTH if auth else {})}, timeout=60)
    assert response.status_code == 413, response.text
    assert "larger than" in response.json()["detail"]
    assert httpx.get(f"{base}/tasks/alpha").status_code == 200
