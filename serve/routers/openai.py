"""The OpenAI-compatible surface: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``.

A session is the extension field ``state_id``; ``user`` names the owner only on servers without keys.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Callable

from fastapi import APIRouter, Depends

from .. import schemas as S
from ..auth import Caller, caller
from ..context import ApiContext, foreign_session_hidden, get_ctx
from ..errors import Unprocessable
from ..generator import GenRequest
from ..streaming import error_event, first_and_rest, public_events, sse_write, streaming_response

router = APIRouter(tags=["openai"], responses=S.ERROR_RESPONSES)
ROLE_TOKENS = {"system": "<system>", "developer": "<system>", "user": "<user>", "assistant": "<assistant>"}


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _usage(out: dict[str, Any]) -> dict[str, int]:
    return {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["tokens"],
            "total_tokens": out["prompt_tokens"] + out["tokens"]}


def _user(req: S._OpenAIBase) -> str | None:
    return req.user if req.user and S.ID_RE.match(req.user) else None


async def _run(ctx: ApiContext, req: S._OpenAIBase, prompt_ids: list[int], new_tokens: int, owner: str,
               stop_ids: list[int], preview: str, chunk: Callable[[dict[str, Any]], dict[str, Any] | None],
               final: Callable[[dict[str, Any]], dict[str, Any]], done_chunk, head=None):
    """One generation, answered whole or as OpenAI-style SSE chunks ending with ``[DONE]``."""
    if req.state_id is not None:
        await ctx.check_session_quota(owner, req.state_id)
    g = GenRequest(prompt_ids=prompt_ids, owner=owner, stop_ids=stop_ids, max_new_tokens=new_tokens,
                   temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, seed=req.seed, stop=req.stop,
                   state_id=req.state_id, create_state=True, prompt_preview=preview)
    if not req.stream:
        async with foreign_session_hidden(req.state_id):
            return final(await ctx.generator.generate.remote(g))
    gen = ctx.generator.options(stream=True).generate_stream.remote(g)
    async with foreign_session_hidden(req.state_id):
        first, rest = await first_and_rest(gen)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    async def events():
        # one write per Generator event (a scheduler iteration's tokens: several `data:` chunks);
        # the head goes with the first tokens, the finish chunk, usage and [DONE] with each other
        out: list[Any] = [] if head is None else [head]
        try:
            ev = first
            while True:
                if ev["type"] == "done":
                    out.append(done_chunk(ev, include_usage))
                    if include_usage:
                        out.append(done_chunk(ev, True, usage_only=True))
                    break
                out += [c for c in map(chunk, public_events(ev)) if c is not None]
                if out:
                    yield sse_write(out)
                    out = []
                ev = await rest.__anext__()
        except StopAsyncIteration:
            pass
        except Exception as e:
            out.append(error_event(e))
        out.append("[DONE]")
        yield sse_write(out)
    return streaming_response(events(), gen)


@router.get("/v1/models", summary="OpenAI-compatible model list")
async def models(ctx: ApiContext = Depends(get_ctx), who: Caller = Depends(caller)):
    return {"object": "list", "data": [{"id": ctx.model_name, "object": "model", "created": int(ctx.started),
                                        "owned_by": "bwr-dnc"}]}


@router.post("/v1/completions", responses=S.SSE_RESPONSE, response_model=S.CompletionResponse, summary="OpenAI-compatible completions")
async def completions(req: S.CompletionRequest, ctx: ApiContext = Depends(get_ctx), who: Caller = Depends(caller)):
    owner = who.owner(_user(req))
    ctx.check_new_tokens(req.max_tokens, "max_tokens")
    ids = ctx.check_prompt(ctx.tok.encode(req.prompt))
    cid, created, model = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), req.model or ctx.model_name
    ctx.count("completions")

    def base(text: str, finish: str | None) -> dict[str, Any]:
        return {"id": cid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

    def final(out):
        text = (req.prompt + out["text"]) if req.echo else out["text"]
        return {**base(text, _finish(out["finish_reason"])), "usage": _usage(out)}

    def chunk(ev):
        return base(ev["token"], None) if ev.get("token") else None

    def done_chunk(ev, inc, usage_only=False):
        if usage_only:
            return {**base("", None), "choices": [], "usage": _usage(ev)}
        return base("", _finish(ev["finish_reason"]))

    head = base(req.prompt, None) if (req.echo and req.stream) else None
    return await _run(ctx, req, ids, req.max_tokens, owner, [ctx.tok.eos_id], req.prompt[:200], chunk, final,
                      done_chunk, head)


def chat_prompt(ctx: ApiContext, messages: list[S.ChatMessage]) -> list[int]:
    """Roles become special tokens: ``<bos> <role> text <sep> ... <assistant>``."""
    tok = ctx.tok
    ids: list[int] = [tok.bos_id]
    for m in messages:
        ids += [tok.token_id(ROLE_TOKENS[m.role])] + tok.encode(m.text()) + [tok.sep_id]
    ids.append(tok.token_id("<assistant>"))
    if len(ids) > ctx.limits.max_prompt_tokens:
        raise Unprocessable(f"messages are {len(ids)} tokens; this server takes at most "
                            f"{ctx.limits.max_prompt_tokens} (max_prompt_tokens)", "prompt_too_long", "messages")
    return ids


@router.post("/v1/chat/completions", responses=S.SSE_RESPONSE, response_model=S.ChatCompletionResponse,
             summary="OpenAI-compatible chat completions (roles become special tokens)")
async def chat_completions(req: S.ChatCompletionRequest, ctx: ApiContext = Depends(get_ctx),
                           who: Caller = Depends(caller)):
    owner = who.owner(_user(req))
    n_new = ctx.check_new_tokens(req.new_tokens(), "max_tokens")
    ids = chat_prompt(ctx, req.messages)
    tok = ctx.tok
    cid, created, model = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), req.model or ctx.model_name
    stop_ids = [tok.eos_id, tok.sep_id, tok.token_id("<user>"), tok.token_id("<system>")]
    ctx.count("chat_completions")

    def base(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    def final(out):
        return {"id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]},
                             "logprobs": None, "finish_reason": _finish(out["finish_reason"])}],
                "usage": _usage(out)}

    def chunk(ev):
        return base({"content": ev["token"]}, None) if ev.get("token") else None

    def done_chunk(ev, inc, usage_only=False):
        if usage_only:
            return {**base({}, None), "choices": [], "usage": _usage(ev)}
        return base({}, _finish(ev["finish_reason"]))

    return await _run(ctx, req, ids, n_new, owner, stop_ids, req.messages[-1].text()[:200], chunk, final,
                      done_chunk, head=base({"role": "assistant", "content": ""}, None))
