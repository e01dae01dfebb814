"""Serve the dashboard's pages and files.

The pages themselves need no key: they are static, and every number on them comes
from /v1 calls that the page's own script makes with the key the user signs in with.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

STATIC = resources.files("service.ui") / "static"

# Everything the pages load comes from this service; no inline script or style, no
# frames, no plugins. `connect-src 'self'` is what lets the page call /v1.
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

# The only files served: a fixed list, so no path from the URL ever reaches the filesystem.
ASSETS = {
    "style.css": "text/css; charset=utf-8",
    "common.js": "text/javascript; charset=utf-8",
    "datasets.js": "text/javascript; charset=utf-8",
    "dataset.js": "text/javascript; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
HTML = "text/html; charset=utf-8"

router = APIRouter(prefix="/ui", include_in_schema=False)


def _file(name: str, media_type: str) -> Response:
    return Response((STATIC / name).read_bytes(), media_type=media_type, headers=HEADERS)


@router.get("")
def datasets_page() -> Response:
    """Sign in, then every dataset the key may see with its budget bar."""
    return _file("datasets.html", HTML)


@router.get("/datasets/{dataset_id}")
def dataset_page(dataset_id: str) -> Response:
    """One dataset: ε over time, the ledger, its integrity check and exports."""
    return _file("dataset.html", HTML)


@router.get("/static/{name}")
def asset(name: str) -> Response:
    """A stylesheet, script or icon of the pages."""
    media_type = ASSETS.get(name)
    if media_type is None:
        raise HTTPException(404, f"no dashboard file {name!r}")
    return _file(name, media_type)
