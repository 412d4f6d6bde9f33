"""The try-it page for people: `/` and `/ui` serve `service/ui/index.html`, `/ui/<asset>` its script and style.

The page is a client of the public routes like any other (it calls `/tasks`, `/tasks/{name}/predict`,
`/readyz`, `/metrics` from the browser), so this router serves files and nothing else: it never reaches
the engine and works while the server is still loading. The files ship inside the package (no build
step, no CDN), and every answer carries a Content-Security-Policy that allows this origin only, plus the
blob:/data: images the page makes from the user's own files and webcam frames.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, HTTPException, Response

router = APIRouter(include_in_schema=False)

# The whole set of files the page may load: a request can never name anything else in the package.
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; "
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidated on each load: an upgraded server never runs yesterday's script
}


def _asset(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise HTTPException(404, f"no page asset {name!r}; the page's files are {', '.join(sorted(ASSETS))}")
    body = resources.files("service").joinpath("ui", name).read_bytes()  # read per request: a few KiB
    return Response(body, media_type=media_type, headers=HEADERS)


@router.get("/")
@router.get("/ui")
def page() -> Response:
    return _asset("index.html")


@router.get("/ui/{name}")
def asset(name: str) -> Response:
    return _asset(name)
