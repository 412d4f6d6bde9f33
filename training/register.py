"""Upload a task artifact to a running server's admin endpoint (`register FILE --url URL`, `train --register`).

Uploading the artifact a server already serves again succeeds (the store treats it as a retry), so
`train --out s3://X --register URL`, where the server's store is X, ends in a 201 too.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from training.validate import check_url


class RegistrationFailed(Exception):
    """The server could not be reached or refused the artifact; the message is one line for the user."""


def register_artifact(source: Path | bytes, url: str, token: str, timeout: float = 120.0) -> str:
    """POST the artifact (a file, or its bytes) to `<url>/admin/tasks`; returns a one-line summary or
    raises RegistrationFailed."""
    check_url(url)
    if isinstance(source, bytes):
        data, name = source, "artifact.safetensors"
    elif Path(source).is_file():
        data, name = Path(source).read_bytes(), Path(source).name
    else:
        raise RegistrationFailed(f"{source} is not a file")
    try:
        response = httpx.post(
            url.rstrip("/") + "/admin/tasks",
            headers={"Authorization": f"Bearer {token}"},
            files={"artifact": (name, data, "application/octet-stream")},
            timeout=timeout,
        )
    except httpx.HTTPError as exc:
        raise RegistrationFailed(f"cannot reach {url}: {exc or type(exc).__name__}") from None
    if response.status_code != 201:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise RegistrationFailed(f"server refused the artifact ({response.status_code}): {detail}")
    task = response.json()
    return f"registered task {task['name']} version {task['version']} at {url}"
