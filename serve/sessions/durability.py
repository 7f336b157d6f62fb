"""Durability of a shard: opening its storage (with retries), recovery from snapshots + WAL with
damage detection, durable appends, loading offloaded banks, snapshots and WAL checkpoints.

Damage is detected, reported and never guessed over (issue 12). Storage errors on the request path
answer 503 ``storage_unavailable`` with nothing changed; background work (offload, checkpoint) fails
quietly and tries again later.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, TypeVar

from ..bank_store import BankStore, RecordDamage, digest
from ..errors import StateDamaged, StorageUnavailable
from .session import Session

logger = logging.getLogger("serve.sessions")
T = TypeVar("T")


async def not_abandoned(work: Awaitable[T]) -> T:
    """Await ``work`` (storage work: a write in a thread goes on whatever happens to its caller);
    when the caller is cancelled, wait until the work is done (the locks the caller holds must cover
    it), then let the cancellation go on. Ray cancels a shard call whose request was cancelled (its
    client left), so any call may be cancelled while it writes: a write the lock no longer covers
    raced the next one (a DELETE removed a snapshot that the write then put back)."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                pass
        if not task.cancelled():
            task.exception()  # a failure has nobody to tell now (the work logs its own)
        raise


def in_thread(fn: Callable[..., T], *args) -> Awaitable[T]:
    """``fn(*args)`` in a thread, :func:`not_abandoned`: for every storage call of a shard."""
    return not_abandoned(asyncio.to_thread(fn, *args))


