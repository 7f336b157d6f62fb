"""Session defects, round 2 (session 16), each reproduced on the real session store: a real shard (the
class Ray runs as the actor) on real files, in-process. Each test failed on the code before its fix.

* a compaction the owner asked for held the session's lease (up to ``lease_timeout_s``, 120 s) and the
  owner's own next turn waited, then got 503 state_busy;
* a damaged session whose owner is unknown was visible to, and deletable by, every owner; another
  owner's damaged session answered a create or turn on its id with its damage (500), not "taken";
* ids differing only in case shared one snapshot file on a storage that folds case (macOS, Windows);
* a retried save of a turn more than 32 updates old answered 409 instead of the duplicate ack.

Found while looking for more of the kind: the metrics any key reads named other owners' damaged
sessions; a session found damaged by a checkpoint kept every WAL epoch from then on.

The unreachable-shard listing (round 2, defect 1) needs several real shard actors: it is in
tests/test_session_defects_ray.py.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from serve.errors import APIError
from shard_helpers import commit_turn, local_shard, shard_config, turn_ids


async def _turn(shard, sid, owner, tag):
    return await commit_turn(shard, sid, await shard.begin_turn(sid, owner, False), tag)


def _tags(info) -> list[str]:
    return [t.get("tag") for t in info["history"] if t.get("kind") == "generate"]


def _slow_compaction(shard, seconds: float) -> asyncio.Event:
    """Make ``shard``'s compaction take ``seconds`` (it stands in for the CPU model's replay, minutes
    for a real model; its length is the point). Returns the event set when one starts."""
    started = asyncio.Event()

    def slow(payload, turns, merge, threshold):
        started.set()
        import time
        time.sleep(seconds)
        meta = {"tokens_seen": 1, "levels": []}
        return b"compacted " * 50, meta, meta, {}, 0, len(payload or b"")
    shard._compact_bytes = slow
    return started


# --------------------------------------------------------------------------- 2. user compaction
def test_the_owners_turn_takes_over_from_the_compaction_they_asked_for(tmp_path):
    """POST /v1/state/{id}/compact leases the session for the whole CPU replay (up to
    ``lease_timeout_s``). Round 1 let a turn take over from the memory manager's compaction only; the
    owner's own next turn waited ``lease_wait_s`` behind theirs and got 503 state_busy. Now the turn
    goes first, is saved, and the compaction says it was not saved and why (409
    compaction_preempted); asked for again on the idle session, it runs."""
    async def main():
        cfg = shard_config(tmp_path / "bank", lease_wait_s=0.3)
        shard = local_shard(cfg)
        await shard.create("s", "alice")
        await shard.apply_update("s", 1, "u-1", b"the bank " * 100, {"tokens_seen": 1}, {"kind": "generate"})
        started = _slow_compaction(shard, 1.0)
        compaction = asyncio.create_task(shard.compact("s", "alice"))
        await started.wait()
        lease = await shard.begin_turn("s", "alice", False)  # before the fix: 503 state_busy after 0.3 s
        assert lease["seq"] == 1
        with pytest.raises(APIError) as e:
            await compaction
        assert e.value.status == 409 and e.value.code == "compaction_preempted", e.value
        assert "not saved" in e.value.message
        await commit_turn(shard, "s", lease, "turn")
        bank = await shard.get_bank("s", "alice")
        assert bank["seq"] == 2 and bank["payload"] == b"the bank " * 100 and len(bank["turns"]) == 1
        started.clear()
        again = await shard.compact("s", "alice")  # the session is idle: the compaction is saved
        assert again["state"]["seq"] == 3
        assert (await shard.get_bank("s", "alice"))["payload"] == b"compacted " * 50
    asyncio.run(main())


# --------------------------------------------------------------------------- 3. owners of damaged sessions
def _damage_snapshot_header(cfg, sid: str) -> None:
    path = os.path.join(cfg.storage, "shard-0", "sessions", f"{sid}.snap")
    with open(path, "r+b") as f:
        f.truncate(10)  # the header (which named the owner) is gone


def test_a_damaged_session_whose_owner_is_unknown_is_nobodys(tmp_path):
    """Round 1 took the owner of a session with an unreadable snapshot header from its WAL records.
    Once a checkpoint has folded them away, nothing names the owner: the damaged session had owner
    "" and an empty owner matched every owner, so bob saw alice's damaged session (500 naming it),
    and could delete it. Now no owner sees it (404, as a missing one), creating or taking a turn
    on its id says "taken" (no damage detail), and the operator (owner None) sees it with a message
    that says why no key can and how to remove it."""
    async def main():
        cfg = shard_config(tmp_path / "bank")
        shard = local_shard(cfg)
        await shard.create("a", "alice")
        await shard.apply_update("a", 1, "u-1", b"alice's bank " * 100, {"tokens_seen": 1}, {"kind": "generate"})
        await shard.checkpoint()  # the session is in its snapshot; the WAL epochs naming it are dropped
        shard.store.close()
        _damage_snapshot_header(cfg, "a")
        again = local_shard(cfg)
        assert again.sessions["a"].damage and again.sessions["a"].owner == ""
        for owner in ("alice", "bob"):
            for call in (again.info("a", owner), again.delete("a", owner), again.get_bank("a", owner),
                         again.begin_turn("a", owner, False), again.compact("a", owner)):
                with pytest.raises(APIError) as e:
                    await call
                assert e.value.status == 404, (owner, e.value)  # before the fix: 500 naming it; a delete
            assert await again.list_sessions(owner) == []
            for call in (again.create("a", owner), again.begin_turn("a", owner, True)):
                with pytest.raises(APIError) as e:
                    await call
                assert e.value.code == "state_id_taken", e.value  # the router shows it as 404
        with pytest.raises(APIError) as e:
            await again.info("a", None)
        assert e.value.code == "state_damaged" and "owner is unknown" in e.value.message
        assert [s["state_id"] for s in await again.list_sessions(None)] == ["a"]
        assert (await again.delete("a", None))["deleted"]  # the operator's way out
        await again.create("a", "bob")  # the id is free again
    asyncio.run(main())


def test_another_owners_damaged_session_is_taken_not_shown(tmp_path):
    """bob creating (or starting a turn with create_state on) the id of alice's damaged session was
    answered with alice's damage (500 state_damaged, the id, the shard, the storage detail) instead
    of "this id is taken": the damage check came before the owner check."""
    async def main():
        cfg = shard_config(tmp_path / "bank")
        shard = local_shard(cfg)
        await shard.create("a", "alice")
        await shard.apply_update("a", 1, "u-1", b"alice's bank " * 100, {"tokens_seen": 1}, {"kind": "generate"})
        assert await shard.offload("a")
        shard.store.close()
        _damage_snapshot_header(cfg, "a")  # the WAL still names alice (round 1)
        again = local_shard(cfg)
        assert again.sessions["a"].owner == "alice" and again.sessions["a"].damage
        for call in (again.create("a", "bob"), again.begin_turn("a", "bob", True)):
            with pytest.raises(APIError) as e:
                await call
            assert e.value.code == "state_id_taken", e.value  # before the fix: state_damaged
        for call in (again.create("a", "alice"), again.begin_turn("a", "alice", True)):
            with pytest.raises(APIError) as e:
                await call
            assert e.value.code == "state_damaged" and "DELETE /v1/state/a" in e.value.message
    asyncio.run(main())


# --------------------------------------------------------------------------- 4. ids that differ in case
@pytest.fixture
def case_folding_storage():
    """An fsspec storage that folds case the way macOS (APFS) and Windows disks do: one file per name
    whatever its case, listed under the case it was created with. A stand-in: this machine's kernel
    has no case-folding filesystem to mount (no ext4 casefold, no vfat, tmpfs refuses ``casefold``)."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class CaseFoldingMemoryFS(MemoryFileSystem):
        protocol = ("cifold",)
        store: dict = {}
        pseudo_dirs = [""]

        @classmethod
        def _strip_protocol(cls, path):
            path = super()._strip_protocol(path)
            low = path.lower()
            for known in [*cls.store, *cls.pseudo_dirs]:  # an existing name in another case is that name
                if known.lower() == low:
                    return known
            return path

    fsspec.register_implementation("cifold", CaseFoldingMemoryFS, clobber=True)
    CaseFoldingMemoryFS.store.clear()
    CaseFoldingMemoryFS.pseudo_dirs[:] = [""]
    yield "cifold://bank"
    CaseFoldingMemoryFS.store.clear()


