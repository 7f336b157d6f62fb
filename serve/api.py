"""The HTTP/WebSocket API: :func:`create_api` assembles the routers (serve/routers/) around an
:class:`~serve.context.ApiContext`. Routes validate and translate; models run in the Generator,
banks live in the shards.
"""

from __future__ import annotations

import asyncio
import os
from contextlib import asynccontextmanager

from fastapi import FastAPI

from .access_log import AccessLog
from .context import ApiContext
from .errors import APIError, install_handlers
from .metrics import RequestMetrics
from .routers import docs, generate, health, live, openai, research, sessions, training
from .routers.health import VERSION

DESCRIPTION = ("Generation with per-session hierarchical memory (StateBank), OpenAI-compatible endpoints "
               "and research/introspection endpoints. Errors are JSON: "
               "{\"error\": {\"message\", \"type\", \"param\", \"code\"}}. Servers with API keys want "
               "`Authorization: Bearer KEY` on every call but /health (WebSockets: the header, or a first "
               "message {\"type\": \"auth\", \"key\": KEY}).")


def create_api(ctx: ApiContext) -> FastAPI:
    if ctx.tok is None:
        from dnc.tokenizer import get_tokenizer

        ctx.tok = get_tokenizer()

    @asynccontextmanager
    async def lifespan(_app):
        tasks = [asyncio.create_task(live.pump_hub(ctx)), asyncio.create_task(live.tick_metrics(ctx))]
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()

    app = FastAPI(title="BWR-DNC serving API", version=VERSION, lifespan=lifespan, description=DESCRIPTION,
                  docs_url=None, redoc_url=None)
    app.state.ctx = ctx
    install_handlers(app)
    app.add_middleware(AccessLog)
    app.add_middleware(RequestMetrics)  # Prometheus: requests by route and status (serve/metrics.py)
    if ctx.allowed_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=ctx.allowed_origins, allow_methods=["*"],
                           allow_headers=["Authorization", "Content-Type", "X-Owner"])
    paths = set()
    for module in (health, generate, sessions, openai, research, live, training, docs):
        app.include_router(module.router)
        paths |= {getattr(r, "path", "") for r in module.router.routes}
    ctx.endpoints = sorted(p for p in paths if p.startswith(("/v1", "/research", "/ws", "/health", "/model")))
    app.mount(docs.ASSETS_URL, docs.assets_app(), name="docs-assets")
    _mount_ui(app, ctx)
    return app


def _mount_ui(app: FastAPI, ctx: ApiContext) -> None:
    if ctx.ui_dir and os.path.isdir(ctx.ui_dir):
        from fastapi.staticfiles import StaticFiles

        app.mount("/ui", StaticFiles(directory=ctx.ui_dir, html=True), name="ui")
        return

    @app.get("/ui", include_in_schema=False)
    @app.get("/ui/{path:path}", include_in_schema=False)
    async def no_ui(path: str = ""):
        raise APIError(f"the web UI is not installed on this server (looked in {ctx.ui_dir!r})", "no_ui")
