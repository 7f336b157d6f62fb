"""``POST /v1/generate``: text generation, whole or streamed (SSE), with or without a session."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request

from .. import schemas as S
from ..auth import Caller, caller
from ..context import ApiContext, foreign_session_hidden, get_ctx
from ..generator import GenRequest
from ..metrics import ARRIVED, BODY_READ
from ..streaming import error_event, first_and_rest, public_events, sse, sse_write, streaming_response

router = APIRouter(tags=["generation"], responses=S.ERROR_RESPONSES)


@router.post("/v1/generate", responses=S.SSE_RESPONSE, response_model=S.GenerateResponse,
             summary="Generate text (stream=true: Server-Sent Events, one `token` event per token, then `done`; "
                     "the tokens of one decode iteration arrive in one write)")
async def generate(req: S.GenerateRequest, request: Request, ctx: ApiContext = Depends(get_ctx),
                   who: Caller = Depends(caller)):
    t_handler = time.perf_counter()
    # the ingress's stages (timing.timeline.ingress_*) are ms after the request reached its ASGI app
    # (serve.metrics.RequestMetrics, the outermost middleware), else after this handler began
    t_in = request.scope.get(ARRIVED, t_handler)
    t_body = request.scope.get(BODY_READ)
    owner = who.owner(req.owner)
    ctx.check_new_tokens(req.max_new_tokens)
    ids = ctx.check_prompt(ctx.tok.encode(req.prompt))
    if req.state_id is not None and req.create_state:
        await ctx.check_session_quota(owner, req.state_id)
    g = GenRequest(prompt_ids=ids, owner=owner, stop_ids=[ctx.tok.eos_id], max_new_tokens=req.max_new_tokens,
                   temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, seed=req.seed,
                   stop=req.stop, state_id=req.state_id, create_state=req.create_state,
                   prompt_preview=req.prompt[:200])
    ctx.count("generate")
    if not req.stream:
        t_sent = time.perf_counter()
        async with foreign_session_hidden(req.state_id):
            out = await ctx.generator.generate.remote(g)
        ingress_timeline(out, t_in, t_body, t_handler, t_sent, None, None)
        return S.GenerateResponse(**{k: out[k] for k in S.GenerateResponse.model_fields if k in out})
    t_sent = time.perf_counter()
    gen = ctx.generator.options(stream=True).generate_stream.remote(g)
    async with foreign_session_hidden(req.state_id):
        first, rest = await first_and_rest(gen)
    t_first = time.perf_counter()

    async def events():
        # one write per Generator event (a scheduler iteration's tokens), one SSE event per token
        n = 1
        if first.get("type") == "done":
            ingress_timeline(first, t_in, t_body, t_handler, t_sent, t_first, n)
        yield sse_write(public_events(first))
        try:
            async for ev in rest:
                n += 1
                if ev.get("type") == "done":
                    ingress_timeline(ev, t_in, t_body, t_handler, t_sent, t_first, n)
                yield sse_write(public_events(ev))
        except Exception as e:  # mid-stream: the status line is gone, report in-band
            yield sse(error_event(e))
    return streaming_response(events(), gen)


def ingress_timeline(done: dict, t_in: float, t_body: float | None, t_handler: float, t_sent: float,
                     t_first: float | None, events: int | None) -> None:
    """Add the ingress's stages (ms after ``t_in``, this process's clock) to the timeline of the
    Generator's ``done`` dict: the body read (None: not seen), the route's handler began (after
    middleware, body parsing and validation), sent to the Generator, first event back (streams),
    result back."""
    line = done.setdefault("timing", {}).setdefault("timeline", {})
    if t_body is not None:
        line["ingress_body_ms"] = (t_body - t_in) * 1e3
    line.update(ingress_handler_ms=(t_handler - t_in) * 1e3, ingress_sent_ms=(t_sent - t_in) * 1e3,
                ingress_done_ms=(time.perf_counter() - t_in) * 1e3)
    if t_first is not None:
        line.update(ingress_first_event_ms=(t_first - t_in) * 1e3, ingress_events=events)
