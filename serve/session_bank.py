"""Session memory banks in sharded, named Ray actors, with durable storage and a memory manager.

A session (``state_id``) lives in exactly one shard, chosen by a stable hash of its id. A shard:

* keeps each session's serialized bank (``DNCState.export()`` as safetensors bytes), owner, history
  (turns with timestamps and token counts) and a sequence number ``seq`` of the last applied update;
* applies updates in ``seq`` order (an update that arrives early waits for its predecessor);
  re-sending an applied update (same seq and update id, as Ray's task retries do) is acknowledged
  again without being reapplied; a different update for an applied seq is a conflict (409);
* acknowledges an update only once its WAL record is durably written (``BankStore.append``), so a
  ``ray.kill`` loses nothing acknowledged; ``__init__`` (rerun by Ray on restart) restores every
  session from snapshots + WAL;
* serialises a session's turns with a lease (``begin_turn`` .. ``commit_turn``/``abort_turn``) so two
  concurrent generations on one session do not race; the seq check keeps it correct even if a lease
  is lost in a restart;
* runs a memory manager in the background: compaction of idle sessions (``model.compact_state`` then
  ``DNCState.merge_duplicates``), TTL cleanup, offload of idle banks to storage when the shard's
  memory budget is exceeded (restored on the next access), and WAL checkpointing (snapshot what
  the WAL holds, start a new epoch, drop the old ones).

:class:`SessionBankShard` is a plain class (unit-testable in-process); :class:`BankClient` runs it as
Ray actors: named, ``get_if_exists``, detached (they outlive any one replica), ``max_restarts=-1``,
``max_task_retries=-1`` and ``num_cpus=0``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from .bank_store import BankStore, RecordDamage, StorageError, digest
from .errors import Busy, Conflict, NotFound, StateDamaged, StorageUnavailable, session_not_found

logger = logging.getLogger("serve.session_bank")


@dataclass
class BankConfig:
    """Settings shared by the client and every shard (passed to actors as a dict)."""

    storage: str
    """Root directory or fsspec URI; shard ``i`` keeps its files under ``<storage>/shard-<i>``."""
    num_shards: int = 2
    """Number of shard actors. Fixed for a storage root (recorded in ``<storage>/layout.json``)."""
    namespace: str = "bwr-dnc"
    """Ray namespace of the named actors."""
    model: dict[str, Any] = field(default_factory=dict)
    """``ModelSpec`` fields of the served model: shards load it (CPU) to compact banks."""
    memory_budget_bytes: int = 256 * 2**20
    """Bank bytes a shard keeps in memory; least recently used idle banks beyond it are offloaded."""
    session_ttl_s: float = 7 * 24 * 3600.0
    """Sessions untouched this long are deleted by the cleanup task."""
    manager_interval_s: float = 5.0
    """Period of the background memory manager."""
    auto_compact: bool = True
    """Compact (and merge) idle sessions whose L0 is at least ``compact_l0_fill`` full."""
    compact_idle_s: float = 30.0
    compact_l0_fill: float = 0.75
    merge_threshold: float = 0.98
    checkpoint_wal_bytes: int = 64 * 2**20
    """WAL size past which the manager snapshots the sessions it holds and starts a new epoch."""
    lease_timeout_s: float = 120.0
    """Longest lease the shard grants itself (a compaction), and the cap of a turn's renewed lease."""
    lease_ttl_s: float = 10.0
    """A turn's lease expires this long after it was granted or last renewed. Its holder renews it
    (``BankClient.keep_lease``) every ``lease_ttl_s / 4`` while it lives, so a turn whose generator
    died frees its session within ``lease_ttl_s``, not ``lease_timeout_s``."""
    lease_wait_s: float = 30.0
    """How long a request waits for a busy session before answering 503."""
    queue_wait_s: float = 30.0
    """How long an out-of-order update waits for its predecessor."""
    max_history: int = 256
    """Turns kept per session."""

    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.storage}|{self.num_shards}".encode()).hexdigest()[:10]

    def actor_name(self, i: int) -> str:
        return f"dnc-bank-{self.fingerprint()}-{i}"

    def shard_uri(self, i: int) -> str:
        return f"{self.storage.rstrip('/')}/shard-{i}"


