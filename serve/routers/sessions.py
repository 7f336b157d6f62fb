"""Sessions: ``/v1/states`` (list, paginated; create) and ``/v1/state/{id}`` (read, delete, compact).

Every call acts for the caller's owner; another owner's session answers 404 like a missing one.
"""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Body, Depends, Query

from .. import schemas as S
from ..auth import Caller, caller
from ..context import ApiContext, check_state_id, foreign_session_hidden, get_ctx
from ..errors import NotFound

router = APIRouter(tags=["sessions"], responses=S.ERROR_RESPONSES)


@router.get("/v1/states", response_model=S.StateListResponse,
            summary="The caller's sessions, by state_id, a page at a time (pass `after` = the last id)")
async def list_states(ctx: ApiContext = Depends(get_ctx), who: Caller = Depends(caller),
                      owner: str | None = Query(None, description="Owner when the server has no keys (X-Owner wins)."),
                      limit: int = Query(100, ge=1, le=1000, description="Sessions per page."),
                      after: str | None = Query(None, max_length=64, description="Start after this state_id.")):
    listing = await ctx.bank.list_reachable(who.owner(owner))  # a shard that is down is named, not a 503
    states = sorted(listing["states"], key=lambda s: s["state_id"])
    if after is not None:
        states = [s for s in states if s["state_id"] > after]
    page = states[:limit]
    more = len(states) > limit
    down = listing["unreachable_shards"]
    return {"states": page, "count": len(page), "has_more": more,
            "next_after": page[-1]["state_id"] if more else None, "incomplete": bool(down),
            "unreachable_shards": down}


@router.post("/v1/states", response_model=S.StateInfo, status_code=201, summary="Create an empty session")
async def create_state(req: S.StateCreateRequest | None = Body(None), ctx: ApiContext = Depends(get_ctx),
                       who: Caller = Depends(caller)):
    req = req or S.StateCreateRequest()
    owner = who.owner(req.owner)
    sid = req.state_id or f"s-{uuid.uuid4().hex[:12]}"
    await ctx.check_session_quota(owner, sid if req.state_id else None)
    try:
        async with foreign_session_hidden(sid):
            return await ctx.bank.call(sid, "create", owner)
    except NotFound:
        raise NotFound(f"state_id {sid!r} is not available; choose another id (or omit it for a "
                       "server-generated one)", "state_not_found", "state_id") from None


@router.get("/v1/state/{state_id}", response_model=S.StateInfo, summary="A session: bank summary and history")
async def get_state(state_id: str, ctx: ApiContext = Depends(get_ctx), who: Caller = Depends(caller),
                    owner: str | None = Query(None, description="Owner when the server has no keys.")):
    return await ctx.bank.call(check_state_id(state_id), "info", who.owner(owner), True)


@router.delete("/v1/state/{state_id}", response_model=S.DeleteResponse, summary="Delete a session and its bank")
async def delete_state(state_id: str, ctx: ApiContext = Depends(get_ctx), who: Caller = Depends(caller),
                       owner: str | None = Query(None, description="Owner when the server has no keys.")):
    return await ctx.bank.call(check_state_id(state_id), "delete", who.owner(owner))


@router.post("/v1/state/{state_id}/compact", response_model=S.StateCompactResponse,
             summary="Compact a session's bank now (L0 -> L1 -> L2 through the learned compressor, then merge)")
async def compact_state(state_id: str, req: S.StateCompactRequest | None = Body(None),
                        ctx: ApiContext = Depends(get_ctx), who: Caller = Depends(caller)):
    req = req or S.StateCompactRequest()
    sid = check_state_id(state_id)
    return await ctx.bank.call(sid, "compact", who.owner(req.owner), req.merge, req.merge_threshold)
