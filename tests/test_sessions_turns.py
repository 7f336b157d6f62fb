"""Issue 14: session turns that write only what changed, and session states resident where they run.

The Generator's turn path (``serve.sessions.turns.SessionTurns``) runs in-process here against a real
shard on real files (``LocalBankClient``), with the real tiny model and the real decode loop
(``dnc.generate.BatchDecoder``). A "replica" is one ``SessionTurns`` (its own resident states)."""

from __future__ import annotations

import asyncio
from dataclasses import asdict

import pytest
import torch

from serve.errors import StateDamaged
from serve.modeling import ModelSpec, load_model, state_to_bytes
from serve.sessions import BankConfig, LocalBankClient, SessionBankShard
from serve.sessions.resident import ResidentState, ResidentStates
from serve.sessions.turn_log import (chain_digest, fingerprint_mismatch, pack_ids, rebuild_state, state_fingerprint,
                                     unpack_ids)
from serve.sessions.turns import SessionTurns, state_of
from session_turn_helpers import chat, same_state, turn_prompt


@pytest.fixture(scope="module")
def model():
    return load_model(ModelSpec(preset="tiny", seed=0), "cpu").model


def _cfg(root, **kw):
    base = dict(storage=str(root), num_shards=1, model={"preset": "tiny", "seed": 0}, manager_interval_s=0,
                lease_wait_s=1.0, snapshot_every_turns=4, snapshot_every_tokens=10_000)
    base.update(kw)
    return BankConfig(**base)


async def _run_here(fn, *args):
    return fn(*args)


def _replica(shard, model, budget=None) -> SessionTurns:
    return SessionTurns(model, LocalBankClient(shard), _run_here, budget)


# --------------------------------------------------------------------------- records
def test_token_records_are_small_and_snapshots_come_every_n_turns(tmp_path, model):
    async def main():
        shard = SessionBankShard(asdict(_cfg(tmp_path / "bank", snapshot_every_turns=3)), 0)
        turns = _replica(shard, model)
        kinds, sizes = [], []
        for i in range(5):
            _, ack = await chat(turns, "s", i, new_tokens=32)
            kinds.append(ack["record"])
            sizes.append(ack["durable_bytes"])
        # the first turn of a fresh session has no full state behind it yet: tokens too
        assert kinds == ["tokens", "tokens", "state", "tokens", "tokens"]
        full = len(state_to_bytes(turns.resident._items["s"].state))
        tokens = [n for k, n in zip(kinds, sizes) if k == "tokens"]
        states = [n for k, n in zip(kinds, sizes) if k == "state"]
        assert max(tokens) <= 64 * 1024 and max(tokens) < full / 10, (tokens, full)
        assert min(states) > full / 2, (states, full)  # the full state (it grows within a segment)
        info = await shard.info("s", "alice")
        assert info["seq"] == 5 and info["turns"] == 5
        # the state's size is reported after token turns too (tensor bytes, close to the stored form)
        assert 0.9 * full < info["bank_bytes"] <= full
        assert shard.counters["token_records"] == 4 and shard.counters["state_records"] == 1
    asyncio.run(main())


def test_ids_and_digest_chain():
    ids = [0, 1, 255, 2**31]
    assert unpack_ids(pack_ids(ids)) == ids and len(pack_ids(ids)) == 16
    a = chain_digest(None, [1, 2, 3], 2)
    assert a == chain_digest(None, [1, 2, 3], 2)
    assert a != chain_digest(None, [1, 2, 3], 1) and a != chain_digest("x", [1, 2, 3], 2)
    with pytest.raises(ValueError):
        unpack_ids(b"abc")


