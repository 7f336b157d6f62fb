"""``/docs`` (Swagger UI) and ``/redoc`` from assets the app serves itself (serve/static/docs,
vendored at pinned versions with their licences: see serve/static/docs/VENDORED.md). No CDN: the
pages work on a machine without a network."""

from __future__ import annotations

import os

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
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
    p = _prefix(request)
    return get_redoc_html(openapi_url=f"{p}/openapi.json", title=f"{request.app.title} - ReDoc",
                          redoc_js_url=f"{p}{ASSETS_URL}/redoc/redoc.standalone.js",
                          redoc_favicon_url=f"{p}{ASSETS_URL}/swagger-ui/favicon-32x32.png",
                          with_google_fonts=False)
