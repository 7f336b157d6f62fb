"""``dnc serve --proxy haproxy`` as a user runs it (a real process, its own local Ray cluster, real
HTTP): HAProxy, not Ray's Python proxy, takes the port (its stats count our requests), and through
it API keys and owners hold, 4xx errors keep their messages, SSE streams token by token,
WebSockets authenticate, the UI loads; the Ingress replica's own HTTP port (which HAProxy forwards
to) stays on loopback and asks for a key too. SIGTERM stops it all.

The rest of the serve tests run behind HAProxy with ``--serve-proxy haproxy`` (tests/conftest.py).
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PORT = int(os.environ.get("DNC_SERVE_TEST_PORT", "8128"))
BASE = f"http://127.0.0.1:{PORT}"
ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def haproxy_server(tmp_path_factory):
    """``dnc serve --proxy haproxy`` with keys for alice and bob; yields (HAProxy's stats port, the
    folder of the HAProxy config Ray writes). Its fixed default ports (stats 8404, exporter 9101,
    fallback proxy 8500/9500) are moved to free ones, so it can run beside another cluster."""
    import httpx

    tmp = tmp_path_factory.mktemp("haproxy")
    stats = free_port()
    env = {**os.environ, "DNC_API_KEYS": f"alice:{ALICE},bob:{BOB}", "WANDB_MODE": "offline",
           "RAY_SERVE_HAPROXY_STATS_PORT": str(stats), "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
           "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
           "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port()),
           "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(tmp / "haproxy" / "haproxy.cfg")}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "ray_jobs.cli", "serve", "--proxy", "haproxy", "--port", str(PORT),
                             "--storage", str(tmp / "storage")], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, (tmp / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"{BASE}/health", timeout=10).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp / "serve.log").read_text()[-3000:]
            time.sleep(1)
        yield stats, tmp / "haproxy"
    finally:
        proc.send_signal(signal.SIGTERM)  # the driver tears Serve and its local cluster down
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()


def haproxy_stats(stats_port: int) -> list[dict[str, str]]:
    """HAProxy's own counters (its stats page as CSV): one row per frontend, backend and server."""
    import httpx

    text = httpx.get(f"http://127.0.0.1:{stats_port}/stats;csv", timeout=10).text
    return list(csv.DictReader(io.StringIO(text.lstrip("# "))))


def frontend_requests(stats_port: int) -> int:
    rows = [r for r in haproxy_stats(stats_port) if r["svname"] == "FRONTEND" and r["pxname"] == "http_frontend"]
    assert rows, "HAProxy has no http_frontend"
    return int(rows[0]["req_tot"] or 0)


