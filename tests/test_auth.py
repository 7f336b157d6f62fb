"""API keys: parsing, the bind rule, and the real Serve app with keys on (401s, the key decides the
owner, WebSocket authentication, origins, strict types, the temperature floor, no key in any log).

The isolation matrix and quotas across every endpoint are in tests/test_abuse.py.
"""

from __future__ import annotations

import concurrent.futures as cf
import glob
import json
import logging
import os
import time

import httpx
import pytest
import yaml

from serve.auth import (Caller, KeyConfigError, KeyRing, RedactKeys, check_bind, is_loopback, load_key_ring,
                        parse_keys)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PORT = int(os.environ.get("DNC_SERVE_TEST_PORT", "8123"))
BASE = f"http://127.0.0.1:{PORT}"
ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-0123456789abcdefgh"


# ------------------------------------------------------------------------------ without Ray
def test_parse_keys_and_key_ring(tmp_path):
    assert parse_keys(f"alice:{ALICE}, bob:{BOB}\n# a comment\n") == {ALICE: "alice", BOB: "bob"}
    for bad, needle in [("alice", "owner:key"), ("al ice:" + ALICE, "owner must match"),
                        ("alice:short", "at least 16"), (f"alice:{ALICE},bob:{ALICE}", "two owners")]:
        with pytest.raises(KeyConfigError, match=needle) as e:
            parse_keys(bad)
        assert ALICE not in str(e.value)  # a config error never echoes a key
    f = tmp_path / "keys"
    f.write_text(f"bob:{BOB}\n")
    ring = load_key_ring(str(f), env={"DNC_API_KEYS": f"alice:{ALICE}"})
    assert ring.enabled and ring.owners == ["alice", "bob"]
    assert ring.owner_for(ALICE) == "alice" and ring.owner_for(BOB) == "bob"
    assert ring.owner_for("x" * 30) is None and ring.owner_for(None) is None
    assert ALICE not in repr(ring) and BOB not in repr(ring)  # digests only
    with pytest.raises(KeyConfigError, match="does not exist"):
        load_key_ring(str(tmp_path / "missing"), env={})
    assert not load_key_ring(None, env={}).enabled


def test_bind_rule_and_owner_rule():
    off, on = KeyRing(), KeyRing.from_pairs({ALICE: "alice"})
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    assert "API keys off" in check_bind("127.0.0.1", off)
    for host in ("0.0.0.0", "10.1.2.3", "::"):
        with pytest.raises(KeyConfigError, match="refusing to serve on") as e:
            check_bind(host, off)
        assert "\n" not in str(e.value)
    assert "API keys on" in check_bind("0.0.0.0", on)
    # with a key the claimed owner does not count; without keys X-Owner wins over the body
    assert Caller(key_owner="alice", header_owner="bob").owner("carol") == "alice"
    assert Caller(header_owner="bob").owner("carol") == "bob" and Caller().owner("carol") == "carol"
    assert Caller().owner() == "anonymous"


def test_build_app_refuses_beyond_loopback_without_keys(monkeypatch, tmp_path):
    from conftest import serve_off
    from serve.app import build_app

    serve_off()  # build_app checks the host of a running Serve instead (serve.auth.serve_http_host)
    monkeypatch.delenv("DNC_API_KEYS", raising=False)
    with pytest.raises(KeyConfigError, match="refusing to serve on 0.0.0.0 without API keys") as e:
        build_app({"http_host": "0.0.0.0", "storage": str(tmp_path)})
    assert "\n" not in str(e.value)
    with pytest.raises(KeyConfigError, match="at least 16"):  # a weak key fails fast, in one line too
        monkeypatch.setenv("DNC_API_KEYS", "alice:short")
        build_app({"storage": str(tmp_path)})


def test_config_yaml_never_binds_beyond_loopback_without_keys():
    cfg = yaml.safe_load(open(os.path.join(ROOT, "serve", "config.yaml")))
    host = cfg["http_options"]["host"]
    args = cfg["applications"][0]["args"]
    assert is_loopback(host) or args.get("api_keys_file"), host


