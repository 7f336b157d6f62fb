"""The shared context of every router: handles, limits, the key ring and per-replica counters.

One :class:`ApiContext` lives on ``app.state.ctx``; routers get it with ``Depends(get_ctx)``, so
the same routers run inside the Serve ingress (serve/app.py) or any FastAPI app built around a
context. Nothing here talks to a model: that is the Generator's job.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from starlette.requests import HTTPConnection

from . import schemas as S
from .auth import KeyRing
from .errors import TooManyRequests, Unprocessable, find_api_error, session_not_found
from .live import Broadcaster

logger = logging.getLogger("serve.context")


@dataclass
class Limits:
    """What one server accepts (``AppArgs`` sets them); the API's hard bounds are in schemas.py."""

    max_new_tokens: int = 512
    max_prompt_tokens: int = 8192
    max_research_tokens: int = 2048
    max_research_context_tokens: int = 4096   # efficiency-metrics context_tokens
    max_research_new_tokens: int = 128        # efficiency-metrics new_tokens
    research_concurrency_per_owner: int = 1   # expensive research calls in flight per owner (replica)
    max_sessions_per_owner: int = 1000
    max_ws_per_owner: int = 8                 # open WebSockets per owner (replica)
    max_ws_total: int = 256                   # open WebSockets in all (replica)


@dataclass
class ApiContext:
    generator: Any                 # DeploymentHandle of the Generator
    bank: Any                      # BankClient
    hub: Callable[[], Any]         # -> LiveHub actor handle
    live: Broadcaster = field(default_factory=Broadcaster)
    limits: Limits = field(default_factory=Limits)
    keys: KeyRing = field(default_factory=KeyRing)
    allowed_origins: list[str] = field(default_factory=list)
    model_name: str = "bwr-dnc"
    tok: Any = None                # dnc tokenizer (byte-level)
    ui_dir: str | None = None
    live_interval_s: float = 2.0
    started: float = field(default_factory=time.time)
    runs_root: str = "runs"        # training runs the dashboard follows (serve/routers/training.py)
    counters: dict[str, int] = field(default_factory=dict)
    endpoints: list[str] = field(default_factory=list)            # API paths (GET /), set by create_api
    research_in_flight: Counter = field(default_factory=Counter)   # owner -> expensive calls running
    ws_open: Counter = field(default_factory=Counter)              # owner -> open WebSockets
    ws_authenticating: int = 0                                     # sockets waiting for their key

    def count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    # ------------------------------------------------------------------ limits
    def check_new_tokens(self, n: int, param: str = "max_new_tokens") -> int:
        if n > self.limits.max_new_tokens:
            raise Unprocessable(f"{param} must be <= {self.limits.max_new_tokens} on this server (got {n})",
                                "too_many_tokens", param)
        return n

    def check_prompt(self, ids: list[int], param: str = "prompt") -> list[int]:
        if len(ids) > self.limits.max_prompt_tokens:
            raise Unprocessable(f"{param} is {len(ids)} tokens (UTF-8 bytes); this server takes at most "
                                f"{self.limits.max_prompt_tokens} (max_prompt_tokens)", "prompt_too_long", param)
        return ids

    @asynccontextmanager
    async def research_slot(self, owner: str) -> AsyncIterator[None]:
        """Hold one of the owner's expensive-research slots; 429 when all are taken."""
        cap = self.limits.research_concurrency_per_owner
        if self.research_in_flight[owner] >= cap:
            self.count("rejected/research_concurrency")
            raise TooManyRequests(f"at most {cap} expensive research request(s) per key at a time; "
                                  "wait for the running one to finish", "research_concurrency")
        self.research_in_flight[owner] += 1
        try:
            yield
        finally:
            self.research_in_flight[owner] -= 1
            if self.research_in_flight[owner] <= 0:
                del self.research_in_flight[owner]

    async def check_session_quota(self, owner: str, state_id: str | None) -> None:
        """429 if creating ``state_id`` would give ``owner`` more than ``max_sessions_per_owner``
        sessions. An existing session of the owner passes (one shard call).

        The count skips shards that cannot answer (logged): one unreachable shard must not stop
        every owner from starting a session on the shards that work (the new session's own shard
        answers for itself when it is created). An owner may then pass the cap by what the
        unreachable shards hold, for as long as they are down: a soft limit, not a security one."""
        if state_id is not None:
            try:
                await self.bank.call(state_id, "info", owner, False)
                return
            except Exception as e:
                if find_api_error(e) is None or find_api_error(e).status != 404:
                    raise  # the shard is down or busy: that error, not a quota answer
        cap = self.limits.max_sessions_per_owner
        listing = await self.bank.list_reachable(owner)
        sessions = listing["states"]
        if listing["unreachable_shards"]:
            logger.warning("session quota of %s counted without shards %s (unreachable): %d sessions", owner,
                           listing["unreachable_shards"], len(sessions))
        if len(sessions) >= cap:
            self.count("rejected/session_quota")
            raise TooManyRequests(f"this key holds {len(sessions)} sessions, the most this server allows "
                                  f"(max_sessions_per_owner={cap}); delete some with DELETE /v1/state/{{id}}",
                                  "session_quota")

    def ws_admit(self, owner: str) -> str | None:
        """Count an open WebSocket; the refusal reason when over a cap (the caller closes)."""
        if sum(self.ws_open.values()) >= self.limits.max_ws_total:
            return f"server holds {self.limits.max_ws_total} WebSockets, its most; retry later"
        if self.ws_open[owner] >= self.limits.max_ws_per_owner:
            return f"at most {self.limits.max_ws_per_owner} open WebSockets per key; close one"
        self.ws_open[owner] += 1
        return None

    def ws_release(self, owner: str) -> None:
        self.ws_open[owner] -= 1
        if self.ws_open[owner] <= 0:
            del self.ws_open[owner]


async def get_ctx(conn: HTTPConnection) -> ApiContext:
    """FastAPI dependency: the app's context (HTTP requests and WebSockets alike). ``async`` on
    purpose: FastAPI runs a plain ``def`` dependency in its thread pool, a thread hand-off (and a
    wait for a free worker under load) on every request for an attribute read."""
    return conn.app.state.ctx


def check_state_id(state_id: str) -> str:
    try:
        return S.check_id(state_id, "state_id")
    except ValueError:
        shown = state_id if len(state_id) <= 40 else state_id[:37] + "..."
        raise Unprocessable(f"state_id must match {S.ID_PATTERN} (got {shown!r})", "invalid_state_id",
                            "state_id") from None


@asynccontextmanager
async def foreign_session_hidden(state_id: str | None) -> AsyncIterator[None]:
    """Another owner's session answers 404 like a missing one (a 409 "taken" would tell a caller
    that the id exists)."""
    try:
        yield
    except Exception as e:
        api = find_api_error(e)
        if state_id is not None and api is not None and api.code == "state_id_taken":
            raise session_not_found(state_id) from None
        raise
