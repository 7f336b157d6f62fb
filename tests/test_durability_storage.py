"""Issue 12, storage faults injected for real: a flipped bit in a WAL record (payload, header, length
prefix), damaged snapshots (payload byte, edited header, truncated file), and a full disk (a real
tmpfs of a few hundred KiB, mounted for the test; needs root). After each: the damage is detected
and reported naming the session, other sessions keep working, and every acknowledged update is
present after a restart. The session store runs in-process here (the same class is the Ray actor)."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import struct
import subprocess
import zlib

import pytest

from serve.bank_store import BankStore, RecordDamage, iter_records, pack_record
from serve.errors import Conflict, NotFound, StateDamaged, StorageUnavailable
from shard_helpers import local_shard, shard_config


def _payload(sid: str, seq: int) -> bytes:
    return f"bank of {sid} at {seq} ".encode() * 300  # ~5 KiB, opaque to the store


async def _put(shard, sid, seq, owner="alice"):
    if seq == 1:
        await shard.create(sid, owner)
    return await shard.apply_update(sid, seq, f"u-{sid}-{seq}", _payload(sid, seq), {"tokens_seen": seq},
                                    {"kind": "generate"})


def _log(root) -> str:
    wal = os.path.join(root, "shard-0", "wal")
    logs = sorted(f for f in os.listdir(wal) if f.endswith(".log") and os.path.getsize(os.path.join(wal, f)))
    return os.path.join(wal, logs[-1])


def _offsets(data: bytes) -> list[tuple[int, dict]]:
    """(offset, header) of every record of a log."""
    out, off = [], 0
    for h, p in iter_records(data):
        out.append((off, h))
        off += len(pack_record(h, p))
    return out


def _flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


# --------------------------------------------------------------------------- WAL framing
@pytest.mark.parametrize("where", ["payload", "header", "length"])
def test_a_flipped_bit_costs_one_record_not_the_rest(tmp_path, where):
    store = BankStore(str(tmp_path / "s"))
    store.start_epoch()
    for i in range(5):
        store.append({"sid": f"s{i % 2}", "seq": i, "inc": "abc", "i": i}, bytes([i]) * 100)
    store.close()
    path = str(tmp_path / "s" / "wal" / "00000001.log")
    data = open(path, "rb").read()
    off = _offsets(data)[2][0]
    prefix = 117
    target = {"payload": off + prefix + 60, "header": off + prefix + 3, "length": off + 4}[where]
    _flip(path, target)
    damage: list[RecordDamage] = []
    got = [h["i"] for h, _ in BankStore(str(tmp_path / "s")).replay(damage.append)]
    assert got == [0, 1, 3, 4]
    assert len(damage) == 1 and not damage[0].torn and damage[0].where == "wal/00000001.log"
    if where == "length":  # the prefix itself is damaged: found by its checksum, skipped by rescanning
        assert "prefix" in damage[0].reason
    else:  # the intact prefix names what was lost
        assert where in damage[0].reason and (damage[0].sid, damage[0].seq) == ("s0", 2)


def test_format_1_logs_still_load(tmp_path):
    """Logs written before the framing change (magic DNCW, one CRC) replay unchanged."""
    def v1(header, payload=b""):
        h = json.dumps(header).encode()
        return struct.pack("<4sIQI", b"DNCW", len(h), len(payload), zlib.crc32(payload, zlib.crc32(h))) + h + payload

    os.makedirs(tmp_path / "s" / "wal")
    with open(tmp_path / "s" / "wal" / "00000001.log", "wb") as f:
        f.write(v1({"i": 1}, b"abc") + v1({"i": 2}))
    store = BankStore(str(tmp_path / "s"))
    assert [(h["i"], p) for h, p in store.replay()] == [(1, b"abc"), (2, None)]
    store.start_epoch()  # new records go to a new epoch in format 2; both replay
    store.append({"i": 3}, b"x")
    assert [h["i"] for h, _ in BankStore(str(tmp_path / "s")).replay()] == [1, 2, 3]


def test_bit_flip_in_a_wal_record_loses_no_other_session(tmp_path):
    async def main():
        cfg = shard_config(tmp_path / "bank")
        shard = local_shard(cfg)
        for seq in (1, 2):
            for sid in ("a", "b", "c", "d"):
                await _put(shard, sid, seq)
        await _put(shard, "a", 3)  # a's latest acknowledged update: damaged below
        for sid in ("b", "c", "d"):
            await _put(shard, sid, 3)
        shard.store.close()
        path = _log(cfg.storage)
        recs = _offsets(open(path, "rb").read())
        off = next(o for o, h in recs if h.get("sid") == "a" and h["seq"] == 3)
        _flip(path, off + 117 + 500)  # inside its payload

        shard2 = local_shard(cfg)
        for sid in ("b", "c", "d"):  # everything written after the bad record is there
            info = await shard2.info(sid, "alice")
            assert info["seq"] == 3 and info["digest"] is not None
            assert (await shard2.get_bank(sid, "alice"))["payload"] == _payload(sid, 3)
        with pytest.raises(StateDamaged) as e:  # a's seq 3 was acknowledged: a says so, never rolls back
            await shard2.get_bank("a", "alice")
        assert "'a'" in e.value.message and "seq 3" in e.value.message and "payload" in e.value.message
        with pytest.raises(StateDamaged):
            await shard2.begin_turn("a", "alice", True)  # not silently recreated
        st = await shard2.stats()
        assert st["damaged_records"] == 1 and st["damaged_sessions"] == 1
        assert os.path.exists(os.path.join(cfg.storage, "shard-0", "damage.jsonl"))
        # the verdict survives a checkpoint that drops the log holding the evidence, and a restart
        await shard2.checkpoint()
        shard2.store.close()
        shard3 = local_shard(cfg)
        with pytest.raises(StateDamaged):
            await shard3.info("a", "alice")
        # DELETE clears it; the id can be used again
        await shard3.delete("a", "alice")
        await _put(shard3, "a", 1)
        shard3.store.close()
        shard4 = local_shard(cfg)
        assert (await shard4.info("a", "alice"))["seq"] == 1
    asyncio.run(main())


def test_damaged_record_that_is_superseded_costs_nothing(tmp_path):
    async def main():
        cfg = shard_config(tmp_path / "bank")
        shard = local_shard(cfg)
        for seq in (1, 2, 3):
            await _put(shard, "a", seq)
        shard.store.close()
        path = _log(cfg.storage)
        off = next(o for o, h in _offsets(open(path, "rb").read()) if h["seq"] == 2 and h.get("op") == "put")
        _flip(path, off + 117 + 300)
        shard2 = local_shard(cfg)
        assert (await shard2.get_bank("a", "alice"))["payload"] == _payload("a", 3)
        assert shard2.counters["damaged_records"] == 1
    asyncio.run(main())


# --------------------------------------------------------------------------- snapshots
def _snapshotted(tmp_path):
    async def main():
        cfg = shard_config(tmp_path / "bank")
        shard = local_shard(cfg)
        for sid in ("a", "b"):
            for seq in (1, 2):
                await _put(shard, sid, seq)
        await shard.checkpoint()  # snapshots hold everything, the WAL epochs are dropped
        shard.store.close()
        return cfg
    return asyncio.run(main())


@pytest.mark.parametrize("damage", ["payload_byte", "edited_header", "truncated"])
def test_damaged_snapshot_is_reported_never_recreated_or_reowned(tmp_path, damage):
    cfg = _snapshotted(tmp_path)
    path = os.path.join(cfg.storage, "shard-0", "sessions", "a.snap")
    data = open(path, "rb").read()
    if damage == "payload_byte":
        _flip(path, len(data) - 10)
    elif damage == "edited_header":
        with open(path, "wb") as f:
            f.write(data.replace(b'"owner":"alice"', b'"owner":"malet"'))
    else:
        with open(path, "wb") as f:
            f.write(data[:10])

    # an unreadable header took the owner with it (no WAL record is left to name it): the damaged
    # session is then nobody's, and only the operator (owner None) sees it (round 2)
    who = "alice" if damage == "payload_byte" else None

    async def main():
        shard = local_shard(cfg)
        assert (await shard.get_bank("b", "alice"))["payload"] == _payload("b", 2)  # others unaffected
        with pytest.raises(StateDamaged) as e:
            await shard.get_bank("a", who)
        assert "'a'" in e.value.message and "snapshot" in e.value.message
        for owner in ("alice", "malet"):  # neither recreated empty nor handed to another owner
            with pytest.raises((StateDamaged, NotFound, Conflict)):  # Conflict: state_id_taken
                await shard.begin_turn("a", owner, True)
        shard.store.close()
        shard2 = local_shard(cfg)  # the verdict is persistent
        with pytest.raises(StateDamaged):
            await shard2.get_bank("a", who)
        assert os.path.exists(path + ".damaged") or damage == "payload_byte" and os.path.exists(path + ".damaged")
    asyncio.run(main())


# --------------------------------------------------------------------------- disk full
@pytest.fixture
def small_disk(tmp_path):
    """A real 512 KiB tmpfs (root only: a mount)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def _fill(mnt) -> str:
    """Fill the filesystem to the last byte; returns the filler's path (delete it to free space)."""
    path = os.path.join(mnt, "filler")
    with open(path, "wb", buffering=0) as f:
        for size in (65536, 4096, 1):  # down to the last byte
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    return path


