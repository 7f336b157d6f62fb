"""One shard of the session store: a plain class (unit-testable in-process) that the client runs as
a named Ray actor. It is assembled from one module per job:

* :mod:`.state_machine` - sessions, turns, leases and the ordered, idempotent update queue;
* :mod:`.durability` - storage: start with retries, recovery, WAL appends, snapshots, checkpoints;
* :mod:`.manager` - the background policy: compaction, TTL, offload, checkpoint triggers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from ..bank_store import BankStore
from ..errors import StorageUnavailable
from .config import BankConfig
from .durability import DurabilityMixin
from .manager import ManagerMixin
from .session import Session
from .state_machine import StateMachineMixin

logger = logging.getLogger("serve.sessions")


class SessionBankShard(StateMachineMixin, DurabilityMixin, ManagerMixin):
    """One shard of the session bank. Async methods; run as a Ray actor by :class:`BankClient`."""

    def __init__(self, config: dict[str, Any], index: int):
        self.cfg = BankConfig(**config)
        self.index = index
        self.store: BankStore | None = None
        self.sessions: dict[str, Session] = {}
        self.stale_snapshots: dict[str, str] = {}  # deleted id -> incarnation, its snapshot not removed yet
        self.deleted_recently: dict[str, str] = {}  # deleted id -> its owner (see StateMachineMixin.delete)
        self.damage_reports: list[dict[str, Any]] = []
        self.started_at = time.time()
        self.counters = {"updates": 0, "duplicates": 0, "conflicts": 0, "compactions": 0, "merged_slots": 0,
                         "offloads": 0, "restores": 0, "expired": 0, "checkpoints": 0, "recovered_records": 0,
                         "damaged_records": 0, "storage_errors": 0, "fenced": 0, "token_records": 0,
                         "state_records": 0, "durable_bytes": 0, "resident_turns": 0, "loaded_turns": 0}
        self._wal_lock: asyncio.Lock | None = None
        self._snap_lock: asyncio.Lock | None = None
        self._creating: asyncio.Lock | None = None
        self._manager: asyncio.Task | None = None
        self._models = None  # ReplayModels on the CPU, loaded when a compaction first needs one
        # start = open storage + recover. It must not raise: Ray does not restart an actor whose
        # __init__ failed, so a shard started while its storage was down would stay dead (issue 12).
        # Instead it answers 503 and retries with backoff until storage is back.
        self.start_error: str | None = None
        self._retry_s, self._next_start_at = 0.0, 0.0
        self._retrier: asyncio.Task | None = None
        self._try_start()

    # ------------------------------------------------------------------ helpers
    def _locks(self) -> tuple[asyncio.Lock, asyncio.Lock]:
        if self._wal_lock is None:
            self._wal_lock, self._snap_lock = asyncio.Lock(), asyncio.Lock()
        return self._wal_lock, self._snap_lock

    def _start_manager(self) -> None:
        self._ensure_started()
        if self.cfg.manager_interval_s > 0 and (self._manager is None or self._manager.done()):
            self._manager = asyncio.get_running_loop().create_task(self._manage_forever())

    async def ping(self) -> dict[str, Any]:
        self._start_manager()
        return {"shard": self.index, "pid": os.getpid(), "sessions": len(self.sessions)}

    # ------------------------------------------------------------------ stats
    async def stats(self) -> dict[str, Any]:
        try:
            self._start_manager()
        except StorageUnavailable:
            return {"shard": self.index, "pid": os.getpid(), "sessions": 0, "offloaded": 0, "bytes_in_memory": 0,
                    "bytes_total": 0, "memory_budget_bytes": self.cfg.memory_budget_bytes,
                    "storage_error": self.start_error, "started_at": self.started_at, **self.counters}
        live = [s for s in self.sessions.values() if not s.deleted]
        return {"shard": self.index, "pid": os.getpid(), "sessions": len(live),
                "offloaded": sum(s.offloaded for s in live), "bytes_in_memory": self.bytes_in_memory(),
                "bytes_total": sum(s.state_bytes() for s in live), "memory_budget_bytes": self.cfg.memory_budget_bytes,
                "wal_epoch": self.store.epoch, "wal_bytes": self.store.wal_bytes,
                "started_at": self.started_at, "damaged_sessions": sum(bool(s.damage) for s in live),
                "damage_reports": self.damage_reports[-20:], **self.counters}
