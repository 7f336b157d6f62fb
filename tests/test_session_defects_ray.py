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