def test_ids_differing_in_case_are_two_sessions_on_a_case_folding_disk(tmp_path, case_folding_storage):
    """State ids are case-sensitive ([A-Za-z0-9_-]), and every layer treats them so (routing hashes
    the exact id), except one: a session's snapshot file was named ``<id>.snap``. On a disk that
    folds case ("Chat.snap" is "chat.snap") the second session's snapshot replaced the first's, which
    then failed to load (its file held another session: 500 state_damaged) or, after a restart, was
    gone from the listing. Now a name with capitals carries where they are (``Chat.1.snap``)."""
    async def main():
        cfg = shard_config(case_folding_storage)
        shard = local_shard(cfg)
        ids = ["Chat", "chat", "CHAT"]
        for sid in ids:
            await shard.create(sid, "alice")
            await shard.apply_update(sid, 1, f"u-{sid}", f"{sid}'s bank ".encode() * 100, {"tokens_seen": 1},
                                     {"kind": "generate"})
            assert await shard.offload(sid)  # its snapshot is written; its bank leaves memory
        for sid in ids:  # before the fix: StateDamaged ("snapshot file of 'Chat' holds session 'CHAT'")
            assert (await shard.get_bank(sid, "alice"))["payload"] == f"{sid}'s bank ".encode() * 100
        await shard.checkpoint()  # the snapshots alone hold the sessions now
        shard.store.close()
        again = local_shard(cfg)
        assert sorted(s["state_id"] for s in await again.list_sessions("alice")) == sorted(ids)
        for sid in ids:
            assert (await again.get_bank(sid, "alice"))["payload"] == f"{sid}'s bank ".encode() * 100
        await again.delete("chat", "alice")  # removes its own file only
        assert (await local_shard(cfg).get_bank("Chat", "alice"))["payload"] == b"Chat's bank " * 100
    asyncio.run(main())


