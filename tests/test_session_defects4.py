"""Session defects of round 4 (session 19), each reproduced on the real session store: a real shard
(the class Ray runs as the actor) on real files, in-process, or real Ray actors where Ray's own
behaviour is the cause. Each test failed on the code before its fix.

* a turn's save that met a DELETE of its session (waiting for the session's lock while the delete
  was logged) answered 409 ``update_too_old``, "if this request is a retry, its first delivery
  was saved", of a turn that was not saved, in a session that was gone;
* a save cancelled while its record was being written (Serve cancels a request whose client left,
  and Ray cancels every call that request made, the shard's included) left the record in the WAL
  but not in the shard's memory: the next turn took the same seq, and after a restart the cancelled
  turn replaced the acknowledged one (and a DELETE cancelled so stayed live until a restart);
* a snapshot write cancelled so (offloads and checkpoints run at the end of saves) went on in its
  thread after the snapshot lock was let go: a DELETE removed the file before the write put it back,
  and once a checkpoint folded the WAL the deleted session came back at the next restart;
* after a shard restart, a renewal of a turn's lease delivered after the turn's commit or give-back
  took the session back for the finished turn (busy for ``lease_ttl_s``);
* a turn's lease give-back, made while its cancelled request unwound, was cancelled by Ray with it,
  and the session stayed busy for ``lease_ttl_s`` (here made to fail the way Ray fails it; the Ray
  test shows it with real actors).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from serve.errors import APIError
from shard_helpers import commit_turn, local_shard, shard_config


def _tags(info) -> list[str]:
    return [t.get("tag") for t in info["history"] if t.get("kind") == "generate"]


async def _settle(task: asyncio.Task) -> None:
    """Let ``task`` run until it waits on something other than the event loop (a lock, a thread)."""
    for _ in range(5):
        await asyncio.sleep(0)
    assert not task.done()


# --------------------------------------------------------------------------- delete vs. a save
def test_a_save_that_meets_a_delete_is_told_the_session_is_gone(tmp_path):
    """alice's turn is leased; she deletes the session and the turn's save arrives while the delete
    is being logged (it holds the session's lock, and takes the next seq). The save must answer 404
    "deleted ... nothing was saved", not 409 ``update_too_old`` (which tells a client its turn may
    have been saved), and nothing of it may come back, live or after a restart."""
    async def main():
        cfg = shard_config(tmp_path / "bank")
        shard = local_shard(cfg)
        await shard.create("s", "alice")
        await commit_turn(shard, "s", await shard.begin_turn("s", "alice", False), "kept")
        lease = await shard.begin_turn("s", "alice", False)
        deleting = asyncio.ensure_future(shard.delete("s", "alice"))
        await _settle(deleting)  # in the middle of logging the delete, under the session's lock
        with pytest.raises(APIError) as e:
            await commit_turn(shard, "s", lease, "late")
        assert (e.value.status, e.value.code) == (404, "state_not_found"), e.value
        assert "nothing was saved" in e.value.message
        assert await deleting == {"state_id": "s", "deleted": True}
        assert await shard.list_sessions("alice") == []
        shard.store.close()
        assert await local_shard(cfg).list_sessions("alice") == []
    asyncio.run(main())


# --------------------------------------------------------------------------- cancelled writes
@pytest.fixture
def slow_appends():
    """Make a shard's WAL appends take ``seconds`` (a slow disk): the write itself is real, and runs
    on in its thread when the coroutine awaiting it is cancelled, as a real one does."""
    def slow(shard, seconds: float):
        real = shard.store.append

        def append(header, payload):
            time.sleep(seconds)
            return real(header, payload)
        shard.store.append = append
        return lambda: setattr(shard.store, "append", real)
    return slow


def test_a_save_cancelled_mid_write_never_replaces_the_acknowledged_turn(tmp_path, slow_appends):
    """A turn's save is cancelled (its request was: Ray cancels the calls of a cancelled request,
    the shard's too) while its record is written. Before the fix the record landed in the WAL but
    not in memory: the session stayed at its seq, the next turn was acknowledged at the same seq,
    and a restarted shard replayed the cancelled turn instead of it (an acknowledged turn lost, one
    nobody saw in its place). Now the cancelled save is kept whole (it is durable): the next turn
    comes after it, live and after a restart."""
    async def main():
        cfg = shard_config(tmp_path / "bank")
        shard = local_shard(cfg)
        await shard.create("s", "alice")
        lease = await shard.begin_turn("s", "alice", False)
        restore = slow_appends(shard, 0.3)
        saving = asyncio.ensure_future(commit_turn(shard, "s", lease, "cancelled"))
        await asyncio.sleep(0.1)  # the record is being written
        saving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await saving
        restore()
        assert shard.sessions["s"].seq == 1  # what the WAL holds
        ack = await commit_turn(shard, "s", await shard.begin_turn("s", "alice", False), "acknowledged")
        assert ack["applied"] and ack["info"]["seq"] == 2
        ack = await commit_turn(shard, "s", await shard.begin_turn("s", "alice", False), "after")
        live = await shard.info("s", "alice")
        assert _tags(live) == ["cancelled", "acknowledged", "after"]
        shard.store.close()
        again = await local_shard(cfg).info("s", "alice")
        assert _tags(again) == _tags(live) and again["digest"] == live["digest"] == ack["info"]["digest"]
    asyncio.run(main())


def test_a_delete_cancelled_mid_write_stays_deleted(tmp_path, slow_appends):
    """The same for DELETE (its client left while the delete record was written): the delete is
    durable, so the session is gone live too, and its id can be created afresh; before, the live
    shard kept serving it until a restart made it vanish (with every turn taken meanwhile)."""
    async def main():
        cfg = shard_config(tmp_path / "bank")
        shard = local_shard(cfg)
        await shard.create("s", "alice")
        await commit_turn(shard, "s", await shard.begin_turn("s", "alice", False), "before")
        restore = slow_appends(shard, 0.3)
        deleting = asyncio.ensure_future(shard.delete("s", "alice"))
        await asyncio.sleep(0.1)
        deleting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await deleting
        restore()
        assert await shard.list_sessions("alice") == []
        with pytest.raises(APIError) as e:
            await shard.begin_turn("s", "alice", False)
        assert e.value.status == 404
        await shard.delete("s", "alice")  # a retry of the delete is acknowledged
        shard.store.close()
        again = local_shard(cfg)
        assert await again.list_sessions("alice") == []
        assert (await again.create("s", "alice"))["seq"] == 0  # a fresh session under the id
    asyncio.run(main())


# --------------------------------------------------------------------------- cancelled turns
@pytest.mark.parametrize("cancelled_twice", [False, True])
def test_a_give_back_cancelled_by_ray_is_retried(tmp_path, cancelled_twice):
    """A turn that ends uncommitted gives its lease back (``abort_turn``). Its request was cancelled
    by Serve with ``ray.cancel``, which cancels that request's calls recursively, the give-back made
    while it unwinds among them when it loses that race (tests/test_session_defects4_ray.py shows
    it with real actors, where it loses some rounds; here the first give-back fails the way Ray
    fails it, every time). That failure was ignored: the session stayed busy for ``lease_ttl_s``.
    Now the give-back is retried, and the session is free at once; also when the request is
    cancelled a second time while its first give-back is in flight (Serve's proxy and the ingress
    both cancel a stream whose client left): that give-back then failed after its caller was gone.
    """
    from ray.exceptions import TaskCancelledError

    from serve.modeling import ModelSpec, load_model
    from serve.sessions import LocalBankClient
    from serve.sessions.turns import SessionTurns

    class CancelledGiveBack(LocalBankClient):
        """The real shard, but the first ``abort_turn`` fails as a call Ray cancelled does."""

        failed = 0

        async def on_shard(self, i, method, *args, **kwargs):
            if method == "abort_turn" and not self.failed:
                self.failed += 1
                await asyncio.sleep(0.1)  # in flight
                raise TaskCancelledError()
            return await super().on_shard(i, method, *args, **kwargs)

    async def run_here(fn, *args):
        return fn(*args)

    async def main():
        shard = local_shard(shard_config(tmp_path / "bank", lease_ttl_s=30.0, lease_wait_s=0.5))
        bank = CancelledGiveBack(shard)
        turns = SessionTurns(load_model(ModelSpec(preset="tiny", seed=0), "cpu").model, bank, run_here)
        await shard.create("s", "alice")  # (a session its failed turn created would go with it: defects5)
        turn = await turns.begin("s", "alice", True)
        decoding = asyncio.ensure_future(asyncio.sleep(3600))

        async def request():
            try:
                await decoding
            finally:
                await turns.end(turn)
        req = asyncio.ensure_future(request())
        await asyncio.sleep(0)
        req.cancel()  # the client left
        if cancelled_twice:
            await asyncio.sleep(0.05)  # the first give-back is in flight
            req.cancel()
        with pytest.raises(asyncio.CancelledError):
            await req
        await asyncio.sleep(0.1)
        assert bank.failed == 1
        t = time.perf_counter()
        lease = await shard.begin_turn("s", "alice", False)  # before the fix: 503 state_busy after 0.5 s
        assert time.perf_counter() - t < 0.4
        await shard.abort_turn("s", lease["lease_id"])
    asyncio.run(main())


def test_a_snapshot_write_cancelled_midway_cannot_bring_a_deleted_session_back(tmp_path):
    """Offloads and checkpoints write snapshots from request paths too (a save ends by enforcing the
    memory budget, a large WAL by a checkpoint), so Ray's cancellation reaches them. The write went
    on in its thread, but the snapshot lock was let go at once: a DELETE of that session then
    removed its snapshot file before the write put it back; a checkpoint folded the WAL (with the
    delete record), and after a restart the deleted session was back. Now a cancelled snapshot
    write is waited for under the lock, and the delete removes what it wrote."""
    async def main():
        cfg = shard_config(tmp_path / "bank")
        shard = local_shard(cfg)
        await shard.create("x", "alice")
        lease = await shard.begin_turn("x", "alice", False)
        await shard.commit_turn("x", lease["lease_id"], 1, "u-x", b"x's bank " * 100, {"tokens_seen": 9},
                                {"kind": "generate", "tag": "x"})
        real = shard.store.write_snapshot

        def slow_write(sid, header, payload):
            time.sleep(0.3)  # a slow disk
            return real(sid, header, payload)
        shard.store.write_snapshot = slow_write
        offloading = asyncio.ensure_future(shard.offload("x"))  # (what a cancelled save's budget pass runs)
        await asyncio.sleep(0.1)
        offloading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await offloading
        await shard.delete("x", "alice")
        await asyncio.sleep(0.4)  # the write's thread has ended either way
        shard.store.write_snapshot = real
        await shard.checkpoint()  # folds the WAL epochs once no deleted session's snapshot is left
        shard.store.close()
        assert await local_shard(cfg).list_sessions("alice") == []
    asyncio.run(main())


# --------------------------------------------------------------------------- late renewals
@pytest.mark.parametrize("how", ["commit", "give_back"])
def test_a_late_renewal_does_not_take_back_a_finished_turn_after_a_shard_restart(tmp_path, how):
    """A shard that restarted knows no lease, so a renewal takes its lease back (round 1: the turn
    in flight keeps its session). A turn's holder renews every ``lease_ttl_s / 4`` until the turn
    ends; a renewal sent just before the turn's commit (or give-back) and delivered after it took
    the session back for a turn that was over: it stayed busy for ``lease_ttl_s`` (the holder had
    stopped renewing), and the user's next turn waited that long."""
    async def main():
        cfg = shard_config(tmp_path / "bank", lease_ttl_s=30.0, lease_wait_s=0.5)
        shard = local_shard(cfg)
        await shard.create("s", "alice")
        lease = await shard.begin_turn("s", "alice", False)
        shard.store.close()
        shard = local_shard(cfg)  # restarted mid-turn: it forgot the lease
        if how == "commit":
            await commit_turn(shard, "s", lease, "t1")
        else:
            await shard.abort_turn("s", lease["lease_id"])
        assert not await shard.renew_lease("s", lease["lease_id"])  # the late renewal
        nxt = await shard.begin_turn("s", "alice", False)  # before the fix: 503 state_busy
        await commit_turn(shard, "s", nxt, "t2")
        assert _tags(await shard.info("s", "alice")) == (["t1", "t2"] if how == "commit" else ["t2"])
    asyncio.run(main())
