"""Server-Sent Events from the Generator's streamed events (shared by /v1/generate and the OpenAI routes).

The Generator streams one ``tokens`` event per request and scheduler iteration (every token the
request got in that iteration). The routes answer each of those with ONE write to the response:
the clients still see one SSE event per token (``data: {"type": "token", ...}``), but several
events travel in one ASGI message, so the ingress and the proxy handle one message per iteration
and request instead of one per token (:func:`sse_write`).

Responses are :class:`SSEResponse`: a ``StreamingResponse`` that only sends. Starlette's own, under
the ASGI 2.3 scope Serve's proxy passes on, also loops on ``receive()`` to notice a client going
away, and inside a Serve replica every ``receive()`` is a Ray call back to the proxy (after a named
actor lookup): one more round trip and task per stream. The proxy already watches the client and
cancels the ingress's request when it disconnects (``ProxyResponseGenerator``'s
``disconnected_task``), which ends the body iterator and cancels the generation.
"""

from __future__ import annotations

import json
import logging
from typing import Any, AsyncIterator, Iterable

from fastapi.responses import StreamingResponse
from starlette.requests import ClientDisconnect

from .errors import find_api_error

logger = logging.getLogger("serve.streaming")


def public_events(ev: dict[str, Any]) -> list[dict[str, Any]]:
    """The Generator streams chunks (``tokens`` with several items); clients get one event per token."""
    if ev.get("type") == "tokens":
        return [{"type": "token", **item} for item in ev["items"]]
    return [ev]


def sse(obj: Any) -> bytes:
    """One SSE event: ``data: <JSON or text>`` and the blank line that ends it."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


def sse_write(objs: Iterable[Any]) -> bytes:
    """Several SSE events as one write (b"" when there are none: the caller skips it)."""
    return b"".join(sse(o) for o in objs)


def error_event(exc: BaseException) -> dict[str, Any]:
    """An error after the status line went out, reported in-band."""
    api = find_api_error(exc)
    if api is None:
        logger.exception("error while streaming", exc_info=exc)
        return {"type": "error", "status": 500, "error": {"message": "internal error while generating",
                                                           "type": "server_error", "code": "internal_error"}}
    return {"type": "error", "status": api.status, **api.body()}


async def first_and_rest(gen) -> tuple[dict[str, Any], AsyncIterator[dict[str, Any]]]:
    """Await the first streamed event before answering, so errors that happen before any token
    (unknown session, busy, bad input) are a proper 4xx instead of an event in a 200 stream."""
    it = gen.__aiter__()
    first = await it.__anext__()
    return first, it


class SSEResponse(StreamingResponse):
    """A ``StreamingResponse`` that never calls ``receive()`` (see the module docstring): what
    Starlette itself does for ASGI >= 2.4 servers, which report disconnects as send errors."""

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await super().__call__(scope, receive, send)
        try:
            await self.stream_response(send)
        except OSError:
            raise ClientDisconnect() from None
        if self.background is not None:
            await self.background()


def streaming_response(events: AsyncIterator[bytes], gen) -> StreamingResponse:
    async def body():
        ended = False
        try:
            async for chunk in events:
                yield chunk
            ended = True
        finally:
            if not ended:  # the client went away: stop generating (after the end, a cancel is a wasted Ray call)
                try:
                    gen.cancel()
                except Exception:
                    pass
    return SSEResponse(body(), media_type="text/event-stream",
                       headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