def test_a_snapshot_under_its_old_name_is_still_loaded_and_moves_to_the_new_one(tmp_path):
    """Sessions saved before the new names (``Chat.snap``) load as they were, and their next
    snapshot takes the new name and removes the old file: nothing saved under the old scheme is lost."""
    async def main():
        cfg = shard_config(tmp_path / "bank")
        shard = local_shard(cfg)
        await shard.create("Chat", "alice")
        await shard.apply_update("Chat", 1, "u-1", b"old bank " * 100, {"tokens_seen": 1},
                                 {"kind": "generate", "tag": "old"})
        await shard.checkpoint()
        shard.store.close()
        sessions = os.path.join(cfg.storage, "shard-0", "sessions")
        os.rename(os.path.join(sessions, "Chat.1.snap"), os.path.join(sessions, "Chat.snap"))  # the old name
        again = local_shard(cfg)
        assert (await again.get_bank("Chat", "alice"))["payload"] == b"old bank " * 100
        await _turn(again, "Chat", "alice", "after")
        await again.checkpoint()
        again.store.close()
        assert sorted(os.listdir(sessions)) == ["Chat.1.snap"]
        third = local_shard(cfg)
        info = await third.info("Chat", "alice")
        assert info["seq"] == 2 and _tags(info) == ["old", "after"]
        assert (await third.get_bank("Chat", "alice"))["payload"] == b"old bank " * 100
    asyncio.run(main())


