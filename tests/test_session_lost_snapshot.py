"""A session whose acknowledged token turns outlive the state they apply to (session 18).

A token turn (issue 14) is logged as its tokens only and replayed on top of the session's last full
state, which after a WAL checkpoint lives only in the session's snapshot file. When that file is lost
(a disk or bucket that lost it, an operator's cleanup) or rolled back to an older copy, restarting the
shard dropped the turns silently: the session answered 404 "not found", as if it had never existed, or
came back without the turns in between. Damage is reported, never guessed over: the session is
damaged now (500 ``state_damaged`` naming what is missing; DELETE removes it) and the shard's damage
report says so. Real shard, real files, in-process (``shard_helpers``)."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest

from serve.errors import APIError
from shard_helpers import commit_turn, local_shard, shard_config


async def _turn(shard, sid, owner, tag):
    return await commit_turn(shard, sid, await shard.begin_turn(sid, owner, False), tag)


async def _session_with_turns(shard) -> None:
    """``s`` of alice: a full state (seq 1), a token turn (2), a checkpoint (the snapshot holds seq 2
    and the WAL's older records go), then two token turns (3, 4) that only the WAL holds."""
    await shard.create("s", "alice")
    await shard.apply_update("s", 1, "u-1", b"the bank " * 100, {"tokens_seen": 1}, {"kind": "generate"})
    await _turn(shard, "s", "alice", "t1")
    await shard.checkpoint()
    await _turn(shard, "s", "alice", "t2")
    await _turn(shard, "s", "alice", "t3")


def _damage_reports(root) -> list[dict]:
    path = root / "shard-0" / "damage.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_turns_whose_snapshot_is_lost_make_the_session_damaged_not_missing(tmp_path):
    async def main():
        cfg = shard_config(tmp_path / "bank")
        await _session_with_turns(local_shard(cfg))
        snap = tmp_path / "bank" / "shard-0" / "sessions" / "s.snap"
        assert snap.exists()
        snap.unlink()
        shard = local_shard(cfg)  # the restart
        with pytest.raises(APIError) as e:  # before the fix: 404 state_not_found, the turns gone silently
            await shard.get_bank("s", "alice")
        assert e.value.status == 500 and e.value.code == "state_damaged", e.value
        assert "seq 3" in e.value.message and "s.snap is missing" in e.value.message
        assert [r["kind"] for r in _damage_reports(tmp_path / "bank")] == ["wal_turns"]
        with pytest.raises(APIError) as other:  # still alice's: another owner is told nothing about it
            await shard.get_bank("s", "bob")
        assert other.value.status == 404, other.value
        await shard.delete("s", "alice")  # the way out the damage message names
        with pytest.raises(APIError) as gone:
            await shard.get_bank("s", "alice")
        assert gone.value.status == 404
    asyncio.run(main())


def test_a_snapshot_rolled_back_under_later_turns_makes_the_session_damaged(tmp_path):
    """The snapshot file is replaced by an older copy of itself (a restore from a backup): the WAL's
    turns after the newer snapshot would be replayed on a state missing the turns in between."""
    async def main():
        cfg = shard_config(tmp_path / "bank")
        shard = local_shard(cfg)
        await _session_with_turns(shard)
        snap = tmp_path / "bank" / "shard-0" / "sessions" / "s.snap"
        shutil.copy(snap, tmp_path / "old.snap")  # holds seq 2
        await shard.checkpoint()  # the snapshot now holds seq 4
        await _turn(shard, "s", "alice", "t4")  # seq 5, in the WAL only
        shutil.copy(tmp_path / "old.snap", snap)
        restarted = local_shard(cfg)
        with pytest.raises(APIError) as e:  # before the fix: seq 5 replayed on seq 2, turns 3-4 lost
            await restarted.get_bank("s", "alice")
        assert e.value.code == "state_damaged" and "after seq 2" in e.value.message, e.value
    asyncio.run(main())


def test_an_intact_store_or_a_deleted_session_is_not_reported(tmp_path):
    """No false alarm: a plain restart restores every turn; a session deleted after its turns (its
    snapshot removed, its turns and the delete still in the WAL) is simply gone."""
    async def main():
        cfg = shard_config(tmp_path / "bank")
        shard = local_shard(cfg)
        await _session_with_turns(shard)
        await shard.create("d", "alice")
        await shard.apply_update("d", 1, "u-d1", b"bank d " * 50, {"tokens_seen": 1}, {"kind": "generate"})
        await _turn(shard, "d", "alice", "d1")
        await shard.checkpoint()
        await _turn(shard, "d", "alice", "d2")
        await shard.delete("d", "alice")
        restarted = local_shard(cfg)
        bank = await restarted.get_bank("s", "alice")
        assert bank["seq"] == 4 and len(bank["turns"]) == 3, bank
        with pytest.raises(APIError) as e:
            await restarted.get_bank("d", "alice")
        assert e.value.status == 404
        assert _damage_reports(tmp_path / "bank") == []
    asyncio.run(main())