def test_disk_full_is_an_answer_not_a_loss(small_disk):
    async def main():
        cfg = shard_config(small_disk / "bank")
        shard = local_shard(cfg)
        acked = {}
        for sid in ("a", "b"):
            for seq in (1, 2):
                await _put(shard, sid, seq)
                acked[sid] = seq
        filler = _fill(small_disk)
        before = await shard.info("a", "alice")
        for _ in range(3):  # every write fails cleanly, the in-memory state is unchanged
            with pytest.raises(StorageUnavailable) as e:
                await _put(shard, "a", 3)
            assert e.value.status == 503 and "storage unavailable" in e.value.message
        after = await shard.info("a", "alice")
        assert (after["seq"], after["digest"]) == (before["seq"], before["digest"])
        with pytest.raises(StorageUnavailable):
            await shard.create("new", "alice")
        await shard.checkpoint()  # background work on a full disk fails quietly and drops nothing
        assert not await shard.offload("a")
        assert await shard.list_sessions("alice") and len(await shard.list_sessions("alice")) == 2
        os.unlink(filler)  # space returns: the next write succeeds
        await _put(shard, "a", 3)
        await _put(shard, "b", 3)
        acked = {"a": 3, "b": 3}
        shard.store.close()
        damage = []
        list(BankStore(f"{cfg.storage}/shard-0").replay(damage.append))
        assert damage == []  # no torn record left behind for later records to hide behind
        shard2 = local_shard(cfg)  # a restart recovers every acknowledged update
        for sid, seq in acked.items():
            bank = await shard2.get_bank(sid, "alice")
            assert bank["seq"] == seq and bank["payload"] == _payload(sid, seq)
    asyncio.run(main())