# --------------------------------------------------------------------------- 5. retries of old saves
@pytest.mark.parametrize("restart", [False, True])
def test_a_retried_save_older_than_32_updates_is_acknowledged_as_a_duplicate(tmp_path, restart):
    """A turn's save (``commit_tokens``) is retried when its ack was lost (Ray retries the call after
    the shard restarted, or the caller does). The shard recognised a retry by the update ids of the
    last 32 seqs only: a retry arriving after 32 more updates (other turns went on meanwhile) got 409
    (lease_lost, or state_conflict), telling the user a saved turn was not. The id is now kept with
    the turn in the session's history (``max_history`` turns, through restarts)."""
    async def main():
        cfg = shard_config(tmp_path / "bank")
        shard = local_shard(cfg)
        await shard.create("s", "alice")
        first = await shard.begin_turn("s", "alice", False)
        ack = await commit_turn(shard, "s", first, "first")
        for i in range(40):
            await _turn(shard, "s", "alice", f"t{i}")
        if restart:
            await shard.checkpoint()
            shard.store.close()
            shard = local_shard(cfg)
        retry = await commit_turn(shard, "s", first, "first")  # before the fix: 409 lease_lost
        assert retry["duplicate"] and not retry["applied"] and retry["info"]["seq"] == 41
        assert ack["seq"] == 1
        # the same seq with another update id is not a retry
        with pytest.raises(APIError) as e:
            await shard.commit_tokens("s", None, 1, "u-other", turn_ids("other"), 8, None, {}, {"kind": "generate"})
        assert e.value.code == "state_conflict"
        assert _tags(await shard.info("s", "alice")).count("first") == 1
    asyncio.run(main())


def test_a_save_too_old_to_tell_says_what_happened(tmp_path):
    """Past the history the shard keeps (``max_history``), a retry cannot be told from another update
    for that seq: the answer says so, and that a retry's first delivery was saved (a 409 saying "the
    state changed during this request, retry" would make a client send the turn a second time)."""
    async def main():
        cfg = shard_config(tmp_path / "bank", max_history=8)
        shard = local_shard(cfg)
        await shard.create("s", "alice")
        first = await shard.begin_turn("s", "alice", False)
        await commit_turn(shard, "s", first, "first")
        for i in range(40):
            await _turn(shard, "s", "alice", f"t{i}")
        with pytest.raises(APIError) as e:
            await commit_turn(shard, "s", first, "first")
        assert e.value.status == 409 and e.value.code == "update_too_old", e.value
        assert "first delivery was saved" in e.value.message and "Nothing was changed" in e.value.message
        assert (await shard.info("s", "alice"))["seq"] == 41
    asyncio.run(main())


# --------------------------------------------------------------------------- found while looking: stats
def test_the_metrics_every_key_reads_name_no_other_owners_session(tmp_path):
    """/research/metrics (and /ws/research), which any API key reads, carried every shard's stats
    whole, with its last 20 damage reports: each names a session id of any owner and what is
    damaged where. ``owner_view_stats`` (what that view now sends) keeps the counts, drops those."""
    from serve.sessions.client import owner_view_stats

    async def main():
        cfg = shard_config(tmp_path / "bank")
        shard = local_shard(cfg)
        await shard.create("alices-secret-project", "alice")
        await shard.apply_update("alices-secret-project", 1, "u-1", b"alice's bank " * 100, {"tokens_seen": 1},
                                 {"kind": "generate"})
        assert await shard.offload("alices-secret-project")
        shard.store.close()
        _damage_snapshot_header(cfg, "alices-secret-project")
        stats = await local_shard(cfg).stats()
        assert "alices-secret-project" in repr(stats)  # the operator's view names it
        view = owner_view_stats([stats])
        assert "alices-secret-project" not in repr(view)  # before: in every key's /research/metrics
        assert view[0]["damaged_sessions"] == 1 and view[0]["sessions"] == 1
    asyncio.run(main())