def shard_index(state_id: str, num_shards: int) -> int:
    """Stable across processes and Python versions (unlike ``hash()``)."""
    h = hashlib.blake2b(state_id.encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") % num_shards


@dataclass
class _Session:
    state_id: str
    owner: str
    created_at: float
    updated_at: float
    seq: int = 0
    inc: str = ""  # incarnation: a re-created id must not pick up an old incarnation's WAL records
    payload: bytes | None = None
    nbytes: int = 0
    digest: str | None = None
    offloaded: bool = False
    snapshot_seq: int = -1
    meta: dict[str, Any] = field(default_factory=dict)  # summary, levels, tokens_seen
    history: list[dict[str, Any]] = field(default_factory=list)
    applied: dict[int, str] = field(default_factory=dict)  # seq -> update id (recent)
    compacted_seq: int = -1
    last_access: float = field(default_factory=time.monotonic)
    lease: tuple[str, float] | None = None  # (lease id, monotonic expiry)
    grant: str | None = None  # fencing token: the lease granted last; a commit under an older one is refused
    cond: asyncio.Condition | None = None
    deleted: bool = False
    damage: str | None = None  # why the stored session cannot be recovered as acknowledged (None = fine)

    def condition(self) -> asyncio.Condition:
        if self.cond is None:
            self.cond = asyncio.Condition()
        return self.cond

    def leased(self) -> bool:
        return self.lease is not None and self.lease[1] > time.monotonic()

    def header(self) -> dict[str, Any]:
        return {"sid": self.state_id, "inc": self.inc, "owner": self.owner, "created_at": self.created_at,
                "updated_at": self.updated_at, "seq": self.seq, "nbytes": self.nbytes, "digest": self.digest,
                "meta": self.meta, "history": self.history, "applied": {str(k): v for k, v in self.applied.items()},
                "compacted_seq": self.compacted_seq, "damage": self.damage}

    def info(self, shard: int, with_history: bool = False) -> dict[str, Any]:
        out = {"state_id": self.state_id, "owner": self.owner, "created_at": self.created_at,
               "updated_at": self.updated_at, "seq": self.seq,
               "tokens_seen": int(self.meta.get("tokens_seen", 0)),
               "turns": sum(1 for t in self.history if t.get("kind") == "generate"),
               "bank_bytes": self.nbytes, "offloaded": self.offloaded, "digest": self.digest, "shard": shard,
               "levels": self.meta.get("levels", []), "summary": self.meta.get("summary", {})}
        if self.damage:
            out["damage"] = self.damage
        if with_history:
            out["history"] = list(self.history)
        return out


class SessionBankShard:
    """One shard of the session bank. Async methods; run as a Ray actor by :class:`BankClient`."""

    def __init__(self, config: dict[str, Any], index: int):
        self.cfg = BankConfig(**config)
        self.index = index
        self.store: BankStore | None = None
        self.sessions: dict[str, _Session] = {}
        self.damage_reports: list[dict[str, Any]] = []
        self.started_at = time.time()
        self.counters = {"updates": 0, "duplicates": 0, "conflicts": 0, "compactions": 0, "merged_slots": 0,
                         "offloads": 0, "restores": 0, "expired": 0, "checkpoints": 0, "recovered_records": 0,
                         "damaged_records": 0, "storage_errors": 0, "fenced": 0}
        self._wal_lock: asyncio.Lock | None = None
        self._snap_lock: asyncio.Lock | None = None
        self._manager: asyncio.Task | None = None
        self._model = None
        # start = open storage + recover. It must not raise: Ray does not restart an actor whose
        # __init__ failed, so a shard started while its storage was down would stay dead (issue 12).
        # Instead it answers 503 and retries with backoff until storage is back.
        self.start_error: str | None = None
        self._retry_s, self._next_start_at = 0.0, 0.0
        self._retrier: asyncio.Task | None = None
        self._try_start()

    # ------------------------------------------------------------------ start, with retries
    START_BACKOFF_S = (0.25, 10.0)  # first retry delay, cap (doubling in between)

    def _try_start(self) -> bool:
        try:
            self.store = BankStore(self.cfg.shard_uri(self.index))
            self.sessions = {}
            self._recover()
        except OSError as e:
            if self.store is not None:
                self.store.close()
            self.store, self.sessions = None, {}
            self.start_error = f"{type(e).__name__}: {e}"
            lo, hi = self.START_BACKOFF_S
            self._retry_s = min(hi, self._retry_s * 2) if self._retry_s else lo
            self._next_start_at = time.monotonic() + self._retry_s
            self.counters["storage_errors"] += 1
            logger.error("shard %d cannot start on %s (%s); retrying in %.2fs", self.index,
                         self.cfg.shard_uri(self.index), self.start_error, self._retry_s)
            return False
        if self.start_error:
            logger.warning("shard %d started after storage came back (was: %s)", self.index, self.start_error)
        self.start_error, self._retry_s = None, 0.0
        return True

    def _ensure_started(self) -> None:
        """Raise 503 while storage cannot be opened; retry (at most once per backoff step) on calls,
        and in the background so the shard comes back even if nobody asks."""
        if self.store is not None:
            return
        if time.monotonic() >= self._next_start_at and self._try_start():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None and (self._retrier is None or self._retrier.done()):
            self._retrier = loop.create_task(self._retry_start_forever())
        raise StorageUnavailable(f"storage unavailable: session store shard {self.index} cannot open "
                                 f"{self.cfg.shard_uri(self.index)} ({self.start_error}); it retries by itself "
                                 f"(next in {max(0.0, self._next_start_at - time.monotonic()):.1f}s), retry "
                                 "the request later", "storage_unavailable")

    async def _retry_start_forever(self) -> None:
        while self.store is None:
            await asyncio.sleep(max(0.01, self._next_start_at - time.monotonic()))
            if self.store is None:
                await asyncio.to_thread(self._try_start)

    # ------------------------------------------------------------------ recovery
    def _recover(self) -> None:
        """Sessions from snapshot headers (banks stay on storage until accessed), then the WAL.

        Damage is detected, reported and never guessed over (issue 12): a snapshot whose header is
        unreadable, or a WAL record that held a session's latest acknowledged update, makes that
        session *damaged* (every call on it answers 500 ``state_damaged`` naming the damage; DELETE
        clears it). A damaged record that later records supersede costs nothing. Other sessions are
        unaffected."""
        for sid in self.store.list_snapshots():
            try:
                h = self.store.read_snapshot_header(sid)
            except (RecordDamage, ValueError) as e:  # ValueError: a header that is not JSON (format 1)
                self._mark_damaged_at_start(sid, f"snapshot sessions/{sid}.snap: {e}", quarantine=True)
                continue
            s = self._from_header(h)
            s.snapshot_seq = s.seq
            s.offloaded = s.nbytes > 0 and not s.damage
            self.sessions[sid] = s
        bad_records: list[RecordDamage] = []
        last_good: dict[str, list[tuple[int, str, int]]] = {}  # sid -> (record index, inc, seq)
        n = 0
        for header, payload in self.store.replay(bad_records.append):
            self._apply_record(header, payload)
            last_good.setdefault(header["sid"], []).append((len(bad_records), header.get("inc", ""), header["seq"]))
            n += 1
        for k, d in enumerate(bad_records):
            where = f"{getattr(d, 'where', 'wal')} at byte {d.offset}"
            self._report({"kind": "wal_record", "where": where, **d.report()})
            if d.torn or d.sid is None:
                if not d.torn:
                    logger.error("shard %d: unreadable WAL region (%d bytes) %s: %s; the sessions it held cannot "
                                 "be named", self.index, d.length, where, d.reason)
                continue
            later = [(inc, seq) for idx, inc, seq in last_good.get(d.sid, []) if idx > k]
            s = self.sessions.get(d.sid)
            superseded = any(inc != d.inc or seq > d.seq for inc, seq in later) or (
                s is not None and s.inc == d.inc and s.snapshot_seq >= d.seq)
            if superseded:
                logger.warning("shard %d: damaged WAL record of %s seq %d (%s, %s) is superseded by later data",
                               self.index, d.sid, d.seq, where, d.reason)
                continue
            self._mark_damaged_at_start(d.sid, f"WAL record of seq {d.seq} ({where}): {d.reason}", seq=d.seq)
        for s in list(self.sessions.values()):
            if s.deleted:
                self.store.delete_snapshot(s.state_id)
                del self.sessions[s.state_id]
        self.counters["recovered_records"] = n
        self.counters["damaged_records"] = sum(not d.torn for d in bad_records)
        # every restart opens a new epoch: fold the old ones into snapshots at the next manager pass
        self._fold_epochs = len(self.store.epochs()) >= 3
        self.store.start_epoch()
        if n or self.sessions:
            logger.info("shard %d restored %d sessions (%d WAL records)", self.index, len(self.sessions), n)

    def _report(self, entry: dict[str, Any]) -> None:
        """Remember a damage report (stats) and append it to ``<shard>/damage.jsonl`` (best effort)."""
        entry = {"at": time.time(), "shard": self.index, **entry}
        self.damage_reports.append(entry)
        try:
            self.store.append_report(entry)
        except OSError as e:
            logger.error("shard %d: could not record damage report %s: %s", self.index, entry, e)

    def _mark_damaged_at_start(self, sid: str, damage: str, seq: int | None = None, quarantine: bool = False) -> None:
        """Make ``sid`` a damaged session and persist that as a marker snapshot (header only), so the
        verdict survives a later WAL checkpoint; a damaged snapshot is first copied aside."""
        logger.error("shard %d: session %s is damaged: %s", self.index, sid, damage)
        s = self.sessions.get(sid)
        if s is None:
            s = self.sessions[sid] = _Session(sid, "", 0.0, 0.0)
        if quarantine:
            self._report({"kind": "snapshot", "sid": sid, "reason": damage})
        s.damage, s.payload, s.offloaded, s.deleted = damage, None, False, False
        s.seq = max(s.seq, seq if seq is not None else s.seq)
        try:
            if quarantine:
                self.store.quarantine_snapshot(sid)
            self.store.write_snapshot(sid, s.header(), None)
            s.snapshot_seq = s.seq
        except OSError as e:  # the evidence stays on storage: found again at the next start
            logger.error("shard %d: could not persist the damage of %s: %s", self.index, sid, e)

    @staticmethod
    def _from_header(h: dict[str, Any]) -> _Session:
        return _Session(state_id=h["sid"], inc=h.get("inc", ""), owner=h["owner"], created_at=h["created_at"],
                        updated_at=h.get("updated_at", h["created_at"]), seq=h["seq"],
                        nbytes=h.get("nbytes", 0), digest=h.get("digest"), meta=h.get("meta", {}),
                        history=list(h.get("history", [])),
                        applied={int(k): v for k, v in h.get("applied", {}).items()},
                        compacted_seq=h.get("compacted_seq", -1), damage=h.get("damage"))

    def _apply_record(self, h: dict[str, Any], payload: bytes | None) -> None:
        """Apply one WAL record to memory (live path and replay share this)."""
        sid, op, seq, inc = h["sid"], h["op"], h["seq"], h.get("inc", "")
        s = self.sessions.get(sid)
        if op == "create":
            if s is None or s.deleted:
                s = self.sessions[sid] = _Session(sid, h["owner"], h["at"], h["at"], seq=seq, inc=inc)
                s.history.append({"seq": seq, "kind": "create", "at": h["at"]})
            return
        if s is None:  # its create record was in an epoch already dropped: rebuild from the put
            if op != "put":
                return
            s = self.sessions[sid] = _Session(sid, h["owner"], h["at"], h["at"], seq=seq - 1, inc=inc)
        if s.inc != inc or seq <= s.seq:
            return  # another incarnation of the id, or already in the snapshot
        s.seq = seq
        s.updated_at = h["at"]
        if op == "delete":
            s.deleted = True
            return
        s.deleted = False
        s.payload, s.nbytes, s.digest, s.offloaded = payload, len(payload or b""), digest(payload), False
        s.meta = h.get("meta", s.meta)
        if h.get("turn"):
            s.history.append(h["turn"])
            del s.history[:-self.cfg.max_history]
        if h.get("update_id"):
            s.applied[seq] = h["update_id"]
            for old in [k for k in s.applied if k < seq - 32]:
                del s.applied[old]
        if h.get("compacted"):
            s.compacted_seq = seq

    # ------------------------------------------------------------------ helpers
    def _locks(self) -> tuple[asyncio.Lock, asyncio.Lock]:
        if self._wal_lock is None:
            self._wal_lock, self._snap_lock = asyncio.Lock(), asyncio.Lock()
        return self._wal_lock, self._snap_lock

    def _start_manager(self) -> None:
        self._ensure_started()
        if self.cfg.manager_interval_s > 0 and (self._manager is None or self._manager.done()):
            self._manager = asyncio.get_running_loop().create_task(self._manage_forever())

    def _get(self, sid: str, owner: str | None) -> _Session:
        s = self.sessions.get(sid)
        if s is None or s.deleted or (owner is not None and s.owner and s.owner != owner):
            raise session_not_found(sid)
        if s.damage:
            raise self._damaged(s)
        return s

    def _damaged(self, s: _Session) -> StateDamaged:
        return StateDamaged(f"state {s.state_id!r} (shard {self.index}) is damaged on storage and cannot be recovered "
                            f"as acknowledged: {s.damage}. Nothing was guessed; DELETE /v1/state/{s.state_id} "
                            "removes it (the damaged files are kept aside for inspection)", "state_damaged",
                            "state_id")

    async def _append(self, header: dict[str, Any], payload: bytes | None) -> None:
        wal_lock, _ = self._locks()
        async with wal_lock:
            try:
                await asyncio.to_thread(self.store.append, header, payload)
            except OSError as e:
                self.counters["storage_errors"] += 1
                logger.error("shard %d: WAL append for %s failed: %s", self.index, header.get("sid"), e)
                raise StorageUnavailable(f"storage unavailable: the session store (shard {self.index}) could not "
                                         f"write {header.get('op')} of state {header.get('sid')!r} durably "
                                         f"({e.strerror or e}); nothing was changed, retry later",
                                         "storage_unavailable") from None

    async def _ensure_loaded(self, s: _Session) -> None:
        if not s.offloaded:
            return
        _, snap_lock = self._locks()
        async with snap_lock:
            if not s.offloaded:
                return
            try:
                header, payload = await asyncio.to_thread(self.store.read_snapshot, s.state_id)
                if header["seq"] != s.seq or digest(payload) != s.digest:
                    raise RecordDamage(f"snapshot holds seq {header['seq']} digest {digest(payload)}, the session "
                                       f"seq {s.seq} digest {s.digest}")
            except (RecordDamage, ValueError, FileNotFoundError) as e:
                s.damage = f"snapshot sessions/{s.state_id}.snap: {e}"
                s.offloaded = False
                logger.error("shard %d: session %s is damaged: %s", self.index, s.state_id, s.damage)
                self._report({"kind": "snapshot", "sid": s.state_id, "reason": s.damage})
                try:
                    await asyncio.to_thread(self.store.quarantine_snapshot, s.state_id)
                    await asyncio.to_thread(self.store.write_snapshot, s.state_id, s.header(), None)
                except OSError as e2:
                    logger.error("shard %d: could not persist the damage of %s: %s", self.index, s.state_id, e2)
                raise self._damaged(s) from None
            except OSError as e:
                raise StorageUnavailable(f"storage unavailable: could not read the bank of state {s.state_id!r} "
                                         f"(shard {self.index}): {e.strerror or e}; retry later",
                                         "storage_unavailable") from None
            s.payload, s.offloaded = payload, False
            self.counters["restores"] += 1

    def _touch(self, s: _Session) -> None:
        s.last_access = time.monotonic()

    # ------------------------------------------------------------------ public: sessions
    async def ping(self) -> dict[str, Any]:
        self._start_manager()
        return {"shard": self.index, "pid": os.getpid(), "sessions": len(self.sessions)}

    async def create(self, sid: str, owner: str) -> dict[str, Any]:
        """Create an empty session (idempotent for its owner; 409 if another owner holds the id)."""
        self._start_manager()
        s = self.sessions.get(sid)
        if s is not None and s.damage:
            raise self._damaged(s)  # never silently recreated: DELETE first
        if s is not None and not s.deleted:
            if s.owner != owner:
                raise Conflict(f"state_id {sid!r} is taken; choose another id", "state_id_taken", "state_id")
            return s.info(self.index)
        seq = 0
        now = time.time()
        header = {"op": "create", "sid": sid, "inc": uuid.uuid4().hex[:12], "owner": owner, "seq": seq, "at": now}
        await self._append(header, None)
        self.sessions.pop(sid, None)
        self._apply_record(header, None)
        return self.sessions[sid].info(self.index)

    async def info(self, sid: str, owner: str | None, with_history: bool = True) -> dict[str, Any]:
        self._start_manager()
        return self._get(sid, owner).info(self.index, with_history)

    async def list_sessions(self, owner: str | None) -> list[dict[str, Any]]:
        self._start_manager()
        return [s.info(self.index) for s in self.sessions.values()
                if not s.deleted and (owner is None or s.owner == owner)]

    async def get_bank(self, sid: str, owner: str | None) -> dict[str, Any]:
        """Read-only copy of a session's bank: ``{"payload": bytes|None, "seq": n}``."""
        self._start_manager()
        s = self._get(sid, owner)
        await self._ensure_loaded(s)
        self._touch(s)
        out = {"payload": s.payload, "seq": s.seq, "info": s.info(self.index)}
        await self._enforce_budget()
        return out

    async def delete(self, sid: str, owner: str | None) -> dict[str, Any]:
        """Delete a session (also a damaged one: the way to clear it)."""
        self._start_manager()
        s = self.sessions.get(sid)
        if s is None or not s.damage:
            s = self._get(sid, owner)
        elif owner is not None and s.owner and s.owner != owner:
            raise session_not_found(sid)
        async with s.condition():
            header = {"op": "delete", "sid": sid, "inc": s.inc, "owner": s.owner, "seq": s.seq + 1,
                      "at": time.time()}
            await self._append(header, None)
            self._apply_record(header, None)
            s.condition().notify_all()
        self.sessions.pop(sid, None)
        _, snap_lock = self._locks()
        async with snap_lock:
            await asyncio.to_thread(self.store.delete_snapshot, sid)
        return {"state_id": sid, "deleted": True}

    # ------------------------------------------------------------------ public: turns
    async def begin_turn(self, sid: str, owner: str, create: bool) -> dict[str, Any]:
        """Lease the session for one turn and return its bank: ``{lease_id, seq, payload, created}``."""
        self._start_manager()
        s = self.sessions.get(sid)
        created = False
        if s is None or s.deleted:
            if not create:
                raise session_not_found(sid)
            await self.create(sid, owner)
            created = True
        s = self.sessions[sid]
        if s.damage:
            raise self._damaged(s)
        if s.owner != owner:
            if create:
                raise Conflict(f"state_id {sid!r} is taken; choose another id", "state_id_taken", "state_id")
            raise session_not_found(sid)
        lease_id = await self._acquire(s, self.cfg.lease_wait_s, self.cfg.lease_ttl_s)
        try:
            await self._ensure_loaded(s)
        except BaseException:
            self._release(s, lease_id)
            raise
        self._touch(s)
        return {"lease_id": lease_id, "seq": s.seq, "payload": s.payload, "created": created,
                "tokens_seen": int(s.meta.get("tokens_seen", 0)), "lease_ttl_s": self.cfg.lease_ttl_s}

    async def renew_lease(self, sid: str, lease_id: str) -> bool:
        """Extend a turn's lease by ``lease_ttl_s`` (its holder is alive). False once it is lost."""
        s = self.sessions.get(sid)
        if s is None or s.lease is None or s.lease[0] != lease_id:
            return False
        s.lease = (lease_id, time.monotonic() + self.cfg.lease_ttl_s)
        return True

    async def commit_turn(self, sid: str, lease_id: str | None, seq: int, update_id: str,
                          payload: bytes, meta: dict[str, Any], turn: dict[str, Any]) -> dict[str, Any]:
        """Apply the turn's new bank as update ``seq`` and release the lease. Idempotent.

        Fenced: once the session has been leased to another turn (this lease expired: its holder
        stopped renewing it), this turn's commit is refused with 409 ``lease_lost``, even if its seq
        would still fit. A retry of a commit that was applied is acknowledged as a duplicate."""
        try:
            s = self.sessions.get(sid)
            if (s is not None and lease_id is not None and s.grant is not None and s.grant != lease_id
                    and s.applied.get(seq) != update_id):
                self.counters["fenced"] += 1
                raise Conflict(f"the lease of this turn on state {sid!r} expired and the state was leased to "
                               "another request; this turn was not saved, retry it", "lease_lost", "state_id")
            res = await self.apply_update(sid, seq, update_id, payload, meta, turn)
        finally:
            s = self.sessions.get(sid)
            if s is not None and lease_id is not None:
                self._release(s, lease_id)
        await self._enforce_budget()  # now that the session is idle it may be offloaded too
        return res

    async def abort_turn(self, sid: str, lease_id: str) -> None:
        s = self.sessions.get(sid)
        if s is not None:
            self._release(s, lease_id)

    async def apply_update(self, sid: str, seq: int, update_id: str, payload: bytes | None,
                           meta: dict[str, Any], turn: dict[str, Any] | None = None,
                           compacted: bool = False) -> dict[str, Any]:
        """The ordered, idempotent update queue of a session. Returns once the update is durable."""
        self._start_manager()
        s = self._get(sid, None)
        cond = s.condition()
        async with cond:
            if seq > s.seq + 1:  # early: wait for the predecessors (ordered delivery)
                try:
                    await asyncio.wait_for(cond.wait_for(lambda: s.deleted or s.seq >= seq - 1),
                                           self.cfg.queue_wait_s)
                except asyncio.TimeoutError:
                    raise Conflict(f"update seq {seq} of {sid!r} waited {self.cfg.queue_wait_s:.0f}s for "
                                   f"seq {seq - 1}, which never arrived (state is at seq {s.seq})",
                                   "missing_predecessor") from None
                if s.deleted:
                    raise session_not_found(sid)
            if seq <= s.seq:
                if s.applied.get(seq) == update_id:
                    self.counters["duplicates"] += 1
                    return {"seq": s.seq, "applied": False, "duplicate": True, "info": s.info(self.index)}
                self.counters["conflicts"] += 1
                raise Conflict(f"state {sid!r} changed during this request (now at seq {s.seq}, this "
                               f"update was for seq {seq}); retry the request", "state_conflict", "state_id")
            header = {"op": "put", "sid": sid, "inc": s.inc, "owner": s.owner, "seq": seq, "at": time.time(),
                      "update_id": update_id, "meta": meta, "turn": turn, "compacted": compacted}
            if turn is not None:
                turn.setdefault("seq", seq)
                turn.setdefault("at", header["at"])
            await self._append(header, payload)
            self._apply_record(header, payload)
            self.counters["updates"] += 1
            self._touch(s)
            cond.notify_all()
            info = s.info(self.index)
        await self._maybe_checkpoint()
        await self._enforce_budget()
        return {"seq": seq, "applied": True, "duplicate": False, "info": info}

    # ------------------------------------------------------------------ leases
    async def _acquire(self, s: _Session, wait_s: float, ttl_s: float | None = None) -> str:
        cond = s.condition()
        deadline = time.monotonic() + wait_s
        async with cond:
            while s.leased():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Busy(f"state {s.state_id!r} is busy with another request; retry shortly",
                               "state_busy", "state_id")
                try:  # wake at the lease's expiry at the latest
                    await asyncio.wait_for(cond.wait(), min(left, max(0.01, s.lease[1] - time.monotonic())))
                except asyncio.TimeoutError:
                    pass
            if s.deleted:
                raise session_not_found(s.state_id)
            lease_id = uuid.uuid4().hex
            s.lease = (lease_id, time.monotonic() + (ttl_s or self.cfg.lease_timeout_s))
            s.grant = lease_id
            return lease_id

    def _release(self, s: _Session, lease_id: str) -> None:
        if s.lease is not None and s.lease[0] == lease_id:
            s.lease = None
            cond = s.condition()

            async def _notify():
                async with cond:
                    cond.notify_all()
            asyncio.get_running_loop().create_task(_notify())

    # ------------------------------------------------------------------ compaction
    def _load_model(self):
        if self._model is None:
            import torch

            from .modeling import ModelSpec, load_model

            torch.set_num_threads(1)  # a background helper: leave the cores to the generator
            self._model = load_model(ModelSpec(**self.cfg.model), device="cpu").model
        return self._model

    def _compact_bytes(self, payload: bytes | None, merge: bool, threshold: float):
        from .modeling import state_from_bytes, state_meta, state_to_bytes

        model = self._load_model()
        state = state_from_bytes(payload, model)
        before = state_meta(state)
        moved = model.compact_state(state)
        merged = state.merge_duplicates(threshold) if merge else 0
        return state_to_bytes(state), before, state_meta(state), moved, merged

    async def compact(self, sid: str, owner: str | None, merge: bool = True,
                      threshold: float | None = None, wait: bool = True) -> dict[str, Any] | None:
        """Compact one session now (``model.compact_state`` then ``merge_duplicates``)."""
        self._start_manager()
        s = self._get(sid, owner)
        threshold = self.cfg.merge_threshold if threshold is None else threshold
        lease_id = await self._acquire(s, self.cfg.lease_wait_s if wait else 0.0)
        try:
            await self._ensure_loaded(s)
            bytes_before, seq = s.nbytes, s.seq
            t0 = time.perf_counter()
            payload, before, after, moved, merged = await asyncio.to_thread(
                self._compact_bytes, s.payload, merge, threshold)
            turn = {"kind": "compact", "duration_ms": (time.perf_counter() - t0) * 1e3,
                    "tokens_seen": after["tokens_seen"], "detail": {**moved, "merged": merged}}
            res = await self.apply_update(sid, seq + 1, f"compact-{uuid.uuid4().hex}", payload, after, turn,
                                          compacted=True)
        finally:
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
        done = {"expired": 0, "compacted": 0}
        now_wall, now = time.time(), time.monotonic()
        for s in list(self.sessions.values()):
            if s.deleted or s.leased() or s.damage:
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
    def _l0_fill(s: _Session) -> float:
        lv = s.meta.get("levels") or []
        if not lv or not lv[0].get("capacity"):
            return 0.0
        return lv[0]["slots"] / lv[0]["capacity"]

    def bytes_in_memory(self) -> int:
        return sum(len(s.payload) for s in self.sessions.values() if s.payload is not None and not s.offloaded)

    async def _snapshot(self, s: _Session) -> None:
        """Write the session's current bank as its snapshot (if the snapshot is older)."""
        _, snap_lock = self._locks()
        async with snap_lock:
            if s.deleted or s.offloaded or s.damage or s.snapshot_seq >= s.seq:
                return
            header, payload, seq = s.header(), s.payload, s.seq  # consistent: no await in between
            await asyncio.to_thread(self.store.write_snapshot, s.state_id, header, payload)
            s.snapshot_seq = max(s.snapshot_seq, seq)

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

    async def _maybe_checkpoint(self, force: bool = False) -> None:
        if force or self.store.wal_bytes >= self.cfg.checkpoint_wal_bytes:
            await self.checkpoint()

    async def checkpoint(self) -> None:
        """Snapshot every session the WAL holds newer data for, then drop the old WAL epochs.
        Best effort: on a storage error nothing is dropped, and the next pass tries again."""
        try:
            await self._checkpoint()
        except OSError as e:
            self.counters["storage_errors"] += 1
            logger.warning("shard %d: checkpoint failed (the WAL keeps everything): %s", self.index, e)

    async def _checkpoint(self) -> None:
        wal_lock, _ = self._locks()
        async with wal_lock:
            new_epoch = await asyncio.to_thread(self.store.start_epoch)
            # what the old epochs hold, per session (later updates land in the new epoch)
            covered = {sid: s.seq for sid, s in self.sessions.items() if not s.deleted}
        for sid in covered:
            s = self.sessions.get(sid)
            if s is not None and not s.deleted and not s.offloaded and s.snapshot_seq < s.seq:
                await self._snapshot(s)
        if all(s.deleted or s.snapshot_seq >= covered.get(sid, 0) for sid, s in list(self.sessions.items())
               if sid in covered):
            await asyncio.to_thread(self.store.delete_epochs_before, new_epoch)
        self.counters["checkpoints"] += 1

    # ------------------------------------------------------------------ stats
    async def stats(self) -> dict[str, Any]:
        try:
            self._start_manager()
        except StorageUnavailable:
            return {"shard": self.index, "pid": os.getpid(), "sessions": 0, "storage_error": self.start_error,
                    "started_at": self.started_at, **self.counters}
        live = [s for s in self.sessions.values() if not s.deleted]
        return {"shard": self.index, "pid": os.getpid(), "sessions": len(live),
                "offloaded": sum(s.offloaded for s in live), "bytes_in_memory": self.bytes_in_memory(),
                "bytes_total": sum(s.nbytes for s in live), "memory_budget_bytes": self.cfg.memory_budget_bytes,
                "wal_epoch": self.store.epoch, "wal_bytes": self.store.wal_bytes,
                "started_at": self.started_at, "damaged_sessions": sum(bool(s.damage) for s in live),
                "damage_reports": self.damage_reports[-20:], **self.counters}


# ================================================================================== client
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
                max_concurrency=1000,
            ).remote(asdict(self.cfg), i)
            self._handles[i] = h
        return h

    def for_session(self, state_id: str):
        return self.handle(self.shard_of(state_id))

    async def call(self, state_id: str, method: str, *args, **kwargs):
        """``method(state_id, ...)`` on the session's shard. A dead actor handle (the actor was
        removed, or its name now points at a new one) is dropped and resolved again, with backoff;
        every shard method is safe to repeat (seq numbers, update ids)."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError

        i = self.shard_of(state_id)
        delay = 0.1
        for attempt in range(self.RESOLVE_ATTEMPTS):
            h = self.handle(i)
            try:
                return await getattr(h, method).remote(state_id, *args, **kwargs)
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

    async def keep_lease(self, state_id: str, lease_id: str, ttl_s: float) -> None:
        """Renew a turn's lease every ``ttl_s / 4`` until cancelled (run it beside the turn). If this
        process dies the renewals stop, and the session is free again within ``ttl_s``."""
        while True:
            await asyncio.sleep(ttl_s / 4)
            try:
                if not await self.call(state_id, "renew_lease", lease_id):
                    return  # lost (expired or released): the commit will be fenced or is done
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a shard restart: the seq check still guards the commit
                logger.warning("could not renew the lease on %s: %s", state_id, e)

    def start_keep_lease(self, state_id: str, lease: dict[str, Any]) -> asyncio.Task:
        """:meth:`keep_lease` as a task for a ``begin_turn`` answer; cancel it when the turn ends."""
        return asyncio.get_running_loop().create_task(
            self.keep_lease(state_id, lease["lease_id"], lease.get("lease_ttl_s") or self.cfg.lease_ttl_s))

    async def list_sessions(self, owner: str | None) -> list[dict[str, Any]]:
        parts = await asyncio.gather(*(self.handle(i).list_sessions.remote(owner) for i in range(self.cfg.num_shards)))
        out = [s for p in parts for s in p]
        return sorted(out, key=lambda s: s["updated_at"], reverse=True)

    async def stats(self) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(self.handle(i).stats.remote() for i in range(self.cfg.num_shards))))

    async def ping_all(self, timeout_s: float = 5.0) -> int:
        async def one(i):
            try:
                await asyncio.wait_for(self.handle(i).ping.remote(), timeout_s)
                return 1
            except Exception:
                return 0
        return sum(await asyncio.gather(*(one(i) for i in range(self.cfg.num_shards))))

    def kill_all(self) -> None:
        """Remove the shard actors (tests, teardown). Their storage stays."""
        import ray

        for i in range(self.cfg.num_shards):
            try:
                ray.kill(ray.get_actor(self.cfg.actor_name(i), namespace=self.cfg.namespace), no_restart=True)
            except ValueError:
                pass
        self._handles.clear()


def check_layout(storage: str, num_shards: int) -> None:
    """Record the shard count of a storage root; refuse a different one (sessions would be lost)."""
    import fsspec

    from .errors import APIError

    fs, root = fsspec.core.url_to_fs(storage)
    fs.makedirs(root, exist_ok=True)
    path = f"{root.rstrip('/')}/layout.json"
    if fs.exists(path):
        with fs.open(path, "r") as f:
            n = json.load(f).get("num_shards")
        if n != num_shards:
            raise APIError(f"storage {storage!r} holds sessions for {n} shards, not {num_shards}: use "
                           f"bank_shards={n} or a new storage directory")
        return
    with fs.open(path, "w") as f:
        json.dump({"num_shards": num_shards, "format": "bwr-dnc-session-bank", "version": 1}, f)
