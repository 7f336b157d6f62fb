"""Server-Sent Events from the Generator's streamed events (shared by /v1/generate and the OpenAI routes).

The Generator streams one ``tokens`` event per request and scheduler iteration (every token the
request got in that iteration). The routes answer each of those with ONE write to the response:
the clients still see one SSE event per token (``data: {"type": "token", ...}``), but several
events travel in one ASGI message, so the ingress and the proxy handle one message per iteration
and request instead of one per token (:func:`sse_write`).
"""

from __future__ import annotations

import json
import logging
from typing import Any, AsyncIterator, Iterable

from fastapi.responses import StreamingResponse

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


def streaming_response(events: AsyncIterator[bytes], gen) -> StreamingResponse:
    async def body():
        try:
            async for chunk in events:
                yield chunk
        finally:
            try:
                gen.cancel()  # client went away: stop generating
            except Exception:
                pass
    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
