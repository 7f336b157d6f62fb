"""Session defects (session 15 audit) through real HTTP against the real Serve app on a real local
Ray cluster: clients that leave before or during a session turn. A turn is saved only when its
client can be told (the response, or the stream's ``done`` event); one whose client left is not
saved, so the client's retry does not apply it twice and the next turn sees what the client saw.
Port: ``DNC_SERVE_TEST_PORT`` (default 8560)."""

from __future__ import annotations

import concurrent.futures as cf
import os
import time

import httpx
import pytest
from conftest import serve_app

pytestmark = pytest.mark.ray

PORT = int(os.environ.get("DNC_SERVE_TEST_PORT", "8560"))
LONG = 4096  # tokens (the most a server allows): seconds of the tiny model on a CPU, so the turn is surely in flight


@pytest.fixture(scope="module")
def app_args(tmp_path_factory):
    return {"storage": str(tmp_path_factory.mktemp("defects-storage")), "manager_interval_s": 0.5,
            "auto_compact": False, "max_new_tokens": LONG, "bank_shards": 1}


@pytest.fixture(scope="module")
def server(ray_cluster, app_args):
    yield from serve_app(app_args, PORT, "dnc-defects")


def _body(sid, n, **kw):
    # greedy: the tiny untrained model then repeats a token and never ends a long turn early (its
    # end-of-text token comes about once in 260 sampled ones)
    return {"prompt": "Hello there. ", "max_new_tokens": n, "state_id": sid, "temperature": 0.0, **kw}


def _seq(client, sid) -> int:
    r = client.get(f"/v1/state/{sid}")
    assert r.status_code == 200, r.text
    return r.json()["seq"]


def _wait_idle(client, sid, timeout_s=60.0):
    """Until a turn on ``sid`` can begin at once (no lease held), so what was saved is settled."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = client.post("/v1/generate", json=_body(sid, 1))
        if r.status_code == 200:
            return r.json()["state"]["seq"]
        time.sleep(0.5)
    raise AssertionError(f"{sid} stayed busy")


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_that_left_while_waiting_for_its_session_saves_nothing(client, stream):
    """Turn A holds the session; request B for it waits for the lease, and B's client gives up (its
    timeout) before B's turn began. After A, B's turn must not run and be saved behind the client's
    back."""
    sid = f"left-waiting-{int(stream)}"
    assert client.post("/v1/generate", json=_body(sid, 2)).status_code == 200
    with cf.ThreadPoolExecutor(1) as pool:
        a = pool.submit(client.post, "/v1/generate", json=_body(sid, LONG))
        time.sleep(1.5)  # A has the lease and decodes
        with httpx.Client(base_url=client.base_url, timeout=1.0) as impatient:
            try:
                if stream:
                    with impatient.stream("POST", "/v1/generate", json=_body(sid, 4, stream=True)) as r:
                        got = (r.status_code, r.read()[:300])
                else:
                    r = impatient.post("/v1/generate", json=_body(sid, 4))
                    got = (r.status_code, r.text[:300])
            except httpx.TimeoutException:
                got = None
        assert got is None, (got, a.done() and a.result().text[:300])
        ra = a.result()
    assert ra.status_code == 200, ra.text
    assert ra.json()["state"]["seq"] == 2
    time.sleep(3.0)  # B would have had the lease and its few tokens by now
    assert _seq(client, sid) == 2
    assert _wait_idle(client, sid) == 3


def test_a_client_that_leaves_mid_stream_is_not_saved(client):
    """A streamed session turn whose client disconnects after the first tokens is rolled back: the
    client never got ``done``, and its next turn must not build on text it never saw."""
    sid = "left-mid-stream"
    assert client.post("/v1/generate", json=_body(sid, 2)).status_code == 200
    with httpx.Client(base_url=client.base_url, timeout=60) as c:
        with c.stream("POST", "/v1/generate", json=_body(sid, LONG, stream=True)) as r:
            assert r.status_code == 200
            next(r.iter_bytes())  # the first tokens, then the client goes away
    time.sleep(2.0)
    assert _wait_idle(client, sid) == 2  # the left turn was never saved; this one is seq 2
