"""Upload a task artifact to a running server's admin endpoint (`--register URL --token T`)."""

from __future__ import annotations

from pathlib import Path

import httpx


def register_artifact(path: Path, url: str, token: str, timeout: float = 120.0) -> str:
    """POST the artifact to `<url>/admin/tasks`; returns a one-line summary or raises with the server's detail."""
    with open(path, "rb") as handle:
        response = httpx.post(
            url.rstrip("/") + "/admin/tasks",
            headers={"Authorization": f"Bearer {token}"},
            files={"artifact": (path.name, handle, "application/octet-stream")},
            timeout=timeout,
        )
    if response.status_code != 201:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise SystemExit(f"registration failed ({response.status_code}): {detail}")
    task = response.json()
    return f"registered task {task['name']} version {task['version']} at {url}"