class DurabilityMixin:
    """Storage side of :class:`~serve.sessions.shard.SessionBankShard` (see its attributes)."""

    START_BACKOFF_S = (0.25, 10.0)  # first retry delay, cap (doubling in between)

    def _try_start(self) -> bool:
        try:
            self.store = BankStore(self.cfg.shard_uri(self.index))
            self.sessions, self.stale_snapshots, self.deleted_recently = {}, {}, {}
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
            s = Session.from_header(h)
            s.snapshot_seq = s.seq
            s.offloaded = s.nbytes > 0 and not s.damage
            self.sessions[sid] = s
        bad_records: list[RecordDamage] = []
        last_good: dict[str, list[tuple[int, str, int, str]]] = {}  # sid -> (record index, inc, seq, op)
        owners: dict[str, str] = {}  # sid -> the owner its last WAL record names
        n = 0
        # token turns that cannot be applied: their session has no state to replay them on (its snapshot
        # is gone), or turns before them are missing. sid -> (record number, inc, seq, what is wrong)
        orphans: dict[str, tuple[int, str, int, str]] = {}
        records: dict[str, list[tuple[int, str, str, int]]] = {}  # sid -> (record number, inc, op, seq), in order
        for header, payload in self.store.replay(bad_records.append):
            sid, op, inc = header["sid"], header.get("op", "put"), header.get("inc", "")
            records.setdefault(sid, []).append((n, inc, op, header["seq"]))
            s = self.sessions.get(sid)
            if op == "turn" and sid not in orphans and (s is None or (
                    not s.damage and s.inc == inc and header["seq"] > s.seq + 1)):
                orphans[sid] = (n, inc, header["seq"], (
                    f"the WAL holds its token turn of seq {header['seq']} but no state to replay it on "
                    f"(its snapshot sessions/{sid}.snap is missing)" if s is None else
                    f"the WAL holds its token turn of seq {header['seq']} but the turns after seq {s.seq} "
                    "before it are missing"))
            self._apply_record(header, payload)
            if header.get("owner") and header.get("op") != "delete":
                owners[header["sid"]] = header["owner"]
            last_good.setdefault(header["sid"], []).append(
                (len(bad_records), header.get("inc", ""), header["seq"], header.get("op", "put")))
            n += 1
        for k, d in enumerate(bad_records):
            where = f"{getattr(d, 'where', 'wal')} at byte {d.offset}"
            if d.torn:  # a crash mid-append: that record was never acknowledged
                logger.info("shard %d: torn record at the end of %s (never acknowledged)", self.index, where)
                continue
            self._report({"kind": "wal_record", "where": where, **d.report()})
            if d.sid is None:
                logger.error("shard %d: unreadable WAL region (%d bytes) %s: %s; the sessions it held cannot "
                             "be named", self.index, d.length, where, d.reason)
                continue
            later = [(inc, seq, op) for idx, inc, seq, op in last_good.get(d.sid, []) if idx > k]
            s = self.sessions.get(d.sid)
            # only a later full state (or delete) makes a lost record irrelevant: a later token turn
            # (issue 14) is replayed on top of it, so it needs every turn before it
            superseded = any(inc != d.inc or (seq > d.seq and op != "turn") for inc, seq, op in later) or (
                s is not None and s.inc == d.inc and s.snapshot_seq >= d.seq)
            if superseded:
                logger.warning("shard %d: damaged WAL record of %s seq %d (%s, %s) is superseded by later data",
                               self.index, d.sid, d.seq, where, d.reason)
                continue
            self._mark_damaged_at_start(d.sid, f"WAL record of seq {d.seq} ({where}): {d.reason}", seq=d.seq)
        for sid, (at, inc, seq, what) in orphans.items():
            # a later full state, a delete or a new incarnation of the id makes those turns irrelevant
            if any(k > at and (i != inc or op != "turn") for k, i, op, _ in records[sid]):
                continue
            if getattr(self.sessions.get(sid), "damage", None):  # a damaged record above says why already
                continue
            self._report({"kind": "wal_turns", "sid": sid, "seq": seq, "reason": what})
            self._mark_damaged_at_start(sid, what, seq=max(q for _, i, _, q in records[sid] if i == inc))
        for s in self.sessions.values():
            if s.damage and not s.owner and owners.get(s.state_id):
                # its snapshot header (which held the owner) is unreadable: without an owner every owner
                # could see and delete it. The WAL names the owner; the verdict keeps it from now on
                s.owner = owners[s.state_id]
                try:
                    self.store.write_snapshot(s.state_id, s.header(), None)
                except OSError as e:
                    logger.error("shard %d: could not persist the owner of damaged %s: %s", self.index, s.state_id, e)
        for s in list(self.sessions.values()):
            if s.deleted:
                self._remember_deleted(s.state_id, s.owner)
                del self.sessions[s.state_id]
                try:
                    self.store.delete_snapshot(s.state_id)
                except OSError as e:  # storage refuses for now: the WAL keeps the delete record
                    logger.warning("shard %d: could not remove the snapshot of deleted %s: %s", self.index,
                                   s.state_id, e)
                    self.stale_snapshots[s.state_id] = s.inc
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
            s = self.sessions[sid] = Session(sid, "", 0.0, 0.0)
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

    async def _append(self, header: dict[str, Any], payload: bytes | None,
                      then: Callable[[int], None] | None = None) -> int:
        """Append one record durably, then run ``then(size)`` (the record's effect in memory);
        returns the record's size in bytes.

        Not cancelled halfway: Serve cancels a request whose client left, and Ray every call it made,
        this shard's too. The write runs on in its thread whatever happens to the caller, so the
        record will be in the WAL: a cancelled caller waits (its locks held) until the record is
        written and ``then`` ran, and is cancelled after that. Before, a cancelled update was in the
        WAL but not in memory: the next one took the same seq, and a restart replayed the cancelled
        update in place of the acknowledged one (and a cancelled delete came back live)."""
        return await not_abandoned(self._append_then(header, payload, then))

    async def _append_then(self, header: dict[str, Any], payload: bytes | None,
                           then: Callable[[int], None] | None) -> int:
        n = await self._append_durably(header, payload)
        if then is not None:
            then(n)
        return n

    async def _append_durably(self, header: dict[str, Any], payload: bytes | None) -> int:
        wal_lock, _ = self._locks()
        async with wal_lock:
            try:
                return await in_thread(self.store.append, header, payload)
            except OSError as e:
                self.counters["storage_errors"] += 1
                logger.error("shard %d: WAL append for %s failed: %s", self.index, header.get("sid"), e)
                raise StorageUnavailable(f"storage unavailable: the session store (shard {self.index}) could not "
                                         f"write {header.get('op')} of state {header.get('sid')!r} durably "
                                         f"({e.strerror or e}); nothing was changed, retry later",
                                         "storage_unavailable") from None

    async def _ensure_loaded(self, s: Session) -> None:
        if not s.offloaded:
            return
        _, snap_lock = self._locks()
        async with snap_lock:
            if not s.offloaded:
                return
            try:
                header, payload = await in_thread(self.store.read_snapshot, s.state_id)
                # the snapshot's full state must be the session's (token turns may have followed it)
                base_seq = header.get("base_seq", header["seq"])
                if base_seq != s.base_seq or digest(payload) != s.base_digest:
                    raise RecordDamage(f"snapshot holds the full state of seq {base_seq} digest {digest(payload)}, "
                                       f"the session's is seq {s.base_seq} digest {s.base_digest}")
            except (RecordDamage, ValueError, FileNotFoundError) as e:
                s.damage = f"snapshot sessions/{s.state_id}.snap: {e}"
                s.offloaded = False
                logger.error("shard %d: session %s is damaged: %s", self.index, s.state_id, s.damage)
                self._report({"kind": "snapshot", "sid": s.state_id, "reason": s.damage})
                try:
                    await in_thread(self.store.quarantine_snapshot, s.state_id)
                    await in_thread(self.store.write_snapshot, s.state_id, s.header(), None)
                    # the marker holds the verdict and the token turns: it is the session's snapshot now
                    # (as at start-up), else every checkpoint kept every WAL epoch for its newer turns
                    s.snapshot_seq = max(s.snapshot_seq, s.seq)
                except OSError as e2:
                    logger.error("shard %d: could not persist the damage of %s: %s", self.index, s.state_id, e2)
                raise self._damaged(s) from None
            except OSError as e:
                raise StorageUnavailable(f"storage unavailable: could not read the bank of state {s.state_id!r} "
                                         f"(shard {self.index}): {e.strerror or e}; retry later",
                                         "storage_unavailable") from None
            s.payload, s.offloaded = payload, False
            self.counters["restores"] += 1

    async def _snapshot(self, s: Session) -> None:
        """Write the session's last full state and its token turns as its snapshot (if the snapshot
        is older). An offloaded session that logged token turns since is loaded first."""
        if s.offloaded and s.snapshot_seq < s.seq and not s.deleted and not s.damage:
            try:
                await self._ensure_loaded(s)
            except (StateDamaged, StorageUnavailable):
                return  # reported by the load; the WAL keeps the turns

        _, snap_lock = self._locks()
        async with snap_lock:
            if s.deleted or s.offloaded or s.damage or s.snapshot_seq >= s.seq:
                return
            header, payload, seq = s.header(), s.payload, s.seq  # consistent: no await in between
            await in_thread(self.store.write_snapshot, s.state_id, header, payload)
            s.snapshot_seq = max(s.snapshot_seq, seq)

    async def remove_stale_snapshots(self) -> bool:
        """Remove the snapshot files of deleted sessions (``stale_snapshots``: id -> the deleted
        incarnation) that storage refused to remove so far; True when none is left. A file that
        now holds another incarnation (the id was created again and snapshotted) is that one's."""
        _, snap_lock = self._locks()
        async with snap_lock:
            for sid, inc in list(self.stale_snapshots.items()):
                live = self.sessions.get(sid)
                try:
                    if live is not None and live.inc != inc:
                        header = await in_thread(self.store.read_snapshot_header, sid)
                        if header.get("inc", "") != inc:
                            del self.stale_snapshots[sid]
                            continue
                    await in_thread(self.store.delete_snapshot, sid)
                except FileNotFoundError:
                    pass
                except (OSError, RecordDamage, ValueError) as e:
                    self.counters["storage_errors"] += 1
                    logger.warning("shard %d: could not remove the snapshot of deleted %s (retried at the next "
                                   "checkpoint; the WAL keeps its delete record): %s", self.index, sid, e)
                    continue
                del self.stale_snapshots[sid]
        return not self.stale_snapshots

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
            new_epoch = await in_thread(self.store.start_epoch)
            # what the old epochs hold, per session (later updates land in the new epoch)
            covered = {sid: s.seq for sid, s in self.sessions.items() if not s.deleted}
        for sid in covered:
            s = self.sessions.get(sid)
            if s is not None and not s.deleted and s.snapshot_seq < s.seq:
                # an offloaded session too: token turns from a replica holding its state resident do
                # not load its bank, and skipping it kept every old epoch alive (the WAL grew forever).
                # _snapshot loads it; it goes back to storage right after
                was_offloaded = s.offloaded
                await self._snapshot(s)
                if was_offloaded:
                    await self.offload(sid)
        # a deleted session's snapshot still on storage would come back at a restart without the delete
        # record: the old epochs stay until it is gone
        if await self.remove_stale_snapshots() and all(
                s.deleted or s.snapshot_seq >= covered.get(sid, 0) for sid, s in list(self.sessions.items())
                if sid in covered):
            await in_thread(self.store.delete_epochs_before, new_epoch)
        self.counters["checkpoints"] += 1
