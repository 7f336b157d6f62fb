"""Session defects of round 4 (session 19) on the real Serve app: real local Ray, real HTTP through
Serve's proxy, the real Generator and session shard on real files.

* a stream closed by its client after its first token events: nothing of the turn is saved, and the
  client's next turn is answered at once. Before the fix of the lease give-back (Ray cancelled it
  with the request: tests/test_session_defects4.py, test_session_defects4_ray.py) the next turn
  waited ``lease_ttl_s`` (10 s) in some rounds (1 in 3 test runs failed here);
* guards: a stream, or a whole request, whose client gave up while its turn waited for the session
  (another request held it) is neither decoded for nobody nor saved; the session is free at once;
  a session deleted while its turn streams stays deleted, live and after its shard restarts.

One app for the module on the shared Serve port (conftest.SERVE_MODULES: the Serve group).
"""

from __future__ import annotations

import asyncio
import os
import time

import httpx
import pytest

from conftest import serve_app

pytestmark = pytest.mark.ray

PORT = int(os.environ.get("DNC_SERVE_TEST_PORT", "8123"))
OWNER = "alice"


@pytest.fixture(scope="module")
def app_args(tmp_path_factory):
    return {"storage": str(tmp_path_factory.mktemp("defects4-storage")), "manager_interval_s": 0,
            "auto_compact": False, "bank_shards": 1, "live_interval_s": 5.0, "max_new_tokens": 2048,
            "namespace": "dnc-defects4-test"}


@pytest.fixture(scope="module")
def server(ray_cluster, app_args):
    yield from serve_app(app_args, PORT, "dnc-defects4-test")


@pytest.fixture(scope="module")
def bank(server, app_args):
    """A client of the app's own session shards (this test process is a driver of the same cluster)."""
    from serve.app import AppArgs
    from serve.sessions import BankClient

    return BankClient(AppArgs(**app_args).bank_config())


def _turn(sid: str, tag: str, n: int, **kw) -> dict:
    return {"prompt": f"{tag}: what this turn said. ", "state_id": sid, "max_new_tokens": n, "seed": 1,
            "owner": OWNER, **kw}


def _history(client, sid: str) -> list[str]:
    """The prompts of the session's generate turns, in seq order (the tag before the colon)."""
    r = client.get(f"/v1/state/{sid}", params={"owner": OWNER})
    assert r.status_code == 200, r.text
    return [h["prompt_preview"].split(":")[0] for h in r.json()["history"] if h["kind"] == "generate"]


def _next_turn_s(client, sid: str, tag: str) -> tuple[float, dict]:
    t = time.perf_counter()
    r = client.post("/v1/generate", json=_turn(sid, tag, 3))
    assert r.status_code == 200, r.text
    return time.perf_counter() - t, r.json()


def _gives_up(body: dict, timeout_s: float) -> None:
    """POST /v1/generate with a client that gives up after ``timeout_s`` (its socket closed)."""
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"http://127.0.0.1:{PORT}/v1/generate", json=body, timeout=timeout_s)


def test_a_stream_given_up_before_its_first_event_is_not_decoded_for_nobody(client, bank):
    """Guard. The stream's first event is awaited before the status line (so errors before any token
    are a proper 4xx); a client leaving meanwhile (its turn waits for the session, which another
    request holds) cancels the ingress's handler, and Serve the Generator's request with it: it must
    not decode and save the turn once the session is free (the client's retry would then come after
    it: the turn twice), and the next turn takes the session at once."""
    sid = "gave-up-stream"
    assert client.post("/v1/generate", json=_turn(sid, "t0", 3)).status_code == 200
    holder = asyncio.run(bank.call(sid, "begin_turn", OWNER, False))  # another request holds the session
    try:
        _gives_up(_turn(sid, "ghost", 64, stream=True), timeout_s=1.0)
        time.sleep(1.0)  # the cancellation reaches the Generator
    finally:
        asyncio.run(bank.call(sid, "abort_turn", holder["lease_id"]))
    took, out = _next_turn_s(client, sid, "t1")
    assert _history(client, sid) == ["t0", "t1"], "the given-up stream was saved"
    assert out["state"]["seq"] == 2
    assert took < 5.0, took