def test_log_redaction_filter():
    rec = logging.LogRecord("x", logging.INFO, __file__, 1, "headers %s", ({"authorization": f"Bearer {ALICE}"},), None)
    RedactKeys().filter(rec)
    assert ALICE not in rec.getMessage() and "Bearer ***" in rec.getMessage()
    rec = logging.LogRecord("x", logging.INFO, __file__, 1, '{"type": "auth", "key": "%s"}' % BOB, None, None)
    RedactKeys().filter(rec)
    assert BOB not in rec.getMessage()


# ------------------------------------------------------------------------------ the real app
@pytest.fixture(scope="module")
def keyed_server(ray_cluster, tmp_path_factory):
    from conftest import serve_app

    tmp = tmp_path_factory.mktemp("auth")
    (tmp / "keys").write_text(f"alice:{ALICE}\nbob:{BOB}\n")
    args = {"storage": str(tmp / "storage"), "api_keys_file": str(tmp / "keys"), "max_new_tokens": 16,
            "bank_shards": 1, "live_interval_s": 0.5, "allowed_origins": ["http://allowed.example"],
            "namespace": "bwr-dnc-auth-test"}
    yield from serve_app(args, PORT, "dnc-auth")


def _c(key: str | None = None, **headers) -> httpx.Client:
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.Client(base_url=BASE, headers=headers, timeout=60)


@pytest.mark.ray
def test_keys_required_and_the_key_decides_the_owner(keyed_server):
    anon = _c()
    r = anon.post("/v1/generate", json={"prompt": "hi", "max_new_tokens": 2})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["type"] == "authentication_error" and "Bearer" in r.json()["error"]["message"]
    assert _c("not-a-key-but-long-enough").get("/v1/states").status_code == 401
    assert anon.get("/health").status_code == 200 and anon.get("/").json()["auth"] == "bearer"
    assert anon.get("/openapi.json").status_code == 200
    # alice's key, claiming to be bob every way there is: the session is alice's
    a = _c(ALICE, **{"X-Owner": "bob"})
    r = a.post("/v1/generate", json={"prompt": "mine", "max_new_tokens": 2, "state_id": "auth-a", "owner": "bob"})
    assert r.status_code == 200, r.text
    assert r.json()["state"]["owner"] == "alice"
    r = a.post("/v1/completions", json={"prompt": "mine", "max_tokens": 2, "state_id": "auth-a", "user": "bob"})
    assert r.status_code == 200, r.text
    b = _c(BOB)
    assert "auth-a" not in [s["state_id"] for s in b.get("/v1/states").json()["states"]]
    assert b.get("/v1/state/auth-a").status_code == 404
    assert [s["state_id"] for s in a.get("/v1/states").json()["states"]] == ["auth-a"]
    # the OpenAI client sends its api_key as a Bearer token
    import openai

    oa = openai.OpenAI(base_url=f"{BASE}/v1", api_key=BOB, max_retries=0, timeout=60)
    assert oa.models.list().data[0].id == "bwr-dnc"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{BASE}/v1", api_key="wrong-key-0123456789", max_retries=0).models.list()


