"""Routes of the console and the offline docs; nothing here needs an API key (the pages hold no data: the browser
fetches everything through the API with the key the person typed in)."""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import Scope

STATIC = Path(__file__).resolve().parent / "static"
# Swagger UI and ReDoc as released, from the pinned fastapi-offline wheel (pyproject: service extra).
VENDOR = Path(fastapi_offline.__file__).resolve().parent / "static"

# The console: scripts and styles from this origin only, no inline script or style, no eval; images from this
# origin or blob: URLs (dataset images are fetched with the key and shown as blobs).
CONSOLE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
    "font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# Swagger UI and ReDoc set inline styles (ReDoc's styled-components, Swagger's React style props) and ReDoc runs
# its search in a blob: worker; script stays 'self' only.
DOCS_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
    "connect-src 'self'; font-src 'self' data:; worker-src 'self' blob:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _headers(csp: str) -> dict[str, str]:
    return {"Content-Security-Policy": csp, **SECURITY_HEADERS}


class _SecuredStatic(StaticFiles):
    """Static files with the page's CSP and ``nosniff`` on every response."""

    def __init__(self, *, directory: Path, csp: str) -> None:
        super().__init__(directory=directory)
        self._extra = _headers(csp)

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(self._extra)
        return response


router = APIRouter(include_in_schema=False)


def _page(name: str, csp: str) -> FileResponse:
    return FileResponse(STATIC / name, media_type="text/html; charset=utf-8", headers=_headers(csp))


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/console/", status_code=307)


@router.get("/console")
def console_redirect() -> RedirectResponse:
    return RedirectResponse("/console/", status_code=307)


@router.get("/console/")
def console() -> FileResponse:
    return _page("app/index.html", CONSOLE_CSP)


@router.get("/docs")
def swagger_ui() -> FileResponse:
    return _page("docs/swagger.html", DOCS_CSP)


@router.get("/redoc")
def redoc() -> FileResponse:
    return _page("docs/redoc.html", DOCS_CSP)


def install_console(app: FastAPI) -> None:
    """Add the console, the docs pages and their static files to ``app`` (built with docs_url=redoc_url=None)."""
    app.include_router(router)
    app.mount("/console/static", _SecuredStatic(directory=STATIC / "app", csp=CONSOLE_CSP), name="console-static")
    app.mount("/docs-static/vendor", _SecuredStatic(directory=VENDOR, csp=DOCS_CSP), name="docs-vendor")
    app.mount("/docs-static", _SecuredStatic(directory=STATIC / "docs", csp=DOCS_CSP), name="docs-static")
