"""The suite's HTTP contract guard itself: it must flag what the contract forbids and nothing else."""

from __future__ import annotations

import httpx
import pytest

from tests.support.builders import server_settings
from tests.support.http_guard import contract_violation, is_service_url
from tests.support.servers import serve_in_process

UNGUARDED_SEND = httpx.Client.send  # at import, before the autouse fixture wraps it


def answer(status: int, path: str, body: bytes = b"", content_type: str | None = "application/json") -> httpx.Response:
    headers = {"content-type": content_type} if content_type else {}
    return httpx.Response(status, content=body, headers=headers, request=httpx.Request("GET", f"http://h{path}"))


KEPT = {
    "json-200": answer(200, "/tasks", b"[]"),
    "json-404": answer(404, "/tasks/x", b'{"detail": "no task named x"}'),
    "503-busy": answer(503, "/tasks/x/predict", b'{"detail": "queue full"}'),
    "507-full": answer(507, "/admin/tasks", b'{"detail": "store full"}'),
    "204": answer(204, "/admin/tasks/x", content_type=None),
    "metrics-text": answer(200, "/metrics", b"# HELP x\n", "text/plain; version=0.0.4"),
    "docs-html": answer(200, "/docs", b"<html>", "text/html"),
    "v2-error": answer(400, "/v2/models/x/infer", b'{"error": "bad tensor"}'),
}
BROKEN = {
    "plain-500": answer(500, "/tasks/x/predict", b"Internal Server Error", "text/plain"),
    "json-500": answer(500, "/admin/tasks", b'{"detail": "boom"}'),
    "502": answer(502, "/tasks", b'{"detail": "bad gateway"}'),
    "text-400": answer(400, "/tasks/x/predict", b"There was an error", "text/plain"),
    "metrics-error-as-text": answer(404, "/metrics", b"not found", "text/plain"),
    "error-without-detail": answer(422, "/admin/tasks", b'{"message": "bad"}'),
    "invalid-json": answer(200, "/tasks", b"{not json"),
}


@pytest.mark.parametrize("name", KEPT)
def test_guard_lets_contract_answers_through(name):
    assert contract_violation(KEPT[name]) is None


@pytest.mark.parametrize("name", BROKEN)
def test_guard_flags_broken_answers(name):
    assert contract_violation(BROKEN[name])


def test_allowed_500_must_still_be_json():
    assert contract_violation(BROKEN["json-500"], allow_server_errors=True) is None
    assert contract_violation(BROKEN["plain-500"], allow_server_errors=True)


def test_an_app_served_in_process_is_under_the_guard(tmp_path, backbone_file):
    """Route tests on the in-process transport are checked like those on a socket: the client's sends go
    through the guard's wrapper (the test client does not override `send`) and its base URL is watched."""
    with serve_in_process(server_settings(backbone_file, tmp_path / "store")) as client:
        assert is_service_url(client.base_url.join("/tasks"))
        assert type(client).send is httpx.Client.send is not UNGUARDED_SEND  # the autouse fixture's wrapper
    assert not is_service_url(httpx.URL("http://testserver/tasks"))