@pytest.mark.ray
def test_websockets_authenticate(keyed_server):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    ws_base = BASE.replace("http", "ws")
    with connect(f"{ws_base}/ws/live", additional_headers={"Authorization": f"Bearer {ALICE}"}) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "hello"
    with connect(f"{ws_base}/ws/research") as ws:  # browsers: the key in the first message
        ws.send(json.dumps({"type": "auth", "key": BOB}))
        assert json.loads(ws.recv(timeout=10)) == {"type": "auth", "ok": True, "owner": "bob"}
        ws.send(json.dumps({"id": 1, "endpoint": "information-flow", "params": {"text": "hello there"}}))
        assert json.loads(ws.recv(timeout=60))["ok"]
    t0 = time.monotonic()
    with connect(f"{ws_base}/ws/live") as ws:  # says nothing: closed after the auth window
        with pytest.raises(ConnectionClosed) as e:
            ws.recv(timeout=15)
    assert e.value.rcvd.code == 4401 and 4 < time.monotonic() - t0 < 12
    with connect(f"{ws_base}/ws/live", additional_headers={"Authorization": "Bearer wrong-key-0123456789"}) as ws:
        with pytest.raises(ConnectionClosed) as e:
            ws.recv(timeout=10)
    assert e.value.rcvd.code == 4401
    # origins: the listed one and the server's own pass, others are closed with 4403
    for origin, ok in (("http://allowed.example", True), (BASE, True), ("http://evil.example", False)):
        with connect(f"{ws_base}/ws/live", origin=origin,
                     additional_headers={"Authorization": f"Bearer {ALICE}"}) as ws:
            if ok:
                assert json.loads(ws.recv(timeout=10))["type"] == "hello"
            else:
                with pytest.raises(ConnectionClosed) as e:
                    ws.recv(timeout=10)
                assert e.value.rcvd.code == 4403
    pre = httpx.options(f"{BASE}/v1/generate", headers={"Origin": "http://allowed.example",
                                                        "Access-Control-Request-Method": "POST"})
    assert pre.headers.get("access-control-allow-origin") == "http://allowed.example"
    pre = httpx.options(f"{BASE}/v1/generate", headers={"Origin": "http://evil.example",
                                                        "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in pre.headers


@pytest.mark.ray
def test_strict_types_and_422_items_carry_type(keyed_server):
    a = _c(ALICE)
    for body, param in [({"prompt": "x", "max_new_tokens": "4"}, "max_new_tokens"),
                        ({"prompt": "x", "max_new_tokens": True}, "max_new_tokens"),
                        ({"prompt": "x", "stream": "yes"}, "stream"),
                        ({"prompt": 5}, "prompt")]:
        r = a.post("/v1/generate", json=body)
        assert r.status_code == 422, (body, r.text)
        detail = r.json()["detail"]
        assert detail and all(set(d) == {"loc", "msg", "type"} for d in detail), detail
        assert param in r.json()["error"]["message"]
    r = a.post("/v1/completions", json={"prompt": "x", "max_tokens": "4"})
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "int_type"
    r = a.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "stream": "yes"})
    assert r.status_code == 422


@pytest.mark.ray
def test_tiny_temperature_is_greedy_and_harms_no_batchmate(keyed_server):
    a = _c(ALICE)
    body = {"prompt": "Hello there. ", "max_new_tokens": 8, "seed": 1}
    greedy = a.post("/v1/generate", json={**body, "temperature": 0.0}).json()["token_ids"]
    temps = [1e-40, 1e-30, 5e-3, 0.0, 0.7, 1.0, 1e-40, 0.9]
    with cf.ThreadPoolExecutor(len(temps)) as ex:  # one batch: the tiny ones must not fail the rest
        rs = list(ex.map(lambda t: a.post("/v1/generate", json={**body, "temperature": t}), temps))
    assert [r.status_code for r in rs] == [200] * len(temps), [r.text for r in rs if r.status_code != 200]
    for t, r in zip(temps, rs):
        if t < 1e-2:
            assert r.json()["token_ids"] == greedy, t
    r = a.post("/v1/completions", json={"prompt": "Hello there. ", "max_tokens": 8, "temperature": 1e-40})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8


def _serve_logs(session_dir: str, pattern: str = "*") -> dict[str, bytes]:
    paths = glob.glob(os.path.join(session_dir, "logs", "serve", pattern))
    return {p: open(p, "rb").read() for p in paths if os.path.isfile(p)}