@pytest.mark.ray
def test_haproxy_takes_the_port_and_streams_tokens(haproxy_server):
    import httpx

    before = frontend_requests(haproxy_server[0])
    body = {"prompt": "The quick brown fox", "max_new_tokens": 8, "temperature": 0.0, "stream": True}
    events = []
    with httpx.Client(base_url=BASE, timeout=120, headers={"Authorization": f"Bearer {ALICE}"}) as c:
        with c.stream("POST", "/v1/generate", json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
        whole = c.post("/v1/generate", json={**body, "stream": False}).json()
    tokens = [e for e in events if e["type"] == "token"]
    assert [e["index"] for e in tokens] == list(range(len(tokens))) and len(tokens) >= 1
    assert events[-1]["type"] == "done" and events[-1]["tokens"] == len(tokens) == whole["tokens"]
    assert "".join(e["token"] for e in tokens) == whole["text"]  # greedy: the same answer either way
    assert frontend_requests(haproxy_server[0]) >= before + 2  # both went through HAProxy


@pytest.mark.ray
def test_keys_owners_and_errors_hold_behind_haproxy(haproxy_server):
    import httpx

    with httpx.Client(base_url=BASE, timeout=120) as c:
        r = c.get("/v1/states")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert c.get("/v1/states", headers={"Authorization": "Bearer wrong-key-0123456789"}).status_code == 401
        alice, bob = ({"Authorization": f"Bearer {k}"} for k in (ALICE, BOB))
        r = c.post("/v1/generate", headers=alice, json={"prompt": "hi", "max_new_tokens": 2, "state_id": "hap-alice"})
        assert r.status_code == 200, r.text
        assert c.get("/v1/state/hap-alice", headers=alice).status_code == 200
        assert c.get("/v1/state/hap-alice", headers=bob).status_code == 404  # not bob's
        # an owner claimed by header does not beat the key
        assert c.get("/v1/state/hap-alice", headers={**bob, "X-Owner": "alice"}).status_code in (403, 404)
        r = c.post("/v1/generate", headers=alice, json={"prompt": "hi", "max_new_tokens": 0})
        assert r.status_code == 422 and "max_new_tokens" in r.json()["error"]["message"]
        ui = c.get("/ui/")
        assert ui.status_code == 200 and ui.headers["content-type"].startswith("text/html")


@pytest.mark.ray
def test_websockets_authenticate_behind_haproxy(haproxy_server):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    ws_base = BASE.replace("http", "ws")
    with connect(f"{ws_base}/ws/live", additional_headers={"Authorization": f"Bearer {ALICE}"}) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "hello"
    with connect(f"{ws_base}/ws/research", origin=BASE) as ws:  # a browser on the server's own origin
        ws.send(json.dumps({"type": "auth", "key": BOB}))
        assert json.loads(ws.recv(timeout=10)) == {"type": "auth", "ok": True, "owner": "bob"}
        ws.send(json.dumps({"id": 1, "endpoint": "information-flow", "params": {"text": "hello there"}}))
        assert json.loads(ws.recv(timeout=60))["ok"]
    with connect(f"{ws_base}/ws/live", origin="http://evil.example",
                 additional_headers={"Authorization": f"Bearer {ALICE}"}) as ws:
        with pytest.raises(ConnectionClosed) as e:
            ws.recv(timeout=10)
    assert e.value.rcvd.code == 4403


@pytest.mark.ray
def test_the_ingress_replicas_own_port_is_loopback_and_keyed(haproxy_server):
    """HAProxy forwards to the Ingress replica's own HTTP server; that port must not be a way
    around the keys, nor open beyond loopback when the server is loopback-only."""
    import re

    import httpx

    configs = list(haproxy_server[1].rglob("haproxy.cfg"))  # Ray writes one per node, in a folder per node
    assert len(configs) == 1, configs
    direct = re.findall(r"^\s*server (SERVE_REPLICA\S*) (\S+:\d+)", configs[0].read_text(), re.M)
    assert direct, configs[0].read_text()
    direct = [addr for _name, addr in direct]
    for addr in direct:
        host, port = addr.rsplit(":", 1)
        assert host == "127.0.0.1", addr
        r = httpx.get(f"http://{addr}/v1/states", timeout=30)
        assert r.status_code == 401, (addr, r.status_code)


def test_the_proxy_environment_is_explicit_and_validated():
    from serve.app import AppArgs
    from serve.proxy_mode import ProxyModeError, proxy_env

    assert proxy_env("haproxy") == {"RAY_SERVE_ENABLE_HA_PROXY": "1"}
    assert proxy_env("python") == {"RAY_SERVE_ENABLE_HA_PROXY": "0"}  # a stray export cannot turn it on
    assert proxy_env(None) == {}  # null: the environment as it is decides
    # Ray's throughput bundle turns direct ingress on; the python mode keeps its proxy on the port
    assert proxy_env("python", True) == {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
                                         "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
    with pytest.raises(ProxyModeError, match="python, haproxy"):
        proxy_env("nginx")
    assert AppArgs(proxy="null").proxy is None and AppArgs(proxy="haproxy").proxy == "haproxy"
    with pytest.raises(ValueError, match="proxy"):
        AppArgs(proxy="nginx")


def test_serve_load_alternates_the_proxies_and_compares_medians():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from serve_load import proxy_schedule, proxy_set
    from serve_load_report import proxy_comparison, proxy_summary

    assert proxy_schedule(None, 3) == [None]
    assert proxy_schedule(["python", "haproxy"], 3) == ["python", "haproxy", "haproxy", "python", "python", "haproxy"]
    assert proxy_set("haproxy+throughput") == ["proxy=haproxy", "ray_throughput_optimized=true"]

    def row(tps, cpu):
        return {"mode": "stream", "clients": 32, "ok": 10, "errors": {}, "tokens_per_s": tps, "latency_ms_p50": 5.0,
                "ttft_ms_p50": 1.0, "cpu": {"ms_per_request": cpu}}
    rounds = [{"proxy": "python", "round": 1, "rows": [row(100.0, {"proxy": 7.0, "ingress": 3.0})], "paired": None},
              {"proxy": "haproxy", "round": 2, "rows": [row(300.0, {"proxy": 0.5, "haproxy": 0.25})], "paired": None},
              {"proxy": "haproxy", "round": 3, "rows": [row(100.0, {"proxy": 0.5, "haproxy": 0.75})], "paired": None},
              {"proxy": "python", "round": 4, "rows": [row(50.0, {"proxy": 9.0, "ingress": 3.0})], "paired": None}]
    by = {s["proxy"]: s for s in proxy_summary(rounds)}
    assert by["python"]["tokens_per_s"] == 75.0 and by["haproxy"]["tokens_per_s"] == 200.0  # medians of 2
    assert by["haproxy"]["tokens_per_s_vs_base"] == pytest.approx(200 / 75) and by["python"]["n"] == 2
    assert by["haproxy"]["front_cpu_ms_per_request"] == 1.0 and by["python"]["cpu_ms_per_request"] == 11.0
    table = proxy_comparison(rounds)
    assert "order python haproxy haproxy python" in table and "| haproxy | stream | 32 | 2 (20 req, 0 err) |" in table