def test_failed_append_truncates_its_torn_record(small_disk):
    """The store level: a record that only partly fits is cut away, the log stays a clean prefix."""
    store = BankStore(str(small_disk / "s"))
    store.start_epoch()
    store.append({"sid": "a", "seq": 1}, b"x" * 1000)
    filler = _fill(small_disk)
    os.unlink(filler)
    with open(filler, "wb") as f:  # leave ~2 KiB free: a 64 KiB record is torn mid-write
        f.write(b"\0" * (os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize - 2048))
    with pytest.raises(OSError):
        store.append({"sid": "a", "seq": 2}, b"y" * 65536)
    os.unlink(filler)
    store.append({"sid": "a", "seq": 3}, b"z" * 1000)
    store.close()
    damage = []
    assert [h["seq"] for h, _ in BankStore(str(small_disk / "s")).replay(damage.append)] == [1, 3]
    assert damage == []


# --------------------------------------------------------------------------- shard start
def test_shard_whose_storage_is_unwritable_at_start_recovers_by_itself(tmp_path):
    """A read-only filesystem at start (root cannot write there either): the shard answers 503 and
    retries with backoff; once the filesystem is writable again it recovers every session, without
    being rebuilt."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        async def main():
            cfg = shard_config(mnt / "bank")
            shard = local_shard(cfg)
            await _put(shard, "a", 1)
            shard.store.close()
            subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
            shard2 = local_shard(cfg)  # must not raise: Ray does not restart an actor whose __init__ failed
            with pytest.raises(StorageUnavailable) as e:
                await shard2.info("a", "alice")
            assert e.value.status == 503 and "shard 0" in e.value.message
            assert (await shard2.stats())["storage_error"]
            subprocess.run(["mount", "-o", "remount,rw", str(mnt)], check=True)
            for _ in range(100):  # the background retry (started by the failed call) brings it back
                if shard2.store is not None:
                    break
                await asyncio.sleep(0.05)
            info = await shard2.info("a", "alice")
            assert info["seq"] == 1
            await _put(shard2, "a", 2)
        asyncio.run(main())
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


# --------------------------------------------------------------------------- leases
def test_lease_expires_without_renewal_and_fences_the_late_writer(tmp_path):
    async def main():
        shard = local_shard(shard_config(tmp_path / "bank", lease_ttl_s=0.3, lease_wait_s=2.0))
        await _put(shard, "s", 1)
        dead = await shard.begin_turn("s", "alice", False)  # its holder dies: no renewals
        t0 = asyncio.get_running_loop().time()
        alive = await shard.begin_turn("s", "alice", False)  # waits for the expiry, not 120 s
        assert asyncio.get_running_loop().time() - t0 < 1.0
        # the late writer (same seq) is refused by the fencing token; the live one commits
        with pytest.raises(Exception) as e:
            await shard.commit_turn("s", dead["lease_id"], dead["seq"] + 1, "late", b"late", {}, {"kind": "generate"})
        assert getattr(e.value, "code", "") == "lease_lost" and e.value.status == 409
        await shard.commit_turn("s", alive["lease_id"], alive["seq"] + 1, "live", b"live", {}, {"kind": "generate"})
        assert (await shard.get_bank("s", "alice"))["payload"] == b"live"
        # a renewed lease holds
        held = await shard.begin_turn("s", "alice", False)
        for _ in range(6):
            await asyncio.sleep(0.1)
            assert await shard.renew_lease("s", held["lease_id"])
        shard.cfg.lease_wait_s = 0.05
        from serve.errors import Busy
        with pytest.raises(Busy):
            await shard.begin_turn("s", "alice", False)
        await shard.abort_turn("s", held["lease_id"])
        assert not await shard.renew_lease("s", held["lease_id"])
    asyncio.run(main())


def test_concurrent_first_turns_on_a_new_session_create_it_once(tmp_path):
    """Two writers start the first turn of the same new session at once (found by bench/durability.py:
    both appended a create record; the live shard kept the second incarnation, replay the first,
    and every acknowledged turn of the second was dropped at the next restart)."""
    async def main():
        cfg = shard_config(tmp_path / "bank", lease_wait_s=5.0)
        shard = local_shard(cfg)

        async def turn(tag):
            lease = await shard.begin_turn("shared", "alice", True)
            return await shard.commit_turn("shared", lease["lease_id"], lease["seq"] + 1, f"u-{tag}",
                                           tag.encode() * 100, {}, {"kind": "generate"})

        acks = await asyncio.gather(turn("one"), turn("two"))
        assert sorted(a["seq"] for a in acks) == [1, 2]
        shard.store.close()
        shard2 = local_shard(cfg)
        assert (await shard2.info("shared", "alice"))["seq"] == 2
    asyncio.run(main())


# --------------------------------------------------------------------------- token turn records (issue 14)
async def _tokens(shard, sid, seq, owner="alice"):
    """A token turn record (what a Generator commits for a turn that changed the state only by tokens)."""
    if seq == 1:
        await shard.create(sid, owner)
    ids = [(seq * 7 + k) % 256 for k in range(40)]
    return await shard.apply_update(sid, seq, f"t-{sid}-{seq}", None, {"tokens_seen": seq * 40},
                                    {"kind": "generate"}, tokens={"ids": ids, "n_prompt": 8, "fp": None})


@pytest.mark.parametrize("where,seq", [("ids", 3), ("header", 3), ("ids", 2)])
def test_a_damaged_token_turn_record_is_reported_naming_its_session(tmp_path, where, seq):
    """A flipped bit in a turn record (its ids or its header; the last turn, or one that a later token
    turn builds on): that session answers 500 state_damaged naming it and the seq; the sessions
    logged around it keep every acknowledged turn, token turns and full states alike."""
    async def main():
        cfg = shard_config(tmp_path / "bank")
        shard = local_shard(cfg)
        await _put(shard, "b", 1)
        for n in (1, 2, 3):
            await _tokens(shard, "a", n)
            await _tokens(shard, "c", n)
        await _put(shard, "b", 2)
        digests = {sid: (await shard.info(sid, "alice"))["digest"] for sid in ("b", "c")}
        tails = {sid: (await shard.get_bank(sid, "alice"))["turns"] for sid in ("b", "c")}
        shard.store.close()
        path = _log(cfg.storage)
        data = open(path, "rb").read()
        recs = _offsets(data)
        off = next(o for o, h in recs if h.get("sid") == "a" and h["seq"] == seq)
        h = next(h for o, h in recs if o == off)
        header_len = len(json.dumps(h, separators=(",", ":")))
        _flip(path, off + 117 + (header_len + 20 if where == "ids" else 30))

        shard2 = local_shard(cfg)
        for sid in ("b", "c"):
            info = await shard2.info(sid, "alice")
            assert info["seq"] == (2 if sid == "b" else 3) and info["digest"] == digests[sid]
            assert (await shard2.get_bank(sid, "alice"))["turns"] == tails[sid]
        assert (await shard2.get_bank("b", "alice"))["payload"] == _payload("b", 2)
        with pytest.raises(StateDamaged) as e:
            await shard2.begin_turn("a", "alice", True)
        assert "'a'" in e.value.message and f"seq {seq}" in e.value.message
        assert (await shard2.stats())["damaged_records"] == 1
    asyncio.run(main())


def test_token_turns_survive_checkpoints_offload_and_restarts(tmp_path):
    """A session's token turns live in the WAL, then in its snapshot file (beside its last full
    state) once a checkpoint folds the WAL; offloaded and restored, it replays the same turns."""
    async def main():
        cfg = shard_config(tmp_path / "bank")
        shard = local_shard(cfg)
        await _put(shard, "a", 1)
        for seq in (2, 3):
            await _tokens(shard, "a", seq)
        before = await shard.get_bank("a", "alice")
        await shard.checkpoint()
        assert shard.store.epochs() == [shard.store.epoch]  # the old log is gone
        assert await shard.offload("a")
        await _tokens(shard, "a", 4)  # a token turn on an offloaded session: no bank needed
        assert (await shard.stats())["offloaded"] == 1
        await shard.checkpoint()  # loads it to snapshot the new tail
        shard.store.close()
        shard2 = local_shard(cfg)
        after = await shard2.get_bank("a", "alice")
        assert after["payload"] == before["payload"] == _payload("a", 1)
        assert [t["seq"] for t in after["turns"]] == [2, 3, 4]
        assert after["turns"][:2] == before["turns"]
        assert after["info"]["digest"] == (await shard.info("a", "alice"))["digest"]
    asyncio.run(main())
