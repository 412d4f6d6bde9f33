"""Upload a task artifact to a running server's admin endpoint (`register FILE --url URL`, `train --register`).

A task's version is fixed inside its artifact. A server refuses (409) a version that is not higher than
the one it serves, except the very artifact it serves: sending that again is harmless (201, nothing
changes), so `train --out s3://X --register URL`, where the server's store is X, succeeds too. The
messages say which of the two happened, and what to do after a refusal.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from mask_store import CorruptArtifact, artifact_identity, parse_artifact
from training.validate import check_url


class RegistrationFailed(Exception):
    """The server could not be reached or refused the artifact; the message is one line for the user."""


class VersionNotHigher(RegistrationFailed):
    """409: the server serves the task at version `live`, and this artifact's version is not higher."""

    def __init__(self, message: str, live: int):
        super().__init__(message)
        self.live = live


# the store's 409 (mask_store.store): its own advice after the ';' is for any client, ours depends on the command
NOT_HIGHER = re.compile(r"^(.*? is not higher than its live version (\d+))")


def register_artifact(source: Path | bytes, url: str, token: str, timeout: float = 120.0) -> str:
    """POST the artifact (a file, or its bytes) to `<url>/admin/tasks`; returns a one-line summary or
    raises RegistrationFailed (VersionNotHigher for a 409)."""
    check_url(url)
    if isinstance(source, bytes):
        data, name = source, "artifact.safetensors"
    elif Path(source).is_file():
        data, name = Path(source).read_bytes(), Path(source).name
    else:
        raise RegistrationFailed(f"{source} is not a file")
    try:
        manifest = parse_artifact(data, name).manifest
    except CorruptArtifact:
        manifest = None  # the server says what is wrong with it, in its own words
    served = _served(url, manifest.task, min(timeout, 10.0)) if manifest is not None else None
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
        refused = f"server refused the artifact ({response.status_code})"
        if response.status_code == 409 and (match := NOT_HIGHER.match(str(detail))):
            raise VersionNotHigher(f"{refused}: {match.group(1)}", live=int(match.group(2)))
        raise RegistrationFailed(f"{refused}: {detail}")
    task = response.json()
    done = f"registered task {task['name']} version {task['version']} at {url}"
    if served is not None and manifest is not None and served.get("identity") == artifact_identity(manifest):
        return f"{done}: it was already live there (this very artifact), nothing changed"
    return done


def _served(url: str, task: str, timeout: float) -> dict | None:
    """What the server serves as `task` (GET /tasks/{task}), or None: unknown there, or not answering."""
    try:
        response = httpx.get(f"{url.rstrip('/')}/tasks/{task}", timeout=timeout)
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None
