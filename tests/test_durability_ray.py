"""Issue 12 with real Ray actors: a turn's lease ends with its holder (a killed actor stops renewing
it), the client re-resolves a shard handle whose actor is gone, and a shard started on storage that
cannot be opened comes back by itself once it can, without an app restart."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import asdict

import pytest

from serve.errors import find_api_error
from serve.sessions import BankClient, BankConfig

pytestmark = pytest.mark.ray


def _cfg(storage, **kw):
    base = dict(storage=str(storage), num_shards=1, model={"preset": "tiny", "seed": 0}, manager_interval_s=0,
                lease_ttl_s=2.0, lease_wait_s=20.0, namespace="dnc-durability-test")
    base.update(kw)
    return BankConfig(**base)


def test_lease_of_a_killed_holder_ends_within_its_ttl(ray_cluster, tmp_path):
    ray = ray_cluster
    cfg = _cfg(tmp_path / "bank")

    @ray.remote(num_cpus=0)
    class TurnHolder:
        """Stands in for a Generator replica mid-turn: holds the lease and renews it."""

        def __init__(self, cfg_dict):
            self.bank = BankClient(BankConfig(**cfg_dict))

        async def hold(self, sid):
            lease = await self.bank.call(sid, "begin_turn", "alice", True)
            self.keeper = self.bank.start_keep_lease(sid, lease)
            return lease

    from dataclasses import asdict
    client = BankClient(cfg)
    try:
        holder = TurnHolder.remote(asdict(cfg))
        lease = ray.get(holder.hold.remote("s"))

        async def main():
            await asyncio.sleep(2 * cfg.lease_ttl_s)  # renewed: still held well past its TTL
            assert not await client.call("s", "renew_lease", "not-the-holder")
            ray.kill(holder)  # the holder dies mid-turn
            t0 = time.monotonic()
            second = await client.call("s", "begin_turn", "alice", False)
            blocked = time.monotonic() - t0
            assert blocked < cfg.lease_ttl_s + 1.5, blocked
            with pytest.raises(Exception) as e:  # the dead holder's commit would be fenced
                await client.call("s", "commit_turn", lease["lease_id"], lease["seq"] + 1, "late", b"x", {}, {})
            assert find_api_error(e.value).code == "lease_lost"
            await client.call("s", "commit_turn", second["lease_id"], second["seq"] + 1, "ok", b"y", {}, {})
        asyncio.run(main())
    finally:
        client.kill_all()


def test_client_re_resolves_a_dead_shard_and_a_shard_waits_for_its_storage(ray_cluster, tmp_path):
    ray = ray_cluster
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the storage directory should be")
    cfg = _cfg(blocker / "bank")
    client = BankClient(cfg)
    try:
        async def main():
            with pytest.raises(Exception) as e:  # the actor lives and says why
                await client.call("s", "create", "alice")
            err = find_api_error(e.value)
            assert err.status == 503 and "cannot open" in err.message
            os.unlink(blocker)  # storage comes back: no restart of anything needed
            deadline = time.monotonic() + 20
            while True:
                try:
                    await client.call("s", "create", "alice")
                    break
                except Exception as e:
                    assert find_api_error(e).code == "storage_unavailable"
                    assert time.monotonic() < deadline, "the shard never came back"
                    await asyncio.sleep(0.2)
            await client.call("s", "apply_update", 1, "u1", b"bank", {}, {"kind": "generate"})
            # the actor is removed for good (no restart): the next call resolves a new one
            ray.kill(ray.get_actor(cfg.actor_name(0), namespace=cfg.namespace), no_restart=True)
            await asyncio.sleep(0.5)
            info = await client.call("s", "info", "alice", True)
            assert info["seq"] == 1
        asyncio.run(main())
    finally:
        client.kill_all()


def _replica_actor(ray):
    """A Ray actor class standing in for a Generator replica (defined here so Ray ships it by value)."""

    class _Replica:
        """Stands in for a Generator replica (issue 14): the real session turn path (``SessionTurns``:
        resident states, token records, replay) with the real tiny model and decode loop."""

        def __init__(self, cfg_dict):
            import torch

            from serve.modeling import ModelSpec, load_model
            from serve.sessions.turn_log import ReplayModels
            from serve.sessions.turns import SessionTurns

            torch.set_num_threads(1)
            spec = ModelSpec(**cfg_dict["model"])  # the serving dtype too, as a Generator replica
            self.model = load_model(spec, "cpu").model
            models = ReplayModels(lambda d: load_model(spec, "cpu", d).model, spec.dtype, [self.model])

            async def run_here(fn, *args):
                return fn(*args)
            self.turns = SessionTurns(self.model, BankClient(BankConfig(**cfg_dict)), run_here, models=models)

        async def chat(self, sid: str, i: int) -> dict:
            from serve.modeling import state_to_bytes

            t = await self.turns.begin(sid, "alice", True)
            try:
                prompt, new_ids = self._decode(t.state, sid, i)
                ack = await self.turns.commit(t, f"u-{sid}-{i}", prompt, new_ids, {"kind": "generate"})
            finally:
                await self.turns.end(t)
            return {"seq": ack["info"]["seq"], "digest": ack["info"]["digest"], "source": t.source,
                    "record": ack["record"], "state": state_to_bytes(t.state), "dtype": self.turns.dtype}

        def _decode(self, state, sid: str, i: int) -> list[int]:
            from dnc.generate import BatchDecoder, DecodeRow, SamplingParams

            prompt = list(f"turn {i} of {sid}: keep this. ".encode())
            row = DecodeRow(prompt, state, 6, SamplingParams(0.9), seed=i)
            dec = BatchDecoder(self.model)
            dec.add([row])
            while dec.running:
                dec.step()
            return prompt, row.tokens

        def compacted(self, sid: str, threshold: float) -> bytes:
            """The session's resident state compacted and merged here, as the shard's compaction does."""
            from serve.modeling import state_from_bytes, state_to_bytes

            state = state_from_bytes(state_to_bytes(self.turns.resident._items[sid].state), self.model)
            self.model.compact_state(state)
            state.merge_duplicates(threshold)
            return state_to_bytes(state)

        def decode_from(self, state_bytes: bytes, sid: str, i: int) -> bytes:
            """Turn ``i`` decoded on the given state, outside any session: the state it leaves."""
            from serve.modeling import state_from_bytes, state_to_bytes

            state = state_from_bytes(state_bytes, self.model)
            self._decode(state, sid, i)
            return state_to_bytes(state)

    return ray.remote(num_cpus=0)(_Replica)


# bfloat16 only (the GPU serving dtype, and the harder replay: its compaction loads a second model
# copy in the turns' dtype); float32 turns after a shard restart are rebuilt bit for bit in
# tests/test_sessions_turns.py and test_serve_dtype.py, and this test in both dtypes cost ~20 s
# more of the 15-minute suite
@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_token_turns_come_back_after_shard_and_replica_kills(ray_cluster, tmp_path, dtype):
    """Every acknowledged turn (token records and full states) is back after the shard is killed
    (Ray restarts it: recovery from the WAL) and after the replica holding the session resident is
    killed (another replica rebuilds the state from the last full state plus the logged turns, bit
    for bit as the dead replica held it), in either serving dtype; then the restarted shard compacts
    the session on its own CPU model in the dtype the turns were decoded in (every turn checked
    against its fingerprint) and the session goes on."""
    ray = ray_cluster
    cfg = _cfg(tmp_path / "bank", snapshot_every_turns=3, model={"preset": "tiny", "seed": 0, "dtype": dtype})
    client = BankClient(cfg)
    replica = _replica_actor(ray)
    try:
        a = replica.remote(asdict(cfg))
        acked = [ray.get(a.chat.remote("s", i)) for i in range(4)]
        assert [r["record"] for r in acked] == ["tokens", "tokens", "state", "tokens"]
        assert [r["source"] for r in acked] == ["loaded", "resident", "resident", "resident"]
        assert {r["dtype"] for r in acked} == {dtype}

        shard = ray.get_actor(cfg.actor_name(0), namespace=cfg.namespace)
        pid = ray.get(shard.ping.remote())["pid"]
        ray.kill(shard, no_restart=False)  # the shard dies; Ray restarts it from storage
        after = ray.get(a.chat.remote("s", 4))  # the replica's copy is still current: no bank fetched
        assert after["seq"] == 5 and after["source"] == "resident"
        assert ray.get(shard.ping.remote())["pid"] != pid
        acked.append(after)

        ray.kill(a)  # the replica holding the session dies
        b = replica.remote(asdict(cfg))
        last = acked[-1]

        async def check():
            info = await client.call("s", "info", "alice", True)
            assert info["seq"] == last["seq"] and info["digest"] == last["digest"]
            assert [h["seq"] for h in info["history"] if h.get("kind") == "generate"] == [1, 2, 3, 4, 5]
        asyncio.run(check())
        again = ray.get(b.chat.remote("s", 5))
        assert again["source"] == "loaded" and again["seq"] == 6
        # b rebuilt the state by replay: its turn equals the same turn decoded on a's last state
        assert ray.get(b.decode_from.remote(last["state"], "s", 5)) == again["state"]

        assert again["record"] == "state" and ray.get(b.chat.remote("s", 6))["record"] == "tokens"

        async def compact():  # replays that token turn after the last full state on the shard's CPU
            return await client.call("s", "compact", "alice")
        assert asyncio.run(compact())["state"]["seq"] == 8

        async def payload():
            return (await client.call("s", "get_bank", "alice"))["payload"]
        # the shard rebuilt the state the replica holds (in the turn's dtype), bit for bit, then compacted it
        assert asyncio.run(payload()) == ray.get(b.compacted.remote("s", cfg.merge_threshold))
        after = ray.get(b.chat.remote("s", 7))
        assert after["source"] == "loaded" and after["seq"] == 9 and after["dtype"] == dtype
    finally:
        client.kill_all()
