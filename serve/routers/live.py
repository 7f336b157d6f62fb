"""``/ws/live``: an owner's own generation and training events, plus global serving metrics.

Also the WebSocket admission shared with ``/ws/research``: caps on open sockets per owner and in
all (the socket is closed with 4429 beyond them).
"""

from __future__ import annotations

import asyncio
import time
import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import APIRouter, Depends, WebSocket, WebSocketDisconnect

from ..auth import WS_CLOSE_TOO_MANY, authenticate_ws
from ..context import ApiContext, get_ctx

logger = logging.getLogger("serve.routers.live")
router = APIRouter(tags=["live"])


@asynccontextmanager
async def admitted_ws(ctx: ApiContext, ws: WebSocket) -> AsyncIterator[str | None]:
    """Accept, authenticate and admit ``ws``; yield its owner while it holds one of the open-socket
    slots, or None once it has been closed (bad origin 4403, no valid key 4401, over a cap 4429).
    Sockets still authenticating count against ``max_ws_total`` too (they wait up to 5 s)."""
    if ctx.ws_authenticating + sum(ctx.ws_open.values()) >= ctx.limits.max_ws_total:
        ctx.count("rejected/websocket_cap")
        await ws.accept()
        await _close(ws, WS_CLOSE_TOO_MANY, f"server holds {ctx.limits.max_ws_total} WebSockets, its most; retry later")
        yield None
        return
    ctx.ws_authenticating += 1
    try:
        owner = await authenticate_ws(ws, ctx.keys, ctx.allowed_origins)
    finally:
        ctx.ws_authenticating -= 1
    if owner is None:
        ctx.count("rejected/websocket_auth")
        yield None
        return
    refused = ctx.ws_admit(owner)
    if refused is not None:
        ctx.count("rejected/websocket_cap")
        await _close(ws, WS_CLOSE_TOO_MANY, refused)
        yield None
        return
    try:
        yield owner
    finally:
        ctx.ws_release(owner)


async def _close(ws: WebSocket, code: int, reason: str) -> None:
    try:
        await ws.close(code, reason)
    except RuntimeError:  # the client already left
        pass


@router.websocket("/ws/live")
async def ws_live(ws: WebSocket, ctx: ApiContext = Depends(get_ctx)):
    """Metrics, training steps and generation events, as JSON messages with a ``type``."""
    async with admitted_ws(ctx, ws) as owner:
        if owner is not None:
            await _serve_live(ctx, ws, owner)


async def _serve_live(ctx: ApiContext, ws: WebSocket, owner: str) -> None:
    sub = ctx.live.subscribe(owner)
    try:
        await ws.send_json({"type": "hello", "subscriber": sub.id, "interval_s": ctx.live_interval_s})
        try:  # recent training steps, so a new chart is not empty
            for e in await ctx.hub().training_steps.remote(None, 200):
                if sub.wants(e):
                    sub.queue.put_nowait({**e, "backlog": True})
        except Exception:  # the hub is restarting, or the backlog overflowed: live events still come
            pass
        sub.task = asyncio.create_task(ctx.live.pump(sub, ws.send_json))
        reader = asyncio.create_task(_drain(ws))
        await asyncio.wait({sub.task, reader}, return_when=asyncio.FIRST_COMPLETED)
        for t in (sub.task, reader):
            t.cancel()
        if sub.dropped:
            await ws.close(code=1008, reason="subscriber too slow: events overflowed; reconnect")
    except (WebSocketDisconnect, RuntimeError):
        pass  # the client left: not an error
    finally:
        ctx.live.unsubscribe(sub)


async def _drain(ws: WebSocket) -> None:
    """Read (and ignore) what a /ws/live client sends, to notice when it disconnects."""
    try:
        while True:
            await ws.receive_text()
    except (WebSocketDisconnect, RuntimeError):
        return


async def pump_hub(ctx: ApiContext) -> None:
    """Long-poll the hub and fan its events out to this replica's subscribers."""
    cursor = None
    while True:
        try:
            hub = ctx.hub()
            if cursor is None:
                cursor = await hub.last_seq.remote()
            seq, events = await hub.poll.remote(cursor, 10.0)
            if seq < cursor:  # the hub restarted: its numbering began again
                cursor = 0
                continue
            cursor = seq
            for e in events:
                ctx.live.publish(e)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.warning("live hub poll failed; retrying", exc_info=True)
            await asyncio.sleep(1.0)


async def tick_metrics(ctx: ApiContext) -> None:
    """Every ``live_interval_s``: a ``metrics`` event (global, no owner) for this replica's subscribers."""
    while True:
        await asyncio.sleep(ctx.live_interval_s)
        if not ctx.live.subs:
            continue
        try:
            g = await ctx.generator.stats.remote()
            ctx.live.publish({"type": "metrics", "ts": time.time(), "generator": g,
                              "ingress": dict(ctx.counters), "subscribers": len(ctx.live.subs)})
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.debug("metrics tick failed", exc_info=True)