def test_fingerprint_tells_states_apart(model):
    s1 = model.init_state(1)
    with torch.no_grad():
        model(torch.tensor([turn_prompt(0)]), state=s1, last_logits_only=True, metrics=False)
    s2 = rebuild_state(model, state_to_bytes(s1), [])
    assert fingerprint_mismatch(state_fingerprint(s1), state_fingerprint(s2)) is None
    with torch.no_grad():
        model(torch.tensor([[5]]), state=s2, last_logits_only=True, metrics=False)
    assert "structure" in fingerprint_mismatch(state_fingerprint(s1), state_fingerprint(s2))
    s3 = rebuild_state(model, state_to_bytes(s1), [])
    s3.layers[0].cache.k.mul_(1.01)  # same structure, different numbers
    assert "tensor group" in fingerprint_mismatch(state_fingerprint(s1), state_fingerprint(s3))


# --------------------------------------------------------------------------- recovery
def test_a_restarted_shard_and_a_fresh_replica_rebuild_every_acknowledged_turn(tmp_path, model):
    """Snapshot + replay: after the shard restarts (its memory gone) and on a replica that never saw
    the session, the state is the one the acknowledged turns left, bit for bit."""
    async def main():
        cfg = _cfg(tmp_path / "bank", snapshot_every_turns=3)
        shard = SessionBankShard(asdict(cfg), 0)
        a = _replica(shard, model)
        for i in range(7):  # full states at turns 3 and 6, then one token turn
            _, ack = await chat(a, "s", i)
        reference = a.resident._items["s"].state
        seq, dig = ack["info"]["seq"], ack["info"]["digest"]
        shard.store.close()

        shard2 = SessionBankShard(asdict(cfg), 0)  # recovery from the WAL
        b = _replica(shard2, model)
        t = await b.begin("s", "alice", False)
        assert t.source == "loaded" and t.lease["seq"] == seq and t.lease["digest"] == dig
        assert len(t.lease["turns"]) == 1
        same_state(t.state, reference)
        await b.end(t)

        await shard2.checkpoint()  # the WAL folded into the snapshot file (full state + token turns)
        assert shard2.store.read_snapshot_header("s")["tail"]
        await shard2.offload("s")
        shard2.store.close()
        shard3 = SessionBankShard(asdict(cfg), 0)
        bank = await shard3.get_bank("s", "alice")
        same_state(state_of(model, "s", bank), reference)
        # and the session goes on from there
        c = _replica(shard3, model)
        _, ack = await chat(c, "s", 7)
        assert ack["info"]["seq"] == seq + 1
    asyncio.run(main())


def test_replay_that_does_not_give_back_the_acknowledged_state_is_damage(tmp_path, model):
    """Other weights than the ones the turns were decoded with: 500 state_damaged naming the session,
    never a silently different state."""
    async def main():
        shard = SessionBankShard(asdict(_cfg(tmp_path / "bank")), 0)
        for i in range(2):
            await chat(_replica(shard, model), "s", i)
        other = load_model(ModelSpec(preset="tiny", seed=1), "cpu").model
        with pytest.raises(StateDamaged) as e:
            await _replica(shard, other).begin("s", "alice", False)
        assert e.value.code == "state_damaged" and "'s'" in e.value.message and "seq 1" in e.value.message
        t = await _replica(shard, model).begin("s", "alice", False)  # the lease was released
        assert t.source == "loaded"
    asyncio.run(main())


# --------------------------------------------------------------------------- resident states
def test_resident_state_is_used_replayed_or_dropped_as_the_shard_says(tmp_path, model):
    async def main():
        shard = SessionBankShard(asdict(_cfg(tmp_path / "bank", snapshot_every_turns=100)), 0)
        a, b = _replica(shard, model), _replica(shard, model)
        ref = _replica(shard, model)
        t, _ = await chat(a, "s", 0)
        assert t.source == "loaded"
        t, _ = await chat(a, "s", 1)
        assert t.source == "resident" and t.lease["payload"] is None and not t.lease["turns"]
        assert shard.counters["resident_turns"] == 1
        t, _ = await chat(b, "s", 2)  # b has no copy: it loads (full state + 2 token turns replayed)
        assert t.source == "loaded"
        t, _ = await chat(a, "s", 3)  # a's copy is one turn behind: that turn is replayed onto it
        assert t.source == "replayed" and len(t.lease["turns"]) == 1 and t.lease["payload"] is None
        # the same turns on one replica from a state rebuilt from storage give the same state
        bank = await shard.get_bank("s", "alice")
        same_state(a.resident._items["s"].state, state_of(model, "s", bank))
        # a compaction writes a full state: a's copy is stale and is dropped, not used
        await shard.compact("s", "alice")
        t, _ = await chat(a, "s", 4)
        assert t.source == "loaded" and t.lease["base"]
        assert t.lease["payload"] is not None
    asyncio.run(main())