# --------------------------------------------------------------------------- found while looking: WAL growth
def test_a_session_found_damaged_by_a_checkpoint_does_not_keep_the_wal_forever(tmp_path):
    """An offloaded session that took token turns (a replica held its state) is loaded by the next
    checkpoint to be snapshotted; when its stored bank turns out damaged, the session is marked
    damaged (a marker snapshot holding the verdict and its turns), but its snapshot seq stayed behind,
    so every later checkpoint kept every old WAL epoch: the log grew without bound, and each restart
    replayed all of it (the marker written at start-up already counted as the snapshot)."""
    async def main():
        cfg = shard_config(tmp_path / "bank")
        shard = local_shard(cfg)
        for sid in ("a", "b"):
            await shard.create(sid, "alice")
            await shard.apply_update(sid, 1, f"u-{sid}", f"{sid}'s bank ".encode() * 100, {"tokens_seen": 1},
                                     {"kind": "generate"})
            assert await shard.offload(sid)
        s = shard.sessions["a"]
        lease = await shard.begin_turn("a", "alice", False, {"inc": s.inc, "seq": 1, "digest": s.digest})
        assert not lease["base"]
        await commit_turn(shard, "a", lease, "resident")  # a token record; the bank stays offloaded
        path = os.path.join(cfg.storage, "shard-0", "sessions", "a.snap")
        with open(path, "r+b") as f:  # a byte of the stored bank flips
            f.seek(-20, 2)
            b = f.read(1)
            f.seek(-20, 2)
            f.write(bytes([b[0] ^ 0x10]))
        await shard.checkpoint()  # finds the damage while loading "a" to snapshot it
        assert shard.sessions["a"].damage
        for i in range(3):
            await _turn(shard, "b", "alice", f"b{i}")
            await shard.checkpoint()
        assert len(shard.store.epochs()) == 1  # before the fix: 5, one more per checkpoint
        shard.store.close()
        again = local_shard(cfg)
        with pytest.raises(APIError) as e:
            await again.info("a", "alice")
        assert e.value.code == "state_damaged"  # the verdict outlived the WAL it was found in
        assert _tags(await again.info("b", "alice"))[-3:] == ["b0", "b1", "b2"]
    asyncio.run(main())


# --------------------------------------------------------------------------- found while looking: stuck turns
def test_a_stuck_turn_does_not_hold_its_session_forever(tmp_path):
    """A turn's holder renews its lease every ``lease_ttl_s / 4`` for as long as its process lives
    (``BankClient.keep_lease``). A turn whose decode hung while that process lived kept renewing: the
    session stayed busy (503 state_busy for every other request on it) forever, though
    ``lease_timeout_s`` was documented as the cap of a renewed lease. Renewals now stop there; a
    request waiting for the session then gets it, and the stuck turn, if it ever ends, is refused."""
    async def main():
        cfg = shard_config(tmp_path / "bank", lease_ttl_s=0.2, lease_timeout_s=0.6, lease_wait_s=0.1)
        shard = local_shard(cfg)
        await shard.create("s", "alice")
        stuck = await shard.begin_turn("s", "alice", False)
        renewed = []

        async def keeper():  # what BankClient.keep_lease does, at ttl / 4
            while True:
                await asyncio.sleep(0.05)
                ok = await shard.renew_lease("s", stuck["lease_id"])
                renewed.append(ok)
                if not ok:
                    return
        keep = asyncio.create_task(keeper())
        await asyncio.sleep(0.3)
        with pytest.raises(APIError) as e:  # the turn is young: the session is its own
            await shard.begin_turn("s", "alice", False)
        assert e.value.code == "state_busy"
        await asyncio.wait_for(keep, 2.0)  # before the fix: renewed forever (a timeout here)
        assert renewed[-1] is False and all(renewed[:-1])
        await asyncio.sleep(0.3)  # the last renewal's ttl runs out
        live = await shard.begin_turn("s", "alice", False)
        await commit_turn(shard, "s", live, "live")
        with pytest.raises(APIError) as e:
            await commit_turn(shard, "s", stuck, "stuck")
        assert e.value.code == "lease_lost"
        assert _tags(await shard.info("s", "alice")) == ["live"]
    asyncio.run(main())


def test_an_old_named_snapshot_survives_the_lower_case_id_on_a_case_folding_disk(case_folding_storage):
    """On a disk that folds case, the old name of "Chat" (``Chat.snap``) is the new name of "chat"
    (``chat.snap``): the first snapshot of a new "chat" would overwrite the only copy of "Chat".
    Old names are moved to new ones when the shard starts, before anything can write there."""
    import fsspec

    async def main():
        cfg = shard_config(case_folding_storage)
        shard = local_shard(cfg)
        await shard.create("Chat", "alice")
        await shard.apply_update("Chat", 1, "u-1", b"old bank " * 100, {"tokens_seen": 1}, {"kind": "generate"})
        await shard.checkpoint()
        shard.store.close()
        fs, root = fsspec.core.url_to_fs(cfg.shard_uri(0))
        fs.mv(f"{root}/sessions/Chat.1.snap", f"{root}/sessions/Chat.snap")  # what the old code wrote
        again = local_shard(cfg)
        await again.create("chat", "alice")
        await again.apply_update("chat", 1, "u-2", b"new bank " * 100, {"tokens_seen": 1}, {"kind": "generate"})
        assert await again.offload("chat")  # writes chat.snap: the old name of "Chat" on this disk
        await again.checkpoint()
        again.store.close()
        third = local_shard(cfg)
        assert (await third.get_bank("Chat", "alice"))["payload"] == b"old bank " * 100
        assert (await third.get_bank("chat", "alice"))["payload"] == b"new bank " * 100
    asyncio.run(main())


