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


def test_one_unreachable_shard_leaves_listing_and_new_sessions_working(ray_cluster, tmp_path):
    """Round 2. One shard that cannot answer (here its storage is gone for real: its directory is
    replaced by a file and its actor restarted, so it cannot open it and answers 503) made every
    owner's listing (GET /v1/states) and the session quota check of every new session answer 503,
    on every shard. Now the listing holds what the reachable shards hold and names the others
    (``incomplete``, ``unreachable_shards``); the quota is counted without them (logged); a session
    on the unreachable shard still answers 503 itself. Once storage is back, all is listed again."""
    import os
    import shutil

    from serve.auth import Caller
    from serve.context import ApiContext, Limits
    from serve.errors import APIError
    from serve.routers.sessions import list_states
    from serve.sessions import shard_index

    ray = ray_cluster
    root = tmp_path / "bank"
    cfg = BankConfig(storage=str(root), num_shards=2, model={"preset": "tiny", "seed": 0},
                     manager_interval_s=0, namespace="dnc-defects2-test")
    client = BankClient(cfg)
    on = {i: [f"s{k}" for k in range(40) if shard_index(f"s{k}", 2) == i] for i in (0, 1)}
    kept, lost, new = on[0][0], on[1][0], on[0][1]
    ctx = ApiContext(generator=None, bank=client, hub=lambda: None, limits=Limits(max_sessions_per_owner=2))
    try:
        async def main():
            for sid in (kept, lost):
                await client.call(sid, "create", "alice")
            shard1 = str(root / "shard-1")
            shutil.move(shard1, shard1 + ".away")
            open(shard1, "w").close()  # storage for shard 1 is gone: a file where its directory was
            ray.kill(ray.get_actor(cfg.actor_name(1), namespace=cfg.namespace), no_restart=False)
            await asyncio.sleep(1.0)  # Ray restarts it; it cannot open its storage
            with pytest.raises(APIError) as e:
                await client.call(lost, "info", "alice", False)
            assert e.value.status == 503
            await ctx.check_session_quota("alice", new)  # before the fix: 503
            listing = await client.list_reachable("alice")  # before the fix: 503 for the whole listing
            assert [s["state_id"] for s in listing["states"]] == [kept] and listing["unreachable_shards"] == [1]
            page = await list_states(ctx=ctx, who=Caller(header_owner="alice"), owner=None, limit=100, after=None)
            assert page["incomplete"] and page["unreachable_shards"] == [1] and page["count"] == 1
            assert [s["shard"] for s in await client.stats()] == [0, 1]  # /model/stats still answers
            await client.call(new, "create", "alice")
            with pytest.raises(APIError) as e:  # what it can count still counts: 2 of 2
                await ctx.check_session_quota("alice", on[0][2])
            assert e.value.status == 429
            os.remove(shard1)
            shutil.move(shard1 + ".away", shard1)  # storage is back: the shard starts by itself
            for _ in range(100):
                listing = await client.list_reachable("alice")
                if not listing["unreachable_shards"]:
                    break
                await asyncio.sleep(0.2)
            assert sorted(s["state_id"] for s in listing["states"]) == sorted([kept, lost, new])
        asyncio.run(main())
    finally:
        client.kill_all()


def test_a_hung_shard_does_not_hang_listing_stats_or_new_sessions(ray_cluster, tmp_path):
    """Session 18. A shard that is alive but does not answer (here its process is stopped for real
    with SIGSTOP: Ray still sees it alive, so calls queue on it) hung every owner's listing, the quota
    every new session checks and /model/stats, for as long as it hung. Now each of those waits
    ``answer_timeout_s`` for a shard and then names it unreachable, as it does a dead one."""
    import os
    import signal
    import time

    from serve.context import ApiContext, Limits
    from serve.sessions import shard_index

    ray = ray_cluster
    cfg = BankConfig(storage=str(tmp_path / "bank"), num_shards=2, model={"preset": "tiny", "seed": 0},
                     manager_interval_s=0, namespace="dnc-defects3-test", answer_timeout_s=1.0)
    client = BankClient(cfg)
    on = {i: [f"s{k}" for k in range(40) if shard_index(f"s{k}", 2) == i] for i in (0, 1)}
    kept, hung, new = on[0][0], on[1][0], on[0][1]
    ctx = ApiContext(generator=None, bank=client, hub=lambda: None, limits=Limits(max_sessions_per_owner=3))
    pid = None
    try:
        async def main():
            nonlocal pid
            for sid in (kept, hung):
                await client.call(sid, "create", "alice")
            pid = (await client.on_shard(1, "ping"))["pid"]
            os.kill(pid, signal.SIGSTOP)
            t0 = time.monotonic()
            listing = await asyncio.wait_for(client.list_reachable("alice"), 30)  # before: never returned
            assert [s["state_id"] for s in listing["states"]] == [kept] and listing["unreachable_shards"] == [1]
            assert "did not answer within 1 s" in listing["errors"][0].message
            await asyncio.wait_for(ctx.check_session_quota("alice", new), 30)
            await client.call(new, "create", "alice")
            stats = await asyncio.wait_for(client.stats(), 30)
            assert stats[1]["unreachable"] and stats[0]["sessions"] == 2
            assert time.monotonic() - t0 < 15
            os.kill(pid, signal.SIGCONT)
            pid = None
            listing = await client.list_reachable("alice")  # answered again, nothing lost
            assert sorted(s["state_id"] for s in listing["states"]) == sorted([kept, hung, new])
        asyncio.run(main())
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGCONT)
        client.kill_all()