def test_compaction_reports_the_size_of_the_state_it_compacted(tmp_path, model):
    """bytes_before / bytes_after of POST /v1/state/{id}/compact: the stored form of the state before
    and after, also when the session has only token turns (its last full state is none, 0 bytes)."""
    async def main():
        shard = SessionBankShard(asdict(_cfg(tmp_path / "bank", snapshot_every_turns=100)), 0)
        turns = _replica(shard, model)
        for i in range(3):
            _, ack = await chat(turns, "s", i, new_tokens=32)
            assert ack["record"] == "tokens"
        full = len(state_to_bytes(turns.resident._items["s"].state))
        res = await shard.compact("s", "alice")
        assert res["moved"]["compressed"] > 0
        assert res["bytes_before"] == full                   # was 0: the (absent) last full state
        assert 0 < res["bytes_after"] < res["bytes_before"]  # compaction shrinks it
        bank = await shard.get_bank("s", "alice")
        assert res["bytes_after"] == len(bank["payload"])
    asyncio.run(main())


def test_a_turn_that_is_not_committed_leaves_no_resident_copy(tmp_path, model):
    async def main():
        shard = SessionBankShard(asdict(_cfg(tmp_path / "bank")), 0)
        a = _replica(shard, model)
        await chat(a, "s", 0)
        t = await a.begin("s", "alice", False)
        with torch.no_grad():  # the decoder changed the state in place, then the client went away
            model(torch.tensor([[1, 2, 3]]), state=t.state, last_logits_only=True, metrics=False)
        await a.end(t)
        assert "s" not in a.resident
        t, ack = await chat(a, "s", 1)  # reloaded from the shard, the uncommitted tokens are not in it
        assert t.source == "loaded" and ack["info"]["seq"] == 2
        bank = await shard.get_bank("s", "alice")
        same_state(a.resident._items["s"].state, state_of(model, "s", bank))
    asyncio.run(main())


def test_resident_lru_keeps_within_its_byte_budget():
    lru = ResidentStates(budget_bytes=250)
    for sid in "abc":
        lru.put(sid, ResidentState(None, "i", 1, "d", 100))
    assert len(lru) == 2 and "a" not in lru and lru.nbytes == 200
    assert lru.take("b").seq == 1 and "b" not in lru and lru.nbytes == 100
    lru.put("d", ResidentState(None, "i", 1, "d", 300))  # larger than the budget: not kept
    assert "d" not in lru and lru.stats()["resident_evictions"] == 1


def test_resident_budget_evicts_least_recently_used_sessions(tmp_path, model):
    async def main():
        shard = SessionBankShard(asdict(_cfg(tmp_path / "bank")), 0)
        a = _replica(shard, model, budget=0)
        await chat(a, "x", 0)
        one = a.resident  # budget 0: nothing stays
        assert len(one) == 0
        t, _ = await chat(a, "x", 1)
        assert t.source == "loaded"
        b = _replica(shard, model)
        await chat(b, "x", 2)
        nbytes = b.resident.nbytes
        b.resident.budget_bytes = nbytes  # room for one session
        await chat(b, "y", 0)
        assert "y" in b.resident and "x" not in b.resident
    asyncio.run(main())
