"""Service surface: ``/`` (info; browsers go to the UI), ``/health`` (a real forward pass), ``/model/stats``.

``/health`` stays open (load balancers probe it without keys); the rest needs a key when keys are on.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, RedirectResponse

from .. import schemas as S
from ..auth import Caller, caller
from ..context import ApiContext, get_ctx

VERSION = "0.1.0"
router = APIRouter(tags=["service"])


@router.get("/", summary="Service info (browsers are redirected to the UI)")
async def root(request: Request, ctx: ApiContext = Depends(get_ctx)):
    accept = request.headers.get("accept", "")
    if "text/html" in accept and "application/json" not in accept and ctx.ui_dir:
        return RedirectResponse(f"{request.scope.get('root_path', '')}/ui/", status_code=307)
    return {"name": "BWR-DNC", "version": VERSION, "model": ctx.model_name, "docs": "/docs",
            "openapi": "/openapi.json", "ui": "/ui/" if ctx.ui_dir else None,
            "auth": "bearer" if ctx.keys.enabled else "none",
            "endpoints": ctx.endpoints}


@router.get("/health", response_model=S.HealthResponse, summary="Runs a real forward pass",
            responses={503: {"model": S.HealthResponse, "description": "Degraded"}})
async def health(ctx: ApiContext = Depends(get_ctx)):
    gen, alive = await asyncio.gather(ctx.generator.health.remote(), ctx.bank.ping_all())
    ok = gen["logits_finite"] and alive == ctx.bank.cfg.num_shards
    body = S.HealthResponse(status="ok" if ok else "degraded", forward_ms=gen["forward_ms"],
                            logits_finite=gen["logits_finite"], device=gen["device"], shards_alive=alive,
                            shards_total=ctx.bank.cfg.num_shards, uptime_s=time.time() - ctx.started)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@router.get("/model/stats", response_model=S.ModelStatsResponse, responses=S.ERROR_RESPONSES)
async def model_stats(ctx: ApiContext = Depends(get_ctx), who: Caller = Depends(caller)):
    info, gstats = await asyncio.gather(ctx.generator.model_info.remote(), ctx.generator.stats.remote())
    shards = await ctx.bank.stats()
    serving = {"generator": gstats, "ingress": dict(ctx.counters), "live": ctx.live.stats(),
               "sessions": sum(s["sessions"] for s in shards),
               "resident_sessions": sum(s["sessions"] - s.get("offloaded", 0) for s in shards),
               "bank_bytes": sum(s["bytes_total"] for s in shards), "shards": len(shards)}
    return S.ModelStatsResponse(**info, serving=serving)
