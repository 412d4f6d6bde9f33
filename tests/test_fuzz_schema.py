"""Schemathesis over the app's own OpenAPI schema, against the real server: every route, admin with a valid token.

Bounded (`MAX_EXAMPLES` per operation, no shrinking budget beyond Hypothesis' default) so it runs in CI. A
case fails on any 5xx, on an error body that is not JSON `{"detail": ...}`, or on a response that
does not match the schema the app publishes.
"""

from __future__ import annotations

import hypothesis
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from mask_store import TaskStore, artifact_bytes
from service.app import create_app
from service.settings import Settings
from tests.conftest import ADMIN_TOKEN, random_task_artifact, server_settings
from tests.servers import serve_in_thread

MAX_EXAMPLES = 15


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory, backbone_file, resnet18):
    store = tmp_path_factory.mktemp("store")
    TaskStore(store).put(artifact_bytes(random_task_artifact(resnet18, "resnet18", task="alpha", seed=1)))
    settings = server_settings(backbone_file, store, max_request_bytes=1_000_000, max_artifact_bytes=1_000_000)
    with serve_in_thread(settings) as base:
        yield base, settings


# The published schema does not depend on settings or on anything loaded: built once at collection.
SCHEMA = schemathesis.openapi.from_dict(create_app(Settings(admin_token=ADMIN_TOKEN)).openapi())
OPERATIONS = {result.ok().label: result.ok() for result in SCHEMA.get_all_operations()}


def error_is_json_detail(ctx, response, case) -> None:
    """Every 4xx/5xx answers JSON with a `detail` string saying what is wrong (`error` under /v2, as the
    Open Inference Protocol says)."""
    if response.status_code >= 400:
        body = response.json()
        key = "error" if case.path.startswith("/v2/") else "detail"
        assert isinstance(body, dict) and isinstance(body.get(key), str), body


def test_schema_covers_every_route():
    paths = {label.split(" ", 1)[1] for label in OPERATIONS}
    assert {"/tasks/{name}/predict", "/tasks", "/admin/tasks", "/admin/tasks/{name}", "/readyz", "/metrics"} <= paths


# schemathesis' own pytest plugin does not load under pytest 9, so its strategies run under plain Hypothesis
@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_no_5xx_and_errors_are_json_detail(label, fuzzed_server):
    base, _ = fuzzed_server

    @hypothesis.given(case=OPERATIONS[label].as_strategy())
    @hypothesis.settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        suppress_health_check=list(hypothesis.HealthCheck),
        derandomize=True,
        database=None,
    )
    def fuzz(case) -> None:
        response = case.call(base_url=base, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30)
        case.validate_response(
            response,
            checks=[not_a_server_error, content_type_conformance, response_schema_conformance, error_is_json_detail],
        )

    fuzz()
