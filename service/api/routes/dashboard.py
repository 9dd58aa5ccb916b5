"""GET /dashboard/: the web dashboard, static files shipped in the package (no CDN, no build step).

The page itself needs no API key: it asks for one and sends it as ``Authorization: Bearer``
on every API call it makes (kept in the browser's sessionStorage).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse
from starlette.staticfiles import StaticFiles

DASHBOARD_DIR = Path(__file__).resolve().parents[1] / "dashboard"

# Scripts and style sheets only from this origin: no inline script or <style> (element.style is fine).
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(include_in_schema=False)
_files = StaticFiles(directory=DASHBOARD_DIR)


@router.api_route("/dashboard", methods=["GET", "HEAD"])
def dashboard_root() -> RedirectResponse:
    return RedirectResponse("/dashboard/", status_code=308)


@router.api_route("/dashboard/{path:path}", methods=["GET", "HEAD"])
async def dashboard_file(path: str, request: Request) -> Response:
    """A file of the dashboard (``index.html`` for the folder); 404 problem+json otherwise."""
    response = await _files.get_response(path or "index.html", request.scope)
    response.headers.update(SECURITY_HEADERS)
    response.headers["Cache-Control"] = "no-cache"  # revalidate (ETag): an upgrade is seen at once
    return response
