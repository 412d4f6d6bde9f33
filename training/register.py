"""Upload a task artifact to a running server's admin endpoint (`register FILE --url URL`, `train --register`)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from mask_store.artifact import artifact_identity, parse_artifact
from mask_store.errors import MaskStoreError
from mask_store.manifest import Manifest
from training.validate import check_url


class RegistrationFailed(Exception):
    """The server could not be reached or refused the artifact; the message is one line for the user."""


def register_artifact(
    source: Path | bytes, url: str, token: str, timeout: float = 120.0, settle_s: float = 20.0
) -> str:
    """POST the artifact (a file, or its bytes) to `<url>/admin/tasks`; returns a one-line summary or
    raises RegistrationFailed.

    A 409 for an artifact the server already serves is success: `train --out s3://X --register URL`,
    where the server's store is X, has published it before the upload. Up to `settle_s` seconds are
    given to the server to pick it up from its store.
    """
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
    if response.status_code == 409 and (manifest := _manifest_or_none(data)) and _serves(url, manifest, settle_s):
        return f"task {manifest.task} version {manifest.version} is already served at {url} (its store holds it)"
    if response.status_code != 201:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise RegistrationFailed(f"server refused the artifact ({response.status_code}): {detail}")
    task = response.json()
    return f"registered task {task['name']} version {task['version']} at {url}"


def _manifest_or_none(data: bytes) -> Manifest | None:
    try:
        return parse_artifact(data, "artifact").manifest
    except MaskStoreError:
        return None


def _serves(url: str, manifest: Manifest, settle_s: float) -> bool:
    """Whether the server serves exactly this artifact (the identity its task description shows); waits
    while it serves an older version or none (its store holds one at least as new: it picks it up at its
    next store poll)."""
    expected = artifact_identity(manifest)
    deadline = time.monotonic() + settle_s
    while True:
        try:
            response = httpx.get(f"{url.rstrip('/')}/tasks/{manifest.task}", timeout=10)
            served = response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return False
        if response.status_code not in (200, 404):
            return False
        version = served.get("version") if isinstance(served, dict) else None
        if isinstance(version, int) and version >= manifest.version:
            return served.get("identity") == expected
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)