# --------------------------------------------------------------------------- 1. listing (in-process part)
def test_a_listing_with_no_shard_answering_is_503_not_empty(tmp_path):
    """The listing names shards that cannot answer instead of failing (the Ray test shows it with
    two shards); when none answers, an empty 200 would tell the owner they have no sessions: 503."""
    from serve.sessions import LocalBankClient

    async def main():
        root = tmp_path / "bank"
        root.mkdir()
        (root / "shard-0").write_text("not a directory")  # its storage cannot be opened, for real
        client = LocalBankClient(local_shard(shard_config(root)))
        with pytest.raises(APIError) as e:
            await client.list_reachable("alice")
        assert e.value.status == 503 and e.value.code == "storage_unavailable"
        assert [s["shard"] for s in await client.stats()] == [0]  # stats still answer (its storage_error)
    asyncio.run(main())


# --------------------------------------------------------------------------- found while looking: retried deletes
def test_a_retried_delete_is_acknowledged(tmp_path):
    """Ray retries a shard call whose actor died before answering (``max_task_retries=-1``). A delete
    that was durable (its WAL record written) is replayed by the restarted shard, so its retry met no
    session and answered 404 "not found": the user was told the delete had not happened. A recent
    delete of the same owner is now acknowledged again; another owner, or an id never created,
    still gets 404, and an id created again is that new session."""
    async def main():
        cfg = shard_config(tmp_path / "bank")
        shard = local_shard(cfg)
        await shard.create("s", "alice")
        await _turn(shard, "s", "alice", "t")
        assert (await shard.delete("s", "alice"))["deleted"]
        shard.store.close()
        again = local_shard(cfg)  # the actor restarted after the delete was durable
        assert (await again.delete("s", "alice"))["deleted"]  # the retry; before the fix: 404
        for sid, owner in (("s", "bob"), ("never", "alice")):
            with pytest.raises(APIError) as e:
                await again.delete(sid, owner)
            assert e.value.status == 404
        await again.create("s", "bob")  # the id is taken again: a delete is about the new session
        with pytest.raises(APIError) as e:
            await again.delete("s", "alice")
        assert e.value.status == 404
        assert (await again.info("s", "bob"))["seq"] == 0
    asyncio.run(main())


def test_where_old_names_already_collided_the_surviving_session_is_found(case_folding_storage):
    """On a disk that folds case the old names could already have collided: ``Chat.snap`` (listed
    with the case it was made in) holding the snapshot of "chat", which overwrote it. That file was
    listed as "Chat" only, so "chat" was never restored. Now the id the file holds is listed too;
    "Chat", whose snapshot was overwritten, is reported damaged (nothing guessed)."""
    import fsspec

    async def main():
        cfg = shard_config(case_folding_storage)
        shard = local_shard(cfg)
        await shard.create("chat", "alice")
        await shard.apply_update("chat", 1, "u-1", b"chat's bank " * 100, {"tokens_seen": 1}, {"kind": "generate"})
        await shard.checkpoint()
        shard.store.close()
        fs, root = fsspec.core.url_to_fs(cfg.shard_uri(0))
        data = fs.cat_file(f"{root}/sessions/chat.snap")
        fs.rm(f"{root}/sessions/chat.snap")
        fs.pipe_file(f"{root}/sessions/Chat.snap", data)  # "Chat" made the file; "chat" overwrote it
        again = local_shard(cfg)
        assert (await again.get_bank("chat", "alice"))["payload"] == b"chat's bank " * 100  # before: 404
        with pytest.raises(APIError) as e:
            await again.info("Chat", None)
        assert e.value.code == "state_damaged" and "holds session 'chat'" in e.value.message
    asyncio.run(main())
