"""``/docs`` (Swagger UI) from assets the app serves itself (serve/static/docs, vendored at a pinned
version with its licence: see serve/static/docs/VENDORED.md). No CDN: the page works on a machine
without a network. ``/redoc`` redirects there: one vendored docs UI is kept (ReDoc's 0.9 MB bundle
rendered the same OpenAPI a second time)."""

from __future__ import annotations

import os

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "static", "docs")
ASSETS_URL = "/docs-assets"
router = APIRouter(include_in_schema=False)


def assets_app() -> StaticFiles:
    return StaticFiles(directory=ASSETS_DIR)


def _prefix(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/")


@router.get("/docs")
async def swagger_ui(request: Request):
    p = _prefix(request)
    return get_swagger_ui_html(openapi_url=f"{p}/openapi.json", title=f"{request.app.title} - Swagger UI",
                               oauth2_redirect_url=f"{p}/docs/oauth2-redirect",
                               swagger_js_url=f"{p}{ASSETS_URL}/swagger-ui/swagger-ui-bundle.js",
                               swagger_css_url=f"{p}{ASSETS_URL}/swagger-ui/swagger-ui.css",
                               swagger_favicon_url=f"{p}{ASSETS_URL}/swagger-ui/favicon-32x32.png",
                               swagger_ui_parameters={"persistAuthorization": True})


@router.get("/docs/oauth2-redirect")
async def swagger_ui_redirect():
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc")
async def redoc(request: Request):
    """ReDoc is no longer shipped: a permanent redirect to ``/docs`` (the same OpenAPI, Swagger UI)."""
    return RedirectResponse(f"{_prefix(request)}/docs", status_code=308)
