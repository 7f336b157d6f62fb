"""A session turn as the Generator runs it (issue 14): lease the session, hold its state (resident,
or rebuilt from the shard's last full state and token turns), and commit what the turn changed.

* :meth:`SessionTurns.begin` leases the session from its shard, offering the replica's resident copy
  (:mod:`.resident`). The shard says whether that copy is current, needs a few token turns replayed
  (another replica served them), or is stale (then the last full state comes back, and the turns
  after it are replayed: :func:`.turn_log.rebuild_state`).
* :meth:`SessionTurns.commit` logs the turn's tokens and the fingerprint of the state they left
  (``commit_tokens``: a few KiB for a short turn), or the full state when a snapshot is due
  (``BankConfig.snapshot_due``). The turn is answered after the shard acknowledged the record,
  which it does only once the record is fsynced. The state then stays resident.
* Every turn is decoded in the replica's serving dtype and its record names it; turns recorded in
  another dtype (before the server's dtype changed) replay in theirs (:class:`.turn_log.ReplayModels`),
  and the state is then cast to the serving dtype, as it would be loaded from a full state.
* :meth:`SessionTurns.end` releases the lease of a turn that was not committed and never keeps its
  state (the decoder changed it in place); a session that turn created, with no turn acknowledged
  in it, goes with it (the shard's ``abort_turn``).
* While a turn runs, its lease keeper (``BankClient.keep_lease``) learns at once when the session is
  deleted: :meth:`Turn.deleted`, and the Generator takes the turn's row out of the batch.

The model work runs through ``run(fn, *args)`` (the Generator's model thread); the shard calls go
through ``bank`` (a :class:`~.client.BankClient`, or :class:`~.client.LocalBankClient` in-process).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

from ..errors import NotFound, StateDamaged
from .resident import ResidentState, ResidentStates
from .turn_log import ReplayMismatch, ReplayModels, rebuild_state, replay_turns, state_fingerprint, state_nbytes

logger = logging.getLogger("serve.sessions")


@dataclass
class Turn:
    """One leased turn: the session's state to decode in, and the lease it commits under."""

    sid: str
    lease: dict[str, Any]
    state: Any
    keeper: asyncio.Task | None = None
    source: str = "loaded"  # "resident" | "replayed" | "loaded": where the state came from
    ack: dict[str, Any] | None = field(default=None)

    def deleted(self) -> bool:
        """Whether the session was deleted while this turn ran (its lease keeper says so: the
        shard refuses the commit, so the decode may stop; :func:`deleted_midway` is the error)."""
        k = self.keeper
        return k is not None and k.done() and not k.cancelled() and k.exception() is None and k.result() == "deleted"


def deleted_midway(sid: str) -> NotFound:
    """The in-band 404 of a turn whose session was deleted while it ran (the shard's own words)."""
    return NotFound(f"state {sid!r} was deleted while this request ran; nothing was saved", "state_not_found",
                    "state_id")


def _damaged(sid: str, e: ReplayMismatch) -> StateDamaged:
    return StateDamaged(f"state {sid!r} cannot be rebuilt as acknowledged: {e}. Nothing was guessed; DELETE "
                        f"/v1/state/{sid} removes it", "state_damaged", "state_id")


def state_of(models, sid: str, bank: dict[str, Any], dtype: str | None = None):
    """The state of a ``get_bank`` answer (on the model thread) in ``dtype`` (None: the served
    model's, ``models.default``); 500 ``state_damaged`` naming the session when a token turn does not
    replay to its acknowledged state. ``models``: :class:`ReplayModels` or one model."""
    models = ReplayModels.of(models)
    try:
        return rebuild_state(models, bank["payload"], bank.get("turns") or [], dtype=dtype or models.default)
    except ReplayMismatch as e:
        raise _damaged(sid, e) from None


