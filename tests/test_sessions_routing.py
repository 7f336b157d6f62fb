"""Issue 14: a session's turns go to the Generator replica that holds its state.

The ranking is checked as a function; then the real Serve app with two Generator replicas serves
several sessions over HTTP, and the shards count how many turns came with a resident copy (no bank
fetched) against how many had to load one."""

from __future__ import annotations

import asyncio
import os
from collections import Counter

import httpx
import pytest

from serve.sessions.routing import rank_replicas

PORT = int(os.environ.get("DNC_SERVE_TEST_PORT", "8123"))


def test_rendezvous_ranking_is_stable_and_spreads_sessions():
    replicas = ["r-a", "r-b", "r-c"]
    assert rank_replicas("chat-1", replicas) == rank_replicas("chat-1", list(reversed(replicas)))
    firsts = Counter(rank_replicas(f"s{i}", replicas)[0] for i in range(300))
    assert set(firsts) == set(replicas) and min(firsts.values()) > 60, firsts
    # a replica going away moves only its own sessions
    moved = [i for i in range(300) if rank_replicas(f"s{i}", replicas)[0] != "r-c"
             and rank_replicas(f"s{i}", ["r-a", "r-b"])[0] != rank_replicas(f"s{i}", replicas)[0]]
    assert moved == []


@pytest.mark.ray
def test_session_turns_stay_on_the_replica_holding_their_state(ray_cluster, tmp_path):
    from conftest import remove_app, serve_on
    from serve.app import run_app
    from serve.sessions import BankClient, BankConfig

    app_args = {"storage": str(tmp_path / "bank"), "bank_shards": 2, "generator_replicas": 2,
                "generator_num_cpus": 0, "torch_threads": 1, "manager_interval_s": 0, "auto_compact": False,
                "namespace": "dnc-routing-test"}
    serve_on(PORT)
    try:
        base = run_app(app_args, PORT, name="dnc-routing-test", timeout_s=240)
        sessions, turns = [f"route-{i}" for i in range(6)], 4
        with httpx.Client(base_url=base, timeout=120) as c:
            for k in range(turns):
                for sid in sessions:
                    r = c.post("/v1/generate", json={"prompt": f"turn {k}. ", "max_new_tokens": 3,
                                                     "state_id": sid, "seed": k})
                    assert r.status_code == 200, r.text
                    assert r.json()["state"]["seq"] == k + 1
        bank = BankClient(BankConfig(storage=app_args["storage"], num_shards=2, namespace="dnc-routing-test"))
        stats = asyncio.run(bank.stats())
        resident = sum(s["resident_turns"] for s in stats)
        loaded = sum(s["loaded_turns"] for s in stats)
        token_records = sum(s["token_records"] for s in stats)
        assert loaded + resident == len(sessions) * turns
        # each session loads once (its first turn, on the replica it hashes to), then stays resident
        assert loaded == len(sessions), (loaded, resident)
        assert token_records == len(sessions) * turns
    finally:
        remove_app(app_args, "dnc-routing-test")
