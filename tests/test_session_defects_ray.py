"""Session defects (session 15 audit) that need real Ray actors: see tests/test_session_defects.py
for the in-process ones."""

from __future__ import annotations

import asyncio

import pytest

from serve.sessions import BankClient, BankConfig

pytestmark = pytest.mark.ray


def test_listing_sessions_re_resolves_a_replaced_shard(ray_cluster, tmp_path):
    """A shard actor removed for good (and made again under its name by the next caller): session
    calls resolved the new one, but listing (GET /v1/states, and the session quota every new session
    checks) and stats kept the dead handle, so they failed (500) on that ingress until a session call
    happened to land on that shard."""
    ray = ray_cluster
    cfg = BankConfig(storage=str(tmp_path / "bank"), num_shards=1, model={"preset": "tiny", "seed": 0},
                     manager_interval_s=0, namespace="dnc-defects-test")
    client = BankClient(cfg)
    try:
        async def main():
            await client.call("s", "create", "alice")
            assert [s["state_id"] for s in await client.list_sessions("alice")] == ["s"]
            ray.kill(ray.get_actor(cfg.actor_name(0), namespace=cfg.namespace), no_restart=True)
            await asyncio.sleep(0.5)
            assert [s["state_id"] for s in await client.list_sessions("alice")] == ["s"]  # recovered from storage
            assert (await client.stats())[0]["sessions"] == 1
            assert await client.ping_all() == 1
        asyncio.run(main())
    finally:
        client.kill_all()


def test_a_turn_cancelled_while_waiting_for_its_session_leaves_no_lease_behind(ray_cluster, tmp_path):
    """A turn waits for its session's lease (another turn holds it) and is cancelled (its client left:
    Serve cancels the request). A call to a Ray actor is not cancelled with its caller: the shard
    went on waiting, granted the lease to nobody, and the session stayed busy for a whole
    ``lease_ttl_s`` (every other request on it waited, or got 503 state_busy)."""
    from serve.modeling import ModelSpec, load_model
    from serve.sessions.turns import SessionTurns

    cfg = BankConfig(storage=str(tmp_path / "bank"), num_shards=1, model={"preset": "tiny", "seed": 0},
                     manager_interval_s=0, namespace="dnc-defects-test", lease_ttl_s=30.0, lease_wait_s=3.0)
    client = BankClient(cfg)
    model = load_model(ModelSpec(preset="tiny", seed=0), "cpu").model

    async def run_here(fn, *args):
        return fn(*args)
    try:
        async def main():
            await client.call("s", "create", "alice")
            holder = await client.call("s", "begin_turn", "alice", False)  # a turn in flight elsewhere
            turns = SessionTurns(model, client, run_here)
            waiting = asyncio.create_task(turns.begin("s", "alice", False))
            await asyncio.sleep(0.5)
            waiting.cancel()  # its client left
            with pytest.raises(asyncio.CancelledError):
                await waiting
            await client.call("s", "abort_turn", holder["lease_id"])  # the turn in flight ends
            await asyncio.sleep(1.0)
            lease = await client.call("s", "begin_turn", "alice", False)  # before the fix: 503 state_busy
            await client.call("s", "abort_turn", lease["lease_id"])
        asyncio.run(main())
    finally:
        client.kill_all()
