"""The HTTP/WebSocket API as a FastAPI app, built around an :class:`ApiContext`.

The context holds what the routes talk to (the Generator handle, the SessionBank client, the live
hub and fan-out) so the same routes run inside the Serve ingress (serve/app.py) and, with fakes,
in plain tests. Routes validate and translate; models run in the Generator, banks live in the
shards.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from fastapi import Body, FastAPI, Header, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
from pydantic import ValidationError

from . import schemas as S
from .errors import APIError, Unprocessable, describe_validation_error, find_api_error, install_handlers
from .generator import GenRequest
from .live import Broadcaster

logger = logging.getLogger("serve.routes")
VERSION = "0.1.0"


@dataclass
class Limits:
    max_new_tokens: int = 512
    max_prompt_tokens: int = 8192
    max_research_tokens: int = 2048


@dataclass
class ApiContext:
    generator: Any                 # DeploymentHandle of the Generator
    bank: Any                      # BankClient
    hub: Callable[[], Any]         # -> LiveHub actor handle
    live: Broadcaster = field(default_factory=Broadcaster)
    limits: Limits = field(default_factory=Limits)
    model_name: str = "bwr-dnc"
    ui_dir: str | None = None
    live_interval_s: float = 2.0
    started: float = field(default_factory=time.time)
    runs_root: str = "runs"        # training runs the dashboard follows (serve/routers/training.py)
    counters: dict[str, int] = field(default_factory=dict)

    def count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n


# --------------------------------------------------------------------------- helpers
def _owner(header: str | None, body: str | None = None) -> str:
    owner = header or body or "anonymous"
    try:
        return S.check_id(owner, "owner (X-Owner header)")
    except ValueError as e:
        raise Unprocessable(str(e), "invalid_owner", "owner") from None


def _sid(state_id: str) -> str:
    try:
        return S.check_id(state_id, "state_id")
    except ValueError:
        shown = state_id if len(state_id) <= 40 else state_id[:37] + "..."
        raise Unprocessable(f"state_id must match {S.ID_PATTERN} (got {shown!r})", "invalid_state_id",
                            "state_id") from None


def _public_events(ev: dict[str, Any]) -> list[dict[str, Any]]:
    """The Generator streams chunks (``tokens`` with several items); clients get one event per token."""
    if ev.get("type") == "tokens":
        return [{"type": "token", **item} for item in ev["items"]]
    return [ev]


def _sse(obj: Any) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


def _error_event(exc: BaseException) -> dict[str, Any]:
    api = find_api_error(exc)
    if api is None:
        logger.exception("error while streaming", exc_info=exc)
        return {"type": "error", "status": 500, "error": {"message": "internal error while generating",
                                                           "type": "server_error", "code": "internal_error"}}
    return {"type": "error", "status": api.status, **api.body()}


async def _first_and_rest(gen) -> tuple[dict[str, Any], AsyncIterator[dict[str, Any]]]:
    """Await the first streamed event before answering, so errors that happen before any token
    (unknown session, busy, bad input) are a proper 4xx instead of an event in a 200 stream."""
    it = gen.__aiter__()
    first = await it.__anext__()
    return first, it


def _streaming(events: AsyncIterator[bytes], gen) -> StreamingResponse:
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


# --------------------------------------------------------------------------- app
def create_api(ctx: ApiContext) -> FastAPI:
    from dnc.tokenizer import get_tokenizer

    tok = get_tokenizer()

    @asynccontextmanager
    async def lifespan(_app):
        tasks = [asyncio.create_task(_pump_hub(ctx)), asyncio.create_task(_tick_metrics(ctx))]
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()

    app = FastAPI(title="BWR-DNC serving API", version=VERSION, lifespan=lifespan,
                  description="Generation with per-session hierarchical memory (StateBank), "
                              "OpenAI-compatible endpoints and research/introspection endpoints. "
                              "Errors are JSON: {\"error\": {\"message\", \"type\", \"param\", \"code\"}}.")
    install_handlers(app)
    from .routers.training import router as training_router  # runs + bench results for the dashboard
    app.state.ctx = ctx
    app.include_router(training_router)

    def encode_prompt(text: str) -> list[int]:
        ids = tok.encode(text)
        if len(ids) > ctx.limits.max_prompt_tokens:
            raise Unprocessable(f"prompt is {len(ids)} tokens (UTF-8 bytes); this server takes at most "
                                f"{ctx.limits.max_prompt_tokens} (max_prompt_tokens)", "prompt_too_long", "prompt")
        return ids

    def check_new_tokens(n: int, param: str = "max_new_tokens") -> int:
        if n > ctx.limits.max_new_tokens:
            raise Unprocessable(f"{param} must be <= {ctx.limits.max_new_tokens} on this server (got {n})",
                                "too_many_tokens", param)
        return n

    # ------------------------------------------------------------------ service
    @app.get("/", summary="Service info (browsers are redirected to the UI)")
    async def root(request: Request):
        accept = request.headers.get("accept", "")
        if "text/html" in accept and "application/json" not in accept and ctx.ui_dir:
            return RedirectResponse(f"{request.scope.get('root_path', '')}/ui/", status_code=307)
        return {"name": "BWR-DNC", "version": VERSION, "model": ctx.model_name, "docs": "/docs", "openapi": "/openapi.json",
                "ui": "/ui/" if ctx.ui_dir else None,
                "endpoints": sorted({getattr(r, "path", "") for r in app.routes
                                     if getattr(r, "path", "").startswith(("/v1", "/research", "/ws", "/health", "/model"))})}

    @app.get("/health", response_model=S.HealthResponse, summary="Runs a real forward pass")
    async def health():
        gen, alive = await asyncio.gather(ctx.generator.health.remote(), ctx.bank.ping_all())
        ok = gen["logits_finite"] and alive == ctx.bank.cfg.num_shards
        body = S.HealthResponse(status="ok" if ok else "degraded", forward_ms=gen["forward_ms"],
                                logits_finite=gen["logits_finite"], device=gen["device"], shards_alive=alive,
                                shards_total=ctx.bank.cfg.num_shards, uptime_s=time.time() - ctx.started)
        return JSONResponse(body.model_dump(), status_code=200 if ok else 503)

    @app.get("/model/stats", response_model=S.ModelStatsResponse)
    async def model_stats():
        info, gstats = await asyncio.gather(ctx.generator.model_info.remote(), ctx.generator.stats.remote())
        shards = await ctx.bank.stats()
        serving = {"generator": gstats, "ingress": dict(ctx.counters), "live": ctx.live.stats(),
                   "sessions": sum(s["sessions"] for s in shards),
                   "bank_bytes": sum(s["bytes_total"] for s in shards), "shards": len(shards)}
        return S.ModelStatsResponse(**info, serving=serving)

    # ------------------------------------------------------------------ generation
    def gen_request(prompt_ids: list[int], owner: str, **kw) -> GenRequest:
        return GenRequest(prompt_ids=prompt_ids, owner=owner, stop_ids=[tok.eos_id], **kw)

    @app.post("/v1/generate", response_model=S.GenerateResponse,
              summary="Generate text (stream=true: Server-Sent Events, one `token` event per token, then `done`)")
    async def generate(req: S.GenerateRequest, x_owner: str | None = Header(None)):
        owner = _owner(x_owner, req.owner)
        check_new_tokens(req.max_new_tokens)
        g = gen_request(encode_prompt(req.prompt), owner, max_new_tokens=req.max_new_tokens,
                        temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, seed=req.seed,
                        stop=req.stop, state_id=req.state_id, create_state=req.create_state,
                        prompt_preview=req.prompt[:200])
        ctx.count("generate")
        if not req.stream:
            out = await ctx.generator.generate.remote(g)
            return S.GenerateResponse(**{k: out[k] for k in S.GenerateResponse.model_fields if k in out})
        gen = ctx.generator.options(stream=True).generate_stream.remote(g)
        first, rest = await _first_and_rest(gen)

        async def events():
            for e in _public_events(first):
                yield _sse(e)
            try:
                async for ev in rest:
                    for e in _public_events(ev):
                        yield _sse(e)
            except Exception as e:  # mid-stream: the status line is gone, report in-band
                yield _sse(_error_event(e))
        return _streaming(events(), gen)

    # ------------------------------------------------------------------ states
    @app.get("/v1/states", response_model=S.StateListResponse, summary="The caller's sessions")
    async def list_states(x_owner: str | None = Header(None), owner: str | None = Query(None)):
        states = await ctx.bank.list_sessions(_owner(x_owner, owner))
        return {"states": states, "count": len(states)}

    @app.post("/v1/states", response_model=S.StateInfo, status_code=201, summary="Create an empty session")
    async def create_state(req: S.StateCreateRequest | None = Body(None), x_owner: str | None = Header(None)):
        req = req or S.StateCreateRequest()
        owner = _owner(x_owner, req.owner)
        sid = req.state_id or f"s-{uuid.uuid4().hex[:12]}"
        return await ctx.bank.call(sid, "create", owner)

    @app.get("/v1/state/{state_id}", response_model=S.StateInfo, summary="A session: bank summary and history")
    async def get_state(state_id: str, x_owner: str | None = Header(None), owner: str | None = Query(None)):
        return await ctx.bank.call(_sid(state_id), "info", _owner(x_owner, owner), True)

    @app.delete("/v1/state/{state_id}", response_model=S.DeleteResponse)
    async def delete_state(state_id: str, x_owner: str | None = Header(None), owner: str | None = Query(None)):
        return await ctx.bank.call(_sid(state_id), "delete", _owner(x_owner, owner))

    @app.post("/v1/state/{state_id}/compact", response_model=S.StateCompactResponse,
              summary="Compact a session's bank now (L0 -> L1 -> L2 through the learned compressor, then merge)")
    async def compact_state(state_id: str, req: S.StateCompactRequest | None = Body(None),
                            x_owner: str | None = Header(None)):
        req = req or S.StateCompactRequest()
        sid = _sid(state_id)
        return await ctx.bank.call(sid, "compact", _owner(x_owner, req.owner), req.merge, req.merge_threshold)

    # ------------------------------------------------------------------ OpenAI-compatible
    @app.get("/v1/models", summary="OpenAI-compatible model list")
    async def models():
        return {"object": "list", "data": [{"id": ctx.model_name, "object": "model", "created": int(ctx.started),
                                            "owned_by": "bwr-dnc"}]}

    def openai_finish(reason: str) -> str:
        return "length" if reason == "length" else "stop"

    async def openai_run(req: S._OpenAIBase, prompt_ids: list[int], new_tokens: int, owner: str,
                         stop_ids: list[int], preview: str, chunk: Callable[[dict[str, Any]], dict[str, Any] | None],
                         final: Callable[[dict[str, Any]], dict[str, Any]], done_chunk, head=None):
        g = GenRequest(prompt_ids=prompt_ids, owner=owner, stop_ids=stop_ids, max_new_tokens=new_tokens,
                       temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, seed=req.seed, stop=req.stop,
                       state_id=req.state_id, create_state=True, prompt_preview=preview)
        if not req.stream:
            return final(await ctx.generator.generate.remote(g))
        gen = ctx.generator.options(stream=True).generate_stream.remote(g)
        first, rest = await _first_and_rest(gen)
        include_usage = bool((getattr(req, "stream_options", None) or {}).get("include_usage"))

        async def events():
            if head is not None:
                yield _sse(head)
            try:
                ev = first
                while True:
                    if ev["type"] == "done":
                        yield _sse(done_chunk(ev, include_usage))
                        if include_usage:
                            yield _sse(done_chunk(ev, True, usage_only=True))
                        break
                    for e in _public_events(ev):
                        c = chunk(e)
                        if c is not None:
                            yield _sse(c)
                    ev = await rest.__anext__()
            except StopAsyncIteration:
                pass
            except Exception as e:
                yield _sse(_error_event(e))
            yield _sse("[DONE]")
        return _streaming(events(), gen)

    def usage(out: dict[str, Any]) -> dict[str, int]:
        return {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["tokens"],
                "total_tokens": out["prompt_tokens"] + out["tokens"]}

    @app.post("/v1/completions", response_model=S.CompletionResponse, summary="OpenAI-compatible completions")
    async def completions(req: S.CompletionRequest, x_owner: str | None = Header(None)):
        owner = _owner(x_owner, req.user if req.user and S._ID_RE.match(req.user) else None)
        check_new_tokens(req.max_tokens, "max_tokens")
        ids = encode_prompt(req.prompt)
        cid, created, model = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), req.model or ctx.model_name
        ctx.count("completions")

        def base(text: str, finish: str | None) -> dict[str, Any]:
            return {"id": cid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        def final(out):
            text = (req.prompt + out["text"]) if req.echo else out["text"]
            return {**base(text, openai_finish(out["finish_reason"])), "usage": usage(out)}

        def chunk(ev):
            return base(ev["token"], None) if ev.get("token") else None

        def done_chunk(ev, inc, usage_only=False):
            if usage_only:
                return {**base("", None), "choices": [], "usage": usage(ev)}
            return base("", openai_finish(ev["finish_reason"]))

        head = base(req.prompt, None) if (req.echo and req.stream) else None
        return await openai_run(req, ids, req.max_tokens, owner, [tok.eos_id], req.prompt[:200], chunk, final,
                                done_chunk, head)

    def chat_prompt(messages: list[S.ChatMessage]) -> list[int]:
        role_tok = {"system": "<system>", "developer": "<system>", "user": "<user>", "assistant": "<assistant>"}
        ids: list[int] = [tok.bos_id]
        for m in messages:
            ids += [tok.token_id(role_tok[m.role])] + tok.encode(m.text()) + [tok.sep_id]
        ids.append(tok.token_id("<assistant>"))
        if len(ids) > ctx.limits.max_prompt_tokens:
            raise Unprocessable(f"messages are {len(ids)} tokens; this server takes at most "
                                f"{ctx.limits.max_prompt_tokens} (max_prompt_tokens)", "prompt_too_long", "messages")
        return ids

    @app.post("/v1/chat/completions", response_model=S.ChatCompletionResponse,
              summary="OpenAI-compatible chat completions (roles become special tokens)")
    async def chat_completions(req: S.ChatCompletionRequest, x_owner: str | None = Header(None)):
        owner = _owner(x_owner, req.user if req.user and S._ID_RE.match(req.user) else None)
        n_new = check_new_tokens(req.new_tokens(), "max_tokens")
        ids = chat_prompt(req.messages)
        cid, created, model = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), req.model or ctx.model_name
        stop_ids = [tok.eos_id, tok.sep_id, tok.token_id("<user>"), tok.token_id("<system>")]
        ctx.count("chat_completions")

        def base(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        def final(out):
            return {"id": cid, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]},
                                 "logprobs": None, "finish_reason": openai_finish(out["finish_reason"])}],
                    "usage": usage(out)}

        def chunk(ev):
            return base({"content": ev["token"]}, None) if ev.get("token") else None

        def done_chunk(ev, inc, usage_only=False):
            if usage_only:
                return {**base({}, None), "choices": [], "usage": usage(ev)}
            return base({}, openai_finish(ev["finish_reason"]))

        return await openai_run(req, ids, n_new, owner, stop_ids, req.messages[-1].text()[:200], chunk, final,
                                done_chunk, head=base({"role": "assistant", "content": ""}, None))

    # ------------------------------------------------------------------ research
    async def run_research(name: str, req, owner: str) -> dict[str, Any]:
        text = getattr(req, "text", None)
        if text is not None and len(text.encode()) > ctx.limits.max_research_tokens:
            raise Unprocessable(f"text is {len(text.encode())} tokens; research endpoints take at most "
                                f"{ctx.limits.max_research_tokens} (max_research_tokens)", "text_too_long", "text")
        ctx.count(f"research/{name}")
        return await ctx.generator.research.remote(name, req.model_dump(), owner)

    def add_research(name: str, model: type, doc: str) -> None:
        async def endpoint(req, x_owner: str | None = Header(None)):
            return await run_research(name, req, _owner(x_owner, getattr(req, "owner", None)))
        # the body model is chosen at runtime: give FastAPI a real annotation, not a string
        endpoint.__annotations__ = {"req": model, "x_owner": str | None}
        endpoint.__name__ = "research_" + name.replace("-", "_")
        app.post(f"/research/{name}", summary=doc)(endpoint)

    docs = {
        "analyze-text": "Per-token loss and memory reads (level mass, top slots) from model(..., trace=True)",
        "gradient-analysis": "Per-layer gradient norms of the LM loss from a real backward pass",
        "state-evolution": "The bank (slots per level, bytes, loss) after each segment of the text",
        "attention-analysis": "Local attention (entropy, distance, matrix) and memory attention by level",
        "efficiency-metrics": "Tokens/s measured now; bank bytes vs the KV cache of a plain Transformer",
        "state-clustering": "Slot keys clustered by k-means and projected to 2-D by PCA",
        "information-flow": "Share of each layer's update from the memory read vs local attention",
        "explain-decision": "Memory slots and input tokens that most raised a chosen token's logit",
    }
    for name, model in S.RESEARCH_REQUESTS.items():
        add_research(name, model, docs[name])

    @app.get("/research/efficiency-metrics", summary="Efficiency metrics with default sizes")
    async def efficiency_get(context_tokens: int = Query(256, ge=1, le=16_384), new_tokens: int = Query(16, ge=1, le=512)):
        req = S.EfficiencyRequest(context_tokens=context_tokens, new_tokens=new_tokens)
        return await run_research("efficiency-metrics", req, "anonymous")

    @app.get("/research/metrics", summary="Serving, bank, training and model metrics (runs a probe forward pass)")
    async def research_metrics():
        probe, gstats, shards, hub = await asyncio.gather(
            ctx.generator.probe.remote(), ctx.generator.stats.remote(), ctx.bank.stats(), ctx.hub().summary.remote())
        return {"model": probe, "generator": gstats, "ingress": dict(ctx.counters), "live": ctx.live.stats(),
                "bank": {"sessions": sum(s["sessions"] for s in shards), "bytes_total": sum(s["bytes_total"] for s in shards),
                         "bytes_in_memory": sum(s["bytes_in_memory"] for s in shards), "shards": shards},
                "training": hub["runs"], "events": hub["events"], "uptime_s": time.time() - ctx.started}

    @app.post("/research/training-step", summary="A trainer posts one step's metrics: stored and broadcast on /ws/live")
    async def training_step(req: S.TrainingStepRequest):
        event = {"type": "training_step", "run_id": req.run_id, "step": req.step, "metrics": req.metrics,
                 "loss": req.metrics.get("loss", req.metrics.get("train/loss")), "ts": req.timestamp or time.time()}
        seq = await ctx.hub().publish.remote(event)
        ctx.count("training_steps")
        return {"stored": True, "seq": seq, "run_id": req.run_id, "step": req.step}

    @app.get("/research/training-steps", summary="Stored training steps (newest last)")
    async def training_steps(run_id: str | None = Query(None), limit: int = Query(500, ge=1, le=20_000)):
        steps = await ctx.hub().training_steps.remote(run_id, limit)
        return {"steps": steps, "count": len(steps)}

    # ------------------------------------------------------------------ websockets
    @app.websocket("/ws/live")
    async def ws_live(ws: WebSocket):
        """Metrics, training steps and generation events, as JSON messages with a ``type``."""
        await ws.accept()
        sub = ctx.live.subscribe()
        try:
            await ws.send_json({"type": "hello", "subscriber": sub.id, "interval_s": ctx.live_interval_s})
            try:  # recent training steps, so a new chart is not empty
                for e in await ctx.hub().training_steps.remote(None, 200):
                    sub.queue.put_nowait({**e, "backlog": True})
            except (asyncio.QueueFull, Exception):
                pass
            sub.task = asyncio.create_task(ctx.live.pump(sub, ws.send_json))
            reader = asyncio.create_task(_drain(ws))
            await asyncio.wait({sub.task, reader}, return_when=asyncio.FIRST_COMPLETED)
            for t in (sub.task, reader):
                t.cancel()
            if sub.dropped:
                await ws.close(code=1008, reason="subscriber too slow: events overflowed; reconnect")
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            ctx.live.unsubscribe(sub)

    @app.websocket("/ws/research")
    async def ws_research(ws: WebSocket):
        """Request/response research queries: send ``{"id", "endpoint", "params"}``, get
        ``{"id", "ok", "endpoint", "result"}`` or ``{"id", "ok": false, "error": {...}}``."""
        await ws.accept()
        owner = _safe_owner(ws.headers.get("x-owner") or ws.query_params.get("owner"))
        try:
            while True:
                raw = await ws.receive_text()
                await ws.send_json(await _ws_research_one(raw, owner))
        except WebSocketDisconnect:
            pass

    async def _ws_research_one(raw: str, owner: str) -> dict[str, Any]:
        rid = None
        try:
            try:
                msg = S.WSResearchRequest.model_validate_json(raw)
            except ValidationError as e:
                raise _validation(e, "message must be JSON: {\"id\", \"endpoint\", \"params\"}") from None
            rid = msg.id
            if msg.endpoint == "metrics":
                return {"id": rid, "ok": True, "endpoint": "metrics", "result": await research_metrics()}
            model = S.RESEARCH_REQUESTS.get(msg.endpoint)
            if model is None:
                raise Unprocessable(f"unknown endpoint {msg.endpoint!r}; use one of: metrics, "
                                    + ", ".join(S.RESEARCH_REQUESTS), "unknown_endpoint", "endpoint")
            try:
                req = model.model_validate(msg.params)
            except ValidationError as e:
                raise _validation(e) from None
            result = await run_research(msg.endpoint, req, _safe_owner(getattr(req, "owner", None) or owner))
            return {"id": rid, "ok": True, "endpoint": msg.endpoint, "result": result}
        except Exception as e:
            api = find_api_error(e)
            if api is None:
                logger.exception("ws research failed")
                api = APIError("internal error", "internal_error")
                api.status = 500
            return {"id": rid, "ok": False, "status": api.status, **api.body()}

    # ------------------------------------------------------------------ UI
    if ctx.ui_dir and os.path.isdir(ctx.ui_dir):
        from fastapi.staticfiles import StaticFiles

        app.mount("/ui", StaticFiles(directory=ctx.ui_dir, html=True), name="ui")
    else:
        @app.get("/ui", include_in_schema=False)
        @app.get("/ui/{path:path}", include_in_schema=False)
        async def no_ui(path: str = ""):
            raise APIError(f"the web UI is not installed on this server (looked in {ctx.ui_dir!r})", "no_ui")

    return app


def _validation(e: ValidationError, hint: str | None = None) -> Unprocessable:
    parts = [describe_validation_error(x)["msg_full"] for x in e.errors()]
    msg = "; ".join(parts)
    return Unprocessable(f"{hint}: {msg}" if hint else msg, "validation_error")


def _safe_owner(value: str | None) -> str:
    return value if value and S._ID_RE.match(value) else "anonymous"


async def _drain(ws: WebSocket) -> None:
    """Read (and ignore) what a /ws/live client sends, to notice when it disconnects."""
    try:
        while True:
            await ws.receive_text()
    except (WebSocketDisconnect, RuntimeError):
        return


async def _pump_hub(ctx: ApiContext) -> None:
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


async def _tick_metrics(ctx: ApiContext) -> None:
    """Every ``live_interval_s``: a ``metrics`` event for this replica's subscribers."""
    while True:
        await asyncio.sleep(ctx.live_interval_s)
        if not ctx.live.subs:
            continue
        try:
            g = await ctx.generator.stats.remote()
            ctx.live.publish({"type": "metrics", "ts": time.time(), "generator": g, "ingress": dict(ctx.counters),
                              "subscribers": len(ctx.live.subs)})
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.debug("metrics tick failed", exc_info=True)