class SessionTurns:
    """Session turns of one Generator replica (see the module docstring). ``model`` is the served
    model (its dtype is the serving dtype); ``models`` the replay models holding it (default: that
    model alone, which cannot replay turns recorded in another dtype)."""

    def __init__(self, model, bank, run: Callable[..., Awaitable], budget_bytes: int | None = None,
                 models: ReplayModels | None = None):
        from ..modeling import dtype_name

        self.model = model
        self.dtype = dtype_name(model)
        self.models = models or ReplayModels.of(model)
        self.bank = bank
        self.cfg = bank.cfg
        self.run = run
        self._orphans: set[asyncio.Task] = set()  # lease give-backs of cancelled turns (see _lease)
        self.resident = ResidentStates(self.cfg.resident_budget_bytes if budget_bytes is None else budget_bytes)
        self.counters = {"turns_resident": 0, "turns_replayed": 0, "turns_loaded": 0, "turn_records_tokens": 0,
                         "turn_records_state": 0, "turn_durable_bytes": 0, "turn_replay_mismatches": 0}

    async def begin(self, sid: str, owner: str, create: bool) -> Turn:
        mine = self.resident.take(sid)  # the turn owns it now; it comes back only when committed
        lease = await self._lease(sid, owner, create, mine.have() if mine else None)
        keeper = self.bank.start_keep_lease(sid, lease)  # the lease lives as long as this turn
        try:
            if lease["base"]:
                state = await self.run(rebuild_state, self.models, lease["payload"], lease["turns"], True,
                                       self.dtype)
                source = "loaded"
            else:
                state = mine.state
                if lease["turns"]:  # another replica served these turns: replay them onto our copy
                    state = await self.run(replay_turns, self.models, state, lease["turns"], True, self.dtype)
                source = "replayed" if lease["turns"] else "resident"
        except BaseException as e:
            keeper.cancel()
            await self._abort(sid, lease)
            if isinstance(e, ReplayMismatch):
                self.counters["turn_replay_mismatches"] += 1
                logger.error("session %s: %s", sid, e)
                raise _damaged(sid, e) from None
            raise
        self.counters[f"turns_{source}"] += 1
        return Turn(sid, lease, state, keeper, source)

    async def _lease(self, sid: str, owner: str, create: bool, have: dict[str, Any] | None) -> dict[str, Any]:
        """``begin_turn`` on the shard. Cancelling the caller does not cancel a call to a Ray actor: a
        turn cancelled while it waits for its session (another turn holds it) would leave the shard
        granting the lease to nobody, the session busy for a whole ``lease_ttl_s``. So a lease granted
        after the turn was cancelled is given back."""
        call = asyncio.ensure_future(self.bank.call(sid, "begin_turn", owner, create, have))
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            def give_back(done: asyncio.Future) -> None:
                if not done.cancelled() and done.exception() is None:
                    task = asyncio.ensure_future(self._abort(sid, done.result()))
                    self._orphans.add(task)  # a strong reference until it ran
                    task.add_done_callback(self._orphans.discard)
            call.add_done_callback(give_back)
            raise

    async def commit(self, turn: Turn, update_id: str, prompt_ids: Sequence[int], new_ids: Sequence[int],
                     info: dict[str, Any]) -> dict[str, Any]:
        """Make the turn durable as update ``seq + 1``: its tokens (``prompt_ids`` then ``new_ids``, all
        of them fed into the state), or the full state when a snapshot is due. ``info`` is the turn's
        history entry (``tokens_seen`` is added). Returns the shard's answer (``info``,
        ``durable_bytes``, ``record``) once the record is durable."""
        from ..modeling import state_meta, state_to_bytes

        lease, sid, state = turn.lease, turn.sid, turn.state
        ids = [int(i) for i in prompt_ids] + [int(i) for i in new_ids]
        seq = lease["seq"] + 1
        full = self.cfg.snapshot_due(lease["tail_turns"], lease["tail_tokens"], len(ids))

        def describe():  # on the model thread
            body = state_to_bytes(state) if full else state_fingerprint(state)
            return state_meta(state), body, state_nbytes(state)
        meta, body, nbytes = await self.run(describe)
        info = {**info, "tokens_seen": meta["tokens_seen"], "dtype": self.dtype}
        if full:  # the full state's bytes keep its dtype
            ack = await self.bank.call(sid, "commit_turn", lease["lease_id"], seq, update_id, body, meta, info)
        else:
            ack = await self.bank.call(sid, "commit_tokens", lease["lease_id"], seq, update_id, ids,
                                       len(prompt_ids), body, meta, info, self.dtype)
        turn.ack = ack
        kind = ack.get("record", "state")
        self.counters[f"turn_records_{kind}"] += 1
        self.counters["turn_durable_bytes"] += int(ack.get("durable_bytes", 0))
        if ack["info"]["seq"] == seq:
            self.resident.put(sid, ResidentState(turn.state, lease["inc"], seq, ack["info"]["digest"], nbytes))
        return ack

    async def end(self, turn: Turn) -> None:
        """Stop renewing the lease; release it when the turn was not committed."""
        if turn.keeper is not None:
            turn.keeper.cancel()
        if turn.ack is None:
            await self._abort(turn.sid, turn.lease)

    GIVE_BACK_RETRY_S = (0.05, 1.0)
    """First delay and cap (s, doubling) of the retries of a lease give-back that failed."""

    async def _abort(self, sid: str, lease: dict[str, Any]) -> None:
        """Give the turn's lease back (``abort_turn``); returns after the first try. A turn ends
        uncommitted mostly because its request was cancelled (its client left), and Serve cancels a
        request with ``ray.cancel``, which also cancels, recursively, the calls the request made:
        the give-back made while it unwinds among them when it loses that race (and always when the
        request is cancelled a second time meanwhile). Before, that failure was ignored and the
        session stayed busy for ``lease_ttl_s``; now the give-back is retried in a task of its own
        until it is done or the lease has expired anyway."""
        tried = asyncio.Event()
        task = asyncio.ensure_future(self._give_back(sid, lease, tried))
        self._orphans.add(task)  # a strong reference until it ran
        task.add_done_callback(self._orphans.discard)
        await tried.wait()  # a cancellation here leaves the give-back running

    async def _give_back(self, sid: str, lease: dict[str, Any], tried: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        until = loop.time() + float(lease.get("lease_ttl_s") or self.cfg.lease_ttl_s)
        delay, cap = self.GIVE_BACK_RETRY_S
        while True:
            try:
                await self.bank.call(sid, "abort_turn", lease["lease_id"])
                return
            except Exception as e:  # Ray's TaskCancelledError, or the shard unreachable for now
                logger.info("session %s: giving the lease back failed (%s); retrying", sid, type(e).__name__)
            finally:
                tried.set()
            if loop.time() + delay >= until:
                return
            await asyncio.sleep(delay)
            delay = min(cap, delay * 2)

    def stats(self) -> dict[str, int]:
        return {**self.counters, **self.resident.stats()}
