"""Issue 12 with real Ray actors: a turn's lease ends with its holder (a killed actor stops renewing
it), the client re-resolves a shard handle whose actor is gone, and a shard started on storage that
cannot be opened comes back by itself once it can, without an app restart."""

from __future__ import annotations

import asyncio
import os
import time

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
