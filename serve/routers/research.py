"""Research and introspection: ``POST /research/{name}`` for every registered computation,
``/research/metrics``, the training-step feed, and the ``/ws/research`` request/response socket.

Every call is authenticated and acts for the caller's owner (a session named in the request must
be theirs). Expensive computations are capped (context and token limits) and limited per owner to
``research_concurrency_per_owner`` at a time (429 beyond).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from fastapi import APIRouter, Depends, Query, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ValidationError

from .. import schemas as S
from ..auth import Caller, caller
from ..context import ApiContext, get_ctx
from ..errors import APIError, Unprocessable, describe_validation_error, find_api_error
from ..sessions.client import owner_view_stats
from .live import admitted_ws

logger = logging.getLogger("serve.routers.research")
router = APIRouter(tags=["research"], responses=S.ERROR_RESPONSES)

def research_endpoints() -> dict[str, tuple[type[BaseModel], str, bool]]:
    """name -> (request model, summary, expensive), from the one registry (serve.research.RESEARCH)."""
    from ..research import RESEARCH

    return {e.name: (e.request, e.summary, e.expensive) for e in RESEARCH.values()}


ENDPOINTS = research_endpoints()


def _check_caps(ctx: ApiContext, req: BaseModel) -> None:
    lim = ctx.limits
    text = getattr(req, "text", None)
    if text is not None and len(text.encode()) > lim.max_research_tokens:
        raise Unprocessable(f"text is {len(text.encode())} tokens; research endpoints take at most "
                            f"{lim.max_research_tokens} (max_research_tokens)", "text_too_long", "text")
    for param, cap, name in (("context_tokens", lim.max_research_context_tokens, "max_research_context_tokens"),
                             ("new_tokens", lim.max_research_new_tokens, "max_research_new_tokens")):
        value = getattr(req, param, None)
        if value is not None and value > cap:
            raise Unprocessable(f"{param} must be <= {cap} on this server ({name}; got {value})",
                                "research_too_large", param)


async def run_research(ctx: ApiContext, name: str, req: BaseModel, owner: str) -> dict[str, Any]:
    _check_caps(ctx, req)
    ctx.count(f"research/{name}")
    if not ENDPOINTS[name][2]:
        return await ctx.generator.research.remote(name, req, owner)
    async with ctx.research_slot(owner):
        return await ctx.generator.research.remote(name, req, owner)


def _add_endpoint(name: str, model: type[BaseModel], summary: str) -> None:
    async def endpoint(req, ctx: ApiContext = Depends(get_ctx), who: Caller = Depends(caller)):
        return await run_research(ctx, name, req, who.owner(getattr(req, "owner", None)))
    # the body model is chosen at runtime: give FastAPI a real annotation, not a string
    endpoint.__annotations__ = {"req": model, "ctx": ApiContext, "who": Caller}
    endpoint.__name__ = "research_" + name.replace("-", "_")
    router.post(f"/research/{name}", summary=summary)(endpoint)


for _name, (_model, _summary, _) in ENDPOINTS.items():
    _add_endpoint(_name, _model, _summary)


@router.get("/research/efficiency-metrics", summary="Efficiency metrics with default sizes")
async def efficiency_get(ctx: ApiContext = Depends(get_ctx), who: Caller = Depends(caller),
                         context_tokens: int = Query(256, ge=1, le=16_384),
                         new_tokens: int = Query(16, ge=1, le=512)):
    req = S.EfficiencyRequest(context_tokens=context_tokens, new_tokens=new_tokens)
    return await run_research(ctx, "efficiency-metrics", req, who.owner())


async def metrics_view(ctx: ApiContext, owner: str) -> dict[str, Any]:
    probe, gstats, shards, hub = await asyncio.gather(
        ctx.generator.probe.remote(), ctx.generator.stats.remote(), ctx.bank.stats(), ctx.hub().summary.remote())
    runs = {r: v for r, v in hub["runs"].items() if (v.get("last") or {}).get("owner") in (None, owner)}
    shards = owner_view_stats(shards)  # every key reads this: no other owner's session ids
    return {"model": probe, "generator": gstats, "ingress": dict(ctx.counters), "live": ctx.live.stats(),
            "bank": {"sessions": sum(s["sessions"] for s in shards), "bytes_total": sum(s["bytes_total"] for s in shards),
                     "bytes_in_memory": sum(s["bytes_in_memory"] for s in shards), "shards": shards},
            "training": runs, "events": hub["events"], "uptime_s": time.time() - ctx.started}


@router.get("/research/metrics", summary="Serving, bank, training and model metrics (runs a probe forward pass)")
async def research_metrics(ctx: ApiContext = Depends(get_ctx), who: Caller = Depends(caller)):
    return await metrics_view(ctx, who.owner())


@router.post("/research/training-step",
             summary="A trainer posts one step's metrics: stored and sent to the owner's /ws/live subscribers")
async def training_step(req: S.TrainingStepRequest, ctx: ApiContext = Depends(get_ctx),
                        who: Caller = Depends(caller)):
    owner = who.owner()
    event = {"type": "training_step", "run_id": req.run_id, "step": req.step, "metrics": req.metrics,
             "loss": req.metrics.get("loss", req.metrics.get("train/loss")), "ts": req.timestamp or time.time(),
             "owner": owner}
    seq = await ctx.hub().publish.remote(event)
    ctx.count("training_steps")
    return {"stored": True, "seq": seq, "run_id": req.run_id, "step": req.step}


def own_steps(steps: list[dict[str, Any]], owner: str) -> list[dict[str, Any]]:
    return [e for e in steps if e.get("owner") in (None, owner)]


@router.get("/research/training-steps",
            summary="The newest `limit` stored training steps, the caller's among them (newest last)")
async def training_steps(ctx: ApiContext = Depends(get_ctx), who: Caller = Depends(caller),
                         run_id: str | None = Query(None, max_length=64),
                         limit: int = Query(500, ge=1, le=20_000)):
    steps = own_steps(await ctx.hub().training_steps.remote(run_id, limit), who.owner())
    return {"steps": steps, "count": len(steps)}


# ------------------------------------------------------------------------------ websocket
@router.websocket("/ws/research")
async def ws_research(ws: WebSocket, ctx: ApiContext = Depends(get_ctx)):
    """Request/response research queries: send ``{"id", "endpoint", "params"}``, get
    ``{"id", "ok", "endpoint", "result"}`` or ``{"id", "ok": false, "error": {...}}``."""
    async with admitted_ws(ctx, ws) as owner:
        if owner is None:
            return
        await _serve_research_socket(ctx, ws, owner)


async def _serve_research_socket(ctx: ApiContext, ws: WebSocket, owner: str) -> None:
    """Answer messages in order. The next receive is always pending, so a client that leaves
    mid-computation is noticed: the work is cancelled and nothing is sent to a closed socket
    (Ray's proxy logs an ERROR for a send after the client went away)."""
    receiving = asyncio.create_task(ws.receive_text())
    try:
        while True:
            raw = await receiving
            receiving = asyncio.create_task(ws.receive_text())
            work = asyncio.create_task(_ws_research_one(ctx, raw, owner))
            await asyncio.wait({work, receiving}, return_when=asyncio.FIRST_COMPLETED)
            if receiving.done() and receiving.exception() is not None:  # the client left
                work.cancel()
                return
            await ws.send_json(await work)
    except (WebSocketDisconnect, RuntimeError):
        return  # the client left: not an error
    finally:
        receiving.cancel()


def _is_auth_message(raw: str) -> bool:
    try:
        msg = json.loads(raw)
    except ValueError:
        return False
    return isinstance(msg, dict) and msg.get("type") == "auth"


def _validation(e: ValidationError, hint: str | None = None) -> Unprocessable:
    msg = "; ".join(describe_validation_error(x)["msg_full"] for x in e.errors())
    return Unprocessable(f"{hint}: {msg}" if hint else msg, "validation_error")


async def _ws_research_one(ctx: ApiContext, raw: str, owner: str) -> dict[str, Any]:
    rid = None
    if _is_auth_message(raw):  # a client that authenticates anyway (keys off, or a repeat)
        return {"type": "auth", "ok": True, "owner": owner}
    try:
        try:
            msg = S.WSResearchRequest.model_validate_json(raw)
        except ValidationError as e:
            raise _validation(e, "message must be JSON: {\"id\", \"endpoint\", \"params\"}") from None
        rid = msg.id
        if msg.endpoint == "metrics":
            return {"id": rid, "ok": True, "endpoint": "metrics", "result": await metrics_view(ctx, owner)}
        found = ENDPOINTS.get(msg.endpoint)
        if found is None:
            raise Unprocessable(f"unknown endpoint {msg.endpoint!r}; use one of: metrics, "
                                + ", ".join(ENDPOINTS), "unknown_endpoint", "endpoint")
        try:
            req = found[0].model_validate(msg.params)
        except ValidationError as e:
            raise _validation(e) from None
        if not ctx.keys.enabled:  # without keys a message may name its owner, as X-Owner does
            claimed = getattr(req, "owner", None)
            owner = claimed if claimed and S.ID_RE.match(claimed) else owner
        result = await run_research(ctx, msg.endpoint, req, owner)
        return {"id": rid, "ok": True, "endpoint": msg.endpoint, "result": result}
    except Exception as e:
        api = find_api_error(e)
        if api is None:
            logger.exception("ws research failed")
            api = APIError("internal error", "internal_error")
            api.status = 500
        return {"id": rid, "ok": False, "status": api.status, **api.body()}
