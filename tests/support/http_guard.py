"""The suite-wide HTTP contract guard: any 500 (or other unexpected 5xx) and any non-JSON answer from a
server the tests started fails the test, whatever the test itself asserts.

`tests.support.servers.wait_ready` records every server base URL here; conftest's autouse fixture wraps
`httpx.Client.send` and `httpx.AsyncClient.send` (which `httpx.get/post/...` use too) and checks each
response to one of those URLs. A test that provokes a 500 on purpose says so with
`@pytest.mark.allow_server_errors`.
"""

from __future__ import annotations

import json

import httpx

from service.protocols import error_key_for

SERVICE_URLS: set[str] = set()
# The contract's only legitimate 5xx: overload or draining (503), deadline passed (504), storage full (507).
ALLOWED_5XX = frozenset({503, 504, 507})
# Routes whose successful answers are not JSON by design (Prometheus text, the OpenAPI UI pages).
NON_JSON_PATHS = ("/metrics", "/docs", "/redoc")


def is_service_url(url: httpx.URL) -> bool:
    return any(str(url).startswith(base + "/") for base in SERVICE_URLS)


def contract_violation(response: httpx.Response, allow_server_errors: bool = False) -> str | None:
    """Why `response` breaks the HTTP contract, or None if it keeps it."""
    status, path = response.status_code, response.request.url.path
    where = f"{response.request.method} {path} answered {status}"
    if status >= 500 and status not in ALLOWED_5XX and not allow_server_errors:
        return f"{where}: a server error ({response.text[:300]!r})"
    if status in (204, 304) or (status < 400 and path.startswith(NON_JSON_PATHS)):
        return None
    content_type = response.headers.get("content-type", "")
    if not content_type.startswith("application/json"):
        return f"{where} with content-type {content_type!r}, not JSON"
    try:
        body = json.loads(response.content)
    except httpx.ResponseNotRead:  # a streamed response: the body is the test's to read
        return None
    except ValueError:
        return f"{where}: body is not valid JSON ({response.content[:300]!r})"
    if status >= 400:
        key = error_key_for(path)  # each protocol's own error shape, as its route module declares it
        if not isinstance(body, dict) or not isinstance(body.get(key), str) or not body[key]:
            return f"{where}: error body lacks a {key!r} message ({body!r})"
    return None
