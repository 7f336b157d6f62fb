"""The client of the session store: routes a session's calls to its shard actor (creating the
actors on first use, re-resolving dead handles) and keeps a turn's lease alive."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict
from typing import Any

from ..errors import StorageUnavailable
from .config import BankConfig, shard_index
from .shard import SessionBankShard

logger = logging.getLogger("serve.sessions")


class BankClient:
    """Routes session calls to their shard actor (creating the actors on first use)."""

    def __init__(self, config: BankConfig):
        self.cfg = config
        self._handles: dict[int, Any] = {}

    def shard_of(self, state_id: str) -> int:
        return shard_index(state_id, self.cfg.num_shards)

    def handle(self, i: int):
        h = self._handles.get(i)
        if h is None:
            import ray

            actor_cls = ray.remote(SessionBankShard)
            h = actor_cls.options(
                name=self.cfg.actor_name(i), namespace=self.cfg.namespace, get_if_exists=True,
                lifetime="detached", max_restarts=-1, max_task_retries=-1, num_cpus=0,
                # every session turn in flight keeps a call waiting here (hold_lease, a long poll), and
                # a replica runs up to max_ongoing_requests of them: room for them and the other calls
                max_concurrency=10000,
            ).remote(asdict(self.cfg), i)
            self._handles[i] = h
        return h

    def shard_indices(self) -> range:
        return range(self.cfg.num_shards)

    def for_session(self, state_id: str):
        return self.handle(self.shard_of(state_id))

    async def call(self, state_id: str, method: str, *args, **kwargs):
        """``method(state_id, ...)`` on the session's shard. A dead actor handle (the actor was
        removed, or its name now points at a new one) is dropped and resolved again, with backoff;
        every shard method is safe to repeat (seq numbers, update ids)."""
        return await self.on_shard(self.shard_of(state_id), method, state_id, *args, **kwargs)

    async def on_shard(self, i: int, method: str, *args, **kwargs):
        """``method(*args)`` on shard ``i``, re-resolving a dead handle as :meth:`call` does (the
        calls over every shard too: a listing must not keep a dead handle either)."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError

        delay = 0.1
        for attempt in range(self.RESOLVE_ATTEMPTS):
            h = self.handle(i)
            try:
                return await getattr(h, method).remote(*args, **kwargs)
            except (ActorDiedError, ActorUnavailableError) as e:
                if self._handles.get(i) is h:
                    del self._handles[i]
                if attempt == self.RESOLVE_ATTEMPTS - 1:
                    raise StorageUnavailable(f"storage unavailable: session store shard {i} is not reachable "
                                             f"({type(e).__name__}); retry later", "storage_unavailable") from None
                logger.warning("bank shard %d unreachable (%s); resolving it again", i, type(e).__name__)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)

    RESOLVE_ATTEMPTS = 5

    async def keep_lease(self, state_id: str, lease_id: str, ttl_s: float) -> str:
        """Keep a turn's lease until cancelled (run it beside the turn): renew it every ``ttl_s / 4``,
        waiting on the shard in between (``hold_lease``), so that the deletion of the session is
        known at once. Returns how the lease ended when that was not the turn's own doing:
        "deleted" (the session was deleted: nothing of the turn can be saved; stop decoding it),
        "lost" (expired and leased elsewhere: its commit will be fenced), "ended" (released). If
        this process dies the renewals stop, and the session is free again within ``ttl_s``."""
        while True:
            try:
                how = await self.call(state_id, "hold_lease", lease_id, ttl_s / 4)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a shard restart: the seq check still guards the commit
                from ray.exceptions import TaskCancelledError

                # (cancelled with the request, as Serve cancels one whose client left: not worth a warning)
                log = logger.info if isinstance(e, TaskCancelledError) else logger.warning
                log("could not renew the lease on %s: %s", state_id, e)
                await asyncio.sleep(ttl_s / 4)
                continue
            if how != "held":
                return how

    def start_keep_lease(self, state_id: str, lease: dict[str, Any]) -> asyncio.Task:
        """:meth:`keep_lease` as a task for a ``begin_turn`` answer (its result: how the lease ended
        early, see there); cancel it when the turn ends."""
        return asyncio.get_running_loop().create_task(
            self.keep_lease(state_id, lease["lease_id"], lease.get("lease_ttl_s") or self.cfg.lease_ttl_s))

    async def list_sessions(self, owner: str | None) -> list[dict[str, Any]]:
        """Every session of ``owner`` (None: all), newest first; 503 when a shard cannot answer."""
        listing = await self.list_reachable(owner)
        if listing["unreachable_shards"]:
            raise listing["errors"][0]
        return listing["states"]

    async def list_reachable(self, owner: str | None) -> dict[str, Any]:
        """What the shards that answer hold: ``{"states": [...] (newest first), "unreachable_shards":
        [i, ...], "errors": [StorageUnavailable, ...]}``. A shard that cannot answer (503: its actor
        is gone, its storage is down) is named instead of failing the whole listing: before, one
        unreachable shard made every owner's listing, and the session quota every new session
        checks, answer 503. When no shard answers, that 503 is raised (an empty listing would say
        the owner has no sessions)."""
        from ..errors import find_api_error

        idx = list(self.shard_indices())
        parts = await asyncio.gather(*(self._answer_in_time(i, "list_sessions", owner) for i in idx),
                                     return_exceptions=True)
        states, down, errors = [], [], []
        for i, p in zip(idx, parts):
            if isinstance(p, BaseException):
                api = find_api_error(p)
                if api is None or api.status != 503:
                    raise p
                logger.warning("listing sessions without shard %d: %s", i, api.message)
                down.append(i)
                errors.append(api)
            else:
                states.extend(p)
        if errors and len(errors) == len(idx):
            raise errors[0]
        states.sort(key=lambda s: s["updated_at"], reverse=True)
        return {"states": states, "unreachable_shards": down, "errors": errors}

    async def stats(self) -> list[dict[str, Any]]:
        """Every shard's ``stats()``, in shard order. A shard that cannot answer (503) is an entry
        ``{"shard": i, "unreachable": why, "sessions": 0, ...}``: before, it failed /model/stats and
        /research/metrics for everyone (one unreachable shard, as with the listing)."""
        from ..errors import find_api_error

        idx = list(self.shard_indices())
        parts = await asyncio.gather(*(self._answer_in_time(i, "stats") for i in idx), return_exceptions=True)
        out = []
        for i, p in zip(idx, parts):
            if isinstance(p, BaseException):
                api = find_api_error(p)
                if api is None or api.status != 503:
                    raise p
                p = {"shard": i, "unreachable": api.message, "sessions": 0, "offloaded": 0, "bytes_in_memory": 0,
                     "bytes_total": 0}
            out.append(p)
        return out

    async def _answer_in_time(self, i: int, method: str, *args):
        """:meth:`on_shard` for the calls over every shard, bounded by ``answer_timeout_s``: a shard
        that does not answer in time counts as unreachable (503), as a dead one does."""
        try:
            return await asyncio.wait_for(self.on_shard(i, method, *args), self.cfg.answer_timeout_s)
        except asyncio.TimeoutError:
            raise StorageUnavailable(f"storage unavailable: session store shard {i} did not answer within "
                                     f"{self.cfg.answer_timeout_s:g} s; retry later", "storage_unavailable") from None

    async def ping_all(self, timeout_s: float = 5.0) -> int:
        async def one(i):
            try:
                await asyncio.wait_for(self.on_shard(i, "ping"), timeout_s)
                return 1
            except Exception:
                return 0
        return sum(await asyncio.gather(*(one(i) for i in self.shard_indices())))

    def kill_all(self) -> None:
        """Remove the shard actors (tests, teardown). Their storage stays."""
        import ray

        for i in range(self.cfg.num_shards):
            try:
                ray.kill(ray.get_actor(self.cfg.actor_name(i), namespace=self.cfg.namespace), no_restart=True)
            except ValueError:
                pass
        self._handles.clear()


OPERATOR_ONLY_STATS = ("damage_reports",)
"""Keys of a shard's ``stats()`` that name sessions of every owner (state ids, what is damaged where):
for operators (logs, ``<shard>/damage.jsonl``), not for an owner's view."""


def owner_view_stats(shards: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Shard stats without what names other owners' sessions (:data:`OPERATOR_ONLY_STATS`), for
    views any API key reads (/research/metrics, /ws/research): they carried the last 20 damage
    reports, each naming a session id of any owner and its damage."""
    return [{k: v for k, v in s.items() if k not in OPERATOR_ONLY_STATS} for s in shards]


class LocalBankClient(BankClient):
    """A :class:`BankClient` over one in-process :class:`SessionBankShard` (no Ray): for tests and
    benchmarks that drive the Generator's session turns (``SessionTurns``) against a real shard."""

    def __init__(self, shard: SessionBankShard):
        super().__init__(shard.cfg)
        self.shard = shard

    def shard_indices(self) -> range:
        return range(1)

    async def on_shard(self, i: int, method: str, *args, **kwargs):
        return await getattr(self.shard, method)(*args, **kwargs)  # the one shard, whatever ``i``
