"""The session state machine of a shard: create / read / delete, turns under leases, and the
ordered, idempotent update queue (seq numbers, update ids, fencing tokens).

A session's updates apply in ``seq`` order (an early one waits for its predecessor); re-sending an
applied update (same seq and id, as Ray's retries do) is acknowledged again without being reapplied;
a different update for an applied seq is a conflict (409). A turn holds a lease renewed by its
holder; a commit under a lease that was superseded is refused (409 ``lease_lost``).

A lease names the incarnation it was granted on (``<inc>.<random>``), and so does every update made
under one: an update of an incarnation that was deleted meanwhile is refused (404), even once the id
was created again (a reset, or another owner) and its seq would fit there. Leases are not durable, so
the fencing token alone cannot tell after a shard restart.

A turn's holder keeps its lease with ``hold_lease`` (renew, then wait for a delete: it stops decoding
a turn whose session went). A session a turn created goes again when that turn ends without an
acknowledged update (``abort_turn``, or the manager once its lease expired): it must not count
against its owner's quota holding nothing.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from ..bank_store import digest
from .turn_log import chain_digest, pack_ids, unpack_ids
from ..errors import Busy, Conflict, NotFound, StateDamaged, session_not_found
from .session import Session


def lease_incarnation(lease_id: str | None) -> str | None:
    """The incarnation a lease was granted on (None: no lease, or one without it)."""
    if not lease_id or "." not in lease_id:
        return None
    return lease_id.split(".", 1)[0]


class StateMachineMixin:
    """Session-facing side of :class:`~serve.sessions.shard.SessionBankShard`."""

    def _apply_record(self, h: dict[str, Any], payload: bytes | None) -> None:
        """Apply one WAL record to memory (live path and replay share this)."""
        sid, op, seq, inc = h["sid"], h["op"], h["seq"], h.get("inc", "")
        s = self.sessions.get(sid)
        if op == "create":
            if s is None or s.deleted:
                s = self.sessions[sid] = Session(sid, h["owner"], h["at"], h["at"], seq=seq, inc=inc)
                s.history.append({"seq": seq, "kind": "create", "at": h["at"]})
            return
        if s is None:  # its create record was in an epoch already dropped: rebuild from the put
            if op != "put":
                return
            s = self.sessions[sid] = Session(sid, h["owner"], h["at"], h["at"], seq=seq - 1, inc=inc)
        if s.inc != inc or seq <= s.seq:
            return  # another incarnation of the id, or already in the snapshot
        s.seq = seq
        s.updated_at = h["at"]
        if op == "delete":
            s.deleted = True
            return
        s.deleted = False
        if op == "turn":  # tokens only: the full state stays what it was, the turn joins the tail
            s.tail.append({"seq": seq, "ids": unpack_ids(payload), "n_prompt": int(h["n_prompt"]),
                           "fp": h.get("fp"), "digest": h["digest"]})
            if h.get("dtype"):  # none in records older than the serving dtype: float32 (turn_log.turn_dtype)
                s.tail[-1]["dtype"] = h["dtype"]
            s.digest = h["digest"]
        else:  # a full state record
            s.payload, s.nbytes, s.digest, s.offloaded = payload, len(payload or b""), digest(payload), False
            s.base_seq, s.base_digest, s.tail = seq, s.digest, []
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

    def _get(self, sid: str, owner: str | None) -> Session:
        s = self.sessions.get(sid)
        if s is None or s.deleted or not self._owned(s, owner):
            raise session_not_found(sid)
        if s.damage:
            raise self._damaged(s)
        return s

    @staticmethod
    def _owned(s: Session, owner: str | None) -> bool:
        """Whether ``owner`` may see ``s`` (None: the operator, who sees every session). A session
        whose owner is unknown (damaged before any record naming it could be read) is nobody's:
        before, an empty owner matched every owner, who could all see and delete it."""
        return owner is None or s.owner == owner

    def _damaged(self, s: Session) -> StateDamaged:
        how = (f"DELETE /v1/state/{s.state_id} removes it" if s.owner else
               "its owner is unknown (no readable record names it), so no API key can see or delete it; an "
               f"operator removes it with BankClient.call({s.state_id!r}, 'delete', None)")
        return StateDamaged(f"state {s.state_id!r} (shard {self.index}) is damaged on storage and cannot be recovered "
                            f"as acknowledged: {s.damage}. Nothing was guessed; {how} (the damaged files are kept "
                            "aside for inspection)", "state_damaged", "state_id")

    def _touch(self, s: Session) -> None:
        s.last_access = time.monotonic()

    # ------------------------------------------------------------------ public: sessions

    async def create(self, sid: str, owner: str) -> dict[str, Any]:
        """Create an empty session (idempotent for its owner; 409 if another owner holds the id).

        Creates are serialised: two first turns of one new session racing here would otherwise both
        log a create, the live shard keep the second incarnation and replay the first (which drops
        every update of the second at the next restart)."""
        return await self._create(sid, owner, by_turn=False)

    async def _create(self, sid: str, owner: str, by_turn: bool) -> dict[str, Any]:
        """:meth:`create`; ``by_turn``: for a turn's ``create_state`` (else the owner asked for the
        session itself, which then stays even when the turn that created it fails: abort_turn)."""
        self._start_manager()
        async with self._create_lock():
            s = self.sessions.get(sid)
            if s is not None and not s.deleted:
                if s.owner != owner:  # before the damage: another owner's damage is none of this caller's
                    raise Conflict(f"state_id {sid!r} is taken; choose another id", "state_id_taken", "state_id")
                if s.damage:
                    raise self._damaged(s)  # never silently recreated: DELETE first
                if not by_turn:
                    s.made_by = None
                return s.info(self.index)
            header = {"op": "create", "sid": sid, "inc": uuid.uuid4().hex[:12], "owner": owner, "seq": 0,
                      "at": time.time()}
            info: dict[str, Any] = {}

            def created(_: int) -> None:
                self.sessions.pop(sid, None)
                self.deleted_recently.pop(sid, None)
                self._apply_record(header, None)
                info.update(self.sessions[sid].info(self.index))
            await self._append(header, None, created)
            return info

    def _create_lock(self) -> asyncio.Lock:
        if self._creating is None:  # made on the actor's event loop
            self._creating = asyncio.Lock()
        return self._creating

    async def info(self, sid: str, owner: str | None, with_history: bool = True) -> dict[str, Any]:
        self._start_manager()
        return self._get(sid, owner).info(self.index, with_history)

    async def list_sessions(self, owner: str | None) -> list[dict[str, Any]]:
        self._start_manager()
        return [s.info(self.index) for s in self.sessions.values() if not s.deleted and self._owned(s, owner)]

    async def get_bank(self, sid: str, owner: str | None) -> dict[str, Any]:
        """Read-only copy of a session's content: ``{"payload": bytes|None, "turns": [...], "seq": n}``:
        its last full state and the token turns after it (``turn_log.rebuild_state`` makes the state)."""
        self._start_manager()
        s = self._get(sid, owner)
        await self._ensure_loaded(s)
        self._touch(s)
        out = {"payload": s.payload, "turns": list(s.tail), "seq": s.seq, "info": s.info(self.index)}
        await self._enforce_budget()
        return out

    DELETED_REMEMBERED = 4096
    """Deleted ids (and owners) a shard remembers, so that a retried delete is acknowledged."""

    def _remember_deleted(self, sid: str, owner: str) -> None:
        self.deleted_recently.pop(sid, None)
        self.deleted_recently[sid] = owner
        while len(self.deleted_recently) > self.DELETED_REMEMBERED:
            del self.deleted_recently[next(iter(self.deleted_recently))]

    async def delete(self, sid: str, owner: str | None) -> dict[str, Any]:
        """Delete a session (also a damaged one: the way to clear it).

        Deleting an id this owner deleted recently (since this shard's WAL last folded, or this
        process deleted it) is acknowledged again: Ray retries a call whose actor died before it
        answered, and the retry of a delete that was durable met a shard that had replayed it (404
        "not found" for a delete that happened)."""
        self._start_manager()
        s = self.sessions.get(sid)
        if (s is None or s.deleted) and sid in self.deleted_recently and (
                owner is None or self.deleted_recently[sid] == owner):
            return {"state_id": sid, "deleted": True}
        if s is None or not s.damage:
            s = self._get(sid, owner)
        elif not self._owned(s, owner):
            raise session_not_found(sid)
        async with s.condition():
            await self._log_delete(s, remember=True)
        await self.remove_stale_snapshots()
        return {"state_id": sid, "deleted": True}

    async def _log_delete(self, s: Session, remember: bool) -> None:
        """Delete ``s`` durably (its WAL record), then in memory; the caller holds ``s.condition()``.
        ``remember``: a retried delete of this id is acknowledged again (:meth:`delete`)."""
        sid = s.state_id
        header = {"op": "delete", "sid": sid, "inc": s.inc, "owner": s.owner, "seq": s.seq + 1, "at": time.time()}

        def deleted(_: int) -> None:
            self._apply_record(header, None)
            s.condition().notify_all()
            self.sessions.pop(sid, None)
            if remember:
                self._remember_deleted(sid, s.owner)
            # the delete is durable now (its WAL record); the snapshot file goes too, or, when storage
            # refuses, later (remove_stale_snapshots), and the WAL keeps the delete record until it went
            self.stale_snapshots[sid] = s.inc
        await self._append(header, None, deleted)

    # ------------------------------------------------------------------ public: turns
    async def begin_turn(self, sid: str, owner: str, create: bool, have: dict[str, Any] | None = None) -> dict[str, Any]:
        """Lease the session for one turn and return what the caller needs to hold its state:
        ``{lease_id, seq, inc, digest, base, payload, turns, tail_turns, tail_tokens, created, ...}``.

        ``have`` (``{"inc", "seq", "digest"}``) describes a copy the caller holds (a Generator's
        resident state). When this session can replay from it (same incarnation, and ``seq`` is the
        last full state or a token turn after it, with the same digest), ``base`` is False, no bank
        is sent, and ``turns`` are the token turns after ``have["seq"]`` (none when it is current).
        Otherwise ``base`` is True: ``payload`` is the last full state and ``turns`` every token turn
        after it (the caller drops its stale copy)."""
        self._start_manager()
        for attempt in range(2):
            s = self.sessions.get(sid)
            created = False
            if s is None or s.deleted:
                if not create:
                    raise session_not_found(sid)
                await self._create(sid, owner, by_turn=True)
                created = True
            s = self.sessions[sid]
            if s.owner != owner:  # before the damage: another owner's damage is none of this caller's
                if create:
                    raise Conflict(f"state_id {sid!r} is taken; choose another id", "state_id_taken", "state_id")
                raise session_not_found(sid)
            if s.damage:
                raise self._damaged(s)
            try:
                lease_id = await self._acquire(s, self.cfg.lease_wait_s, self.cfg.lease_ttl_s, preempt=True)
            except NotFound:
                if create and s.discarded and attempt == 0:
                    continue  # the turn that created it failed while this one waited (abort_turn): create it again
                raise
            break
        if created:
            s.made_by = lease_id  # a failure of this turn removes the session again (abort_turn)
        resident = (have is not None and have.get("inc") == s.inc and have.get("seq", -1) <= s.seq
                    and s.digest_at(int(have["seq"])) == have.get("digest"))
        try:
            if not resident:
                await self._ensure_loaded(s)
        except BaseException:
            self._release(s, lease_id)
            raise
        self._touch(s)
        self.counters["resident_turns" if resident else "loaded_turns"] += 1
        turns = [t for t in s.tail if t["seq"] > have["seq"]] if resident else list(s.tail)
        return {"lease_id": lease_id, "seq": s.seq, "inc": s.inc, "digest": s.digest, "base": not resident,
                "payload": None if resident else s.payload, "turns": turns, "tail_turns": len(s.tail),
                "tail_tokens": s.tail_tokens(), "created": created,
                "tokens_seen": int(s.meta.get("tokens_seen", 0)), "lease_ttl_s": self.cfg.lease_ttl_s}

    async def renew_lease(self, sid: str, lease_id: str) -> bool:
        """Extend a turn's lease by ``lease_ttl_s`` (its holder is alive). False once it is lost.

        A shard that restarted forgot its leases (they are not durable): a renewal there takes the
        lease back when nobody leased the session since (no grant) and it is the lease's incarnation,
        so a second request waits for the turn in flight instead of overtaking it (which got that
        turn refused at its commit, 409 ``lease_lost``). Never a lease whose turn already committed
        or gave it back here (a renewal sent before that, delivered after): it took the session
        back for a turn that was over, busy for ``lease_ttl_s``."""
        s = self.sessions.get(sid)
        if s is None or s.deleted:
            return False
        now = time.monotonic()
        if (s.lease is None and s.grant is None and lease_incarnation(lease_id) == s.inc
                and lease_id not in s.ended):  # a renewal delivered after its turn's commit or give-back
            s.grant, s.leased_at = lease_id, now
        elif s.lease is None or s.lease[0] != lease_id:
            return False
        elif now - s.leased_at > self.cfg.lease_timeout_s:
            # a turn held this long is stuck (its holder alive, its decode not): renewing it forever
            # kept the session busy (503 for every other request) for as long as that process lived.
            # Refused, the lease lapses within lease_ttl_s; the turn may still commit unless another
            # request leased the session meanwhile (then 409 lease_lost, as for any expired lease)
            return False
        s.lease = (lease_id, now + self.cfg.lease_ttl_s)
        return True

    async def hold_lease(self, sid: str, lease_id: str, watch_s: float) -> str:
        """:meth:`renew_lease`, then wait up to ``watch_s`` for the turn's session to be deleted (a
        long poll: its holder calls again at once, ``BankClient.keep_lease``). Returns "held"
        (renewed, nothing happened meanwhile), "deleted" (this lease's incarnation of the session is
        gone: the turn cannot be saved, its holder stops decoding), "ended" (the lease was released:
        committed or given back) or "lost" (expired and leased to another request, or refused).

        Why the wait: a turn whose session was deleted kept decoding to ``max_new_tokens`` (its
        holder learned it only at the commit, 404), a batch row spent for nothing, every step of the
        batch it shared slower; the renewals alone (every ``lease_ttl_s / 4``) would tell it seconds
        late. The wait ends at the release too, so a finished turn leaves no call waiting here."""
        if not await self.renew_lease(sid, lease_id):
            s = self.sessions.get(sid)
            gone = s is None or s.deleted or s.inc != lease_incarnation(lease_id)
            return "deleted" if gone else ("ended" if lease_id in s.ended else "lost")
        s = self.sessions[sid]
        cond = s.condition()

        def over() -> bool:
            return s.deleted or s.lease is None or s.lease[0] != lease_id

        async def watch() -> None:
            async with cond:
                await cond.wait_for(over)
        try:
            await asyncio.wait_for(watch(), watch_s)
        except asyncio.TimeoutError:
            return "held"
        if s.deleted:
            return "deleted"
        return "ended" if lease_id in s.ended else "lost"

    async def commit_turn(self, sid: str, lease_id: str | None, seq: int, update_id: str,
                          payload: bytes, meta: dict[str, Any], turn: dict[str, Any]) -> dict[str, Any]:
        """Apply the turn's new bank as update ``seq`` and release the lease. Idempotent.

        Fenced: once the session has been leased to another turn (this lease expired: its holder
        stopped renewing it), this turn's commit is refused with 409 ``lease_lost``, even if its seq
        would still fit. A retry of a commit that was applied is acknowledged as a duplicate."""
        return await self._commit(sid, lease_id, seq, update_id, payload, meta, turn, None)

    async def commit_tokens(self, sid: str, lease_id: str | None, seq: int, update_id: str, ids: list[int],
                            n_prompt: int, fingerprint: dict[str, Any] | None, meta: dict[str, Any],
                            turn: dict[str, Any], dtype: str | None = None) -> dict[str, Any]:
        """Like :meth:`commit_turn` for a turn that changed the state only by tokens: logs the turn's
        ``ids`` (the first ``n_prompt`` were the prompt, the rest generated), the ``fingerprint``
        of the state it left (``turn_log.state_fingerprint``) instead of the bank, and the ``dtype``
        it was decoded in (a replay runs in it; None: float32). Idempotent, fenced."""
        tokens = {"ids": [int(i) for i in ids], "n_prompt": int(n_prompt), "fp": fingerprint}
        if dtype is not None:
            tokens["dtype"] = str(dtype)
        return await self._commit(sid, lease_id, seq, update_id, None, meta, turn, tokens)

    async def _commit(self, sid, lease_id, seq, update_id, payload, meta, turn, tokens) -> dict[str, Any]:
        inc = lease_incarnation(lease_id)
        try:
            res = await self.apply_update(sid, seq, update_id, payload, meta, turn, tokens=tokens, inc=inc,
                                          fence=lease_id)
        except BaseException:
            if lease_id is not None:  # the turn failed at its commit: as a give-back (its session may go)
                try:
                    await self.abort_turn(sid, lease_id)
                except Exception:  # (storage down: the commit's own error says so; the lease went back)
                    pass
            raise
        s = self.sessions.get(sid)
        if s is not None and lease_id is not None:
            self._release(s, lease_id)
        await self._enforce_budget()  # now that the session is idle it may be offloaded too
        return res

    async def abort_turn(self, sid: str, lease_id: str) -> None:
        """Give back the lease of a turn that ends without a commit (it failed, or its client left).

        When that turn created the session and no turn was acknowledged in it (seq 0), the session
        is removed (a delete record, as DELETE logs it, but not remembered as the owner's delete):
        before, it stayed, empty, listed and counted against the owner's ``max_sessions_per_owner``,
        and a client retrying a failing first turn under fresh ids ran out of quota holding nothing.
        A session made by ``POST /v1/states`` (no turn made it) or one a turn was acknowledged in is
        never removed here; nor one whose creating turn's lease expired and went to another turn
        (that turn owns the session now). Idempotent: a retried give-back finds nothing to do."""
        s = self.sessions.get(sid)
        if s is None:
            return
        try:
            if s.made_by == lease_id and self._unused(s, lease_id):
                async with s.condition():
                    if self._unused(s, lease_id):
                        await self._log_delete(s, remember=False)
                        # set before the lock is let go: a turn that waited for the lease wakes to a
                        # deleted session, and creates it again if it may (begin_turn)
                        s.discarded = True
                await self.remove_stale_snapshots()
        finally:  # (a storage error: the lease goes back all the same)
            self._release(s, lease_id)

    @staticmethod
    def _unused(s: Session, lease_id: str) -> bool:
        """Whether ``s`` holds no acknowledged turn and is still leased by ``lease_id``."""
        return s.seq == 0 and not s.deleted and s.lease is not None and s.lease[0] == lease_id

    async def apply_update(self, sid: str, seq: int, update_id: str, payload: bytes | None,
                           meta: dict[str, Any], turn: dict[str, Any] | None = None,
                           compacted: bool = False, tokens: dict[str, Any] | None = None,
                           inc: str | None = None, fence: str | None = None) -> dict[str, Any]:
        """The ordered, idempotent update queue of a session. Returns once the update is durable.

        ``payload`` is a full state (a "put" record); with ``tokens`` (``{"ids", "n_prompt", "fp"}``,
        and ``"dtype"``) the update is a token turn instead (a "turn" record holding the ids, 4 bytes a
        token). ``inc``: the incarnation the update was computed on (None: whichever is live); 404
        when the session is another one now. ``fence``: the lease it was computed under; 409 when
        the session was leased to another request since (checked under the session's lock with the
        append: checked before it, a request could lease the session while this update waited for
        the lock). A restarted shard knows no lease (no grant): then the seq check alone decides."""
        self._start_manager()
        s = self._get(sid, None)
        if inc is not None and s.inc != inc:
            raise NotFound(f"state {sid!r} was deleted while this request ran (the id now names a new "
                           "session); nothing was saved", "state_not_found", "state_id")
        cond = s.condition()
        async with cond:
            if s.deleted:
                # deleted while this update waited for the lock (the delete holds it while its record is
                # appended, and takes a seq): before, the seq check below answered 409 update_too_old,
                # "if this request is a retry, its first delivery was saved", of a session that is gone
                raise NotFound(f"state {sid!r} was deleted while this request ran; nothing was saved",
                               "state_not_found", "state_id")
            duplicate = seq <= s.seq and self._was_applied(s, seq, update_id)
            if seq <= s.seq and not duplicate and not self._remembers(s, seq):
                # neither "saved" nor "not saved" can be proved: say so (before the fence check, whose
                # "not saved, retry it" would make a client send a saved turn a second time)
                self.counters["conflicts"] += 1
                raise Conflict(f"update seq {seq} of {sid!r} is older than the {self.cfg.max_history} updates "
                               f"whose ids this session keeps (it is at seq {s.seq}), so it cannot be told "
                               "apart from a retry: if this request is a retry, its first delivery was saved "
                               "(see the session's history); otherwise another update took that seq. Nothing "
                               "was changed", "update_too_old", "state_id")
            if fence is not None and s.grant is not None and s.grant != fence and not duplicate:
                self.counters["fenced"] += 1
                if compacted:
                    raise Conflict(f"state {sid!r} was taken over by a turn while it was being compacted; the turn "
                                   "went first and this compaction was not saved: ask for it again when the "
                                   "session is idle", "compaction_preempted", "state_id")
                raise Conflict(f"the lease of this turn on state {sid!r} expired and the state was leased to "
                               "another request; this turn was not saved, retry it", "lease_lost", "state_id")
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
                if duplicate:
                    self.counters["duplicates"] += 1
                    # a retry after a lost ack (e.g. the shard restarted): the first delivery wrote the
                    # record, this one writes nothing, but its ack has the same keys as a fresh one's
                    return {"seq": s.seq, "applied": False, "duplicate": True, "info": s.info(self.index),
                            "durable_bytes": 0, "record": "duplicate"}
                self.counters["conflicts"] += 1
                raise Conflict(f"state {sid!r} changed during this request (now at seq {s.seq}, this "
                               f"update was for seq {seq}); retry the request", "state_conflict", "state_id")
            header = {"op": "put", "sid": sid, "inc": s.inc, "owner": s.owner, "seq": seq, "at": time.time(),
                      "update_id": update_id, "meta": meta, "turn": turn, "compacted": compacted}
            if tokens is not None:
                payload = pack_ids(tokens["ids"])
                header.update(op="turn", n_prompt=tokens["n_prompt"], fp=tokens.get("fp"),
                              digest=chain_digest(s.digest, tokens["ids"], tokens["n_prompt"]))
                if tokens.get("dtype"):
                    header["dtype"] = tokens["dtype"]
            if turn is not None:
                turn.setdefault("seq", seq)
                turn.setdefault("at", header["at"])
                # the history keeps the update's id as long as it keeps the turn (max_history), so a
                # retry is recognised for that long, not only for the last 32 seqs of ``applied``
                turn["update_id"] = update_id
            def applied(record_bytes: int) -> None:
                self._apply_record(header, payload)
                self.counters["updates"] += 1
                self.counters["token_records" if tokens is not None else "state_records"] += 1
                self.counters["durable_bytes"] += record_bytes
                self._touch(s)
                cond.notify_all()
            record_bytes = await self._append(header, payload, applied)
            info = s.info(self.index)
        await self._maybe_checkpoint()
        await self._enforce_budget()
        return {"seq": seq, "applied": True, "duplicate": False, "info": info, "durable_bytes": record_bytes,
                "record": "tokens" if tokens is not None else "state"}

    @staticmethod
    def _was_applied(s: Session, seq: int, update_id: str) -> bool:
        """Whether update ``update_id`` was applied as ``seq`` (a retry): ``applied`` holds the last
        32 seqs' ids, the history (a turn's entry names its update) the last ``max_history`` turns."""
        if s.applied.get(seq) == update_id:
            return True
        return any(h.get("seq") == seq and h.get("update_id") == update_id for h in reversed(s.history))

    @staticmethod
    def _remembers(s: Session, seq: int) -> bool:
        """Whether the id of the update applied as ``seq`` is still known (see :meth:`_was_applied`)."""
        return seq in s.applied or any(h.get("seq") == seq and "update_id" in h for h in s.history)

    # ------------------------------------------------------------------ leases
    async def _acquire(self, s: Session, wait_s: float, ttl_s: float | None = None, preempt: bool = False) -> str:
        """Lease ``s`` (waiting up to ``wait_s`` for the holder); ``preempt``: take it over from a
        background compaction (``Session.background``), whose result is then fenced out."""
        cond = s.condition()
        deadline = time.monotonic() + wait_s
        async with cond:
            while s.leased() and not (preempt and s.background is not None and s.lease[0] == s.background):
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
            lease_id = f"{s.inc}.{uuid.uuid4().hex}"  # see lease_incarnation
            s.leased_at = time.monotonic()
            s.lease = (lease_id, s.leased_at + (ttl_s or self.cfg.lease_timeout_s))
            s.grant, s.background = lease_id, None
            return lease_id

    def _release(self, s: Session, lease_id: str) -> None:
        s.end_lease(lease_id)
        if s.lease is not None and s.lease[0] == lease_id:
            s.lease = None
            cond = s.condition()

            async def _notify():
                async with cond:
                    cond.notify_all()
            asyncio.get_running_loop().create_task(_notify())
