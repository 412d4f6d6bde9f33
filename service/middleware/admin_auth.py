"""The admin token check, as ASGI middleware on the `/admin` prefix.

It runs on the request headers alone, before any route, dependency or form parser reads a byte of the
body: an unauthenticated 200 MiB upload is answered 401/403 at once and the connection closed, instead
of being received and spooled to temporary files first.
"""

from __future__ import annotations

import secrets

from pydantic import SecretStr

from service.middleware.answers import count_error, has_body, send_json_error

ADMIN_PREFIX = "/admin"


def admin_refusal(token: SecretStr | None, authorization: str | None) -> tuple[int, str, list] | None:
    """(status, detail, extra headers) refusing the request, or None when `authorization` carries the token."""
    if token is None:
        return 403, "admin API disabled: start the server with PIGGYBACK_ADMIN_TOKEN set", []
    scheme, _, credentials = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        challenge = [(b"www-authenticate", b"Bearer")]
        return 401, "missing token: send 'Authorization: Bearer <token>'", challenge
    if not secrets.compare_digest(credentials.strip().encode(), token.get_secret_value().encode()):
        return 403, "wrong admin token", []
    return None


class AdminAuth:
    """Refuses every `/admin` request without the right bearer token, from the headers alone."""

    def __init__(self, app, token: SecretStr | None, prefix: str = ADMIN_PREFIX):
        self.app = app
        self.token = token
        self.prefix = prefix

    def _guarded(self, path: str) -> bool:
        return path == self.prefix or path.startswith(self.prefix + "/")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self._guarded(scope["path"]):
            return await self.app(scope, receive, send)
        authorization = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
        refusal = admin_refusal(self.token, authorization)
        if refusal is None:
            return await self.app(scope, receive, send)
        status, detail, headers = refusal
        count_error(scope, f"HTTP{status}")
        await send_json_error(send, status, detail, headers, close=has_body(scope))
