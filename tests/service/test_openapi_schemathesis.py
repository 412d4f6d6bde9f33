"""Schemathesis over the app's own OpenAPI schema, against the real server: every route, admin with a valid token.

Bounded (`MAX_EXAMPLES` per operation, no shrinking budget beyond Hypothesis' default) so it runs in CI. Every
check schemathesis has runs on every case: a 5xx, a status, header, content type or body the published schema
does not declare, invalid data accepted or valid data refused, an ignored token, and our own: an error body that
is not JSON `{"detail": ...}` (`{"error": ...}` under /v2).
"""

from __future__ import annotations

import hypothesis
import pytest
import schemathesis
from schemathesis.checks import CHECKS, load_all_checks

from mask_store import TaskStore, artifact_bytes
from service.app import create_app
from service.settings import Settings
from tests.support.builders import ADMIN_TOKEN, random_task_artifact, server_settings
from tests.support.servers import serve_in_thread

MAX_EXAMPLES = 15


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory, backbone_file, resnet18):
    store = tmp_path_factory.mktemp("store")
    TaskStore(store).put(artifact_bytes(random_task_artifact(resnet18, "resnet18", task="alpha", seed=1)))
    settings = server_settings(backbone_file, store, max_request_bytes=1_000_000, max_artifact_bytes=1_000_000)
    with serve_in_thread(settings) as base:
        yield base, settings


# Schema-valid is not valid for opaque uploads: a binary string the schema allows is rarely an artifact or an
# image, and the API rightly refuses it (400 damaged, 413 too large, 415 not an image, 422 not an artifact).
# For these, schemathesis' positive-data check is replaced by `opaque_upload_refused_for_a_reason`.
OPAQUE_UPLOADS = {
    "POST /admin/tasks": {400, 409, 413, 422},
    "POST /tasks/{name}/predict": {400, 404, 413, 415},
    "POST /v2/models/{name}/infer": {400, 404, 413, 415},
    "POST /v2/models/{name}/versions/{version}/infer": {400, 404, 413, 415},
}
# The published schema does not depend on settings or on anything loaded: built once at collection.
SCHEMA = schemathesis.openapi.from_dict(create_app(Settings(admin_token=ADMIN_TOKEN)).openapi())
OPERATIONS = {result.ok().label: result.ok() for result in SCHEMA.get_all_operations()}
load_all_checks()
ALL_CHECKS = CHECKS.get_all()


def error_is_json_detail(ctx, response, case) -> None:
    """Every 4xx/5xx answers JSON with a `detail` string saying what is wrong (`error` under /v2, as the
    Open Inference Protocol says)."""
    if response.status_code >= 400:
        body = response.json()
        key = "error" if case.path.startswith("/v2/") else "detail"
        assert isinstance(body, dict) and isinstance(body.get(key), str), body


def opaque_upload_refused_for_a_reason(ctx, response, case) -> None:
    """A refused upload is refused for one of the reasons its operation documents for bad content."""
    if 400 <= response.status_code < 500 and case.operation.label in OPAQUE_UPLOADS:
        allowed = OPAQUE_UPLOADS[case.operation.label] | {401, 403, 408, 422}
        assert response.status_code in allowed, (response.status_code, response.text)


def test_schema_covers_every_route():
    paths = {label.split(" ", 1)[1] for label in OPERATIONS}
    assert {"/tasks/{name}/predict", "/tasks", "/admin/tasks", "/admin/tasks/{name}", "/readyz", "/metrics"} <= paths


# schemathesis' own pytest plugin does not load under pytest 9, so its strategies run under plain Hypothesis
@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_no_5xx_and_errors_are_json_detail(label, fuzzed_server):
    base, _ = fuzzed_server
    checks = [c for c in ALL_CHECKS if not (label in OPAQUE_UPLOADS and c.__name__ == "positive_data_acceptance")]

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
            checks=[*checks, error_is_json_detail, opaque_upload_refused_for_a_reason],
        )

    fuzz()
