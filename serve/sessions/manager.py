"""The memory manager of a shard (off the request path): compaction of idle sessions
(``model.compact_state`` then ``merge_duplicates``), TTL cleanup, offload of idle banks beyond the
memory budget, and WAL checkpoints when the log grows."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from ..errors import Busy, Conflict, NotFound, StateDamaged, StorageUnavailable
from .session import Session
from .turn_log import ReplayMismatch

logger = logging.getLogger("serve.sessions")


class ManagerMixin:
    """Background policy of :class:`~serve.sessions.shard.SessionBankShard`."""

    # ------------------------------------------------------------------ compaction
    def _replay_models(self):
        """The shard's CPU models, one per dtype the turns it replays were decoded in (loaded on first
        use: a shard of a bfloat16 server holds one bfloat16 model, plus a float32 one only for
        sessions with turns logged before the server's dtype changed)."""
        if self._models is None:
            import torch

            from ..modeling import ModelSpec, load_model
            from .turn_log import ReplayModels

            torch.set_num_threads(1)  # a background helper: leave the cores to the generator
            spec = ModelSpec(**self.cfg.model)
            self._models = ReplayModels(lambda dtype: load_model(spec, device="cpu", dtype=dtype).model)
        return self._models

    def _compact_bytes(self, payload: bytes | None, turns: list[dict[str, Any]], merge: bool, threshold: float):
        from ..modeling import state_dtype, state_meta, state_to_bytes
        from .turn_log import rebuild_state

        models = self._replay_models()
        # the last full state, then its token turns, each in the dtype it was decoded in; the state
        # stays in the last one's (the stored state's with no turns), and so does the compaction
        state = rebuild_state(models, payload, turns)
        before = state_meta(state)
        # the state's stored size before, measured as bytes_after is: the last full state alone
        # misses every token turn since (0 for a session that never had a snapshot)
        bytes_before = len(state_to_bytes(state))
        moved = models(state_dtype(state)).compact_state(state)
        merged = state.merge_duplicates(threshold) if merge else 0
        return state_to_bytes(state), before, state_meta(state), moved, merged, bytes_before

    async def compact(self, sid: str, owner: str | None, merge: bool = True,
                      threshold: float | None = None, wait: bool = True) -> dict[str, Any] | None:
        """Compact one session now (``model.compact_state`` then ``merge_duplicates``).

        A turn arriving meanwhile takes the session over instead of waiting for the CPU replay
        (minutes for a real model; the compaction's lease lasts ``lease_timeout_s``), and this
        compaction is then refused (409 ``compaction_preempted``) rather than overwrite what the turn
        began from. That holds for a compaction the owner asked for (POST /v1/state/{id}/compact) as
        for the memory manager's (``wait=False``): before, the owner's own next turn waited
        ``lease_wait_s`` behind it and got 503 ``state_busy``. A turn is what the user is waiting for;
        a compaction can be asked for again."""
        self._start_manager()
        s = self._get(sid, owner)
        threshold = self.cfg.merge_threshold if threshold is None else threshold
        lease_id = await self._acquire(s, self.cfg.lease_wait_s if wait else 0.0)
        s.background = lease_id  # a turn may take it over (see above)
        try:
            await self._ensure_loaded(s)
            seq = s.seq
            t0 = time.perf_counter()
            try:
                payload, before, after, moved, merged, bytes_before = await asyncio.to_thread(
                    self._compact_bytes, s.payload, list(s.tail), merge, threshold)
            except ReplayMismatch as e:
                raise StateDamaged(f"state {sid!r} (shard {self.index}) cannot be compacted: {e}", "state_damaged",
                                   "state_id") from None
            turn = {"kind": "compact", "duration_ms": (time.perf_counter() - t0) * 1e3,
                    "tokens_seen": after["tokens_seen"], "detail": {**moved, "merged": merged}}
            res = await self.apply_update(sid, seq + 1, f"compact-{uuid.uuid4().hex}", payload, after, turn,
                                          compacted=True, inc=s.inc, fence=lease_id)
        finally:
            if s.background == lease_id:
                s.background = None
            self._release(s, lease_id)
        await self._enforce_budget()
        self.counters["compactions"] += 1
        self.counters["merged_slots"] += merged
        return {"state_id": sid, "moved": moved, "merged": merged, "levels_before": before["levels"],
                "levels_after": after["levels"], "bytes_before": bytes_before, "bytes_after": len(payload),
                "state": res["info"]}

    # ------------------------------------------------------------------ memory manager
    async def _manage_forever(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.manager_interval_s)
            try:
                await self.manage_once()
            except Exception:
                logger.exception("shard %d: memory manager pass failed", self.index)

    async def manage_once(self) -> dict[str, int]:
        """One pass of the memory manager (also callable directly, e.g. from tests)."""
        self._ensure_started()
        done = {"expired": 0, "compacted": 0, "abandoned": 0}
        now_wall, now = time.time(), time.monotonic()
        for s in list(self.sessions.values()):
            if s.deleted or s.leased() or s.damage:
                continue
            if s.made_by is not None and s.lease is not None and s.lease[0] == s.made_by:
                # the turn that created it let its lease expire, neither committed nor given back (its
                # replica died): what its give-back does (abort_turn: an empty session goes)
                await self.abort_turn(s.state_id, s.made_by)
                done["abandoned"] += 1
                continue
            if now_wall - s.updated_at > self.cfg.session_ttl_s and now - s.last_access > self.cfg.session_ttl_s:
                await self.delete(s.state_id, None)
                self.counters["expired"] += 1
                done["expired"] += 1
                continue
            if (self.cfg.auto_compact and s.compacted_seq < s.seq and s.nbytes
                    and now - s.last_access >= self.cfg.compact_idle_s and self._l0_fill(s) >= self.cfg.compact_l0_fill):
                try:
                    await self.compact(s.state_id, None, merge=True, wait=False)
                    done["compacted"] += 1
                except (Busy, Conflict, NotFound, StateDamaged, StorageUnavailable):
                    pass
        await self._maybe_checkpoint(force=self._fold_epochs)
        self._fold_epochs = False
        await self._enforce_budget()
        return done

    @staticmethod
    def _l0_fill(s: Session) -> float:
        lv = s.meta.get("levels") or []
        if not lv or not lv[0].get("capacity"):
            return 0.0
        return lv[0]["slots"] / lv[0]["capacity"]

    def bytes_in_memory(self) -> int:
        return sum(len(s.payload) for s in self.sessions.values() if s.payload is not None and not s.offloaded)

    async def offload(self, sid: str) -> bool:
        """Move a session's bank to storage and drop it from memory."""
        s = self.sessions.get(sid)
        if s is None or s.deleted or s.offloaded or s.leased() or s.payload is None:
            return False
        async with s.condition():
            try:
                await self._snapshot(s)
            except OSError as e:  # storage full/down: the bank simply stays in memory
                self.counters["storage_errors"] += 1
                logger.warning("shard %d: could not offload %s: %s", self.index, sid, e)
                return False
            if s.snapshot_seq < s.seq or s.leased():
                return False  # it changed meanwhile; try again later
            s.payload, s.offloaded = None, True
        self.counters["offloads"] += 1
        return True

    async def _enforce_budget(self) -> None:
        if self.bytes_in_memory() <= self.cfg.memory_budget_bytes:
            return
        idle = sorted((s for s in self.sessions.values()
                       if s.payload is not None and not s.offloaded and not s.leased() and not s.deleted),
                      key=lambda s: s.last_access)
        for s in idle:
            if self.bytes_in_memory() <= self.cfg.memory_budget_bytes:
                break
            await self.offload(s.state_id)