def test_a_whole_request_timed_out_by_its_client_is_not_saved(client, bank):
    """Guard. The same for a plain (not streamed) turn: Serve cancels the Generator's request the
    ingress awaits, and the turn waiting for its session gives the lease back when it gets it."""
    sid = "gave-up-whole"
    assert client.post("/v1/generate", json=_turn(sid, "t0", 3)).status_code == 200
    holder = asyncio.run(bank.call(sid, "begin_turn", OWNER, False))
    try:
        _gives_up(_turn(sid, "ghost", 64), timeout_s=1.0)
        time.sleep(1.0)
    finally:
        asyncio.run(bank.call(sid, "abort_turn", holder["lease_id"]))
    _next_turn_s(client, sid, "t1")
    assert _history(client, sid) == ["t0", "t1"], "the timed-out request was saved"


def test_a_stream_closed_after_its_first_tokens_is_not_saved_and_frees_its_session(client):
    """The client reads the first token events of a long turn and closes its socket, five times on
    five sessions: each turn is cancelled between decode steps, nothing of it is saved (never half
    a turn), its lease is given back, and the next turn is answered at once from the state before."""
    for i in range(5):
        sid = f"closed-stream-{i}"
        assert client.post("/v1/generate", json=_turn(sid, "t0", 3)).status_code == 200
        with httpx.stream("POST", f"http://127.0.0.1:{PORT}/v1/generate", timeout=60,
                          json=_turn(sid, "cut", 2000, stream=True, temperature=0.0)) as r:
            assert r.status_code == 200
            got, done = 0, False
            for line in r.iter_lines():
                got += line.startswith("data:")
                done = done or '"type": "done"' in line
                if got >= 1 + i % 3 or done:
                    break  # the socket closes with the block
        took, out = _next_turn_s(client, sid, "t1")
        # a turn that ended (an end-of-text token) before the client left is saved whole, as answered
        assert _history(client, sid) == (["t0", "cut", "t1"] if done else ["t0", "t1"])
        assert out["state"]["seq"] == (3 if done else 2)
        assert took < 5.0, (i, took)  # before the fix: lease_ttl_s (10 s) in some rounds


def test_a_session_deleted_while_its_turn_streams_stays_deleted(client, app_args):
    """Guard. DELETE while a turn of the session is decoding: the delete answers at once, the turn
    ends with an in-band 404 naming the session (its save is refused: nothing of it is kept), and
    the session does not come back, live or after its shard restarts (a real actor restart: the
    shard replays its WAL)."""
    import ray

    from serve.app import AppArgs

    sid = "deleted-midway"
    assert client.post("/v1/generate", json=_turn(sid, "t0", 3)).status_code == 200
    events = []
    with httpx.stream("POST", f"http://127.0.0.1:{PORT}/v1/generate", timeout=60,
                      json=_turn(sid, "doomed", 400, stream=True, temperature=0.0)) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data:"):
                events.append(line)
                break
        d = client.delete(f"/v1/state/{sid}", params={"owner": OWNER})
        assert d.status_code == 200 and d.json()["deleted"], d.text
        events += [line for line in lines if line.startswith("data:")]
    last = events[-1]
    if '"type": "done"' not in last:  # (a turn that ended before the delete was saved, then deleted)
        assert '"type": "error"' in last and '"status": 404' in last and "state_not_found" in last, last
    for _ in range(2):
        assert client.get(f"/v1/state/{sid}", params={"owner": OWNER}).status_code == 404
        r = client.post("/v1/generate", json=_turn(sid, "again", 3, create_state=False))
        assert r.status_code == 404 and r.json()["error"]["param"] == "state_id", r.text
        assert sid not in [s["state_id"] for s in client.get("/v1/states", params={"owner": OWNER}).json()["states"]]
        cfg = AppArgs(**app_args).bank_config()
        ray.kill(ray.get_actor(cfg.actor_name(0), namespace=cfg.namespace), no_restart=False)
        time.sleep(1.0)  # Ray restarts it; it recovers from its files