@pytest.mark.ray
def test_logs_one_line_per_request_no_polling_no_disconnect_errors(keyed_server, ray_cluster):
    from websockets.sync.client import connect

    session_dir = ray_cluster._private.worker._global_node.get_session_dir_path()

    def ingress_log() -> bytes:
        return b"".join(d for p, d in _serve_logs(session_dir).items() if "dnc-auth_Ingress" in p)

    errors_before = sum(d.count(b"GeneratorExit") + d.count(b"ERROR") for d in _serve_logs(session_dir).values())
    lines_before = ingress_log().count(b"POST /v1/generate 200")
    polls_before = sum(d.count(b"GET /health") + d.count(b"GET /model/stats") for d in _serve_logs(session_dir).values())
    a = _c(ALICE)
    for _ in range(5):  # what the UI polls every 2 s
        assert a.get("/health").status_code == 200 and a.get("/model/stats").status_code == 200
    assert a.post("/v1/generate", json={"prompt": "log me", "max_new_tokens": 2}).status_code == 200
    time.sleep(1.5)
    assert ingress_log().count(b"POST /v1/generate 200") == lines_before + 1  # one line, from the ingress
    for path in ("/ws/live", "/ws/research"):  # clients that vanish mid-conversation
        ws = connect(BASE.replace("http", "ws") + path, additional_headers={"Authorization": f"Bearer {ALICE}"})
        if path == "/ws/research":
            ws.send(json.dumps({"id": 1, "endpoint": "gradient-analysis", "params": {"text": "hello there " * 40}}))
        else:
            ws.recv(timeout=10)
        time.sleep(0.3)
        ws.socket.close()  # no close frame
    with httpx.stream("POST", f"{BASE}/v1/generate", headers={"Authorization": f"Bearer {ALICE}"},
                      json={"prompt": "bye", "max_new_tokens": 16, "stream": True}) as r:
        next(r.iter_lines())  # leave mid-stream
    time.sleep(3.0)
    logs = _serve_logs(session_dir)
    everything = b"".join(logs.values())
    polls_after = sum(d.count(b"GET /health") + d.count(b"GET /model/stats") for d in logs.values())
    assert polls_after == polls_before  # polling is quiet (proxies and ingress alike)
    errors_after = sum(d.count(b"GeneratorExit") + d.count(b"ERROR") for d in logs.values())
    assert errors_after == errors_before, [line for line in everything.splitlines()
                                           if b"ERROR" in line or b"GeneratorExit" in line][-5:]


@pytest.mark.ray
def test_keys_never_reach_the_logs(keyed_server, ray_cluster, capfd):
    """After every test above: no key in any Ray log file (replicas, proxies, controller, workers)
    nor in this process' output."""
    from websockets.sync.client import connect

    # a few more requests that carry keys in the places a logger might look
    _c(ALICE).get("/v1/state/does-not-exist")
    _c("wrong-key-0123456789-abcdef").get("/v1/states")
    httpx.get(f"{BASE}/v1/states", headers={"Authorization": f"Bearer {BOB}", "X-Owner": "alice"})
    with connect(BASE.replace("http", "ws") + "/ws/live") as ws:
        ws.send(json.dumps({"type": "auth", "key": "wrong-key-0123456789-abcdef"}))
        time.sleep(0.5)
    time.sleep(2.0)  # let log files flush
    session_dir = ray_cluster._private.worker._global_node.get_session_dir_path()
    files = [f for f in glob.glob(os.path.join(session_dir, "logs", "**", "*"), recursive=True) if os.path.isfile(f)]
    assert files, session_dir
    access_lines = 0
    for path in files:
        data = open(path, "rb").read()
        for key in (ALICE, BOB, "wrong-key-0123456789-abcdef"):
            assert key.encode() not in data, f"{key[:5]}... found in {path}"
        access_lines += data.count(b"serve.access") + data.count(b"GET /v1/states")
    assert access_lines > 0, "the access log should have been written somewhere"
    out, err = capfd.readouterr()
    assert ALICE not in out + err and BOB not in out + err
